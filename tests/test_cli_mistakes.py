"""`gateway infer` meets the mistakes a new operator makes with one line and an exit code each,
never a traceback, and without the HTTP library's request lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.slow


@pytest.fixture
def here(gateway: Gateway, tmp_path: Path) -> Path:
    creds = json.loads((gateway.pki / "credentials.json").read_text())
    creds["gateway"], creds["token_endpoint"] = gateway.url, f"{gateway.url}/oauth/token"
    (tmp_path / "credentials.json").write_text(json.dumps(creds))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "digit.json").write_text(json.dumps([[0.0] * 64]))
    (tmp_path / "integers.json").write_text(json.dumps([[8] * 64]))  # as a person types pixels
    return tmp_path


CASES = [
    # (arguments, exit code, what stderr says)
    (["digits", "--input", "empty.json"], 2, "empty.json: not JSON"),
    (["digits", "--input", "missing.npy"], 2, "missing.npy: no such file"),
    (["digits", "--input", "digit.json", "--credentials", "nowhere.json"], 2, "`gateway init` writes it"),
    (["digits", "--input", "digit.json", "--principal", "dmeo"], 2, "did you mean 'demo'?"),
    (["digit", "--input", "digit.json"], 3, "did you mean 'digits'?"),
]


@pytest.mark.parametrize("arguments,code,says", CASES, ids=[c[2] for c in CASES])
def test_a_mistake_gets_one_line_and_its_exit_code(here: Path, arguments: list[str], code: int, says: str) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "infer", *arguments], capture_output=True, text=True,
                         cwd=here, timeout=60)
    assert out.returncode == code, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr and "HTTP Request" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_answer_is_json_on_standard_output(here: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "infer", "digits", "--input", "digit.json"],
                         capture_output=True, text=True, cwd=here, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert json.loads(out.stdout)["probabilities"]["shape"] == [1, 10]


def test_integers_are_sent_as_the_floats_the_model_declares(here: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "infer", "digits", "--input", "integers.json", "-o", "yaml"],
                         capture_output=True, text=True, cwd=here, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    import yaml

    assert yaml.safe_load(out.stdout)["probabilities"]["shape"] == [1, 10]


def test_gateway_config_is_honoured_and_global_options_go_anywhere(pki: Path, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "GATEWAY_CONFIG": str(pki / "gateway.toml")}
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "--log-level", "warning"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=60)  # no gateway.toml here
    assert out.returncode == 0 and f"{pki / 'gateway.toml'}: valid" in out.stdout, out.stderr
    missing = subprocess.run([sys.executable, "-m", "gateway", "check"], capture_output=True, text=True, cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "GATEWAY_CONFIG"}, timeout=60)
    assert missing.returncode == 2 and "gateway.toml: no such file" in missing.stderr


def gateway_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *arguments], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


USAGE = [
    # (arguments, what stderr says): mistakes argparse catches, each exit 2 with a usage line
    (["usres", "list"], "did you mean 'users'?"),
    (["users", "lst"], "did you mean 'list'?"),
    (["audit", "verfy"], "did you mean 'verify'?"),
    (["users", "add"], "the following arguments are required: name, --roles"),
    (["models", "rewrap", "models/digits/1"], "the following arguments are required: --new-kek-file"),
    (["models", "sign"], "the following arguments are required: folder"),
    (["admin", "quarantine", "digits"], "the following arguments are required: VERSION, --reason"),
    (["users", "list", "-o", "xml"], "argument -o/--format: invalid choice: 'xml'"),
]


@pytest.mark.parametrize("arguments,says", USAGE, ids=[" ".join(c[0]) for c in USAGE])
def test_a_usage_mistake_says_what_and_exits_2(tmp_path: Path, arguments: list[str], says: str) -> None:
    out = gateway_cli(*arguments, cwd=tmp_path)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_each_action_has_its_own_help_and_options_go_anywhere(pki: Path, tmp_path: Path) -> None:
    verify = gateway_cli("audit", "verify", "--help", cwd=tmp_path).stdout
    assert "--allow-unsealed" in verify and "--follow" not in verify and "--since" not in verify
    tail = gateway_cli("audit", "tail", "--help", cwd=tmp_path).stdout
    assert "--follow" in tail and "--allow-unsealed" not in tail
    log = tmp_path / "audit"
    log.mkdir()
    # options after the positional arguments and the global ones after the action
    out = gateway_cli("audit", "verify", str(log), "--config", str(pki / "gateway.toml"), "--no-manifest",
                      "--log-level", "warning", cwd=tmp_path)
    assert out.returncode == 1 and "no audit log files" in out.stdout, out.stderr


def test_lists_print_as_a_table_json_or_yaml(pki: Path, tmp_path: Path) -> None:
    import yaml

    config = ("--config", str(pki / "gateway.toml"))
    table = gateway_cli("clients", "list", *config, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "ROLES", "DESCRIPTION"] and rows[0].split()[:2] == ["demo", "inference"]
    as_json = json.loads(gateway_cli("clients", "list", "-o", "json", *config, cwd=tmp_path).stdout)
    as_yaml = yaml.safe_load(gateway_cli("clients", "list", *config, "-o", "yaml", cwd=tmp_path).stdout)
    assert as_json == as_yaml and as_json[0]["name"] == "demo" and as_json[0]["roles"] == ["inference"]
    keys = json.loads(gateway_cli("keys", "list", *config, "-o", "json", cwd=tmp_path).stdout)
    assert [k["state"] for k in keys].count("current") == 1


def test_an_unexpected_error_is_one_line_unless_debug(pki: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli
    from gateway.commands import identity

    def broken(args: object) -> object:
        raise RuntimeError("the issuer's store is corrupt")

    monkeypatch.setattr(identity, "_store", broken)
    arguments = ["keys", "list", "--config", str(pki / "gateway.toml")]
    assert cli.main(arguments) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "gateway: unexpected error: RuntimeError: the issuer's store is corrupt (--debug shows the traceback)"]
    with pytest.raises(RuntimeError, match="corrupt"):
        cli.main([*arguments, "--debug"])
