"""The Helm chart in deploy/helm/x402-gateway, rendered offline for every ci/*-values.yaml: valid
Kubernetes (kubernetes-validate --strict), secure by default, secrets only in Secrets, network
policies that isolate the facilitator and Redis, and config files the services' own loaders accept.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python", reason="needs the test dependency helm-python-sdk")
yaml = pytest.importorskip("yaml", reason="needs PyYAML")

from storage import is_redis_url  # noqa: E402
from tests.helm.chart import (  # noqa: E402
    CHART_DIR,
    CI_DIR,
    NAMESPACE,
    ci_values,
    container_env,
    find,
    manifests,
    materialize_config,
    notes,
    one,
    pod_specs,
    render,
)

VALUE_SETS = [
    "minimal",
    "external-redis-cluster",
    "bundled-redis",
    "facilitator-disabled",
    "ingress-tls",
    "autoscaling",
    "external-facilitator",
    "gpu-workers",
    "upto-sessions",
    "tee",
]
KUBE_VERSIONS = ["1.33.0", "1.27.0"]  # a recent one, and the chart's kubeVersion floor
SIGNER_KEYS = [  # 32-byte test keys (anvil's published development accounts); never funded on a real chain
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
]


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def wants_monitoring(values: dict) -> bool:
    return bool(values.get("metrics", {}).get("prometheusRule", {}).get("enabled"))


@pytest.fixture(scope="session")
def rendered(chart) -> dict[str, dict[str, str]]:
    """Each value set rendered as `helm template` would (with the Prometheus Operator API when the
    set enables alerts, which need it)."""
    return {name: render(chart, ci_values(name), monitoring=wants_monitoring(ci_values(name))) for name in VALUE_SETS}


@pytest.fixture(scope="session")
def objects(rendered) -> dict[str, list[dict]]:
    return {name: manifests(text) for name, text in rendered.items()}


def test_every_ci_values_file_is_tested():
    assert sorted(p.name.removesuffix("-values.yaml") for p in CI_DIR.glob("*-values.yaml")) == sorted(VALUE_SETS)


# -- valid Kubernetes -----------------------------------------------------------------------------


def test_every_manifest_validates_strictly(chart, tmp_path):
    """kubernetes-validate --strict on every object of every value set, with and without the
    Prometheus Operator API; only the operator's own kinds (no schema offline) are skipped."""
    files = []
    for name in VALUE_SETS:
        values = ci_values(name)
        for monitoring in ([True] if wants_monitoring(values) else [False, True]):
            path = tmp_path / f"{name}-{'monitoring' if monitoring else 'plain'}.yaml"
            path.write_text(yaml.safe_dump_all(manifests(render(chart, values, monitoring=monitoring))))
            files.append(str(path))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    args = [str(cli), "--strict", "--quiet"]
    for version in KUBE_VERSIONS:
        args += ["-k", version]
    result = subprocess.run(args + files, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    for line in output.splitlines():
        assert re.search(r"kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1", line), line


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint(name):
    report = helm.lint(CHART_DIR, ci_values(name), strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]]
    assert not problems and not report["errors"], report


def test_lint_without_required_values_names_them():
    report = helm.lint(CHART_DIR)
    assert any("missing properties 'payTo', 'accepts', 'upstreams', 'routes'" in e for e in report["errors"]), report


# -- secrets ----------------------------------------------------------------------------------------


def secret_values(values: dict, objs: list[dict]) -> set[str]:
    """Every secret the values carry inline, and every value of a rendered Secret."""
    found: set[str] = set()
    found.update(values.get("facilitator", {}).get("signer", {}).get("keys", []))
    for up in values.get("gateway", {}).get("upstreams", {}).values():
        if up.get("auth", {}).get("value"):
            found.add(up["auth"]["value"])
    if token := values.get("gateway", {}).get("budgets", {}).get("adminToken", {}).get("value"):
        found.add(token)
    for net in values.get("facilitator", {}).get("networks", []):
        if net.get("rpcUrl"):
            found.add(net["rpcUrl"])
    for section in ("external", "bundled"):
        redis = values.get("redis", {}).get(section, {})
        if pw := redis.get("password") or redis.get("auth", {}).get("password"):
            found.add(pw)
    for secret in find(objs, "Secret"):
        for encoded in secret.get("data", {}).values():
            found.update(v for v in base64.b64decode(encoded).decode().split(",") if v)
    return found


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_appear_only_in_secrets(name, objects):
    objs = objects[name]
    secrets = secret_values(ci_values(name), objs)
    if name == "facilitator-disabled":  # the set with every secret inline, so there is something to look for
        assert len(secrets) >= 7
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        for value in secrets:
            assert value not in text, f"a secret value appears in {obj['kind']} {obj['metadata']['name']}"


def test_inline_secrets_land_in_the_chart_secret(objects):
    secret = one(objects["facilitator-disabled"], "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    values = ci_values("facilitator-disabled")
    assert data["signer-keys"] == ",".join(values["facilitator"]["signer"]["keys"])
    assert data["admin-token"] == values["gateway"]["budgets"]["adminToken"]["value"]
    assert data["upstream-openai-auth"].startswith("Bearer sk-")
    assert data["rpc-url-84532"].startswith("https://")
    assert data["redis-password"] == "inlineRedisPassword42"


def test_no_chart_secret_when_everything_is_referenced(objects):
    assert not find(objects["external-redis-cluster"], "Secret")
    assert not find(objects["autoscaling"], "Secret")


def test_bundled_redis_password_is_generated_once_and_never_in_argv(objects):
    objs = objects["minimal"]
    secret = one(objs, "Secret")
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 32
    redis = one(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert "$REDIS_PASSWORD" in redis["args"][0] and "requirepass" in redis["args"][0]
    assert "--requirepass" not in " ".join(redis["command"] + redis["args"])


# -- pods: security, probes, shutdown, spread ------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_locked_down(name, objects):
    for obj, pod in pod_specs(objects[name]):
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert pod["automountServiceAccountToken"] is False, where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        mounts_by_volume = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert sc.get("privileged", False) is False, where
            if obj["kind"] != "Pod":
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"], where
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], f"{where}: no writable /tmp"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_services_have_probes_and_graceful_shutdown(name, objects):
    values = ci_values(name)
    for component in ("gateway", "facilitator"):
        deployments = find(objects[name], "Deployment", component)
        if not deployments:
            assert component == "facilitator" and values["facilitator"].get("enabled") is False
            continue
        pod = deployments[0]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert [p["name"] for p in c["ports"]] == ["http"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert sleep >= 5
        # after the preStop sleep: uvicorn's 60 s graceful shutdown (gateway), the receipt wait (facilitator)
        drain = 60 if component == "gateway" else 20
        assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 10


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_spread_over_nodes_and_zones(name, objects):
    for component in ("gateway", "facilitator"):
        for deployment in find(objects[name], "Deployment", component):
            pod = deployment["spec"]["template"]
            keys = {t["topologyKey"] for t in pod["spec"]["topologySpreadConstraints"]}
            assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
            for t in pod["spec"]["topologySpreadConstraints"]:
                assert t["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_selectors_are_stable_and_match(name, objects):
    objs = objects[name]
    allowed = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
    workloads = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    for w in workloads.values():
        selector = w["spec"]["selector"]["matchLabels"]
        assert set(selector) == allowed
        assert selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    for svc in find(objs, "Service"):
        matching = [w for w in workloads.values()
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in matching[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    for pdb in find(objs, "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"] == w["spec"]["selector"]["matchLabels"] for w in workloads.values())


# -- network policies --------------------------------------------------------------------------------


def _policy(objs: list[dict], component: str) -> dict:
    return one(objs, "NetworkPolicy", component)


def _selects(peer: dict, component: str) -> bool:
    return peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == component


@pytest.mark.parametrize("name", ["minimal", "bundled-redis", "external-redis-cluster", "autoscaling"])
def test_facilitator_is_reachable_only_from_the_gateway(name, objects):
    policy = _policy(objects[name], "facilitator")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "facilitator"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert len(rule["from"]) == 1 and _selects(rule["from"][0], "gateway")
    assert "namespaceSelector" not in rule["from"][0]  # the gateway pods of this namespace only
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_scrapers_are_added_to_the_facilitator_policy_when_listed(objects):
    (rule,) = _policy(objects["ingress-tls"], "facilitator")["spec"]["ingress"]
    assert _selects(rule["from"][0], "gateway")
    assert rule["from"][1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


@pytest.mark.parametrize("name", ["minimal", "bundled-redis", "facilitator-disabled", "ingress-tls"])
def test_bundled_redis_is_reachable_only_from_the_gateway_and_the_facilitator(name, objects):
    objs = objects[name]
    (rule,) = _policy(objs, "redis")["spec"]["ingress"]
    expected = {"gateway"} | ({"facilitator"} if find(objs, "Deployment", "facilitator") else set())
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in rule["from"]} == expected
    assert all(set(p) == {"podSelector"} for p in rule["from"])
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_gateway_policy_admits_the_ingress_controller_only_when_told(objects):
    (open_rule,) = _policy(objects["minimal"], "gateway")["spec"]["ingress"]
    assert "from" not in open_rule and open_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    (rule,) = _policy(objects["ingress-tls"], "gateway")["spec"]["ingress"]
    namespaces = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in rule["from"]
                  if "namespaceSelector" in p]
    assert namespaces == ["ingress-nginx", "monitoring"]
    assert any(_selects(p, "test") for p in rule["from"])  # the helm test pod


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_pod_is_under_a_policy(name, objects):
    objs = objects[name]
    policies = [p["spec"]["podSelector"]["matchLabels"] for p in find(objs, "NetworkPolicy")]
    for obj, _ in pod_specs(objs):
        if obj["kind"] == "Pod":
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in policies), obj["metadata"]["name"]


# -- the config files, loaded by the services' own loaders -------------------------------------------------


BATCH_KEY_FROM_SECRET = "0x" + "42" * 32


def _fake_secret(variable: str, secret: str, key: str, chart_secret: dict[str, str]) -> str:
    if secret.endswith("-secrets"):
        return chart_secret[key]
    if variable == "FACILITATOR_SIGNER_KEYS":
        return ",".join(SIGNER_KEYS)
    if variable.startswith("FACILITATOR_RPC_URL_"):
        return f"https://rpc.example/{variable.lower()}/api-key"
    if variable.startswith("GATEWAY_UPSTREAM_"):
        return f"Bearer sk-from-{secret}"
    if variable == "X402_REDIS_PASSWORD":
        return "s3cr3t-from-" + secret
    if variable == "GATEWAY_FACILITATOR_AUTH":
        return "Bearer facilitator-key"
    if variable.startswith("GATEWAY_TEE_") or variable == "GATEWAY_PROOFS_RPC_URL":
        return f"https://rpc-from-{secret}.example"
    if variable == "GATEWAY_PROOFS_SIGNER_KEY":
        return f"key-from-{secret}"
    if variable == "GATEWAY_BATCH_AUTHORIZER_KEY":
        return BATCH_KEY_FROM_SECRET
    raise AssertionError(f"no fake for {variable} from {secret}/{key}")


def _container_env(objs: list[dict], container: dict) -> dict[str, str]:
    chart_secret = {k: base64.b64decode(v).decode() for s in find(objs, "Secret") for k, v in s["data"].items()}
    return container_env(container, lambda var, name, key: _fake_secret(var, name, key, chart_secret))


def _config_path(container: dict) -> str:
    args = container["args"]
    return args[args.index("--config") + 1]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_gateway_config_loads_with_the_gateway_loader(name, objects, tmp_path):
    from facilitator.settings import load_settings
    from gateway.settings import load_gateway_settings

    objs = objects[name]
    values = ci_values(name)
    deployment = one(objs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["gateway", "serve"]
    files = materialize_config(objs, pod, container, tmp_path)
    env = _container_env(objs, container)
    settings = load_gateway_settings(str(files[_config_path(container)]), env=env)

    g = values["gateway"]
    assert settings.pay_to == g["payTo"]
    assert settings.host == "0.0.0.0" and settings.port == container["ports"][0]["containerPort"]
    assert [(a.network, a.asset, a.decimals, a.transfer_method) for a in settings.accepts] == [
        (a["network"], a["asset"], a["decimals"], a["transferMethod"]) for a in g["accepts"]]
    assert [(r.path, r.upstream, r.price) for r in settings.routes] == [
        (r["path"], r["upstream"], r.get("price")) for r in g["routes"]]
    for route, loaded in zip(g["routes"], settings.routes, strict=True):
        assert (loaded.batch is not None) == bool(route.get("batch"))
        if loaded.batch is not None:  # the key comes from a Secret, never from the ConfigMap
            key = g["batch"]["receiverAuthorizerKey"].get("value") or BATCH_KEY_FROM_SECRET
            assert loaded.batch.receiver_authorizer_key.get_secret_value() == key
            assert loaded.batch.claim_interval_s == g["batch"].get("claimIntervalSeconds", 60)
    for up_name, up in g["upstreams"].items():
        assert settings.upstreams[up_name].urls == [u.rstrip("/") for u in up.get("urls", [])]
        assert settings.upstreams[up_name].kind == up.get("kind", "urls")
        if "workers" in up:
            pool = settings.upstreams[up_name].workers
            assert pool is not None and pool.protocol == up["workers"].get("protocol", "openai")
            assert (pool.dns, pool.max_concurrency) == (up["workers"].get("dns"), up["workers"].get("maxConcurrency", 32))
        if "tee" in up:
            tee = settings.upstreams[up_name].tee
            assert tee is not None and tee.registry == up["tee"]["registry"]
            assert tee.rpc_url == up["tee"].get("rpcUrl") or tee.rpc_url.startswith("https://rpc-from-")
            assert tee.eject_after == up["tee"].get("ejectAfter", 3)
        if "auth" in up:
            expected = up["auth"].get("value") or f"Bearer sk-from-{up['auth']['existingSecret']}"
            assert settings.upstreams[up_name].auth_value.get_secret_value() == expected
            assert settings.upstreams[up_name].auth_header == up["auth"].get("header", "Authorization")

    redis = values.get("redis", {})
    if redis.get("mode", "bundled") == "bundled":
        assert re.fullmatch(rf"redis://:[^@]+@pay-x402-gateway-redis\.{NAMESPACE}\.svc:6379/0", settings.store_url)
        assert "$(" not in settings.store_url
    else:
        ext = redis["external"]
        scheme, rest = ext["url"].split("://")
        if ext.get("topology", "standalone") != "standalone":  # the client follows the scheme
            scheme = f"{scheme}+{ext['topology']}"
        if ext.get("existingSecret"):
            assert settings.store_url == f"{scheme}://:s3cr3t-from-{ext['existingSecret']}@{rest}"
        else:
            assert settings.store_url == f"{scheme}://{rest}"

    for route, given in zip(settings.routes, g["routes"], strict=True):
        if "sessions" in given:  # metered upto sessions, with their exposure bound and funds watch
            assert route.sessions is not None and route.metered
            assert (route.sessions.cap, route.sessions.max_exposure, route.sessions.watch_funds) == (
                given["sessions"]["cap"], given["sessions"].get("maxExposure"), given["sessions"].get("watchFunds", True))
    assert settings.rpc_urls == g.get("rpcUrls", {})
    assert settings.funds_poll_s == g.get("fundsPollSeconds", 1)
    proofs = g.get("proofs", {})
    assert (settings.proofs is not None) == bool(proofs.get("enabled"))
    if settings.proofs is not None:
        assert (settings.proofs.relay, settings.proofs.chain_id) == (proofs["relay"], proofs["chainId"])
        assert settings.proofs.signer_key.get_secret_value() == f"key-from-{proofs['signer']['existingSecret']}"

    budgets = g.get("budgets", {})
    assert (settings.budgets is not None) == bool(budgets.get("enabled"))
    if settings.budgets is not None:
        assert len(settings.budgets.policies) == len(budgets.get("policies", []))
        assert (settings.budgets.reconcile_every_s, settings.budgets.reconcile_lag_blocks) == (
            budgets.get("reconcileEverySeconds", 600), budgets.get("reconcileLagBlocks", 30))
        has_token = bool(budgets.get("adminToken", {}).get("existingSecret") or budgets.get("adminToken", {}).get("value"))
        assert ("BUDGETS_ADMIN_TOKEN_FILE" in env) == has_token
        if has_token:
            assert env["BUDGETS_ADMIN_TOKEN_FILE"].startswith(
                next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "admin-token"))

    fac = values["facilitator"]
    if fac.get("enabled", True):
        assert settings.facilitator.mode == "remote"
        assert settings.facilitator.url == f"http://pay-x402-gateway-facilitator.{NAMESPACE}.svc:4020"
        assert settings.facilitator.timeout_s >= settings.settle_timeout_s
        assert "FACILITATOR_SIGNER_KEYS" not in env  # the keys stay in the facilitator pods
    elif fac.get("external", {}).get("url"):
        assert settings.facilitator.mode == "remote" and settings.facilitator.url == fac["external"]["url"]
        assert settings.facilitator.auth_value.get_secret_value() == "Bearer facilitator-key"
        assert "FACILITATOR_SIGNER_KEYS" not in env
    else:
        # In-process: the gateway pod holds the facilitator's config and keys, exactly as
        # gateway.app.build_facilitator_client loads them.
        assert settings.facilitator.mode == "local"
        fac_settings = load_settings(str(files[settings.facilitator.config_file]), env=env)
        assert [k.get_secret_value() for k in fac_settings.signer_keys] == fac["signer"]["keys"]
        assert fac_settings.store_url == settings.store_url and is_redis_url(fac_settings.store_url)
        assert [n.rpc_url.get_secret_value() for n in fac_settings.networks] == [n["rpcUrl"] for n in fac["networks"]]


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if ci_values(n)["facilitator"].get("enabled", True)])
def test_facilitator_config_loads_with_the_facilitator_loader(name, objects, tmp_path):
    from facilitator.settings import load_settings

    objs = objects[name]
    values = ci_values(name)
    pod = one(objs, "Deployment", "facilitator")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["facilitator", "serve"]
    files = materialize_config(objs, pod, container, tmp_path)
    env = _container_env(objs, container)
    settings = load_settings(str(files[_config_path(container)]), env=env)

    assert settings.host == "0.0.0.0" and settings.port == container["ports"][0]["containerPort"]
    assert len(settings.signer_keys) == len(SIGNER_KEYS)
    assert is_redis_url(settings.store_url) and "$(" not in settings.store_url
    assert settings.receipt_timeout_s < values["gateway"].get("settleTimeoutSeconds", 45)
    assert settings.state_poll_s == values["facilitator"].get("statePollSeconds", 0.25)
    assert settings.claim_lease_s == values["facilitator"].get("claimLeaseSeconds", 60)
    by_network = {n.network: n for n in settings.networks}
    assert set(by_network) == {n["network"] for n in values["facilitator"]["networks"]}
    for network, net in by_network.items():
        assert net.rpc_url.get_secret_value() == f"https://rpc.example/facilitator_rpc_url_{net.chain_id}/api-key"
        offered = {a["asset"].lower() for a in values["gateway"]["accepts"] if a["network"] == network}
        assert {t.address.lower() for t in net.tokens} == offered


# -- the schema and the chart's own checks -------------------------------------------------------------


def _without(values: dict, path: str) -> dict:
    values = json.loads(json.dumps(values))
    *parents, last = path.split(".")
    node = values
    for p in parents:
        node = node[p]
    del node[last]
    return values


def _with(values: dict, path: str, value: Any) -> dict:
    values = json.loads(json.dumps(values))
    *parents, last = path.split(".")
    node = values
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value
    return values


BAD_VALUES = [
    ("missing payTo", lambda v: _without(v, "gateway.payTo"), "at '/gateway': missing property 'payTo'"),
    ("payTo not an address", lambda v: _with(v, "gateway.payTo", "0x1234"), "at '/gateway/payTo'"),
    ("negative price", lambda v: _with(v, "gateway.routes.0.price", "-0.01"), "at '/gateway/routes/0/price'"),
    ("negative price as a number", lambda v: _with(v, "gateway.routes.0.price", -1), "at '/gateway/routes/0/price'"),
    ("negative model price", lambda v: _with(v, "gateway.routes.0.models", {"gpt-4o": "-2"}),
     "at '/gateway/routes/0/models/gpt-4o'"),
    ("unknown network name", lambda v: _with(v, "gateway.accepts.0.network", "base-mainnet"),
     "at '/gateway/accepts/0/network'"),
    ("non-EVM network", lambda v: _with(v, "gateway.accepts.0.network", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"),
     "at '/gateway/accepts/0/network'"),
    ("unknown facilitator network", lambda v: _with(v, "facilitator.networks.0.network", "eip155:base"),
     "at '/facilitator/networks/0/network'"),
    ("unknown transfer method", lambda v: _with(v, "gateway.accepts.0.transferMethod", "permit"),
     "at '/gateway/accepts/0/transferMethod'"),
    ("misspelt key", lambda v: _with(v, "gateway.replicas", 3), "additional properties 'replicas' not allowed"),
    ("upstream name unusable in an env var", lambda v: _with(v, "gateway.upstreams", {"open-ai": {"urls": ["https://x"]}}),
     "at '/gateway/upstreams'"),
    ("Redis URL with a password", lambda v: _with(v, "redis", {"mode": "external", "external": {"url": "redis://:pw@r:6379"}}),
     "at '/redis/external/url'"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_clear_message(chart, case, mutate, message):
    values = mutate(ci_values("minimal"))
    with pytest.raises(helm.HelmValuesError) as err:
        render(chart, values)
    text = str(err.value)
    assert "values don't meet the specifications of the schema" in text
    assert message in text, text
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)


BAD_COMBINATIONS = [
    ("route names an unknown upstream", lambda v: _with(v, "gateway.routes.0.upstream", "anthropic"),
     "names upstream \"anthropic\", which is not in gateway.upstreams"),
    ("an accepted network without an RPC", lambda v: _with(v, "gateway.accepts.0.network", "eip155:10"),
     "gateway.accepts offers eip155:10 but facilitator.networks has no entry"),
    ("several facilitator processes on an embedded store",
     lambda v: _with(v, "facilitator.extraEnv", [{"name": "FACILITATOR_STORE_URL", "value": "sqlite:///var/lib/x402/f.db"}]),
     "facilitator.extraEnv: 3 facilitator processes ((replicaCount 2 + strategy.maxSurge 1) x workers 1) share the "
     "signer keys and coordinate their nonces through the facilitator's store"),
    ("in-process: several gateway processes on an embedded store",
     lambda v: _with(_with(_with(v, "facilitator.enabled", False), "gateway.autoscaling",
                           {"enabled": True, "minReplicas": 2, "maxReplicas": 6}),
                     "gateway.extraEnv", [{"name": "FACILITATOR_STORE_URL", "value": "memory://"}]),
     "gateway.extraEnv: 7 in-process facilitators (gateway (autoscaling.maxReplicas 6 + strategy.maxSurge 1) x workers 1)"),
    ("Sentinel URL without the master's name",
     lambda v: _with(v, "redis", {"mode": "external", "external": {"topology": "sentinel", "url": "redis://s-0:26379"}}),
     "with topology sentinel give the Sentinels and the master's service name"),
    ("no signer keys", lambda v: _with(v, "facilitator.signer", {}), "facilitator.signer: give existingSecret"),
    ("receipt wait longer than the settle wait", lambda v: _with(v, "facilitator.receiptTimeoutSeconds", 50),
     "facilitator.receiptTimeoutSeconds must be shorter than gateway.settleTimeoutSeconds"),
    ("ingress without hosts", lambda v: _with(v, "ingress", {"enabled": True}), "ingress.hosts: give at least one host"),
    ("external Redis without a URL", lambda v: _with(v, "redis", {"mode": "external"}), "redis.external.url is required"),
    ("external facilitator key without a Secret",
     lambda v: _with(v, "facilitator", {"enabled": False, "external": {"url": "https://f.example", "authHeader": "X-Key"}}),
     "facilitator.external.authHeader needs existingSecret and existingSecretKey"),
    ("alerts without the Prometheus Operator", lambda v: _with(v, "metrics", {"prometheusRule": {"enabled": True}}),
     "metrics.prometheusRule.enabled needs the monitoring.coreos.com/v1 API"),
    ("batch-settlement without the authorizer key",
     lambda v: _with(v, "gateway.routes", [{**v["gateway"]["routes"][0], "batch": True}]),
     "gateway.batch.receiverAuthorizerKey: a route offers batch-settlement"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS])
def test_chart_rejects_inconsistent_values(chart, case, mutate, message):
    with pytest.raises(helm.HelmRenderError) as err:
        render(chart, mutate(ci_values("minimal")))
    assert message in str(err.value)


# -- signer keys: shared by every process, nonces coordinated through Redis ------------------------------


def _facilitator_container(objs: list[dict]) -> tuple[dict, dict]:
    """(pod spec, container) of whoever runs the facilitator: its Deployment, else the gateway."""
    deployment = (find(objs, "Deployment", "facilitator") or find(objs, "Deployment", "gateway"))[0]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_one_key_serves_any_number_of_replicas_and_the_hpa(chart):
    """No key arithmetic: a single key renders with many facilitator processes, and with the
    facilitator in-process under an HPA."""
    one_key = {"keys": SIGNER_KEYS[:1]}
    service = _with(_with(_with(ci_values("minimal"), "facilitator.signer", one_key),
                          "facilitator.replicaCount", 6), "facilitator.workers", 4)
    rendered = render(chart, service)
    assert one(manifests(rendered), "Deployment", "facilitator")["spec"]["replicas"] == 6
    assert "any number of replicas works" in notes(rendered)
    inprocess = _with(_with(_with(_with(ci_values("minimal"), "facilitator.enabled", False), "facilitator.signer", one_key),
                            "gateway.workers", 4),
                      "gateway.autoscaling", {"enabled": True, "minReplicas": 2, "maxReplicas": 30})
    rendered = render(chart, inprocess)
    assert one(manifests(rendered), "HorizontalPodAutoscaler", "gateway")["spec"]["maxReplicas"] == 30
    text = notes(rendered)
    assert "any number of replicas works" in text and not re.search(r"\blease", text, re.I) and "keyCount" not in text
    with pytest.raises(helm.HelmValuesError, match="keyCount"):  # the old knob is gone
        render(chart, _with(ci_values("minimal"), "facilitator.signer.keyCount", 3))


SENTINEL = {"mode": "external", "external": {"topology": "sentinel", "url": "rediss://s-0:26379,s-1:26379/mymaster/2",
                                             "existingSecret": "x402-redis", "existingSecretPasswordKey": "password"}}
REDIS_CASES = [n for n in VALUE_SETS if n != "external-facilitator"] + ["sentinel"]


@pytest.mark.parametrize("name", REDIS_CASES)
def test_every_facilitator_process_coordinates_nonces_through_redis(name, chart, objects, tmp_path):
    """The facilitator, built from the rendered config and environment exactly as the service
    builds it, uses the Redis nonce lock (RedisNonces) and the Redis settlement store."""
    import asyncio

    from facilitator.app import build_facilitator
    from facilitator.evm.nonces import RedisNonces
    from facilitator.settings import load_settings
    from facilitator.store.redis_store import RedisSettlementStore

    objs = objects[name] if name in objects else manifests(render(chart, _with(ci_values("minimal"), "redis", SENTINEL)))
    pod, container = _facilitator_container(objs)
    files = materialize_config(objs, pod, container, tmp_path)
    env = _container_env(objs, container)
    config = _config_path(container)
    if container["args"][0] == "gateway":  # in-process: the gateway's config names the facilitator's
        config = json.loads(files[config].read_text())["facilitator"]["config_file"]
    settings = load_settings(str(files[config]), env=env)
    assert is_redis_url(settings.store_url), settings.store_url
    if name == "sentinel":
        assert settings.store_url == "rediss+sentinel://:s3cr3t-from-x402-redis@s-0:26379,s-1:26379/mymaster/2"

    async def build() -> None:
        fac = build_facilitator(settings)
        try:
            assert isinstance(fac.store, RedisSettlementStore)
            for chain in fac.chains.values():
                assert isinstance(chain.sender.nonces, RedisNonces)
        finally:
            await fac.close()

    asyncio.run(build())


def test_store_overrides_that_keep_nonces_coordinated_are_accepted(chart):
    base = ci_values("minimal")
    other_redis = [{"name": "FACILITATOR_STORE_URL", "value": "redis://other-redis.data.svc:6379/3"}]
    from_secret = [{"name": "FACILITATOR_STORE_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "url"}}}]
    embedded = [{"name": "FACILITATOR_STORE_URL", "value": "sqlite:///var/lib/x402/facilitator.sqlite3"}]
    single_process = _with(_with(base, "facilitator.replicaCount", 1), "facilitator.strategy",
                           {"maxSurge": 0, "maxUnavailable": 1})
    for values in (_with(base, "facilitator.extraEnv", other_redis), _with(base, "facilitator.extraEnv", from_secret),
                   _with(single_process, "facilitator.extraEnv", embedded)):
        assert one(manifests(render(chart, values)), "Deployment", "facilitator")


def test_facilitator_alerts_follow_an_in_process_facilitator(chart):
    values = _with(ci_values("facilitator-disabled"), "metrics", {"prometheusRule": {"enabled": True}})
    rule = one(manifests(render(chart, values, monitoring=True)), "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for alert in ("X402SignerBalanceLow", "X402SignerNonceStuck", "X402UnresolvedSettlements"):
        assert 'service="pay-x402-gateway"' in alerts[alert]  # the gateway serves the facilitator's metrics


# -- features per value set ----------------------------------------------------------------------------


def test_facilitator_disabled_runs_it_in_the_gateway(objects, rendered):
    objs = objects["facilitator-disabled"]
    assert not find(objs, "Deployment", "facilitator") and not find(objs, "Service", "facilitator")
    assert not find(objs, "NetworkPolicy", "facilitator")
    container = one(objs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert {"FACILITATOR_SIGNER_KEYS", "FACILITATOR_RPC_URL_84532", "FACILITATOR_STORE_URL"} <= set(names)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FACILITATOR_STORE_URL"] == env["GATEWAY_STORE_URL"]  # the facilitator's store is the gateway's Redis
    assert is_redis_url(env["FACILITATOR_STORE_URL"])
    text = notes(rendered["facilitator-disabled"])
    assert "the gateway pods hold the signer keys" in text and "any number of replicas works" in text
    assert not re.search(r"\blease", text, re.I)  # no signer leases: every process uses every key


def test_external_redis_cluster(objects):
    objs = objects["external-redis-cluster"]
    assert not find(objs, "StatefulSet") and not find(objs, "NetworkPolicy", "redis")
    for component, var in (("gateway", "GATEWAY_STORE_URL"), ("facilitator", "FACILITATOR_STORE_URL")):
        env = one(objs, "Deployment", component)["spec"]["template"]["spec"]["containers"][0]["env"]
        (url,) = [e["value"] for e in env if e["name"] == var]
        # the scheme picks the services' Redis Cluster client (redis_from_url)
        assert url == "rediss+cluster://:$(X402_REDIS_PASSWORD)@clustercfg.x402.abc123.use1.cache.amazonaws.com:6379"
        (pw,) = [e for e in env if e["name"] == "X402_REDIS_PASSWORD"]
        assert pw["valueFrom"]["secretKeyRef"] == {"name": "x402-redis", "key": "auth-token"}
        assert [e["name"] for e in env].index("X402_REDIS_PASSWORD") < [e["name"] for e in env].index(var)


def test_bundled_redis(objects):
    objs = objects["bundled-redis"]
    sts = one(objs, "StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd" and claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "redis:7.4-alpine"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}["REDIS_PASSWORD"] == {
        "name": "x402-redis", "key": "password"}
    assert container["readinessProbe"]["exec"] and container["livenessProbe"]["exec"]
    conf = next(c for c in find(objs, "ConfigMap", "redis"))["data"]["redis.conf"]
    for line in ("appendonly yes", "maxmemory 1gb", "maxmemory-policy noeviction", "include /run/redis/auth.conf"):
        assert line in conf
    assert not find(objs, "Secret")  # the password is referenced, not copied


def test_ingress_with_tls_streams_and_hides_admin(objects):
    objs = objects["ingress-tls"]
    ingress = one(objs, "Ingress", "gateway")
    a = ingress["metadata"]["annotations"]
    assert a["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(a["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600  # the upstreams' default timeout
    assert int(a["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    assert a["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "api-example-com-tls", "hosts": ["api.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    paths = {p["path"] for p in rule["http"]["paths"]}
    assert paths == {"/v1", "/v2"}
    config = json.loads(one(objs, "ConfigMap", "gateway")["data"]["gateway.json"])
    assert config["public_url"] == "https://api.example.com"


def test_autoscaling(objects, rendered):
    objs = objects["autoscaling"]
    hpa = one(objs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pay-x402-gateway"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in one(objs, "Deployment", "gateway")["spec"]  # the HPA owns it
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in find(objs, "PodDisruptionBudget")} == {
        "gateway", "facilitator"}
    facilitator = one(objs, "Deployment", "facilitator")
    assert "any number of replicas works with\n   any number of keys" in notes(rendered["autoscaling"])
    assert facilitator["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--workers", "2"]


def test_metrics_use_servicemonitors_when_the_operator_exists_else_annotations(chart):
    values = ci_values("minimal")
    with_operator = manifests(render(chart, values, monitoring=True))
    monitors = find(with_operator, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {"gateway", "facilitator"}
    for m in monitors:
        assert m["spec"]["endpoints"][0]["port"] == "http" and m["spec"]["endpoints"][0]["path"] == "/metrics"
    for obj, _ in pod_specs(with_operator):
        assert "prometheus.io/scrape" not in obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    without = manifests(render(chart, values))
    assert not find(without, "ServiceMonitor")
    for component in ("gateway", "facilitator"):
        annotations = one(without, "Deployment", component)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"


def _known_metric_names() -> set[str]:
    from facilitator.metrics import FacilitatorMetrics
    from gateway.metrics import GatewayMetrics

    names: set[str] = set()
    for registry in (GatewayMetrics().registry, FacilitatorMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            kind = family.type
            if kind == "counter":
                names.add(family.name + "_total")
            if kind == "histogram":
                names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


def test_alerts_and_dashboard_use_only_metrics_that_exist(objects):
    known = _known_metric_names()
    rule = one(objects["autoscaling"], "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"X402SettlementFailures", "X402SignerBalanceLow", "X402UnresolvedSettlements", "X402Gateway5xxRate"} <= set(alerts)
    dashboards = [c for c in find(objects["minimal"], "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    board = json.loads(dashboards[0]["data"]["x402-gateway.json"])
    exprs = list(alerts.values()) + [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bx402_[a-z0-9_]+", e)}
    assert used and used <= known, used - known
    titles = {p["title"] for p in board["panels"]}
    for panel in ("Paid calls /s by route", "Revenue by asset (base units /s)", "Refusals /s by reason",
                  "Settlement latency (gateway)", "Settlement failures and pending /s",
                  "Budget usage of the top agents", "Upstream latency p95 by upstream"):
        assert panel in titles
    runbook = (CHART_DIR.parents[1] / "README.md").read_text().lower()
    for alert in alerts:
        assert f"### {alert.lower()}" in runbook, f"{alert} is not explained in deploy/README.md"


def test_bundled_redis_config_starts_a_redis_that_wants_the_password(objects, tmp_path):
    """The rendered redis.conf and start script, run by a local redis-server (paths and port moved
    into tmp): it starts, refuses unauthenticated clients, and evicts nothing."""
    import shutil
    import socket
    import time

    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server is not installed")
    objs = objects["bundled-redis"]
    conf = one(objs, "ConfigMap", "redis")["data"]["redis.conf"]
    container = one(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = {d: tmp_path / d.strip("/").replace("/", "-") for d in ("/data", "/run/redis", "/etc/redis")}
    for local in dirs.values():
        local.mkdir()
    for mounted, local in dirs.items():
        conf = conf.replace(f" {mounted}", f" {local}")
    (dirs["/etc/redis"] / "redis.conf").write_text(conf.replace("port 6379", f"port {port}"))
    script = container["args"][0]
    for mounted, local in dirs.items():
        script = script.replace(f"{mounted}/", f"{local}/")
    password = "pw-" + "x" * 29
    log = (tmp_path / "redis.log").open("wb")
    proc = subprocess.Popen(["sh", "-c", script.replace("exec redis-server", f"exec {server}")],
                            env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password}, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ask(*args: str, auth: bool = True) -> str:
            env = {"PATH": "/usr/bin:/bin"} | ({"REDISCLI_AUTH": password} if auth else {})
            return subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *args], env=env, capture_output=True,
                                  text=True, timeout=5).stdout.strip()

        deadline = time.monotonic() + 10
        while ask("ping") != "PONG":
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        assert "NOAUTH" in ask("ping", auth=False)
        assert ask("config", "get", "maxmemory-policy").splitlines() == ["maxmemory-policy", "noeviction"]
        assert ask("config", "get", "appendonly").splitlines() == ["appendonly", "yes"]
        assert password not in " ".join(proc.args)  # not in argv (ps shows it)
        assert oct((dirs["/run/redis"] / "auth.conf").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
