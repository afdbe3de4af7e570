"""The built-in issuer in process: secrets at rest, TOTP, lockout, and signing-key rotation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers

from gateway.cli import main
from gateway.config import Config, load_config
from gateway.devsetup import init
from gateway.errors import Unauthorized
from gateway.security import issuer as issuer_module
from gateway.security.issuer import BuiltinIssuer, IssuerStore, totp_now
from gateway.security.tokens import TokenValidator
from tests.security.test_limits import Redis, running_redis


@pytest.fixture
def setup(tmp_path: Path, models_root: Path) -> tuple[Config, dict[str, dict[str, str]]]:
    init(tmp_path, models_root)
    text = (tmp_path / "gateway.toml").read_text().replace("max_failed_logins = 100", "max_failed_logins = 3")
    (tmp_path / "gateway.toml").write_text(text)
    creds = json.loads((tmp_path / "credentials.json").read_text())["principals"]
    return load_config(tmp_path / "gateway.toml"), creds


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def _token(issuer: BuiltinIssuer, form: dict[str, str], headers: dict[str, str] | None = None,
                 ) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, body, out = await issuer.respond("https://localhost:8443/oauth/token", Headers(headers or {}), form, None)
    return status, body, dict(out)


async def _password(issuer: BuiltinIssuer, user: dict[str, str], password: str | None = None,
                    code: str | None = None) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "password", "client_id": "gateway-cli", "username": user["username"],
            "password": password or user["password"]}
    if code:
        form["totp"] = code
    status, body, _ = await _token(issuer, form)
    return status, body


def test_secrets_are_stored_hashed_and_private(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    directory = Path(config.issuer.directory)
    for name in ("keys.json", "clients.json", "users.json"):
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600
    stored = (directory / "clients.json").read_text() + (directory / "users.json").read_text()
    assert creds["demo"]["client_secret"] not in stored and creds["admin"]["password"] not in stored
    assert "scrypt$" in stored


@pytest.mark.anyio
async def test_password_alone_is_pwd_and_with_totp_is_mfa(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    status, weak = await _password(issuer, creds["admin"])
    assert status == 200
    status, strong = await _password(issuer, creds["admin"], code=totp_now(creds["admin"]["totp_secret"]))
    assert status == 200
    claims = [json.loads(base64.urlsafe_b64decode(str(t["access_token"]).split(".")[1] + "===")) for t in (weak, strong)]
    assert claims[0]["amr"] == ["pwd"] and claims[0]["acr"] == "urn:gateway:acr:pwd"
    assert claims[1]["amr"] == ["pwd", "otp", "mfa"] and claims[1]["acr"] == "urn:gateway:acr:mfa"


@pytest.mark.anyio
async def test_a_totp_code_works_once(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    code = totp_now(creds["admin"]["totp_secret"])
    assert (await _password(issuer, creds["admin"], code=code))[0] == 200
    status, body = await _password(issuer, creds["admin"], code=code)
    assert status == 400 and body["error"] == "invalid_grant"
    assert (await _password(issuer, creds["admin"], code="000000" if code != "000000" else "111111"))[0] == 400


@pytest.mark.anyio
async def test_consecutive_failures_lock_the_account(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    for _ in range(config.issuer.max_failed_logins):
        assert (await _password(issuer, creds["admin"], password="wrong-password"))[0] == 400
    status, body, headers = await _token(issuer, {"grant_type": "password", "client_id": "gateway-cli",
                                                  "username": "admin", "password": creds["admin"]["password"]})
    assert status == 429 and "locked" in str(body["error_description"])  # even the right password
    assert int(headers["Retry-After"]) > 0


@pytest.mark.anyio
async def test_a_success_resets_the_failure_count(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    for _ in range(5):  # more failures in all than the limit, never that many in a row
        assert (await _password(issuer, creds["admin"], password="wrong-password"))[0] == 400
        assert (await _password(issuer, creds["admin"]))[0] == 200


@pytest.mark.anyio
async def test_client_secret_failures_lock_the_client(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    form = {"grant_type": "client_credentials"}
    for _ in range(config.issuer.max_failed_logins):
        assert (await _token(issuer, form, _basic("demo", "wrong")))[0] == 401
    assert (await _token(issuer, form, _basic("demo", creds["demo"]["client_secret"])))[0] == 429


@pytest.mark.anyio
async def test_rotation_keeps_old_tokens_valid_until_the_old_key_is_pruned(
        setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    form = {"grant_type": "client_credentials"}
    basic = _basic("demo", creds["demo"]["client_secret"])
    issuer.store.recheck_s = 0  # see the CLI's change at once (serving processes: within a second)
    old = (await _token(issuer, form, basic))[1]["access_token"]
    store = IssuerStore(config.issuer.directory, recheck_s=0)
    validator = TokenValidator(config, store.public_keys)
    assert main(["keys", "rotate", "--config", config.source]) == 0
    new = (await _token(issuer, form, basic))[1]["access_token"]
    assert old.split(".")[0] != new.split(".")[0]  # another kid
    for token in (old, new):
        assert (await validator.authenticate(token, None)).subject == "demo"
    store.rotate(keep_retired_s=0)  # retire-and-prune: as if the overlap had passed
    with pytest.raises(Unauthorized):
        await validator.authenticate(old, None)


@pytest.mark.anyio
async def test_an_expired_built_in_token_is_refused(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    config, creds = setup
    issuer = BuiltinIssuer(config)
    token = (await _token(issuer, {"grant_type": "client_credentials"},
                          _basic("demo", creds["demo"]["client_secret"])))[1]["access_token"]
    later = TokenValidator(config, IssuerStore(config.issuer.directory).public_keys,
                           clock=lambda: time.time() + config.issuer.token_ttl_s + config.auth.leeway_s + 1)
    with pytest.raises(Unauthorized, match="expired"):
        await later.authenticate(token, None)


def test_cli_adds_users_and_clients(setup: tuple[Config, dict[str, dict[str, str]]],
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = setup
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["users", "add", "carol", "--roles", "admin,inference", "--password-stdin", "--config", config.source]) == 0
    out = capsys.readouterr().out
    assert "otpauth://totp/gateway:carol?" in out and "secret=" in out
    assert main(["clients", "add", "batch-job", "--roles", "inference", "--config", config.source]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    store = IssuerStore(config.issuer.directory)
    assert store.users()["carol"]["roles"] == ["admin", "inference"]
    assert secret not in (Path(config.issuer.directory) / "clients.json").read_text()
    assert main(["clients", "add", "batch-job", "--roles", "inference", "--config", config.source]) == 1  # exists
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "dave", "--roles", "admin", "--password-stdin", "--config", config.source]) == 1
    assert main(["clients", "remove", "batch-job", "--config", config.source]) == 0
    assert "batch-job" not in store.clients()


@pytest.mark.anyio
async def test_a_password_only_sign_in_does_not_clear_guessed_codes(
        setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    """With the password known, wrong codes alternated with password-only sign-ins still lock the
    account after ``max_failed_otp`` (10) wrong codes: the lower factor's success clears only its own count."""
    config, creds = setup
    issuer = BuiltinIssuer(config)
    admin = creds["admin"]
    wrong = "000000" if totp_now(admin["totp_secret"]) != "000000" else "111111"
    for attempt in range(10):
        status, _ = await _password(issuer, admin, code=wrong)
        assert status == 400
        if attempt < 9:
            status, _ = await _password(issuer, admin)  # the password alone still works...
            assert status == 200
    for code in (totp_now(admin["totp_secret"]), None):  # ...until the tenth wrong code: then nothing does
        status, body = await _password(issuer, admin, code=code)
        assert status == 429 and "locked" in str(body["error_description"])


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["basic-public-client-with-secret-in-form", "basic-with-another-id-in-form"])
async def test_a_client_that_authenticates_twice_is_refused(setup: tuple[Config, dict[str, dict[str, str]]],
                                                            how: str) -> None:
    """RFC 6749 section 2.3: one authentication method per request. Once this let a locked client
    use its secret in the form while another client was named (and blamed) in the header."""
    config, creds = setup
    issuer = BuiltinIssuer(config)
    demo = creds["demo"]
    for _ in range(3):  # lock demo (max_failed_logins = 3 here)
        status, _, _ = await _token(issuer, {"grant_type": "client_credentials"}, _basic("demo", "wrong"))
        assert status == 401
    header = _basic("gateway-cli", "") if how.startswith("basic-public") else _basic("other", "x")
    form = {"grant_type": "client_credentials", "client_id": "demo", "client_secret": demo["client_secret"]}
    status, body, _ = await _token(issuer, form, header)
    assert status == 400 and body["error"] == "invalid_request" and "more than one way" in body["error_description"]


@pytest.mark.anyio
@pytest.mark.parametrize("credentials", [b"\xff\xfe:secret", b"no-colon-here"], ids=["not-utf8", "no-colon"])
async def test_malformed_basic_credentials_are_a_bad_request(setup: tuple[Config, dict[str, dict[str, str]]],
                                                              credentials: bytes) -> None:
    config, _ = setup
    issuer = BuiltinIssuer(config)
    header = {"authorization": "Basic " + base64.b64encode(credentials).decode()}
    status, body, _ = await _token(issuer, {"grant_type": "client_credentials"}, header)
    assert status == 400 and body["error"] == "invalid_request"


@pytest.mark.anyio
async def test_an_unknown_client_and_a_wrong_secret_look_the_same(setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    """Same answer, same work (one scrypt): client ids cannot be enumerated. Once: 94 ms and a
    'cannot authenticate' for a known client, 14 ms and 'does not exist' for an unknown one."""
    config, _ = setup
    issuer = BuiltinIssuer(config)
    answers: dict[str, list[tuple[int, str]]] = {"demo": [], "no-such-client": []}
    times: dict[str, list[float]] = {"demo": [], "no-such-client": []}
    for _ in range(2):  # under the lockout (3): each refusal is counted against its claimed client
        for client in answers:
            started = time.perf_counter()
            status, body, _ = await _token(issuer, {"grant_type": "client_credentials"}, _basic(client, "wrong"))
            times[client].append(time.perf_counter() - started)
            answers[client].append((status, body["error_description"]))
    assert answers["demo"] == answers["no-such-client"]
    ratio = min(times["no-such-client"]) / min(times["demo"])
    assert 0.5 < ratio < 2, f"an unknown client is refused {ratio:.2f} times as fast"


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis | None]:
    """Where the lockout counts live: this process, or a real ``redis-server`` shared by replicas."""
    if request.param == "memory":
        yield None
    else:
        yield from running_redis(tmp_path_factory)


@contextlib.asynccontextmanager
async def _issuer(config: Config, storage: Redis | None, max_failed_logins: int) -> AsyncIterator[BuiltinIssuer]:
    limits = config.limits if storage is None else dataclasses.replace(
        config.limits, storage=f"redis://127.0.0.1:{storage.port}/0")
    issuer = BuiltinIssuer(dataclasses.replace(
        config, limits=limits, issuer=dataclasses.replace(config.issuer, max_failed_logins=max_failed_logins)))
    try:
        yield issuer
    finally:
        await issuer.limiter.close()


@pytest.mark.anyio
async def test_concurrent_guesses_get_no_more_tries_than_the_lockout_allows(
        setup: tuple[Config, dict[str, dict[str, str]]], storage: Redis | None) -> None:
    """Guesses sent together must not all pass a lockout check made before any of them is counted.
    Once 12 wrong passwords sent at once were all checked against a limit of 3, and 25 wrong codes
    against a limit of 10: an attacker who knew the password got as many code guesses per lockout
    as requests it could keep in flight."""
    config, creds = setup
    admin = creds["admin"]
    async with _issuer(config, storage, 3) as issuer:
        answers = await asyncio.gather(*(_password(issuer, admin, password="wrong-password") for _ in range(12)))
        assert sorted(status for status, _ in answers) == [400] * 3 + [429] * 9
        assert (await _password(issuer, admin))[0] == 429  # locked: even the right password

    # A fresh account store, the password known and the code guessed: room for 25 passwords at once.
    if storage is not None:
        storage.cli("flushall")
    async with _issuer(config, storage, 100) as issuer:
        now = totp_now(admin["totp_secret"])
        wrong = [f"{n:06d}" for n in range(40) if f"{n:06d}" != now][:25]
        answers = await asyncio.gather(*(_password(issuer, admin, code=code) for code in wrong))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [400] * config.issuer.max_failed_otp + [429] * (25 - config.issuer.max_failed_otp)
        assert (await _password(issuer, admin, code=now))[0] == 429
        if storage is not None:  # counted in Redis, not in a fallback of this process's own
            assert issuer.limiter.degraded is None
            assert storage.cli("get", "gateway:limits:gateway/lockout/otp:admin").strip() == str(config.issuer.max_failed_otp)
            assert storage.cli("get", "gateway:limits:gateway/trying/otp:admin").strip() in ("", "0")


@pytest.mark.anyio
async def test_right_secrets_sent_together_wait_a_second_and_lock_nothing(
        setup: tuple[Config, dict[str, dict[str, str]]], storage: Redis | None) -> None:
    """Attempts in flight hold places under the lockout's limit: more right secrets at once than
    the limit are told to try again in a second, and the account is not locked by them."""
    config, creds = setup
    form = {"grant_type": "client_credentials"}
    async with _issuer(config, storage, 3) as issuer:
        answers = await asyncio.gather(*(_token(issuer, form, _basic("demo", creds["demo"]["client_secret"]))
                                         for _ in range(8)))
        assert sorted(status for status, _, _ in answers) == [200] * 3 + [429] * 5
        assert {headers["Retry-After"] for status, _, headers in answers if status == 429} == {"1"}
        assert {body["error_description"] for status, body, _ in answers if status == 429} == {
            "other sign-ins to this account are being checked; try again in a second"}
        assert (await _token(issuer, form, _basic("demo", creds["demo"]["client_secret"])))[0] == 200
        for _ in range(2):  # and failures still count as before
            assert (await _token(issuer, form, _basic("demo", "wrong")))[0] == 401
        assert (await _token(issuer, form, _basic("demo", creds["demo"]["client_secret"])))[0] == 200
        for _ in range(3):
            assert (await _token(issuer, form, _basic("demo", "wrong")))[0] == 401
        status, _, headers = await _token(issuer, form, _basic("demo", creds["demo"]["client_secret"]))
        assert status == 429 and int(headers["Retry-After"]) > 1


@pytest.mark.anyio
async def test_a_refused_password_does_not_use_up_code_guesses(
        setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    """A code is only judged with the right password: a wrong password with a code counts against the
    password, never against the codes."""
    config, creds = setup
    issuer = BuiltinIssuer(config)
    admin = creds["admin"]
    for _ in range(config.issuer.max_failed_logins - 1):
        assert (await _password(issuer, admin, password="wrong-password", code="123456"))[0] == 400
        assert (await _password(issuer, admin))[0] == 200  # clears the password's count, not the codes'
    for _ in range(config.issuer.max_failed_otp - 1):
        status, _ = await _password(issuer, admin, password="wrong-password", code="123456")
        assert status == 400
        assert (await _password(issuer, admin))[0] == 200
    assert (await _password(issuer, admin, code=totp_now(admin["totp_secret"])))[0] == 200


@pytest.mark.anyio
async def test_sign_ins_are_judged_a_few_at_a_time(setup: tuple[Config, dict[str, dict[str, str]]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each secret costs a 16 MiB, ~50 ms scrypt. Once every token request took a thread of its own
    (up to 40): a burst of right secrets took ~1 GB and both cores, and inference answers waited
    ~100 ms instead of 3. At most ``issuer.sign_in_threads`` are judged at once; the rest wait."""
    config, creds = setup
    config = dataclasses.replace(config, issuer=dataclasses.replace(config.issuer, max_failed_logins=100))
    monkeypatch.setattr(issuer_module, "available_cpus", lambda: 4)  # sign_in_threads = 0: half the cores
    judging, most = 0, 0
    lock = threading.Lock()
    verify = issuer_module.verify_secret

    def counted(secret: str, stored: str) -> bool:
        nonlocal judging, most
        with lock:
            judging += 1
            most = max(most, judging)
        try:
            return verify(secret, stored)
        finally:
            with lock:
                judging -= 1

    monkeypatch.setattr(issuer_module, "verify_secret", counted)
    issuer = BuiltinIssuer(config)
    form = {"grant_type": "client_credentials"}
    answers = await asyncio.gather(*(_token(issuer, form, _basic("demo", creds["demo"]["client_secret"]))
                                     for _ in range(12)))
    assert [status for status, _, _ in answers] == [200] * 12
    assert most == 2


@pytest.mark.anyio
async def test_a_code_sent_in_several_sign_ins_at_once_signs_in_once(
        setup: tuple[Config, dict[str, dict[str, str]]]) -> None:
    """Sign-ins are judged in several threads; the check that a code is unused and the note that it is
    now used are one step. (The window between them is widened here, as a busy machine can.)"""
    config, creds = setup
    config = dataclasses.replace(config, issuer=dataclasses.replace(config.issuer, sign_in_threads=8,
                                                                     max_failed_logins=100))
    issuer = BuiltinIssuer(config)

    class Slow(dict[str, int]):
        def get(self, *args: Any) -> Any:
            value = super().get(*args)
            time.sleep(0.05)  # between reading and writing: others may read meanwhile
            return value

    issuer._used_codes = Slow()
    code = totp_now(creds["admin"]["totp_secret"])
    answers = await asyncio.gather(*(_password(issuer, creds["admin"], code=code) for _ in range(8)))
    assert sorted(status for status, _ in answers) == [200] + [400] * 7
