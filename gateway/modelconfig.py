"""The configuration of each served model (``[models.NAME]``) with its ``guard``, ``output`` and
``extraction`` tables, and how a table's values are checked against a section's types (used for
every section by ``gateway.config``, which re-exports all of this)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = [
    "EXTRACTION_ACTIONS", "EXTRACTION_SIGNALS", "GUARD_ACTIONS", "OUTPUT_POLICIES", "Device", "ExtractionAction",
    "ExtractionConfig", "GuardAction", "GuardConfig", "ModelConfig", "OutputConfig", "OutputPolicyName", "coerce",
    "parse_model",
]

Device = Literal["auto", "cuda", "cpu"]


def _strictest(table: tuple[tuple[str, str], ...], roles: frozenset[str] | tuple[str, ...], default: str,
               order: tuple[str, ...]) -> str:
    """The last in ``order`` of the values ``table`` gives the caller's roles, or ``default``."""
    chosen = [value for role, value in table if role in roles]
    return max(chosen, key=order.index) if chosen else default


GuardAction = Literal["record", "flag", "reject", "throttle"]
GUARD_ACTIONS: tuple[str, ...] = get_args(GuardAction)
"""Strictest last: a principal with several roles gets the strictest of their actions."""


@dataclass(frozen=True)
class GuardConfig:
    """``[models.NAME.guard]``: adversarial-input and anomaly detection on the request path.

    Off unless ``detectors`` names some; the model version's folder must then hold a signed
    ``calibration.json`` made with the same ``squeezers`` (``gateway models calibrate``)."""

    detectors: tuple[str, ...] = ()
    """Any of ``squeeze``, ``anomaly``, ``confidence``; their scores are combined."""
    squeezers: tuple[str, ...] = ("bits:2", "bits:3", "bits:4")
    """``bits:N``, ``levels:N``, ``median:K`` (image-shaped inputs); the copies ride in the same worker batch."""
    image: tuple[int, ...] = ()
    """(height, width) or (channels, height, width) an input row is viewed as, when it is flat."""
    target_fpr: float = 0.01
    """The false-positive rate on clean inputs the combined threshold is placed at."""
    action: GuardAction = "record"
    """What a detection does: record (audit and metrics), flag (a response header), reject (422),
    throttle (the request counts ``throttle_cost`` times against the principal's budgets)."""
    roles: tuple[tuple[str, str], ...] = ()
    """``[models.NAME.guard.roles]``: role = action, overriding ``action`` for holders of the role."""
    throttle_cost: int = 10
    on_error: Literal["record", "reject"] = "record"
    """A detector that fails or times out: serve and record it (default), or refuse with 503."""
    timeout_ms: float = 250.0

    @property
    def enabled(self) -> bool:
        return bool(self.detectors)

    def action_for(self, roles: frozenset[str] | tuple[str, ...]) -> str:
        return _strictest(self.roles, roles, self.action, GUARD_ACTIONS)


OutputPolicyName = Literal["full", "round", "top_k", "noised", "label_only"]
OUTPUT_POLICIES: tuple[str, ...] = get_args(OutputPolicyName)
"""Least revealing last: a principal with several roles gets the least revealing of theirs."""


@dataclass(frozen=True)
class OutputConfig:
    """``[models.NAME.output]``: what a caller sees of the model's score outputs (2-D floating-point
    outputs such as probabilities or logits; others pass unchanged)."""

    policy: OutputPolicyName = "full"
    roles: tuple[tuple[str, str], ...] = ()
    """``[models.NAME.output.roles]``: role = policy, overriding ``policy`` for holders of the role."""
    top_k: int = 3
    """``top_k``: the k largest scores per row are kept, the others answered as 0."""
    decimals: int = 2
    """``round``: scores rounded to this many decimals."""
    epsilon: float = 1.0
    """``noised``: Laplace noise of scale 1/epsilon on each score (probabilities are clipped at 0 and
    renormalised). Output perturbation, not a differential-privacy guarantee for the training data."""

    def policy_for(self, roles: frozenset[str] | tuple[str, ...]) -> str:
        return _strictest(self.roles, roles, self.policy, OUTPUT_POLICIES)


ExtractionAction = Literal["record", "label_only", "throttle", "block"]
EXTRACTION_ACTIONS: tuple[str, ...] = get_args(ExtractionAction)
EXTRACTION_SIGNALS = ("prada", "ood", "boundary")


@dataclass(frozen=True)
class ExtractionConfig:
    """``[models.NAME.extraction]``: model-extraction monitoring per principal (``gateway.guards.extraction``).

    Needs the model version's signed ``calibration.json`` (the guard's; ``gateway models calibrate``)."""

    enabled: bool = False
    signals: tuple[str, ...] = EXTRACTION_SIGNALS
    action: ExtractionAction = "label_only"
    """What an alarm does to the principal, until an operator clears it (``gateway principals clear``):
    record (audit, metrics, events only), label_only (answers become one-hot), throttle (each
    request counts ``throttle_cost`` times against the budgets), block (403)."""
    roles: tuple[tuple[str, str], ...] = ()
    """``[models.NAME.extraction.roles]``: role = action; the strictest of a caller's roles applies."""
    prada_delta: float = 0.90
    """PRADA's alarm: the Shapiro–Wilk W of the principal's query distances below this."""
    z_alarm: float = 5.0
    """The ``ood`` and ``boundary`` signals' alarm: the window's mean place this many standard errors
    above a clean stream's."""
    min_queries: int = 50
    """Queries in the window before ``ood`` and ``boundary`` are tested."""
    window: int = 2000
    """The last queries each principal's signals are computed over."""
    max_principals: int = 1000
    """Principals watched at once in this process (least recently seen forgotten first; alarms are kept)."""
    throttle_cost: int = 10

    def action_for(self, roles: frozenset[str] | tuple[str, ...]) -> str:
        return _strictest(self.roles, roles, self.action, EXTRACTION_ACTIONS)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str = "1"
    """The default version: what ``/v2/models/{name}`` serves."""
    versions: tuple[str, ...] = ()
    """Other versions served beside it, each with its own workers (``/versions/{v}``)."""
    workers: int = 1
    """Local worker processes (0: only the remote ``endpoints`` serve it)."""
    endpoints: tuple[str, ...] = ()
    """Worker hosts that serve this model too ("host:port" of ``gateway worker serve``), reached
    over mutual TLS (``[remote_workers]``)."""
    listen: str = ""
    """On a worker host only: where ``gateway worker serve`` serves this model ("host:port")."""
    kek_file: str = ""
    """This model's own key-encryption key (a sealed model), instead of ``supply.kek_file``: a
    worker host holds the keys of the models it serves and no other; a gateway that serves a model
    only through worker hosts needs none (it checks the signature, never unseals)."""
    device: Device = "auto"
    """"cuda" fails loudly when the CUDA execution provider is not active."""
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    intra_op_threads: int = 1
    intra_op_spinning: bool = True
    """Let ONNX Runtime's intra-op threads spin while they wait for work (its own default): less
    latency inside a run; false stops them burning CPU between runs, for a worker whose cores other
    busy processes need (on two shared cores neither was measurably faster for binary
    ``resnetish`` at 16 clients, and spinning was 11% faster for JSON ``resnetish`` at one).
    """
    memory_limit_mb: int = 0
    """Address-space limit for each worker process; 0 means none (CUDA reserves a lot)."""
    max_inflight: int = 256
    """Requests queued or running per worker before 503 with Retry-After."""
    batch_buckets: str = "auto"
    """Pad batches to these sizes ("8,16"); "auto" = max_batch_size on CUDA, none on CPU; "off"."""
    cuda_tf32: bool = False
    """Allow TF32 matrix maths on CUDA: faster, but outputs drift from the CPU's by ~1e-3."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)


def coerce(cls: type, raw: dict[str, Any], where: str, problems: list[str]) -> Any:
    """``raw``'s values that fit ``cls``'s field types, as keyword arguments; each misfit into ``problems``."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"{where}.{key}: unknown setting")
            continue
        hint = hints[key]
        if get_origin(hint) is Literal:
            if value not in get_args(hint):
                problems.append(f"{where}.{key}: {value!r} is not one of {list(get_args(hint))}")
                continue
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif get_origin(hint) is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}.{key}: expected a list of strings")
                continue
            value = tuple(value)
        elif not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            problems.append(f"{where}.{key}: expected {hint.__name__}, got {type(value).__name__}")
            continue
        kwargs[key] = value
    return kwargs


def parse_model(name: str, raw: Any, problems: list[str]) -> ModelConfig | None:
    """``[models.NAME]`` with its ``guard`` and ``output`` tables."""
    where = f"models.{name}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table")
        return None
    table = dict(raw)
    guard = _guard(table.pop("guard", {}), f"{where}.guard", problems)
    output = _output(table.pop("output", {}), f"{where}.output", problems)
    extraction = _extraction(table.pop("extraction", {}), f"{where}.extraction", problems)
    return ModelConfig(name=name, guard=guard, output=output, extraction=extraction,
                       **coerce(ModelConfig, table, where, problems))


_Table = TypeVar("_Table", GuardConfig, OutputConfig, ExtractionConfig)


def _with_roles(cls: type[_Table], raw: Any, where: str, allowed: tuple[str, ...], problems: list[str]) -> _Table:
    """A ``[models.NAME.*]`` table and its ``roles`` table (role = one of ``allowed``)."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table")
        return cls()
    raw = dict(raw)
    roles = _role_table(raw.pop("roles", {}), f"{where}.roles", allowed, problems)
    return dataclasses.replace(cls(**coerce(cls, raw, where, problems)), roles=roles)


def _extraction(raw: Any, where: str, problems: list[str]) -> ExtractionConfig:
    watch = _with_roles(ExtractionConfig, raw, where, EXTRACTION_ACTIONS, problems)
    for name in watch.signals:
        if name not in EXTRACTION_SIGNALS:
            problems.append(f"{where}.signals: {name!r} is not one of {list(EXTRACTION_SIGNALS)}")
    if not 0.5 <= watch.prada_delta < 1 or not 1 <= watch.z_alarm <= 100:
        problems.append(f"{where}: prada_delta must be 0.5..1 (exclusive) and z_alarm 1..100")
    if not 10 <= watch.min_queries <= watch.window <= 100000 or not 1 <= watch.max_principals <= 10**6:
        problems.append(f"{where}: 10 <= min_queries <= window <= 100000 and max_principals 1..1000000")
    if not 1 <= watch.throttle_cost <= 1000:
        problems.append(f"{where}.throttle_cost must be 1..1000")
    return watch


def _output(raw: Any, where: str, problems: list[str]) -> OutputConfig:
    output = _with_roles(OutputConfig, raw, where, OUTPUT_POLICIES, problems)
    if not 1 <= output.top_k <= 1000 or not 0 <= output.decimals <= 6 or not 0.01 <= output.epsilon <= 1000:
        problems.append(f"{where}: top_k must be 1..1000, decimals 0..6 and epsilon 0.01..1000")
    return output


def _role_table(raw: Any, where: str, allowed: tuple[str, ...], problems: list[str]) -> tuple[tuple[str, str], ...]:
    """``[...roles]``: role = one of ``allowed``, as sorted pairs."""
    if not isinstance(raw, dict) or not all(value in allowed for value in raw.values()):
        problems.append(f"{where}: expected a table of role = one of {list(allowed)}")
        return ()
    return tuple(sorted(raw.items()))


def _guard(raw: Any, where: str, problems: list[str]) -> GuardConfig:
    from gateway.guards.detectors import DETECTORS, parse_squeezer

    raw = dict(raw) if isinstance(raw, dict) else raw
    image = raw.pop("image", []) if isinstance(raw, dict) else []
    guard = _with_roles(GuardConfig, raw, where, GUARD_ACTIONS, problems)
    if not isinstance(image, list) or len(image) not in (0, 2, 3) or not all(type(d) is int and d > 0 for d in image):
        problems.append(f"{where}.image: expected [height, width] or [channels, height, width]")
        image = []
    for name in guard.detectors:
        if name not in DETECTORS:
            problems.append(f"{where}.detectors: {name!r} is not one of {list(DETECTORS)}")
    for spec in guard.squeezers:
        try:
            parse_squeezer(spec)
        except ValueError as exc:
            problems.append(f"{where}.squeezers: {exc}")
    if "squeeze" in guard.detectors and not guard.squeezers:
        problems.append(f"{where}.squeezers: the squeeze detector needs at least one squeezer")
    if not 0.0001 <= guard.target_fpr <= 0.5:
        problems.append(f"{where}.target_fpr must be 0.0001..0.5")
    if not 1 <= guard.throttle_cost <= 1000 or not 1 <= guard.timeout_ms <= 60000:
        problems.append(f"{where}: throttle_cost must be 1..1000 and timeout_ms 1..60000")
    return dataclasses.replace(guard, image=tuple(image))
