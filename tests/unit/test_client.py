"""Unit tests of ``worker.client.CacheClient``: key choice, decoding, projection, errors, fallback.

Redis is a small in-memory double of the client's own ``RedisCommands`` protocol (GET, HGETALL,
SET NX PX, EVAL). Its EVAL runs no Lua: it records the call and answers what the test says, so
these tests check which script is sent with which keys and arguments; what the scripts do is
proven against a real Redis in ``tests/integration/test_client.py``.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from worker.client import FILL_SCRIPT, RELEASE_SCRIPT, CacheClient
from worker.events import TableRef
from worker.rules import KeyTemplate, Rule, RuleSet

USERS = TableRef("shop", "users")


class Down(ConnectionError):
    """What a client raises while Redis is unreachable."""


class Commands:
    """The four commands CacheClient uses, over dicts; ``down`` makes the named ones fail."""

    def __init__(self, eval_result: int = 1) -> None:
        self.strings: dict[str, str] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.down: set[str] = set()
        self.eval_result = eval_result
        # Keys whose value "appears" on the n-th GET, as another reader's fill would.
        self.appear: dict[str, tuple[int, str]] = {}

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.down:
            raise Down(f"{name}: connection refused")

    def get(self, name: str) -> Any:
        self._call("get", name)
        if name in self.appear:
            after, value = self.appear[name]
            if sum(1 for c in self.calls if c[:2] == ("get", name)) > after:
                self.strings[name] = value
        stored = self.strings.get(name)
        return None if stored is None else stored.encode()

    def hgetall(self, name: str) -> Any:
        self._call("hgetall", name)
        return dict(self.hashes.get(name, {}))

    def set(self, name: str, value: str, *, px: int | None = None, nx: bool = False) -> Any:
        self._call("set", name, value, px, nx)
        if nx and name in self.strings:
            return None
        self.strings[name] = value
        return True

    def eval(self, script: str, numkeys: int, *keys_and_args: str | int) -> Any:
        self._call("eval", script, numkeys, *keys_and_args)
        return self.eval_result

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


def rule(name: str = "profile", **kw: Any) -> Rule:
    defaults: dict[str, Any] = {
        "name": name,
        "table": USERS,
        "keys": (KeyTemplate.parse("user:{id}"), KeyTemplate.parse("user:email:{email}")),
        "ttl_ms": 60_000,
        "jitter": 0.1,
    }
    defaults.update(kw)
    return Rule(**defaults)


ROW = {
    "id": 7,
    "name": "Zoë",
    "email": "z@x",
    "balance": Decimal("10.50"),
    "seen": dt.date(2024, 2, 29),
    "note": None,
}


def client(redis: Commands, *rules: Rule, **kw: Any) -> CacheClient:
    return CacheClient(redis, RuleSet(rules or (rule(),)), **kw)


class Loader:
    def __init__(self, row: dict[str, Any] | None = ROW, error: Exception | None = None) -> None:
        self.row = row
        self.error = error
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **columns: Any) -> dict[str, Any] | None:
        self.calls.append(columns)
        if self.error is not None:
            raise self.error
        return self.row


# -- key selection and errors --------------------------------------------------------------------


def test_first_template_whose_columns_are_all_given_is_used() -> None:
    redis = Commands()
    redis.strings["user:email:z@x"] = '{"id":7}'
    redis.strings["user:7"] = '{"id":8}'
    c = client(redis)
    assert c.get("profile", Loader(), email="z@x") == {"id": 7}
    # Both templates fit: the first one wins, whatever order the columns come in.
    assert c.get("profile", Loader(), email="z@x", id=7) == {"id": 8}


def test_key_is_rendered_like_the_worker_renders_it() -> None:
    redis = Commands()
    tpl = KeyTemplate.parse("{{acct:{acct}}}:bal:{amount}:{on}:{ok}")
    c = client(redis, rule("odd", keys=(tpl,)))
    c.get("odd", Loader(), acct=3, amount=Decimal("1.50"), on=dt.date(2024, 1, 2), ok=True)
    key = "{acct:3}:bal:1.50:2024-01-02:true"
    assert redis.named("get")[0] == ("get", key)
    # The key has its own hash tag, so the lease is the key plus a suffix (same slot).
    assert redis.named("set")[0][1] == key + ":cw:lease"


def test_unknown_rule_names_the_known_rules() -> None:
    c = client(Commands(), rule("profile"), rule("orders"))
    with pytest.raises(ValueError, match=r"unknown rule 'profle'.*'profile', 'orders'"):
        c.get("profle", Loader(), id=1)


def test_no_fitting_template_names_rule_templates_and_given_columns() -> None:
    c = client(Commands())
    with pytest.raises(ValueError) as err:
        c.get("profile", Loader(), name="x")
    message = str(err.value)
    assert "rule 'profile'" in message and "given columns (name)" in message
    assert "'user:{id}' needs id" in message and "'user:email:{email}' needs email" in message


def test_a_null_key_column_reads_the_database_without_touching_redis() -> None:
    redis = Commands()
    loader = Loader()
    assert client(redis).get("profile", loader, id=None) is not None
    assert redis.calls == [] and loader.calls == [{"id": None}]


def test_column_names_may_shadow_the_parameter_names() -> None:
    redis = Commands()
    tpl = KeyTemplate.parse("x:{rule_name}:{loader}")
    loader = Loader()
    client(redis, rule("x", keys=(tpl,))).get("x", loader, rule_name="a", loader="b")
    assert loader.calls == [{"rule_name": "a", "loader": "b"}]


def test_bad_timing_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        CacheClient(Commands(), RuleSet([rule()]), lease_ms=0)


# -- hits ------------------------------------------------------------------------------------------


def test_json_hit_decodes_and_skips_the_loader() -> None:
    redis = Commands()
    redis.strings["user:7"] = '{"id":7,"balance":"10.50","note":null}'
    loader = Loader()
    assert client(redis).get("profile", loader, id=7) == {"id": 7, "balance": "10.50", "note": None}
    assert loader.calls == [] and redis.named("set") == []


def test_hash_hit_gives_str_fields() -> None:
    redis = Commands()
    redis.hashes["user:7"] = {b"id": b"7", b"name": "Zoë".encode()}
    loader = Loader()
    got = client(redis, rule(format="hash")).get("profile", loader, id=7)
    assert got == {"id": "7", "name": "Zoë"} and loader.calls == []


def test_evict_rules_are_read_as_json() -> None:
    redis = Commands()
    redis.strings["user:7:orders"] = '{"n":2}'
    orders = rule("orders", keys=(KeyTemplate.parse("user:{user_id}:orders"),), action="evict")
    assert client(redis, orders).get("orders", Loader(), user_id=7) == {"n": 2}


@pytest.mark.parametrize("stored", ["not json", "[1, 2]"])
def test_a_value_that_is_no_json_object_falls_back_to_the_loader_without_filling(
    stored: str,
) -> None:
    redis = Commands()
    redis.strings["user:7"] = stored
    loader = Loader(row={"id": 7})
    with structlog.testing.capture_logs() as logs:
        assert client(redis).get("profile", loader, id=7) == {"id": 7}
    assert redis.named("set") == [] and redis.named("eval") == []
    assert [e["doing"] for e in logs if e["event"] == "cache_unavailable"] == ["read"]


# -- misses ----------------------------------------------------------------------------------------


def test_json_miss_takes_a_lease_loads_fills_and_returns_the_hit_shape() -> None:
    redis = Commands()
    r = rule(columns=("id", "name", "balance", "seen", "note"))
    c = client(redis, r, lease_ms=1500)
    loader = Loader()
    got = c.get("profile", loader, id=7)
    expected = {"id": 7, "name": "Zoë", "balance": "10.50", "seen": "2024-02-29", "note": None}
    assert got == expected
    assert loader.calls == [{"id": 7}]
    [(_, lease, token, px, nx)] = redis.named("set")
    assert (lease, px, nx) == ("{user:7}:cw:lease", 1500, True)
    [(_, script, numkeys, key, lease_arg, token_arg, ttl, fmt, payload)] = redis.named("eval")
    assert (script, numkeys, key, lease_arg, token_arg) == (
        FILL_SCRIPT,
        2,
        "user:7",
        lease,
        token,
    )
    assert 54_000 <= ttl <= 60_000 and fmt == "json"
    assert payload == r.payload(ROW)
    # What a later hit decodes is exactly what the miss returned.
    redis.strings["user:7"] = payload
    assert c.get("profile", Loader(), id=7) == got


def test_hash_miss_sends_field_pairs_without_null_columns() -> None:
    redis = Commands()
    r = rule(format="hash", columns=("id", "balance", "note"))
    got = client(redis, r).get("profile", Loader(), id=7)
    assert got == {"id": "7", "balance": "10.50"}
    [call] = redis.named("eval")
    assert call[7:] == ("hash", "id", "7", "balance", "10.50")


def test_tokens_differ_between_misses() -> None:
    redis = Commands()
    c = client(redis)
    c.get("profile", Loader(), id=1)
    c.get("profile", Loader(), id=2)
    tokens = [call[2] for call in redis.named("set")]
    assert len(set(tokens)) == 2 and all(len(t) >= 32 for t in tokens)


def test_a_dropped_fill_still_returns_the_row() -> None:
    redis = Commands(eval_result=0)
    assert client(redis).get("profile", Loader(row={"id": 7}), id=7) == {"id": 7}


def test_loader_none_releases_the_lease_and_caches_nothing() -> None:
    redis = Commands()
    assert client(redis).get("profile", Loader(row=None), id=7) is None
    [(_, script, numkeys, lease, token)] = redis.named("eval")
    assert (script, numkeys, lease) == (RELEASE_SCRIPT, 1, "{user:7}:cw:lease")
    assert token == redis.named("set")[0][2]


def test_loader_exception_releases_the_lease_and_propagates() -> None:
    redis = Commands()
    with pytest.raises(LookupError, match="db gone"):
        client(redis).get("profile", Loader(error=LookupError("db gone")), id=7)
    [call] = redis.named("eval")
    assert call[1] == RELEASE_SCRIPT and call[4] == redis.named("set")[0][2]


def test_an_unencodable_row_releases_the_lease() -> None:
    redis = Commands()
    with pytest.raises(TypeError):
        client(redis).get("profile", Loader(row={"id": 7, "x": object()}), id=7)
    assert redis.named("eval")[0][1] == RELEASE_SCRIPT


# -- lease held by another reader --------------------------------------------------------------


def test_lease_held_elsewhere_waits_then_loads_without_filling() -> None:
    redis = Commands()
    redis.strings["{user:7}:cw:lease"] = "theirs"
    loader = Loader(row={"id": 7, "name": "n", "extra": 1})
    c = client(redis, rule(columns=("id", "name")), wait_ms=30, poll_ms=5)
    assert c.get("profile", loader, id=7) == {"id": 7, "name": "n"}
    assert loader.calls == [{"id": 7}] and redis.named("eval") == []
    polls = len(redis.named("get")) - 1
    assert 2 <= polls <= 7  # bounded by wait_ms / poll_ms
    assert redis.strings["{user:7}:cw:lease"] == "theirs"


def test_lease_held_elsewhere_returns_the_other_readers_fill() -> None:
    redis = Commands()
    redis.strings["{user:7}:cw:lease"] = "theirs"
    redis.appear["user:7"] = (2, '{"id":7}')
    loader = Loader()
    assert client(redis, wait_ms=1000, poll_ms=1).get("profile", loader, id=7) == {"id": 7}
    assert loader.calls == []


# -- Redis failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["get", "set", "eval"])
def test_redis_errors_fall_back_to_the_loader_with_a_warning(failing: str) -> None:
    redis = Commands()
    redis.down.add(failing)
    loader = Loader(row={"id": 7, "balance": Decimal("1.0")})
    with structlog.testing.capture_logs() as logs:
        got = client(redis).get("profile", loader, id=7)
    assert got == {"id": 7, "balance": "1.0"}
    assert len(loader.calls) == 1
    [warning] = [e for e in logs if e["event"] == "cache_unavailable"]
    assert warning["log_level"] == "warning"
    assert warning["doing"] == {"get": "read", "set": "lease", "eval": "fill"}[failing]
    assert warning["rule"] == "profile" and warning["key"] == "user:7"
    assert "connection refused" in warning["error"]


def test_hash_reads_fall_back_too() -> None:
    redis = Commands()
    redis.down.add("hgetall")
    got = client(redis, rule(format="hash")).get("profile", Loader(row={"id": 7}), id=7)
    assert got == {"id": "7"}


def test_a_failed_release_does_not_hide_the_loader_exception() -> None:
    redis = Commands()
    redis.down.add("eval")
    with pytest.raises(LookupError):
        client(redis).get("profile", Loader(error=LookupError("db")), id=7)


def test_outage_warnings_are_rate_limited() -> None:
    redis = Commands()
    redis.down.add("get")
    c = client(redis)
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            c.get("profile", Loader(row={"id": i}), id=i)
    assert len([e for e in logs if e["event"] == "cache_unavailable"]) == 1


# -- from_config ---------------------------------------------------------------------------------

CONFIG = """
[source]
dsn = "mysql://cw@127.0.0.1:3306/shop"
[redis]
url = "redis://127.0.0.1:1/0"
[defaults]
ttl = "2m"
jitter = 0.0
[[rules]]
name = "user-profile"
table = "shop.users"
keys = ["user:{id}"]
format = "hash"
columns = ["id", "name"]
[[rules]]
name = "user-orders"
table = "shop.orders"
keys = ["user:{user_id}:orders"]
action = "evict"
"""


def test_from_config_uses_the_workers_rules(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    redis = Commands()
    c = CacheClient.from_config(str(path), redis, wait_ms=0)
    assert c.get("user-profile", Loader(), id=7) == {"id": "7", "name": "Zoë"}
    [call] = redis.named("eval")
    assert call[3:8] == ("user:7", "{user:7}:cw:lease", redis.named("set")[0][2], 120_000, "hash")
    c.get("user-orders", Loader(row={"user_id": 7, "n": 1}), user_id=7)
    assert redis.named("eval")[-1][6:8] == (120_000, "json")


def test_from_config_builds_a_lazy_redis_client(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    # Port 1 answers nothing: building the client must not connect, and a read falls back.
    c = CacheClient.from_config(path)
    assert c.get("user-profile", Loader(row={"id": 7}), id=7) == {"id": "7"}
    assert json.dumps(c.get("user-orders", Loader(row=None), user_id=1)) == "null"


# -- the protocol document -----------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_docs_and_the_node_example_quote_the_scripts_exactly() -> None:
    from connectors.redis import REFRESH_SCRIPT

    protocol = (DOCS / "read-protocol.md").read_text()
    example = (DOCS / "examples" / "read-through.mjs").read_text()
    for script in (FILL_SCRIPT, RELEASE_SCRIPT, REFRESH_SCRIPT):
        assert f"```lua\n{script}```" in protocol
    assert f"FILL_SCRIPT = `{FILL_SCRIPT}`;" in example
    assert f"RELEASE_SCRIPT = `{RELEASE_SCRIPT}`;" in example
