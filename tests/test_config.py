"""Configuration: typed, validated at once with every error reported, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("""
[server]
port = 70000
processes = "two"
colour = "blue"
[tls]
client_auth = "sometimes"
trusted_proxies = ["not-a-net"]
[models.digits]
workers = 0
device = "tpu"
[extra]
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    for fragment in ("server.port", "server.processes", "server.colour: unknown", "tls.client_auth",
                     "not-a-net", "models.digits.workers", "models.digits.device", "[extra]", "cert_file"):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 9


def test_environment_overrides_and_insecure_settings(pki: Path) -> None:
    env = {"GATEWAY__TLS__CLIENT_AUTH": "optional", "GATEWAY__SERVER__PORT": "9443",
           "GATEWAY__TLS__MIN_VERSION": '"1.2"', "GATEWAY__TLS__TRUSTED_PROXIES": '["10.0.0.1"]'}
    config = load_config(pki / "gateway.toml", environ=env)
    assert config.server.port == 9443 and config.tls.client_auth == "optional"
    warnings = "\n".join(config.insecure_settings())
    assert "client_auth" in warnings and "1.2" in warnings and "trusted_proxies" in warnings
    assert "server.processes" not in warnings
    several = load_config(pki / "gateway.toml", environ={**env, "GATEWAY__SERVER__PROCESSES": "2"})
    assert "server.processes = 2 without Redis" in "\n".join(several.insecure_settings())
    shared = load_config(pki / "gateway.toml", environ={
        "GATEWAY__SERVER__PROCESSES": "2", "GATEWAY__LIMITS__STORAGE": '"redis://127.0.0.1:6379/0"'})
    assert not any("server.processes" in w for w in shared.insecure_settings())


def test_relative_paths_resolve_against_the_config_file(pki: Path) -> None:
    config = load_config(pki / "gateway.toml", environ={})
    assert Path(config.tls.cert_file) == (pki / "certs" / "server.pem").resolve()


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gateway init"):
        load_config(tmp_path / "absent.toml", environ={})


def test_malformed_toml(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text("[server\nport=")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "g.toml", environ={})


def test_guard_and_events_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("""
[models.digits.guard]
detectors = ["squeeze", "vibes"]
squeezers = ["bits:9", "blur:2"]
target_fpr = 0.9
action = "throttle"
image = [8]
[models.digits.guard.roles]
partner = "banish"
[limits]
budget_inferences = ""
[events]
webhook_url = "http://siem.example/hook"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    for fragment in ("'vibes' is not one of", "bits:9", "blur:2", "target_fpr", "guard.image", "guard.roles",
                     "budget_inferences, which is not set", "events.webhook_url must be https://",
                     "events.webhook_secret_file"):
        assert fragment in text, fragment


def test_the_strictest_role_action_applies() -> None:
    from gateway.config import GuardConfig

    guard = GuardConfig(detectors=("anomaly",), action="flag", roles=(("partner", "reject"), ("staff", "record")))
    assert guard.action_for(frozenset({"staff"})) == "record"
    assert guard.action_for(frozenset({"staff", "partner"})) == "reject"
    assert guard.action_for(frozenset({"other"})) == "flag"


def _server_problems(tmp_path: Path, setting: str) -> str:
    """What loading a configuration whose [server] holds ``setting`` refuses ("" when nothing)."""
    path = tmp_path / "g.toml"
    path.write_text(f"[server]\n{setting}\n")
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("value,refused", [(0, True), (0.5, True), (3601, True), (1, False), (75, False)])
def test_the_idle_connection_timeout_is_checked(tmp_path: Path, value: float, refused: bool) -> None:
    """uvicorn takes whole seconds: below 1 the gateway would close each connection after its answer."""
    problems = _server_problems(tmp_path, f"keepalive_timeout_s = {value}")
    assert ("server.keepalive_timeout_s must be 1..3600" in problems) is refused, problems


@pytest.mark.parametrize("value,refused", [(-1, True), (10_001, True), (0, False), (256, False)])
def test_the_connections_per_address_are_checked(tmp_path: Path, value: int, refused: bool) -> None:
    problems = _server_problems(tmp_path, f"max_connections_per_address = {value}")
    assert ("server.max_connections_per_address must be 0 (no limit) to max_connections" in problems) is refused


def test_output_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("""
[models.digits.output]
policy = "blurred"
top_k = 0
[models.digits.output.roles]
partner = "everything"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    for fragment in ("models.digits.output.policy", "top_k must be 1..1000", "models.digits.output.roles"):
        assert fragment in text, fragment


def test_the_redis_password_comes_from_a_file_quoted_into_the_url(pki: Path, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss:w/rd#1\n")
    env = {"GATEWAY__LIMITS__STORAGE": "rediss://redis.internal:6380/0?ssl_ca_certs=/ca.pem",
           "GATEWAY__LIMITS__STORAGE_PASSWORD_FILE": str(secret)}
    storage = load_config(pki / "gateway.toml", environ=env).limits.storage
    import redis

    kwargs = redis.Redis.from_url(storage).connection_pool.connection_kwargs
    assert kwargs["password"] == "p@ss:w/rd#1" and kwargs["host"] == "redis.internal" and kwargs["port"] == 6380
    with pytest.raises(ConfigError, match="storage_password_file"):
        load_config(pki / "gateway.toml", environ={**env, "GATEWAY__LIMITS__STORAGE_PASSWORD_FILE": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="storage_password_file needs a redis"):
        load_config(pki / "gateway.toml", environ={"GATEWAY__LIMITS__STORAGE_PASSWORD_FILE": str(secret)})


def test_a_folder_given_as_the_configuration_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a folder, not a configuration file"):
        load_config(tmp_path)


def test_worker_exec_must_be_an_executable_and_needs_a_worker_user(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.worker_exec: .* is not an executable file"):
        load_config(pki / "gateway.toml", environ={"GATEWAY__SERVER__WORKER_EXEC": str(tmp_path / "missing")})
