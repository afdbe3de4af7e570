"""Role-based access control per verb and model, and step-up (MFA) policy.

Deny by default: a principal may do what one of ``[[rbac.rules]]`` grants to a role it holds, and
nothing else. A model the principal may not use at all is answered 404, exactly as a missing one
is, so model names do not leak between tenants (``visible_models`` filters lists the same way).
A principal that can see a model but lacks the verb gets 403, and so does any principal refused
a verb that names no model (``admin:*``).

When a rule grants the verb, ``[[rbac.step_up]]`` rules then ask how the principal authenticated
(``amr``, ``acr``, ``auth_time``; RFC 8176, RFC 9470). A person who falls short gets 401
``insufficient_user_authentication`` saying what would do; a service (client credentials) or a
bare certificate cannot step up and gets 403.
"""

from __future__ import annotations

import fnmatch
import functools
import time

from gateway.config import VERBS, PolicyConfig, RuleConfig, StepUpRule
from gateway.errors import Forbidden, GatewayError, NotFound, StepUpRequired
from gateway.security.types import Decision, Principal

__all__ = ["MODEL_VERBS", "Policy"]

MODEL_VERBS = ("infer", "metadata", "explain")
"""Verbs aimed at one model: refusing them answers 404 unless the model is visible to the caller."""


@functools.lru_cache(maxsize=4096)  # bounded: model names come from request paths
def _match(patterns: tuple[str, ...], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


class Policy:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.rules = config.rules
        self.step_ups = config.step_up
        self.acr_rank = {acr: i for i, acr in enumerate(config.acr_order)}

    def _granting(self, principal: Principal, verb: str, model: str | None) -> RuleConfig | None:
        for rule in self.rules:
            if principal.roles.intersection(rule.roles) and _match(rule.verbs, verb) and (
                model is None or _match(rule.models, model)
            ):
                return rule
        return None

    def can_see(self, principal: Principal, model: str) -> bool:
        return any(self._granting(principal, verb, model) for verb in MODEL_VERBS)

    def visible_models(self, principal: Principal, models: list[str]) -> list[str]:
        return [m for m in models if self.can_see(principal, m)]

    def _shortfall(self, principal: Principal, step: StepUpRule, now: float) -> str | None:
        if step.amr_any and not set(step.amr_any).intersection(principal.amr):
            return f"needs one of amr {list(step.amr_any)}; the token has {list(principal.amr)}"
        if step.acr_min:
            rank = self.acr_rank.get(principal.acr or "", -1)
            if rank < self.acr_rank[step.acr_min]:
                return f"needs acr {step.acr_min!r} or stronger; the token has {principal.acr!r}"
        if step.max_age_s:
            if principal.auth_time is None:
                return f"needs a sign-in within {step.max_age_s} s; the token has no auth_time"
            age = now - principal.auth_time
            if age > step.max_age_s:
                return f"needs a sign-in within {step.max_age_s} s; the last was {int(age)} s ago"
        return None

    def decide(self, principal: Principal, verb: str, model: str | None, now: float | None = None) -> Decision:
        if verb not in VERBS:
            return Decision(False, verb, model, None, f"unknown verb {verb!r}")
        rule = self._granting(principal, verb, model)
        if rule is None:
            what = f"{verb} on {model!r}" if model else verb
            return Decision(False, verb, model, None, f"no rule grants {what} to roles {sorted(principal.roles)}")
        now = time.time() if now is None else now
        for step in self.step_ups:
            if not _match(step.verbs, verb) or (step.roles and not principal.roles.intersection(step.roles)):
                continue
            short = self._shortfall(principal, step, now)
            if short:
                return Decision(False, verb, model, rule.name, f"{step.name}: {short}", step_up=step.name)
        return Decision(True, verb, model, rule.name, f"granted by {rule.name}")

    def refusal(self, principal: Principal, decision: Decision) -> GatewayError:
        """The answer a refused request gets: 404 hides models the caller cannot see at all."""
        verb, model = decision.verb, decision.model
        if decision.step_up is not None:
            step = next(s for s in self.step_ups if s.name == decision.step_up)
            if principal.kind != "person":
                return Forbidden(f"{verb} needs a person who signed in with stronger authentication "
                                 f"({decision.reason}); a {principal.kind} credential cannot step up")
            strongest = self.config.acr_order[-1] if self.config.acr_order else ""
            return StepUpRequired(decision.reason, acr_values=step.acr_min or strongest,
                                  max_age=step.max_age_s or None)
        if model is not None and verb in MODEL_VERBS and not self.can_see(principal, model):
            return NotFound(f"unknown model {model!r}")
        return Forbidden(decision.reason)
