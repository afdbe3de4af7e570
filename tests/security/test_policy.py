"""RBAC and step-up decisions, policy validation at start-up, and ``gateway policy explain``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, PolicyConfig, RuleConfig, StepUpRule, load_config
from gateway.devsetup import init
from gateway.errors import Forbidden, NotFound, StepUpRequired
from gateway.security.rbac import Policy
from gateway.security.tokens import Principal, roles_from_claims

POLICY = PolicyConfig(
    rules=(
        RuleConfig("serve", ("inference",), ("infer", "metadata", "list"), ("digits", "resnet*")),
        RuleConfig("look", ("auditor",), ("metadata",), ("*",)),
        RuleConfig("ops", ("admin",), ("admin:*", "list"), ("*",)),
    ),
    step_up=(
        StepUpRule("admin-mfa", verbs=("admin:*",), amr_any=("mfa", "hwk"), max_age_s=600),
        StepUpRule("strong-acr", verbs=("infer",), roles=("auditor",), acr_min="urn:gateway:acr:mfa"),
    ),
)


def person(*roles: str, amr: tuple[str, ...] = ("pwd", "otp", "mfa"), age: float = 10,
           acr: str | None = "urn:gateway:acr:mfa") -> Principal:
    return Principal("p", "person", frozenset(roles), amr=amr, acr=acr, auth_time=int(time.time() - age))


def test_deny_by_default_and_rule_patterns() -> None:
    policy = Policy(POLICY)
    assert policy.decide(person("inference"), "infer", "digits").rule == "serve"
    assert policy.decide(person("inference"), "infer", "resnetish").allowed
    assert not policy.decide(person("inference"), "infer", "other").allowed
    assert not policy.decide(person("inference"), "explain", "digits").allowed
    assert not policy.decide(person(), "infer", "digits").allowed  # no roles, nothing
    assert not policy.decide(person("inference"), "no-such-verb", "digits").allowed
    assert policy.visible_models(person("inference"), ["digits", "other", "resnetish"]) == ["digits", "resnetish"]


def test_refusals_hide_models_the_caller_cannot_see() -> None:
    policy = Policy(POLICY)
    hidden = policy.decide(person("inference"), "infer", "other")
    assert isinstance(policy.refusal(person("inference"), hidden), NotFound)
    visible = policy.decide(person("auditor"), "infer", "digits")  # may see it (metadata), not call it
    assert isinstance(policy.refusal(person("auditor"), visible), Forbidden)
    admin = policy.decide(person("inference"), "admin:models", None)
    assert isinstance(policy.refusal(person("inference"), admin), Forbidden)


@pytest.mark.parametrize("make,expect", [  # made when the test runs: a sign-in's age counts from then
    (lambda: person("admin"), None),
    (lambda: person("admin", amr=("pwd",)), StepUpRequired),
    (lambda: person("admin", age=3600), StepUpRequired),
    (lambda: Principal("svc", "service", frozenset({"admin"})), Forbidden),
    (lambda: Principal("cert", "certificate", frozenset({"admin"})), Forbidden),
], ids=["mfa-recent", "pwd-only", "too-old", "service", "certificate"])
def test_step_up(make: Callable[[], Principal], expect: type[Exception] | None) -> None:
    who = make()
    policy = Policy(POLICY)
    decision = policy.decide(who, "admin:models", None)
    if expect is None:
        assert decision.allowed and decision.rule == "ops"
        return
    assert not decision.allowed and decision.step_up == "admin-mfa"
    refusal = policy.refusal(who, decision)
    assert isinstance(refusal, expect)
    if isinstance(refusal, StepUpRequired):
        challenge = refusal.headers["WWW-Authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge and 'max_age="600"' in challenge


def test_step_up_by_role_and_minimum_acr() -> None:
    policy = Policy(PolicyConfig(rules=(RuleConfig("all", ("auditor", "inference"), ("infer",)),), step_up=POLICY.step_up))
    weak = person("auditor", acr="urn:gateway:acr:pwd")
    decision = policy.decide(weak, "infer", "digits")
    assert not decision.allowed and decision.step_up == "strong-acr"
    refusal = policy.refusal(weak, decision)
    assert isinstance(refusal, StepUpRequired) and refusal.extensions["acr_values"] == "urn:gateway:acr:mfa"
    assert policy.decide(person("auditor"), "infer", "digits").allowed
    assert policy.decide(person("inference", acr=None), "infer", "digits").allowed  # rule is for auditors only


def test_roles_from_nested_claims_and_scope() -> None:
    claims = {"roles": ["a"], "realm_access": {"roles": ["b", 3]}, "scope": "c d", "other": "x"}
    assert roles_from_claims(claims, ("roles", "realm_access.roles", "scope")) == {"a", "b", "c", "d"}
    assert roles_from_claims(claims, ("missing.path",)) == frozenset()


@pytest.mark.parametrize("section,message", [
    ('[[rbac.rules]]\nname = "x"\nroles = ["r"]\nverbs = ["infr"]\n', "matches none of"),
    ('[[rbac.rules]]\nname = "x"\nverbs = ["infer"]\n', "].roles: required"),
    ('[[rbac.step_up]]\nname = "s"\nacr_min = "gold"\namr_any = ["otp"]\n', "is not in rbac.acr_order"),
    ('[[rbac.step_up]]\nname = "s"\n', "requires nothing"),
    ('[[auth.issuers]]\nissuer = "http://idp.example.com"\n', "http:// only on loopback"),
    ('[[auth.issuers]]\nissuer = "https://idp.example.com"\nalgorithms = ["HS256"]\n', "algorithms must be"),
    ('[auth.certificate_roles]\n"CN=x" = ["r"]\n', "start with URI:"),
], ids=["unknown-verb", "no-roles", "unknown-acr", "empty-step-up", "http-issuer", "hmac", "identity-form"])
def test_policy_is_validated_at_start_up(tmp_path: Path, models_root: Path, section: str, message: str) -> None:
    init(tmp_path, models_root)
    config = tmp_path / "gateway.toml"
    config.write_text(config.read_text() + "\n" + section)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def test_weakening_auth_settings_are_reported(tmp_path: Path, models_root: Path) -> None:
    init(tmp_path, models_root)
    config = tmp_path / "gateway.toml"
    text = config.read_text().replace("require_token = true", "require_token = false")
    config.write_text(text + '\n[[auth.issuers]]\nissuer = "https://idp.example.com"\ntyp = ""\n')
    found = " ".join(load_config(config).insecure_settings())
    assert "auth.require_token = false" in found and 'typ = ""' in found
    assert main(["check", "--strict", "--config", str(config)]) == 1


def test_policy_explain(tmp_path: Path, models_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init(tmp_path, models_root)
    config = str(tmp_path / "gateway.toml")
    assert main(["policy", "explain", "--sub", "svc", "--roles", "inference", "--verb", "infer",
                 "--model", "digits", "--kind", "service", "--config", config]) == 0
    assert "ALLOW" in capsys.readouterr().out
    assert main(["policy", "explain", "--sub", "ann", "--roles", "admin", "--verb", "admin:models",
                 "--amr", "pwd", "--config", config]) == 1
    out = capsys.readouterr().out
    assert "DENY" in out and "rule:   admin" in out and "admin-mfa" in out and "insufficient_user_authentication" in out
    assert main(["policy", "explain", "--sub", "x", "--roles", "guest", "--verb", "infer", "--model", "digits",
                 "--config", config]) == 1
    assert "deny by default" in capsys.readouterr().out
