"""Rendering the chart offline, the way `helm template` would, and reading what it renders.

helm_python (PyPI `helm-python-sdk`) binds Helm's Go SDK: no helm binary, no cluster. Its public
`Chart.render` takes no `--api-versions`, so `render` below calls the same native entry point with
`api_versions` added when the Prometheus Operator API should look present (pinned to 0.2.2).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "x402-gateway"
CI_DIR = CHART_DIR / "ci"
RELEASE = "pay"
NAMESPACE = "x402"
MONITORING_API = "monitoring.coreos.com/v1"


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_DIR / f"{name}-values.yaml").read_text())


def render(chart: Any, values: Mapping[str, Any], *, monitoring: bool = False,
           kube_version: str | None = None) -> dict[str, str]:
    """{template path: rendered text}; raises HelmValuesError (schema) or HelmRenderError (fail)."""
    from helm_python import _native

    opts: dict[str, Any] = {"name": RELEASE, "namespace": NAMESPACE}
    if monitoring:
        opts["api_versions"] = [MONITORING_API]
    if kube_version:
        opts["kube_version"] = kube_version
    out = _native.call_string("helm_render", chart._raw(), json.dumps(dict(values)), json.dumps(opts))
    return json.loads(out)


def manifests(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object rendered (NOTES.txt and empty documents left out)."""
    objs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                objs.append(doc)
    return objs


def notes(rendered: Mapping[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def find(objs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (
        component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def one(objs: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(objs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(object, pod spec) of every workload and bare pod."""
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o, o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield o, o["spec"]


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(container: dict, secret: Callable[[str, str, str], str]) -> dict[str, str]:
    """The environment the kubelet would give this container: secretKeyRef values from
    `secret(variable, secret name, key)` and $(VAR) references to earlier variables expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret(item["name"], ref["name"], ref["key"])
        else:
            env[item["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), item.get("value", ""))
    return env


def materialize_config(objs: list[dict], pod: dict, container: dict, into: Path) -> dict[str, Path]:
    """Write the ConfigMap files a container mounts under `into`; {path in the pod: local path}."""
    configmaps = {o["metadata"]["name"]: o for o in find(objs, "ConfigMap")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        sources = []
        if "configMap" in volume:
            sources = [volume["configMap"]]
        elif "projected" in volume:
            sources = [s["configMap"] for s in volume["projected"]["sources"] if "configMap" in s]
        for source in sources:
            data = configmaps[source["name"]]["data"]
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                local = into / mount["name"] / item["path"]
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(data[item["key"]])
                files[os.path.join(mount["mountPath"], item["path"])] = local
    return files
