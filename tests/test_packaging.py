"""Packaging promises: the command, the lock, the Dockerfile lint, the layering rules, pins."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.doctor import FLOORS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"


def test_gateway_command_and_module_agree() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gateway ")
    helps = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, check=True)
    for command in ("init", "serve", "check"):
        assert command in helps.stdout


def test_check_reports_insecure_settings(pki: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "gateway", "check", "--strict", "--config", str(pki / "gateway.toml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    weak = subprocess.run([sys.executable, "-m", "gateway", "check", "--strict", "--config", str(pki / "gateway.toml")],
                          capture_output=True, text=True, env={"GATEWAY__TLS__CLIENT_AUTH": "off", "PATH": "/usr/bin"})
    assert weak.returncode == 1 and "client_auth" in weak.stdout


def test_serve_with_a_broken_config_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text("[server]\nport = 0\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "g.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "server.port" in out.stderr and "Traceback" not in out.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG GATEWAY_UID=10001$", text, re.M) and re.search(r"^USER \$\{GATEWAY_UID\}", text, re.M)
    assert "HEALTHCHECK" in text and re.search(r'^CMD \[', text, re.M) and ":latest" not in text
    assert {m for m in re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)} >= {"build", "runtime", "cpu", "cuda"}
    assert re.search(r"^ARG BASE=\S+@sha256:[0-9a-f]{64}$", text, re.M)  # the public base, pinned by digest
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:2] == ["*"] or "*" in ignored  # an allowlist: no key or certificate can enter the context
    assert not [line for line in ignored if line.startswith("!") and any(k in line for k in ("cert", "key", "issuer"))]


def _locked(path: Path) -> dict[str, str]:
    return {m["name"].lower(): m["version"] for m in re.finditer(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+) ",
                                                                   path.read_text(), re.M)}


def test_dependencies_state_ranges_and_every_lock_satisfies_them() -> None:
    """pyproject.toml states compatible ranges (an application can install the gateway beside its
    own pins); the lock files pin exactly, inside those ranges, and agree with one another."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(spec) for spec in project["dependencies"]]
    for req in runtime:
        assert "==" not in str(req.specifier) and "<" in str(req.specifier), f"not a range: {req}"
    extras = project["optional-dependencies"]
    assert [Requirement(s).name for s in extras["gpu"]] == ["onnxruntime-gpu"]
    assert [Requirement(s).name for s in extras["cpu"]] == ["onnxruntime"]
    platform = {"sys_platform": "linux", "platform_machine": "x86_64"}  # what the locks are resolved for
    full, gpu, cpu = (_locked(ROOT / name) for name in
                      ("requirements.lock", "requirements-runtime.lock", "requirements-runtime-cpu.lock"))
    for lock, variant in ((full, "gpu"), (gpu, "gpu"), (cpu, "cpu")):
        for req in [*runtime, *(Requirement(s) for s in extras[variant])]:
            if req.marker is not None and not req.marker.evaluate(platform):
                continue
            name = req.name.lower()
            assert name in lock and req.specifier.contains(lock[name]), f"{req}: locked {lock.get(name)}"
    assert "onnxruntime" not in gpu and "onnxruntime-gpu" not in cpu  # one ONNX Runtime per environment
    assert cpu["onnxruntime"] == gpu["onnxruntime-gpu"]
    for name in set(gpu) & set(cpu):
        assert gpu[name] == cpu[name] == full[name], name


def test_serve_without_onnx_runtime_says_which_extra_to_install(pki: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from gateway import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli.main(["serve", "--config", str(pki / "gateway.toml")]) == 2
    err = capsys.readouterr().err
    assert "gateway[gpu]" in err and "gateway[cpu]" in err


def _version(dist: str) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version(dist))[:3])


@pytest.mark.parametrize("dist,floor", [(d, f) for d, f in FLOORS.items() if d != "python-multipart"])
def test_security_advisory_version_floors(dist: str, floor: tuple[int, ...]) -> None:
    assert _version(dist) >= floor


def test_python_multipart_floor_where_it_is_installed() -> None:
    """Starlette parses forms with python-multipart only when it is installed; it is not, and if a
    dependency ever brings it, the advisory floor (>= 0.0.27) holds."""
    from importlib.metadata import PackageNotFoundError

    lock = (ROOT / "requirements.lock").read_text().lower()
    try:
        installed = _version("python-multipart")
    except PackageNotFoundError:
        assert "\npython-multipart==" not in lock
        return
    assert installed >= FLOORS["python-multipart"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


WEB = ("starlette", "uvicorn", "gateway.app", "gateway.context", "gateway.middleware", "gateway.endpoints",
       "gateway.stages", "gateway.server", "gateway.access")
RULES = [
    ("workers", ("gateway.security", "gateway.audit")),
    # access decisions are plain functions over plain values: no web framework, no request context
    ("security", ("gateway.workers", *WEB)),
    ("audit", ("gateway.workers",)),
]


@pytest.mark.parametrize("package,forbidden", RULES, ids=[r[0] for r in RULES])
def test_dependency_rules(package: str, forbidden: tuple[str, ...]) -> None:
    for path in (PACKAGE / package).rglob("*.py"):
        bad = {n for n in _imports(path) if n.startswith(forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    errors = _imports(PACKAGE / "errors.py")
    assert not {n for n in errors if n.startswith(("gateway.app", "starlette"))}


def test_the_sdk_imports_nothing_of_the_server() -> None:
    """gateway_client (the SDK and the protocol codec) is its own distribution: it may import only
    what that distribution depends on (authlib, cryptography, httpx, numpy, orjson) and the standard library."""
    allowed = {"authlib", "cryptography", "httpx", "numpy", "orjson", "gateway_client"}
    for path in (ROOT / "gateway_client").rglob("*.py"):
        third_party = {n.split(".")[0] for n in _imports(path)} - set(sys.stdlib_module_names) - {"__future__"}
        assert third_party <= allowed, f"{path.relative_to(ROOT)} imports {third_party - allowed}"


def test_the_request_context_imports_only_plain_values() -> None:
    """No cycle between the context and the policy: the context knows the security *types* only."""
    imported = {n for n in _imports(PACKAGE / "context.py") if n.startswith("gateway.")}
    assert imported <= {"gateway.security.types", "gateway.errors", "gateway.routes"}, imported


def test_worker_process_imports_no_server_side_security() -> None:
    code = "import sys, gateway.workers.worker; print(sorted(m for m in sys.modules if m.startswith('gateway.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gateway.security" not in out and "gateway.app" not in out


def test_lint_and_strict_types() -> None:
    bin_dir = Path(sys.executable).parent
    ruff = subprocess.run([str(bin_dir / "ruff"), "check", "gateway", "gateway_client", "tests", "bench", "models"],
                          capture_output=True, text=True, cwd=ROOT)
    assert ruff.returncode == 0, ruff.stdout
    mypy = subprocess.run([str(bin_dir / "mypy")], capture_output=True, text=True, cwd=ROOT)
    assert mypy.returncode == 0, mypy.stdout


def test_serve_with_a_missing_model_names_it(pki: Path, tmp_path: Path) -> None:
    from tests.conftest import write_config

    config = write_config(pki, tmp_path, tmp_path / "empty-repository", port=1)
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no manifest.json" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_a_model_file_that_does_not_match_its_manifest(pki: Path, tmp_path: Path, models_root: Path) -> None:
    import shutil

    from tests.conftest import write_config

    repo = tmp_path / "models"
    shutil.copytree(models_root / "digits", repo / "digits")
    shutil.copytree(models_root / "resnetish", repo / "resnetish", ignore=shutil.ignore_patterns("model.onnx"))
    (repo / "resnetish" / "1" / "model.onnx").write_bytes(b"not the model the manifest describes")
    from gateway.registry.signing import sign_model

    sign_model(repo / "resnetish" / "1", pki / "keys" / "model-signing.key")  # signed: the digest must still match
    config = write_config(pki, tmp_path, repo, port=1)
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "resnetish/1: model.onnx has SHA-256" in out.stderr and "Traceback" not in out.stderr


def test_licensed_apache_2_and_typed() -> None:
    import tomllib
    from importlib.metadata import metadata

    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    assert metadata("gateway")["License-Expression"] == "Apache-2.0"
    # SDK users get the type hints (PEP 561), and the serving processes their OpenSSL configuration.
    data = project["tool"]["setuptools"]["package-data"]["gateway"]
    assert {"py.typed", "server/openssl-modern.cnf", "security/admit.lua"} <= set(data)
    assert all((ROOT / "gateway" / name).is_file() for name in data)
