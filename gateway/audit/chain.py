"""The audit log's format, signatures and offline verification.

A log is one or more *streams* (one per serving process: ``p0``, ``p1``...), each a directory of
JSON-lines files ``<stream>-<first seq, 12 digits>.jsonl``. Every line is one record in canonical
JSON (sorted keys, no spaces, UTF-8) with

* ``seq``: 1, 2, 3... within the stream, across files;
* ``prev``: the SHA-256 (hex) of the previous record's line (``GENESIS`` for the first);
* ``kind``: ``start``, ``request``, ``tls``, ``recovery`` or ``checkpoint``.

A checkpoint also carries ``key_id`` and ``sig``: an Ed25519 signature over the canonical JSON of
the record without ``sig``. Because it holds ``seq`` and ``prev``, it vouches for every record
before it. Changing, removing, reordering or splicing a record breaks a link or a sequence
number; a forged checkpoint fails its signature.

A checkpoint vouches only for what precedes it, so what follows is pinned down in two ways. Only
a ``shutdown`` checkpoint seals a stream's end: a stream that ends with any other record (a
``count`` or ``interval`` checkpoint included) was cut, or its gateway is running or crashed, and
``verify`` refuses it unless told so (``allow_unsealed``). And the log's directory holds
``streams.json``, the stream manifest, signed with the same key and kept by every writer: each
stream ever opened, ``open`` while it runs and ``sealed`` at its last record's number when it
closes. ``verify`` refuses a log with a stream missing from its directory, a stream the manifest
does not list, or a sealed stream that does not end where the manifest says. (A manifest copied
from an earlier time could hide a stream created since: ship logs and manifests to write-once
storage for that.)
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "GENESIS", "MANIFEST", "AuditKey", "VerifyReport", "canonical", "digest", "load_private_key", "load_public_key",
    "stream_files", "update_manifest", "verify_paths",
]

GENESIS = "0" * 64
MANIFEST = "streams.json"
FILE_PATTERN = re.compile(r"^(?P<stream>[A-Za-z0-9_-]+)-(?P<seq>\d{12})\.jsonl$")


def canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        unsigned = {**record, "key_id": key_id(self.public)}
        unsigned.pop("sig", None)
        return {**unsigned, "sig": base64.b64encode(self.private.sign(canonical(unsigned))).decode()}


def load_private_key(path: str | Path) -> AuditKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return AuditKey(key)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def update_manifest(directory: Path, stream: str, sealed_at: int | None, key: AuditKey) -> None:
    """Mark ``stream`` open (``sealed_at`` None) or sealed at that record in the directory's signed
    stream manifest; processes sharing the directory take turns (an exclusive lock)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / MANIFEST
    lock = os.open(directory / ".streams.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        streams: dict[str, Any] = {}
        if path.exists():
            current = orjson.loads(path.read_bytes())
            if isinstance(current, dict) and isinstance(current.get("streams"), dict):
                streams = current["streams"]
        streams[stream] = {"state": "open"} if sealed_at is None else {"state": "sealed", "seq": sealed_at}
        data = canonical(key.sign({"kind": "streams", "streams": streams})) + b"\n"
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        os.close(lock)


def stream_files(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Log files by stream, each stream's files in sequence order; directories are searched."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for given in paths:
        p = Path(given)
        candidates = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
        for f in candidates:
            m = FILE_PATTERN.match(f.name)
            if m:
                found.setdefault(m["stream"], []).append((int(m["seq"]), f))
    return {s: [f for _, f in sorted(files)] for s, files in sorted(found.items())}


@dataclass
class VerifyReport:
    records: int = 0
    checkpoints: int = 0
    streams: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _End:
    """How a stream ends: its last record's number, and whether that is a shutdown checkpoint."""

    seq: int
    sealed: bool


def verify_paths(paths: Iterable[str | Path], public: Ed25519PublicKey, allow_unsealed: bool = False,
                 manifest: Path | None = None, require_manifest: bool = True) -> VerifyReport:
    """Check every stream found under ``paths`` (each stopped at its first problem), then the
    stream manifest: ``manifest``, else ``streams.json`` in a directory given; a directory without
    one is refused unless ``require_manifest`` is false."""
    given = [Path(p) for p in paths]
    report = VerifyReport()
    expected_key = key_id(public)
    streams = stream_files(given)
    if not streams:
        report.problems.append("no audit log files (<stream>-<seq>.jsonl) found")
    ends: dict[str, _End | None] = {}
    for stream, files in streams.items():
        report.streams.append(stream)
        ends[stream] = _verify_stream(stream, files, public, expected_key, allow_unsealed, report)
    manifests = [manifest] if manifest is not None else [p / MANIFEST for p in given if p.is_dir()]
    found = [m for m in manifests if m.exists()]
    if not found:
        if manifests and require_manifest:
            report.problems.append(f"no stream manifest ({MANIFEST}): cannot tell whether a whole stream was removed")
        else:
            report.notes.append("stream completeness not checked (no stream manifest)")
    for path in found:
        _verify_manifest(path, ends, public, expected_key, allow_unsealed, report)
    return report


def _verify_manifest(path: Path, ends: dict[str, _End | None], public: Ed25519PublicKey, expected_key: str,
                     allow_unsealed: bool, report: VerifyReport) -> None:
    try:
        doc = orjson.loads(path.read_bytes())
        listed = doc["streams"] if isinstance(doc, dict) and isinstance(doc.get("streams"), dict) else None
    except (OSError, ValueError, KeyError):
        listed = None
    if listed is None:
        report.problems.append(f"{path}: not a stream manifest")
        return
    problem = _check_signature(doc, public, expected_key)
    if problem:
        report.problems.append(f"{path}: the stream manifest {problem}")
        return
    for stream in sorted(set(ends) - set(listed)):
        report.problems.append(f"stream {stream!r} is not in the stream manifest (files added from elsewhere)")
    for stream, entry in sorted(listed.items()):
        if stream not in ends:
            report.problems.append(f"stream {stream!r} is in the stream manifest but none of its files are here "
                                   "(the stream was deleted)")
            continue
        end = ends[stream]
        if end is None:
            continue  # already reported
        if entry.get("state") == "sealed":
            if end.seq != entry.get("seq") or not end.sealed:
                report.problems.append(f"stream {stream!r} was sealed at record {entry.get('seq')} but ends at record "
                                       f"{end.seq} (records were removed or added after the seal)")
        elif end.sealed:
            report.notes.append(f"stream {stream!r} is sealed; its manifest entry still says open")
        elif not allow_unsealed:
            report.problems.append(f"stream {stream!r} is open: its gateway is running, or stopped without closing it")


def _verify_stream(stream: str, files: list[Path], public: Ed25519PublicKey, expected_key: str,
                   allow_unsealed: bool, report: VerifyReport) -> _End | None:
    """How the stream ends, once every record checked; None at its first problem."""
    prev, seq, last_kind, last_checkpoint, last_reason = GENESIS, 0, "", 0, ""
    for n, path in enumerate(files):
        data = path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        first_seq = int(FILE_PATTERN.match(path.name)["seq"])  # type: ignore[index]
        if lines and first_seq != seq + 1:
            report.problems.append(f"{path.name}: named for record {first_seq}, but record {seq + 1} is next "
                                   "(a file is missing or out of place)")
            return None
        for i, line in enumerate(lines, 1):
            where = f"{path.name}:{i}"
            try:
                record = orjson.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                report.problems.append(f"{where}: record {seq + 1} is not a JSON object (edited or corrupted)")
                return None
            if canonical(record) != line:
                report.problems.append(f"{where}: record {record.get('seq')} is not in canonical form (edited)")
                return None
            if record.get("seq") != seq + 1:
                report.problems.append(f"{where}: record {record.get('seq')} where {seq + 1} belongs "
                                       "(records removed, inserted or reordered)")
                return None
            if record.get("prev") != prev:
                report.problems.append(f"{where}: record {seq + 1} does not link to record {seq} "
                                       f"(record {seq} was altered, or this one comes from another log)")
                return None
            if record.get("stream") != stream:
                report.problems.append(f"{where}: record {seq + 1} belongs to stream {record.get('stream')!r}, "
                                       f"not {stream!r} (spliced from another log)")
                return None
            if record.get("kind") == "checkpoint":
                problem = _check_signature(record, public, expected_key)
                if problem:
                    report.problems.append(f"{where}: checkpoint {seq + 1} {problem}")
                    return None
                report.checkpoints += 1
                last_checkpoint = seq + 1
            prev, seq, last_kind = digest(line), seq + 1, str(record.get("kind"))
            last_reason = str(record.get("reason", ""))
            report.records += 1
        if torn:
            where = f"{path.name}:{len(lines) + 1}"
            if n != len(files) - 1 or not allow_unsealed:
                report.problems.append(f"{where}: a torn, incomplete record after record {seq} "
                                       "(a crash mid-write, or the file was cut)")
                return None
            report.notes.append(f"{stream}: {where}: torn last record after {seq} (crash mid-write)")
    end = _End(seq, last_kind == "checkpoint" and last_reason == "shutdown")
    unsealed = _unsealed(stream, end, last_kind, last_reason, last_checkpoint)
    if unsealed:
        (report.notes if allow_unsealed else report.problems).append(unsealed)
    return end


def _unsealed(stream: str, end: _End, last_kind: str, last_reason: str, last_checkpoint: int) -> str | None:
    """What is wrong with how a stream ends, if anything: only a shutdown checkpoint seals it."""
    if not end.seq or end.sealed:
        return None
    if last_kind != "checkpoint":
        return (f"{stream}: the last {end.seq - last_checkpoint} record(s), {last_checkpoint + 1}..{end.seq}, follow "
                "the last checkpoint (the log was cut short, or the gateway stopped without closing it)")
    return (f"{stream}: the log ends at checkpoint {end.seq} ({last_reason}), not at a shutdown checkpoint "
            "(it was cut after it, or its gateway is running or stopped without closing it)")


def _check_signature(record: dict[str, Any], public: Ed25519PublicKey, expected_key: str) -> str | None:
    if record.get("key_id") != expected_key:
        return f"is signed by key {record.get('key_id')!r}, not {expected_key!r}"
    try:
        signature = base64.b64decode(str(record.get("sig", "")), validate=True)
    except ValueError:
        return "has a malformed signature"
    unsigned = {k: v for k, v in record.items() if k != "sig"}
    try:
        public.verify(signature, canonical(unsigned))
    except InvalidSignature:
        return "has a signature that does not verify (forged or altered)"
    return None
