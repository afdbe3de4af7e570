"""Rate limits, budgets and failed-authentication throttling through running gateways.

Two gateway processes share one real ``redis-server``: they enforce one limit and one budget
together; killing Redis turns no answer into a 500 and local limits keep applying; when Redis is
back, shared limits return by themselves.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cpus import available_cpus
from gateway.security.issuer import totp_now
from tests.conftest import Gateway, credentials, free_port, start_gateway
from tests.test_metrics import value

pytestmark = pytest.mark.slow

DIGITS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}


def rows(n: int) -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 64], "data": [1.0] * 64 * n}]}


class Redis:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--enable-debug-command", "local", "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              check=True).stdout

    def calls(self) -> dict[str, int]:
        """Calls per command since the last ``config resetstat``."""
        out = {}
        for line in self.cli("info", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, stats = line[len("cmdstat_"):].partition(":")
                out[name] = int(stats.split(",")[0].split("=")[1])
        return out

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def running_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """A real ``redis-server`` for the test's duration (the body of a fixture)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed: `make test` installs it (apt-get install redis-server)")
    r = Redis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.kill()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    yield from running_redis(tmp_path_factory)


def _status(gw: Gateway, token: str, method: str = "GET", path: str = "/v2/models/digits",
            body: dict[str, object] | None = None, principal: str = "demo") -> httpx.Response:
    with gw.client(principal, token=False, headers={"Authorization": f"Bearer {token}"}) as c:
        return c.request(method, path, json=body)


def test_two_gateways_share_one_limit_and_one_budget_and_survive_redis_dying(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path, redis: Redis) -> None:
    issuer_url = f"https://localhost:{free_port()}"  # one public name for both replicas, as behind a load balancer
    limits = f"""
storage = "redis://127.0.0.1:{redis.port}/0"
strategy = "fixed-window"
per_address = "100000/minute"
per_principal = "10/minute"
failed_auth_per_address = "100000/minute"
budget_inferences = "6/day"
budget_rows = ""
storage_timeout_s = 0.25
storage_retry_s = 1.0
admission = "before"
"""
    gws = [start_gateway(pki, tmp_path_factory.mktemp(f"gw-redis-{i}"), models_root, limits=limits,
                         issuer_url=issuer_url) for i in range(2)]
    try:
        token = gws[0].token("demo")
        # Inference, alternating replicas: the budget of 6 is one budget, not 6 each.
        answers = [_status(gws[i % 2], token, "POST", "/v2/models/digits/infer", DIGITS) for i in range(8)]
        assert [r.status_code for r in answers] == [200] * 6 + [429, 429]
        exhausted = answers[-1].json()
        assert exhausted["type"].endswith("budget-exhausted") and "reset" in exhausted
        assert int(answers[-1].headers["retry-after"]) > 3600
        # 8 requests so far against per_principal = 10/minute, shared: 2 more, then 429.
        more = [_status(gws[i % 2], token).status_code for i in range(4)]
        assert more == [200, 200, 429, 429]
        limited = _status(gws[1], token)
        assert limited.headers["ratelimit-policy"] == '"per-principal";q=10;w=60'
        assert limited.headers["ratelimit"].startswith('"per-principal";r=0;t=')
        assert int(limited.headers["retry-after"]) >= 1
        for gw in gws:
            with gw.client(token=False) as c:
                assert "degraded" not in c.get("/v2/health/ready").json()
        # A one-time code signs in once, on whichever replica sees it first.
        creds = credentials(pki)["admin"]
        form = {"grant_type": "password", "client_id": "gateway-cli", "username": creds["username"],
                "password": creds["password"], "totp": totp_now(creds["totp_secret"])}
        signed = []
        for gw in gws:
            with gw.client("admin", token=False) as c:
                signed.append(c.post("/oauth/token", data=form))
        assert [r.status_code for r in signed] == [200, 400], signed[1].text

        redis.kill()
        # Redis is gone: no 500, limits still enforced, per process now (10 on this replica alone).
        # Each replica may first refuse from memory, with no round trip, the principal it saw over the
        # shared limit (unless a slow Redis call on this busy machine already made it count alone).
        local = [_status(gws[0], token).status_code for _ in range(12)]
        assert local in ([429] + [200] * 10 + [429], [200] * 10 + [429, 429])
        other = [_status(gws[1], token).status_code for _ in range(4)]
        assert other[0] in (200, 429) and other[1:] == [200] * 3
        with gws[0].client(token=False) as c:
            ready = c.get("/v2/health/ready")
        assert ready.status_code == 200 and "using local limits" in ready.json()["degraded"]["limits"]
        assert "rate-limit storage unreachable" in gws[0].log.read_text()

        redis.start()  # an empty Redis on the same port
        time.sleep(1.2)  # storage_retry_s
        back = [_status(gws[i % 2], token).status_code for i in range(14)]
        assert back == [200] * 10 + [429] * 4  # one shared window again, not 10 per replica
        for gw in gws:
            with gw.client(token=False) as c:
                assert "degraded" not in c.get("/v2/health/ready").json()
        assert "shared limits apply again" in gws[0].log.read_text()
    finally:
        for gw in gws:
            gw.stop()
        if redis.proc is None:
            redis.start()


def test_model_limits_budgets_and_failed_authentication(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    limits = """
strategy = "fixed-window"
per_address = "100000/minute"
per_principal = "100000/minute"
per_principal_model = "3/minute"
failed_auth_per_address = "5/minute"
budget_inferences = ""
budget_rows = "10/day"
"""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-limits"), models_root, limits=limits)
    try:
        demo, admin = gw.token("demo"), gw.token("admin")
        infer = [_status(gw, demo, "POST", "/v2/models/digits/infer", DIGITS).status_code for _ in range(4)]
        assert infer == [200, 200, 200, 429]  # per principal and model
        assert _status(gw, demo, "POST", "/v2/models/resnetish/infer",
                       {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                    "data": [0.0] * 150528}]}).status_code == 200  # another model counts apart
        # Rows: 4 + 4 fit in 10; 4 more do not.
        budget = [_status(gw, admin, "POST", "/v2/models/digits/infer", rows(4), "admin") for _ in range(3)]
        assert [r.status_code for r in budget] == [200, 200, 429]
        assert budget[-1].json()["policy"] == "budget-rows" and budget[-1].json()["error"]
        with gw.client("admin") as c:  # an alert sees which policy refuses
            scrape = c.get("/metrics").text
        assert value(scrape, "gateway_limit_refusals_total", route="infer", policy="per-principal-model") == 1
        assert value(scrape, "gateway_limit_refusals_total", route="infer", policy="budget-rows") == 1
        # Refused credentials from one address: five, then even a good token waits.
        bad = [_status(gw, "garbage").status_code for _ in range(5)]
        assert bad == [401] * 5
        blocked = _status(gw, demo)
        assert blocked.status_code == 429 and blocked.json()["policy"] == "failed-auth"
        with gw.client(token=False) as c:
            assert c.get("/v2/health/ready").status_code == 200  # probes are never limited
    finally:
        gw.stop()


def test_sign_ins_sent_together_from_one_address_get_no_more_tries_than_its_limit(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    """The failed-auth limit was checked when a token request arrived and counted when it was
    answered: 120 wrong secrets sent at once from one address were all judged against a limit of
    30 a minute (password spraying at whatever rate scrypt allows). The issuer now checks and counts
    it while a request holds its place among the sign-ins being judged."""
    limits = 'strategy = "fixed-window"\nper_address = "100000/minute"\nfailed_auth_per_address = "30/minute"\n'
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-spray"), models_root, limits=limits)
    threads = max(1, available_cpus() // 2)  # issuer.sign_in_threads: judged at once, each checked before
    try:
        def guess(n: int) -> int:
            with gw.client(token=False) as c:
                return c.post("/oauth/token", data={"grant_type": "client_credentials"},
                              auth=(f"spray-{n}", "guess"), timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(120) as pool:
            statuses = list(pool.map(guess, range(120)))
        assert set(statuses) == {401, 429}
        assert 30 <= statuses.count(401) <= 30 + threads - 1, statuses.count(401)
    finally:
        gw.stop()


def test_per_address_limit_applies_before_authentication(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> None:
    limits = """
strategy = "fixed-window"
per_address = "6/minute"
failed_auth_per_address = "100000/minute"
"""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-address"), models_root, limits=limits)
    try:
        token = gw.token("demo")  # the token request is the first of six
        statuses = [_status(gw, token).status_code for _ in range(5)]
        with gw.client(token=False) as c:
            anonymous = c.get("/v2/models")
        assert statuses == [200] * 5
        assert anonymous.status_code == 429 and anonymous.json()["policy"] == "per-address"
        with gw.client(token=False) as c:
            assert all(c.get("/v2/health/live").status_code == 200 for _ in range(10))
    finally:
        gw.stop()


def test_an_inference_is_one_round_trip_to_redis(
        pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path, redis: Redis) -> None:
    """Every policy on: per address, failed-auth, per principal, global, per principal and model,
    both budgets. Each request is one script call, whatever it is (an inference's runs while the
    worker computes, and a refused one's outputs are discarded); a refused principal's next
    request is refused by the replica without one."""
    limits = f"""
storage = "redis://127.0.0.1:{redis.port}/0"
per_address = "100000/minute"
per_principal = "100000/minute"
global_limit = "100000/minute"
per_principal_model = "100000/minute"
failed_auth_per_address = "100000/minute"
budget_inferences = "8/day"
budget_rows = "100000/day"
storage_timeout_s = 2.0
"""
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-one-trip"), models_root, limits=limits)
    try:
        token = gw.token("demo")
        assert _status(gw, token, "POST", "/v2/models/digits/infer", DIGITS).status_code == 200  # loads the script
        redis.cli("config", "resetstat")
        answers = [_status(gw, token, "POST", "/v2/models/digits/infer", DIGITS).status_code for _ in range(5)]
        answers += [_status(gw, token).status_code for _ in range(3)]  # no model: admitted after authentication
        answers.append(_status(gw, token, "POST", "/v2/models/nosuch/infer", DIGITS).status_code)  # counted anyway
        assert answers == [200] * 8 + [404]
        calls = redis.calls()  # the commands inside the script count too: they are not round trips
        assert calls["evalsha"] == 9 and "eval" not in calls
        # The budget of 8 is used up (the first inference and these 5, then 2 more); the refusal is
        # remembered: the next two are refused without a round trip.
        over = [_status(gw, token, "POST", "/v2/models/digits/infer", DIGITS) for _ in range(5)]
        assert [r.status_code for r in over] == [200, 200, 429, 429, 429]
        assert all(r.json()["policy"] == "budget-inferences" for r in over[2:])
        assert redis.calls()["evalsha"] == 9 + 3
        with gw.client(token=False) as c:
            assert "degraded" not in c.get("/v2/health/ready").json()
    finally:
        gw.stop()


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    r: Redis = request.getfixturevalue("redis")
    r.cli("flushall")
    return f"redis://127.0.0.1:{r.port}/0"


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
async def test_every_strategy_enforces_its_limit(strategy: str, storage: str) -> None:
    from gateway.config import LimitsConfig
    from gateway.security.ratelimit import Limiter, RateLimited

    limiter = Limiter(LimitsConfig(strategy=strategy, storage=storage, per_principal="4/minute",  # type: ignore[arg-type]
                                   per_principal_model="3/second"))
    allowed, waits = 0, []
    for _ in range(6):
        try:
            await limiter.hit(limiter.per_principal, f"p{strategy}")
            allowed += 1
        except RateLimited as exc:
            waits.append(int(exc.headers["Retry-After"]))
    assert allowed == 4 and limiter.degraded is None
    # The sliding-window counter still weighs this window's 4 hits in the next one: up to 2 windows.
    assert len(waits) == 2 and all(1 <= w <= 120 for w in waits), waits
    # A cost larger than what is left is refused; a smaller one still fits.
    with pytest.raises(RateLimited):
        await limiter.hit(limiter.per_principal_model, "m", cost=4)
    await limiter.hit(limiter.per_principal_model, "m", cost=3)
    await limiter.close()


@pytest.mark.anyio
async def test_an_admission_counts_in_order_up_to_its_refusal(storage: str) -> None:
    from gateway.config import LimitsConfig
    from gateway.security.ratelimit import BudgetExhausted, Charge, Limiter, RateLimited

    limiter = Limiter(LimitsConfig(storage=storage, per_principal="3/minute", per_principal_model="2/minute",
                                   budget_rows="5/day", failed_auth_per_address="1/minute"))
    pp, ppm, rows = limiter.per_principal, limiter.per_principal_model, limiter.budget_rows

    def request(n: int) -> list[Charge]:
        return [Charge(pp, "p"), Charge(ppm, "p|m"), Charge(rows, "p|m", n)]

    await limiter.admit(request(2))
    await limiter.admit(request(2))
    with pytest.raises(RateLimited) as refused:
        await limiter.admit(request(1))  # the model's limit: the principal's counted, the rows not
    assert refused.value.extensions["policy"] == "per-principal-model"
    with pytest.raises(BudgetExhausted):
        await limiter.admit([Charge(rows, "p|m", 2)])  # 4 of 5 rows used: 2 do not fit...
    limiter.refuse_known(rows, "p|m")  # ...and a smaller request is not refused from memory
    await limiter.admit([Charge(rows, "p|m", 1)])
    with pytest.raises(RateLimited):
        await limiter.admit([Charge(pp, "p")])  # 3 of 3
    with pytest.raises(RateLimited):
        limiter.refuse_known(pp, "p")  # remembered, no storage call
    # A test (cost 0) needs room for one and counts nothing.
    await limiter.exceeded(limiter.failed_auth, "a")
    await limiter.exceeded(limiter.failed_auth, "a")
    await limiter.hit(limiter.failed_auth, "a")
    with pytest.raises(RateLimited):
        await limiter.exceeded(limiter.failed_auth, "a")
    assert limiter.degraded is None
    await limiter.close()


@pytest.mark.anyio
async def test_a_slow_redis_counts_as_down(redis: Redis) -> None:
    import asyncio

    from gateway.config import LimitsConfig
    from gateway.security.ratelimit import Limiter

    limiter = Limiter(LimitsConfig(storage=f"redis://127.0.0.1:{redis.port}/0", storage_timeout_s=0.2,
                                   per_principal="5/minute"))
    await limiter.hit(limiter.per_principal, "slow")
    assert limiter.degraded is None
    sleeper = subprocess.Popen(["redis-cli", "-p", str(redis.port), "debug", "sleep", "1.5"], stdout=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await limiter.hit(limiter.per_principal, "slow")  # answered from local counts, without waiting for Redis
        assert time.monotonic() - started < 1.0
        assert limiter.degraded is not None and "Timeout" in limiter.degraded
        assert "using local limits" in limiter.status()["degraded"]
    finally:
        sleeper.wait()
        await limiter.close()


@pytest.mark.anyio
@pytest.mark.parametrize("answer", [b"*0\r\n", b":1\r\n", b"*1\r\n*1\r\n:1\r\n", b"*1\r\n$2\r\nno\r\n"],
                         ids=["no-answers", "not-a-list", "short-answer", "text"])
async def test_a_storage_that_answers_wrongly_counts_as_down(answer: bytes) -> None:
    """Something other than Redis at ``limits.storage`` (or a Redis that answers out of turn): the
    admission falls back to local counts, as for one that is down. An answer with fewer results
    than admissions left every request of that call waiting for ever."""
    import asyncio

    from gateway.config import LimitsConfig
    from gateway.security.ratelimit import Limiter

    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while line := await reader.readline():  # RESP commands: "*N", then "$len" and a value per part
            parts = [await reader.readline() for _ in range(2 * int(line[1:]))][1::2]
            writer.write(answer if parts[0].strip().upper() == b"EVALSHA" else b"+OK\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = Limiter(LimitsConfig(storage=f"redis://127.0.0.1:{port}/0", per_principal="2/minute"))
    try:
        async with asyncio.timeout(5):
            await limiter.hit(limiter.per_principal, "p")
        assert limiter.degraded is not None and "using local limits" in limiter.status()["degraded"]
    finally:
        await limiter.close()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _stored(redis: Redis, keys: list[str]) -> dict[str, str]:
    """What Redis holds under each key (a moving window's list by its length: its entries are times)."""
    out = {}
    for key in keys:
        kind = redis.cli("type", key).strip()
        if kind == "hash":
            out[key] = redis.cli("hmget", key, "w", "c", "p")
        elif kind == "list":
            out[key] = redis.cli("llen", key)
        else:
            out[key] = f"{kind} {redis.cli('get', key).strip()}"
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
async def test_admissions_in_one_script_call_count_as_one_after_another(strategy: str, redis: Redis) -> None:
    """The script reads each key once per call and writes what the call counted at the end: the
    answers and the counts left in Redis are those of the same admissions made one call each."""
    import random

    from gateway.security.limitstores import Limit, RedisCounts
    from gateway.security.types import LimitPolicy

    policies = [p for p in (LimitPolicy.parse("per-principal", "5/hour"), LimitPolicy.parse("global", "9/hour"),
                            LimitPolicy.parse("per-principal-model", "3/hour"),
                            LimitPolicy.parse("budget-rows", "8/day", budget=True)) if p is not None]
    rng = random.Random(7)
    admissions = []
    for _ in range(24):
        principal, model = rng.choice("ab"), rng.choice("xy")
        keys = [principal, "all", f"{principal}|{model}", f"{principal}|{model}"]
        costs = [rng.choice([0, 1, 1, 1]), 1, 1, rng.randint(1, 3)]  # cost 0: a test that counts nothing
        admissions.append([Limit(p, p.items[0], k, c) for p, k, c in zip(policies, keys, costs, strict=True)])
    counts = RedisCounts(f"redis://127.0.0.1:{redis.port}/0", strategy, 2.0)
    try:
        redis.cli("flushall")
        redis.cli("config", "resetstat")
        # Two calls of twelve: the second finds the keys the first wrote (and counts on top of them).
        together = await counts.admit_many(admissions[:12]) + await counts.admit_many(admissions[12:])
        calls = redis.calls()
        stored = redis.cli("keys", "*").split()
        after_two_calls = _stored(redis, stored)
        redis.cli("flushall")
        apart = [(await counts.admit_many([a]))[0] for a in admissions]
        admitted = [r is None for r in together]
        assert admitted.count(True) >= 3 and admitted.count(False) >= 3
        assert [r if r is None else r[0] for r in together] == [r if r is None else r[0] for r in apart]
        for t, a in zip(together, apart, strict=True):  # the waits too (the clock moved on between the two)
            assert t is None or a is None or abs(t[1] - a[1]) < 2.0, (t, a)
        assert sorted(stored) == sorted(redis.cli("keys", "*").split())
        assert after_two_calls == _stored(redis, stored)
        distinct = len(stored)  # a, b, all, a|x, a|y, b|x, b|y and their budgets' keys: read once a call
        reads = calls.get("hmget", 0) + calls.get("get", 0) + calls.get("lindex", 0)
        assert reads <= 2 * distinct if strategy != "moving-window" else reads >= len(admissions)
    finally:
        await counts.close()
