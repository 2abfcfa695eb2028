"""The container image, as far as it can be checked without a Docker engine: the Dockerfile's shape,
the build context, and the image's contents rebuilt the same way (the project's wheel installed
into a clean virtualenv, the entrypoint script in front of it), started with the chart's rendered
config files and the environment its pod specs give.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("yaml", reason="needs PyYAML")

from tests.helm.chart import ROOT, ci_values, manifests, materialize_config, one, render

DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
# The wheel's packages; devtools too, since the CLIs register its dev subcommands.
PACKAGES = ("storage", "facilitator", "budgets", "gateway", "devtools")


def stages(text: str) -> list[list[str]]:
    """Instructions of each build stage (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_dockerfile_is_multi_stage_slim_and_unprivileged():
    builder, runtime = stages(DOCKERFILE.read_text())
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert builder[0] == "FROM ${PYTHON_IMAGE} AS builder" and runtime[0] == "FROM ${PYTHON_IMAGE} AS runtime"
    assert any("pip wheel --wheel-dir /wheels ." in i for i in builder)
    run = " ".join(i for i in runtime if i.startswith("RUN"))
    assert "--no-index --find-links /wheels" in run  # only the builder's wheels
    for tool in ("apt-get", "build-essential", "gcc", "node", "npm", "anvil", "solc", "curl"):
        assert not re.search(rf"\b{tool}\b", run), f"{tool} in the runtime stage"
    assert not any(i.startswith(("COPY . ", "ADD ")) for i in runtime)
    (user,) = [i for i in runtime if i.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000  # numeric, so runAsNonRoot can verify it
    assert uid == "10001"  # the chart's podSecurityContext.runAsUser
    assert 'ENTRYPOINT ["/usr/local/bin/x402-entrypoint"]' in runtime
    assert "WORKDIR /var/lib/x402" in runtime  # the state dir the chart mounts an emptyDir on


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
        hit = hit or fnmatch.fnmatch(path, pattern.replace("**/", "*/")) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
        if hit:
            ignored = not negate
    return ignored


def test_build_context_keeps_what_the_dockerfile_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied: list[str] = []
    for stage in stages(DOCKERFILE.read_text()):
        for instruction in stage:
            if instruction.startswith("COPY ") and "--from=" not in instruction:
                args = [a for a in instruction.split()[1:] if not a.startswith("--")]
                copied += args[:-1]
    assert {"pyproject.toml", "README.md", *PACKAGES, "deploy/docker/entrypoint.sh"} <= set(copied)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(include) == {f"{package}*" for package in PACKAGES}
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for heavy in (".venv", "node_modules", "build", "tests", ".git", "loadtests"):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the daemon"


# -- the image's contents, rebuilt without Docker ------------------------------------------------------


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    """The project's wheel (no dependencies vendored) installed with its declared dependencies into
    a virtualenv that has never seen the source tree, as the Dockerfile's runtime stage does."""
    tmp = tmp_path_factory.mktemp("image")
    src, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    # The builder stage's build context: what the Dockerfile copies, and nothing else (building in
    # the checkout would also leave setuptools' build/ there, whose stale files end up in wheels).
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    quiet = ["--quiet", "--disable-pip-version-check"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", *quiet, "--no-deps", str(src), "-w", str(dist)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = dist.glob("x402_agent_gateway-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", *quiet,
                             "--no-compile", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def _image_env(venv: Path, **extra: str) -> dict[str, str]:
    """What the image's ENV gives a process, and nothing from this test run."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           "ETH_HASH_BACKEND": "pysha3", "HOME": "/tmp", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _entrypoint(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # cwd outside the source tree (python -c puts the working directory on sys.path)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=_image_env(venv, **env), cwd=venv.parent,
                          capture_output=True, text=True, timeout=60)


def test_entry_points_start_from_a_clean_install(clean_venv):
    for service, command in (("gateway", "x402-gateway"), ("facilitator", "x402-facilitator"), ("budgets", "x402-budgets")):
        result = _entrypoint(clean_venv, service, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: {command}" in result.stdout
    serve = _entrypoint(clean_venv, "gateway", "serve", "--help")
    assert serve.returncode == 0 and "--config" in serve.stdout
    assert _entrypoint(clean_venv).returncode == 64
    # everything `serve` imports at start, with the image's hash backend
    check = _entrypoint(clean_venv, "python", "-c",
                        "import gateway.app, facilitator.app, budgets.admin, uvloop, httptools;"
                        "from eth_hash.auto import keccak; assert keccak(b'').hex().startswith('c5d2460186f7')")
    assert check.returncode == 0, check.stderr
    location = _entrypoint(clean_venv, "python", "-c", "import gateway; print(gateway.__file__)")
    assert location.stdout.startswith(str(clean_venv)), "imported from the source tree, not the wheel"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _start(args: list[str], env: dict[str, str], cwd: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{args[1]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _get(f"http://127.0.0.1:{port}/healthz") == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise AssertionError(f"{args[1]} did not answer /healthz:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=5)


def test_services_start_with_the_rendered_config(clean_venv, tmp_path):
    """Both services from the clean install, through the entrypoint, with the chart's rendered
    config files and pod environment (Redis swapped for the embedded store, the RPC unreachable):
    healthy, the facilitator not ready without its chain, and a clean exit on SIGTERM."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a test dependency")
    with helm.Chart.load(ROOT / "deploy" / "helm" / "x402-gateway") as chart:
        objs = manifests(render(chart, ci_values("minimal")))
    fac_port, gw_port, dead_rpc = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen] = []
    try:
        pod = one(objs, "Deployment", "facilitator")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        files = materialize_config(objs, pod, c, tmp_path / "facilitator")
        args = [str(files.get(a, a)) for a in c["args"]]
        keys = ",".join("0x" + format(i, "064x") for i in range(1, 4))  # any keys: the chain is never reached
        env = _image_env(clean_venv, FACILITATOR_SIGNER_KEYS=keys, FACILITATOR_STORE_URL="memory://",
                         FACILITATOR_RPC_URL_8453=f"http://127.0.0.1:{dead_rpc}", FACILITATOR_HOST="127.0.0.1",
                         FACILITATOR_PORT=str(fac_port))
        (tmp_path / "fstate").mkdir()
        procs.append(_start(["sh", str(ENTRYPOINT), *args], env, tmp_path / "fstate", fac_port, tmp_path / "facilitator.log"))
        assert _get(f"http://127.0.0.1:{fac_port}/readyz") == 503  # its chain is unreachable

        pod = one(objs, "Deployment", "gateway")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        files = materialize_config(objs, pod, c, tmp_path / "gateway")
        args = [str(files.get(a, a)) for a in c["args"]]
        env = _image_env(clean_venv, GATEWAY_STORE_URL="memory://", GATEWAY_UPSTREAM_OPENAI_AUTH="Bearer sk-test",
                         GATEWAY_FACILITATOR_URL=f"http://127.0.0.1:{fac_port}", GATEWAY_HOST="127.0.0.1",
                         GATEWAY_PORT=str(gw_port))
        (tmp_path / "gstate").mkdir()
        procs.append(_start(["sh", str(ENTRYPOINT), *args], env, tmp_path / "gstate", gw_port, tmp_path / "gateway.log"))
        assert _get(f"http://127.0.0.1:{gw_port}/metrics") == 200
        assert _get(f"http://127.0.0.1:{gw_port}/readyz") == 503  # the facilitator is not ready
    finally:
        codes = [_stop(p) for p in reversed(procs)]
    # uvicorn drains, then re-raises SIGTERM: the process ends by the signal after a clean shutdown
    assert all(code in (0, -15) for code in codes), codes
    for log in ("gateway.log", "facilitator.log"):
        text = (tmp_path / log).read_text()
        assert "Application shutdown complete" in text, text[-2000:]
        assert "sk-test" not in text and keys.split(",")[0][2:] not in text
