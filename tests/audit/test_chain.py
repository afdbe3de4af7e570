"""The audit chain offline: every way of tampering is caught and named; crashes are told apart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.chain import AuditKey, canonical, digest, stream_files, verify_paths
from gateway.audit.middleware import _client, _part
from gateway.audit.writer import AuditUnavailable, AuditWriter
from gateway.cli import main
from gateway.config import AuditConfig
from gateway.security.types import Decision, PeerIdentity, Principal

KEY = AuditKey(Ed25519PrivateKey.generate())


def request(i: int) -> dict[str, object]:
    return {"kind": "request", "request_id": f"r{i}", "status": 200, "outcome": "allow", "path": "/v2/models/digits/infer"}


async def write_log(directory: Path, records: int = 40, stream: str = "p0", key: AuditKey = KEY,
                    close: bool = True, durability: str = "process", together: bool = False) -> AuditWriter:
    config = AuditConfig(directory=str(directory), checkpoint_every=7, max_file_bytes=4096, flush_window_ms=0.5,
                         durability=durability)
    writer = AuditWriter(config, stream, key)
    writer.open()
    if together:  # as concurrent requests do: batches, rotations and checkpoints interleave
        await asyncio.gather(*(writer.append(request(i)) for i in range(records)))
    else:
        for i in range(records):
            await writer.append(request(i))
    if close:
        await writer.close()
    return writer


def lines_of(directory: Path) -> list[tuple[Path, int]]:
    """(file, line index) for every record, in order."""
    out = []
    for f in stream_files([directory])["p0"]:
        out += [(f, i) for i in range(len(f.read_bytes().splitlines()))]
    return out


def rewrite(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"".join(line + b"\n" for line in change(lines)))


def record_at(path: Path, i: int) -> dict[str, object]:
    return dict(json.loads(path.read_bytes().splitlines()[i]))


@pytest.mark.anyio
@pytest.mark.parametrize("durability", ["process", "fsync"])
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "concurrent"])
async def test_an_untouched_log_verifies(tmp_path: Path, durability: str, together: bool) -> None:
    await write_log(tmp_path, records=120, durability=durability, together=together)
    report = verify_paths([tmp_path], KEY.public)
    assert report.ok, report.problems
    assert len(stream_files([tmp_path])["p0"]) > 1  # it rotated, and the chain continued across files
    assert report.records == sum(1 for _ in lines_of(tmp_path))
    assert report.checkpoints >= (3 if together else 17)  # a batch ends with at most one count checkpoint
    ids = [record_at(f, i).get("request_id") for f, i in lines_of(tmp_path)]
    assert [x for x in ids if x is not None] == [f"r{i}" for i in range(120)]  # each once, in order


@pytest.mark.anyio
@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_an_append_returns_once_its_record_is_as_durable_as_configured(
        tmp_path: Path, durability: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = AuditConfig(directory=str(tmp_path), durability=durability, fsync_interval_ms=100)
    writer = AuditWriter(config, "p0", KEY)
    writer.open()
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    inode = os.fstat(writer.file.fd).st_ino
    await writer.append(request(1), request(2))
    assert b'"request_id":"r2"' in Path(str(writer.file.path)).read_bytes()  # written before the answer, either way
    if durability == "fsync":
        assert synced == [inode]
    else:
        assert synced == []  # in the page cache: survives kill -9, not yet a power cut
        await asyncio.sleep(0.3)
        assert synced == [inode]  # ...until the fsync that follows within fsync_interval_ms
    await writer.close()
    assert verify_paths([tmp_path], KEY.public).ok


@pytest.mark.anyio
async def test_records_of_one_loop_turn_share_a_write_and_each_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = AuditWriter(AuditConfig(directory=str(tmp_path)), "p0", KEY)
    writer.open()
    writes: list[bytes] = []
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted)
    path = Path(str(writer.file.path))

    async def answer(i: int) -> None:
        await writer.append(request(i))
        assert f'"request_id":"r{i}"'.encode() in path.read_bytes()  # never before its record is written

    def waits(i: int) -> bool:
        """Whether appending request i must wait for the end of the turn (or was written at once)."""
        step = writer.append(request(i)).__await__()
        try:
            next(step)
        except StopIteration:
            return False
        step.close()
        writer._turn = None
        return True

    await asyncio.gather(*(answer(i) for i in range(10)))  # ten requests answered in one turn
    assert [w.count(b'"kind":"request"') for w in writes] == [1, 9]  # after a quiet turn: the first at once
    await asyncio.gather(*(answer(i) for i in range(10, 20)))
    assert [w.count(b'"kind":"request"') for w in writes[2:]] == [10]  # after a busy one: all together
    assert waits(20)  # the turn after a busy one: even a lone record waits for its end...
    await asyncio.sleep(0)
    assert not waits(21)  # ...and after that quiet turn, one is written at once again
    await writer.close()
    assert verify_paths([tmp_path], KEY.public).ok
    ids = [record_at(f, i).get("request_id") for f, i in lines_of(tmp_path)]
    assert [x for x in ids if x is not None] == [f"r{i}" for i in (*range(20), 21)]  # 20 was never let finish


@pytest.mark.anyio
async def test_parts_that_many_records_share_are_serialized_once_and_write_the_same_bytes(tmp_path: Path) -> None:
    peer = PeerIdentity("CN=demo,O=Gateway", tuple(f"URI:spiffe://gw/{i}" for i in range(10)), "ab" * 32, "tls")
    principal = Principal("alice", "person", frozenset({"viewer", "inference"}), issuer="https://idp.example",
                          amr=("pwd", "otp"), auth_time=1700000000, token_id="t1")
    decision = Decision(True, "infer", "digits", "analysts", "granted by analysts")
    shared = {**request(1), "client": _client("10.0.0.7", peer), "principal": _part(principal),
              "decision": _part(decision)}
    plain = {**request(1), "principal": principal.as_dict(), "decision": decision.as_dict(),
             "client": {"address": "10.0.0.7", "cert_sha256": "ab" * 32, "subject": "CN=demo,O=Gateway",
                        "sans": [f"URI:spiffe://gw/{i}" for i in range(8)], "source": "tls"}}
    assert canonical(shared) == canonical(plain)
    assert _client("10.0.0.7", peer) is _client("10.0.0.7", peer) and _part(principal) is _part(principal)
    assert canonical({"client": _client(None, None)}) == b'{"client":{"address":null}}'

    writer = AuditWriter(AuditConfig(directory=str(tmp_path)), "p0", KEY)
    counted: list[int] = []
    writer.count = counted.append
    writer.open()
    await writer.append(shared)
    await writer.close()
    assert verify_paths([tmp_path], KEY.public).ok  # canonical form included
    written = [record_at(f, i) for f, i in lines_of(tmp_path)]
    assert [r for r in written if r["kind"] == "request"][0]["principal"] == json.loads(canonical(principal.as_dict()))
    assert sum(counted) == len(written)  # every record, start-up and checkpoints included


@pytest.mark.anyio
@pytest.mark.parametrize("durability", ["process", "fsync"])
async def test_a_write_that_fails_fails_its_requests_and_the_writer_recovers(
        tmp_path: Path, durability: str, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = AuditWriter(AuditConfig(directory=str(tmp_path), durability=durability), "p0", KEY)
    writer.open()
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(AuditUnavailable, match="No space left"):
        await writer.append(request(1))
    with pytest.raises(AuditUnavailable):  # refused at once until the retry time
        await writer.append(request(2))
    monkeypatch.setattr(os, "write", real_write)
    writer.retry_at = 0.0
    await writer.append(request(3))
    await writer.close()
    assert writer.failed is None
    ids = [record_at(f, i).get("request_id") for f, i in lines_of(tmp_path)]
    assert [x for x in ids if x is not None] == ["r3"]
    assert verify_paths([tmp_path], KEY.public).ok


def _request_line(directory: Path, n: int) -> tuple[Path, int]:
    """The n-th request record (not a checkpoint)."""
    found = [(f, i) for f, i in lines_of(directory) if record_at(f, i)["kind"] == "request"]
    return found[n]


def _edit(d: Path) -> str:
    f, i = _request_line(d, 10)
    rewrite(f, lambda ls: [canonical({**json.loads(x), "status": 403}) if k == i else x for k, x in enumerate(ls)])
    return f"record {record_at(f, i)['seq']}"


def _delete(d: Path) -> str:
    f, i = _request_line(d, 12)
    seq = record_at(f, i)["seq"]
    rewrite(f, lambda ls: [x for k, x in enumerate(ls) if k != i])
    return f"where {seq} belongs"


def _reorder(d: Path) -> str:
    f, i = _request_line(d, 3)
    seq = record_at(f, i)["seq"]
    rewrite(f, lambda ls: ls[:i] + [ls[i + 1], ls[i]] + ls[i + 2:])
    return f"where {seq} belongs"


def _truncate_a_middle_file(d: Path) -> str:
    first = stream_files([d])["p0"][0]
    rewrite(first, lambda ls: ls[:-3])
    return "is next"


def _truncate_the_end(d: Path) -> str:
    last = stream_files([d])["p0"][-1]
    rewrite(last, lambda ls: ls[:-2])  # the closing checkpoint and one record gone
    return "follow the last checkpoint"


def _forge_checkpoint(d: Path) -> str:
    f, i = next((f, i) for f, i in lines_of(d) if record_at(f, i)["kind"] == "checkpoint" and i > 3)
    forger = AuditKey(Ed25519PrivateKey.generate())

    def forge(ls: list[bytes]) -> list[bytes]:
        record = json.loads(ls[i])
        record["reason"] = "forged"
        signed = forger.sign(record)
        signed["key_id"] = record["key_id"]  # claim to be the real key
        return [canonical(signed) if k == i else x for k, x in enumerate(ls)]

    rewrite(f, forge)
    return f"checkpoint {record_at(f, i)['seq']} has a signature that does not verify"


def _drop_checkpoint(d: Path) -> str:
    f, i = next((f, i) for f, i in lines_of(d) if record_at(f, i)["kind"] == "checkpoint" and i > 3)
    seq = record_at(f, i)["seq"]
    rewrite(f, lambda ls: [x for k, x in enumerate(ls) if k != i])
    return f"where {seq} belongs"


def _splice(d: Path) -> str:
    other = d.parent / "other-log"
    import asyncio

    asyncio.run(write_log(other, records=40))
    f, i = _request_line(d, 20)
    g, j = _request_line(other, 20)
    donor = g.read_bytes().splitlines()[j]
    rewrite(f, lambda ls: [donor if k == i else x for k, x in enumerate(ls)])
    return "does not link"


def _cut_right_after_a_checkpoint(d: Path) -> str:
    """Everything after a checkpoint other than the last one removed: the end still "looks" signed."""
    files = stream_files([d])["p0"]
    f, i = [(f, i) for f, i in lines_of(d) if record_at(f, i).get("reason") == "count"][-2]
    rewrite(f, lambda ls: ls[: i + 1])
    for later in files[files.index(f) + 1:]:
        later.unlink()
    return "not at a shutdown checkpoint"


def _second_stream(d: Path) -> None:
    import asyncio

    asyncio.run(write_log(d, records=10, stream="p1"))


def _delete_a_whole_stream(d: Path) -> str:
    _second_stream(d)
    shutil.rmtree(d / "p1")
    return "stream 'p1' is in the stream manifest but none of its files are here"


def _add_a_stream_from_elsewhere(d: Path) -> str:
    other = d.parent / "elsewhere"
    import asyncio

    asyncio.run(write_log(other, records=10, stream="p7"))
    shutil.copytree(other / "p7", d / "p7")
    return "stream 'p7' is not in the stream manifest"


def _delete_the_manifest(d: Path) -> str:
    _second_stream(d)
    shutil.rmtree(d / "p1")
    (d / "streams.json").unlink()
    return "no stream manifest"


def _edit_the_manifest(d: Path) -> str:
    _second_stream(d)
    shutil.rmtree(d / "p1")
    doc = json.loads((d / "streams.json").read_text())
    del doc["streams"]["p1"]
    (d / "streams.json").write_bytes(canonical(doc))
    return "the stream manifest has a signature that does not verify"


TAMPERING = [("edit a field", _edit), ("delete a record", _delete), ("reorder two", _reorder),
             ("truncate a rotated file", _truncate_a_middle_file), ("truncate the end", _truncate_the_end),
             ("forge a checkpoint", _forge_checkpoint), ("drop a checkpoint", _drop_checkpoint),
             ("splice from another log", _splice), ("cut right after a checkpoint", _cut_right_after_a_checkpoint),
             ("delete a whole stream", _delete_a_whole_stream), ("add a stream from elsewhere", _add_a_stream_from_elsewhere),
             ("delete the stream manifest", _delete_the_manifest), ("edit the stream manifest", _edit_the_manifest)]


@pytest.mark.parametrize("tamper", [t[1] for t in TAMPERING], ids=[t[0] for t in TAMPERING])
def test_tampering_is_caught_and_named(tmp_path: Path, tamper: Callable[[Path], str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    log = tmp_path / "log"
    asyncio.run(write_log(log))
    expected = tamper(log)
    report = verify_paths([log], KEY.public)
    assert not report.ok
    assert expected in report.problems[0], report.problems
    # The command says the same and exits non-zero.
    public = tmp_path / "audit.pub"
    from cryptography.hazmat.primitives import serialization

    public.write_bytes(KEY.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["audit", "verify", str(log), "--public-key", str(public)]) == 1
    assert expected in capsys.readouterr().out


@pytest.mark.anyio
async def test_a_crash_leaves_a_torn_tail_that_restart_cuts_and_records(tmp_path: Path) -> None:
    writer = await write_log(tmp_path, records=10, close=False)  # no closing checkpoint: as after kill -9
    last = stream_files([tmp_path])["p0"][-1]
    with open(last, "ab") as f:
        f.write(b'{"kind":"request","prev":"')  # a record torn mid-write
    os.close(writer.file.fd)  # what the kernel does when the process dies
    os.close(writer._lock_fd)
    strict = verify_paths([tmp_path], KEY.public)
    assert not strict.ok and "torn" in strict.problems[0]
    lenient = verify_paths([tmp_path], KEY.public, allow_unsealed=True)
    assert lenient.ok and any("torn" in n for n in lenient.notes)
    restarted = AuditWriter(writer.config, "p0", KEY)
    restarted.open()
    await restarted.append({"kind": "request", "request_id": "after", "status": 200})
    await restarted.close()
    report = verify_paths([tmp_path], KEY.public)
    assert report.ok, report.problems
    kinds = [json.loads(x)["kind"] for f in stream_files([tmp_path])["p0"] for x in f.read_bytes().splitlines()]
    assert "recovery" in kinds and "note" in kinds  # the cut and the unsealed tail are on the record


@pytest.mark.anyio
async def test_a_second_writer_on_the_same_stream_is_refused(tmp_path: Path) -> None:
    first = await write_log(tmp_path, records=1, close=False)
    with pytest.raises(RuntimeError, match="in use by another gateway process"):
        AuditWriter(first.config, "p0", KEY).open()
    await first.close()


def test_records_link_by_the_hash_of_the_whole_line(tmp_path: Path) -> None:
    import asyncio

    asyncio.run(write_log(tmp_path, records=3))
    lines = stream_files([tmp_path])["p0"][0].read_bytes().splitlines()
    for before, after in zip(lines, lines[1:]):
        assert json.loads(after)["prev"] == digest(before)
    shutil.rmtree(tmp_path)


def test_record_times_are_utc_to_the_microsecond() -> None:
    from datetime import UTC, datetime

    from gateway.audit.writer import utc_now

    for _ in range(3):
        text = utc_now()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text), text
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - parsed).total_seconds()) < 1
