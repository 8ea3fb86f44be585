"""Unit tests of poison changes: refused actions, rule failures, oversized values, replay.

In-memory doubles only: ``MemorySink`` refuses chosen keys the way Redis refuses a NOPERM key
(the rest of the batch applied, ``PartialApplyError`` naming the refused actions) and
``MemoryDeadLetterStore`` stands in for the Redis stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import structlog

from connectors.memory import MemoryCheckpointStore, MemoryDeadLetterStore, MemorySink, MemorySource
from worker.actions import Evict, Refresh
from worker.dead_letters import DeadLetter, from_action, replay, to_action
from worker.errors import ConfigError, RuleError, SinkError
from worker.events import Op, Position, RowChange, TableRef, Transaction
from worker.rules import KeyTemplate, Rule, RuleSet
from worker.runner import Runner, RunOptions
from worker.settings import compile_rules, load_settings

USERS = TableRef("shop", "users")
COLUMNS = {USERS: ["id", "name"]}
NOPERM = "NOPERM this user has no permissions to access one of the keys used as arguments"


def rule(name: str = "u", *templates: str, **kw: object) -> Rule:
    keys = tuple(KeyTemplate.parse(t) for t in (templates or ("user:{id}",)))
    return Rule(name, USERS, keys, jitter=0.0, **kw)  # type: ignore[arg-type]


def tx(version: int, *rows: dict[str, object]) -> Transaction:
    changes = [RowChange(Op.INSERT, USERS, None, row, version) for row in rows]
    return Transaction(changes, Position(version, {"i": version}), committed_at=time.time())


def make(
    items: list[Transaction],
    rules: RuleSet,
    sink: MemorySink | None = None,
    store: MemoryDeadLetterStore | None = None,
    **opts: object,
) -> tuple[MemorySink, MemoryCheckpointStore, MemoryDeadLetterStore, Runner]:
    sink = sink or MemorySink()
    store = store if store is not None else MemoryDeadLetterStore()
    checkpoints = MemoryCheckpointStore()
    options = RunOptions(
        batch_max_delay_s=0.001,
        batch_max_transactions=1,
        progress_interval_s=3600,
        poison_backoff_s=0.001,
        until_idle=True,
        **opts,  # type: ignore[arg-type]
    )
    runner = Runner(
        MemorySource(items, COLUMNS), sink, checkpoints, rules, options, dead_letters=store
    )
    return sink, checkpoints, store, runner


def events(logs: Sequence[Mapping[str, object]], name: str) -> list[Mapping[str, object]]:
    return [e for e in logs if e["event"] == name]


# ------------------------------------------------------------------------------------------
# Actions the sink keeps refusing
# ------------------------------------------------------------------------------------------


def test_refused_key_is_retried_then_dead_lettered_and_evicted_and_the_worker_goes_on() -> None:
    rules = RuleSet([rule("u", "user:{id}", "poison:{id}")])
    sink = MemorySink(refuse={"poison:1": NOPERM}, refuse_evicts=False)
    sink.values["poison:1"] = "stale"
    sink, checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": "a"}), tx(20, {"id": 2, "name": "b"})],
        rules,
        sink,
        poison_retries=3,
    )
    with structlog.testing.capture_logs() as logs:
        stats = runner.run()

    # The first attempt and three retries, each of the refused action alone after the first.
    assert [a.key for a in sink.refused] == ["poison:1"] * 4
    assert [len(batch) for batch in sink.applied[:4]] == [1, 0, 0, 0]
    [entry] = store.entries
    assert (entry.key, entry.rule, entry.action, entry.version) == ("poison:1", "u", "refresh", 10)
    assert json.loads(entry.value) == {"id": 1, "name": "a"} and entry.format == "json"
    assert entry.error == NOPERM and entry.at.endswith("+00:00") and entry.ttl_ms > 0
    # The safe fallback: the refused key is gone, not left stale.
    assert "poison:1" not in sink.values
    # The rest of the batch, and the next batch, were applied; the checkpoint moved past both.
    assert set(sink.values) == {"user:1", "user:2", "poison:2"}
    assert checkpoints.position is not None and checkpoints.position.version == 20
    assert stats.transactions == 2 and stats.dead_letters == 1

    assert len(events(logs, "actions_refused")) == 3
    [lettered] = events(logs, "dead_lettered")
    assert lettered["key"] == "poison:1" and lettered["rule"] == "u"
    assert lettered["error"] == NOPERM and lettered["dead_letters_total"] == 1
    assert lettered["log_level"] == "warning"
    assert events(logs, "stopped")[0]["dead_letters"] == 1


def test_zero_retries_dead_letters_at_once() -> None:
    sink = MemorySink(refuse={"user:1": "OOM command not allowed"}, refuse_evicts=False)
    sink, _checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": "a"})], RuleSet([rule()]), sink, poison_retries=0
    )
    runner.run()
    assert len(sink.refused) == 1
    assert [e.key for e in store.entries] == ["user:1"]


def test_key_that_refuses_even_the_eviction_is_logged_and_the_worker_goes_on() -> None:
    sink = MemorySink(refuse={"user:1": NOPERM})
    sink, checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": "a"}), tx(20, {"id": 2, "name": "b"})],
        RuleSet([rule()]),
        sink,
        poison_retries=1,
    )
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert [e.key for e in store.entries] == ["user:1"]
    # Two refreshes, then the fallback evict, refused too.
    assert [type(a).__name__ for a in sink.refused] == ["Refresh", "Refresh", "Evict"]
    [failed] = events(logs, "dead_letter_evict_failed")
    assert failed["key"] == "user:1" and failed["stored"] is True
    assert "user:2" in sink.values
    assert checkpoints.position is not None and checkpoints.position.version == 20


def test_dead_letter_store_failing_is_survived_when_the_eviction_works() -> None:
    sink = MemorySink(refuse={"user:1": NOPERM}, refuse_evicts=False)
    sink.values["user:1"] = "stale"
    sink, checkpoints, _store, runner = make(
        [tx(10, {"id": 1, "name": "a"})],
        RuleSet([rule()]),
        sink,
        MemoryDeadLetterStore(fail_adds=True),
        poison_retries=0,
    )
    with structlog.testing.capture_logs() as logs:
        runner.run()
    assert "user:1" not in sink.values
    assert events(logs, "dead_letter_store_failed")
    assert events(logs, "dead_lettered")[0]["stored"] is False
    assert checkpoints.position is not None and checkpoints.position.version == 10


def test_neither_dead_letter_nor_eviction_possible_stops_without_checkpoint() -> None:
    sink = MemorySink(refuse={"user:1": NOPERM})
    sink, checkpoints, _store, runner = make(
        [tx(10, {"id": 1, "name": "a"})],
        RuleSet([rule()]),
        sink,
        MemoryDeadLetterStore(fail_adds=True),
        poison_retries=0,
    )
    with pytest.raises(SinkError, match="neither be dead-lettered nor evicted"):
        runner.run()
    assert checkpoints.position is not None and checkpoints.position.version == 0


def test_transient_sink_failures_are_not_dead_lettered() -> None:
    sink = MemorySink(fail_next=4)
    sink, _checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": "a"})], RuleSet([rule()]), sink, poison_retries=1
    )
    runner.run()
    assert store.entries == [] and "user:1" in sink.values


# ------------------------------------------------------------------------------------------
# Rules that fail on a change
# ------------------------------------------------------------------------------------------


def test_unencodable_value_is_dead_lettered_without_stopping() -> None:
    bad = object()
    profile = rule("profile", "user:{id}", "user:name:{name}")
    ids = rule("ids", "ids:{id}", columns=("id",))
    sink = MemorySink(values={"user:1": "stale", "ids:1": "stale"})
    sink, checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": bad}), tx(20, {"id": 2, "name": "b"})],
        RuleSet([profile, ids]),
        sink,
    )
    with structlog.testing.capture_logs() as logs:
        stats = runner.run()

    [entry] = store.entries
    assert (entry.key, entry.rule, entry.action, entry.version) == ("", "profile", "rule", 10)
    assert "TypeError" in entry.error and "object" in entry.error
    described = json.loads(entry.value)
    assert described["op"] == "insert" and described["table"] == "shop.users"
    assert described["before"] is None and described["after"]["id"] == 1
    assert described["after"]["name"].startswith("<object object at")
    # The failing rule's renderable key was evicted; its unrenderable one skipped; the other
    # rule on the table was applied as usual.
    assert "user:1" not in sink.values
    assert json.loads(str(sink.values["ids:1"])) == {"id": 1}
    assert {"user:2", "user:name:b", "ids:2"} <= set(sink.values)
    assert checkpoints.position is not None and checkpoints.position.version == 20
    assert stats.dead_letters == 1
    [lettered] = events(logs, "dead_lettered")
    assert lettered["rule"] == "profile" and lettered["action"] == "rule"


def test_ruleset_actions_for_still_raises_a_rule_error() -> None:
    rules = RuleSet([rule()])
    change = RowChange(Op.INSERT, USERS, None, {"id": 1, "name": object()}, 5)
    with pytest.raises(RuleError, match="rule 'u' failed"):
        rules.actions_for(change)
    actions, failures = rules.evaluate(change)
    assert actions == [Evict("user:1", "u", 5)]
    assert [f.rule for f in failures] == ["u"] and failures[0].evicted == ("user:1",)


# ------------------------------------------------------------------------------------------
# max_value_bytes
# ------------------------------------------------------------------------------------------


def test_oversized_json_refresh_becomes_an_evict() -> None:
    r = rule("u", "user:{id}", "user:alias:{id}", max_value_bytes=40)
    with structlog.testing.capture_logs() as logs:
        small = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 1, "name": "x"}, 3))
        big = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 2, "name": "x" * 40}, 4))
    assert all(isinstance(a, Refresh) for a in small)
    assert big == [Evict("user:2", "u", 4), Evict("user:alias:2", "u", 4)]
    [warning] = events(logs, "value_too_large")
    assert warning["key"] == "user:2" and warning["rule"] == "u"
    assert warning["bytes"] == len('{"id":2,"name":"' + "x" * 40 + '"}')
    assert warning["limit"] == 40


def test_size_counts_utf8_bytes_not_characters() -> None:
    r = rule(max_value_bytes=30)
    # 14 characters of text, 28 bytes of UTF-8: over the limit only when counted in bytes.
    value = {"n": "é" * 14}
    [action] = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 1, **value}, 3))
    assert isinstance(action, Evict)
    r.max_value_bytes = 60
    [action] = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 1, **value}, 3))
    assert isinstance(action, Refresh)


def test_oversized_hash_refresh_becomes_an_evict() -> None:
    r = rule(format="hash", max_value_bytes=12)
    # Fields and values: "id" + "1" + "name" + "abcde" = 12 bytes, at the limit.
    [fits] = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 1, "name": "abcde"}, 3))
    assert isinstance(fits, Refresh)
    [over] = r.actions_for(RowChange(Op.INSERT, USERS, None, {"id": 1, "name": "abcdef"}, 4))
    assert over == Evict("user:1", "u", 4)


def test_oversized_value_in_the_run_loop_evicts_the_key() -> None:
    sink = MemorySink(values={"user:1": "old"})
    sink, _checkpoints, store, runner = make(
        [tx(10, {"id": 1, "name": "x" * 100})], RuleSet([rule(max_value_bytes=50)]), sink
    )
    runner.run()
    assert "user:1" not in sink.values and store.entries == []


CONFIG = """
name = "shop"
[source]
dsn = "mysql://cw@127.0.0.1:3306/shop"
[batch]
poison_retries = 5
[defaults]
max_value_bytes = 2048
[[rules]]
name = "big"
table = "shop.users"
keys = ["user:{id}"]
max_value_bytes = 100
[[rules]]
name = "default"
table = "shop.users"
keys = ["u:{id}"]
"""


def test_settings_compile_max_value_bytes_and_poison_retries(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    settings = load_settings(path)
    assert settings.batch.poison_retries == 5
    assert settings.dead_letter_key() == "cache-worker:dlq:shop"
    big, default = compile_rules(settings).rules
    assert (big.max_value_bytes, default.max_value_bytes) == (100, 2048)
    path.write_text(CONFIG.replace("[batch]\npoison_retries = 5\n[defaults]\n", "[defaults]\n"))
    assert load_settings(path).batch.poison_retries == 3
    path.write_text(CONFIG.replace('keys = ["u:{id}"]', 'keys = ["u:{id}"]\nmax_value_bytes = 0'))
    with pytest.raises(ConfigError, match=r"rules\[1\]\.max_value_bytes"):
        load_settings(path)
    evict = CONFIG.replace('keys = ["user:{id}"]', 'keys = ["user:{id}"]\naction = "evict"')
    path.write_text(evict)
    with pytest.raises(ConfigError, match="max_value_bytes applies to refresh rules only"):
        load_settings(path)


# ------------------------------------------------------------------------------------------
# Entries and replay
# ------------------------------------------------------------------------------------------


def test_entries_round_trip_to_actions() -> None:
    json_refresh = Refresh("k", '{"a":1}', 1000, 7, "r")
    hash_refresh = Refresh("h", (("a", "1"), ("b", "é")), 1000, 8, "r")
    evict = Evict("e", "r", 9)
    for action in (json_refresh, hash_refresh, evict):
        entry = from_action(action, "boom redis://u:hunter2@host:6379/0")
        assert "hunter2" not in entry.error
        stored = DeadLetter.from_fields("1-0", entry.fields())
        assert to_action(stored) == action
    rule_entry = DeadLetter("", "r", "rule", 1, "TypeError", "now", value="{}")
    assert to_action(rule_entry) is None


def test_replay_applies_deletes_and_keeps_what_fails_again() -> None:
    store = MemoryDeadLetterStore()
    store.add(
        [
            from_action(Refresh("a", '"old"', 1000, 5, "r"), NOPERM),
            from_action(Refresh("b", (("f", "1"),), 1000, 5, "r"), NOPERM),
            from_action(Evict("c", "r", 5), NOPERM),
            from_action(Refresh("d", '"d"', 1000, 5, "r"), NOPERM),
            DeadLetter("", "r", "rule", 5, "TypeError: x", "now", value="{}"),
        ]
    )
    sink = MemorySink(refuse={"d": NOPERM})
    # "a" was written since at a newer version: the replay must not move it back.
    sink.values.update({"a": '"new"', "c": "stale"})
    sink.versions["a"] = 9
    result = replay(store, sink, page=2)
    assert result.replayed == 3
    assert [(e.key, error) for e, error in result.failed] == [("d", NOPERM)]
    assert [e.action for e in result.skipped] == ["rule"]
    assert sink.values == {"a": '"new"', "b": (("f", "1"),)}
    assert sink.stale_refusals == 1
    assert [(e.key, e.action) for e in store.entries] == [("d", "refresh"), ("", "rule")]
