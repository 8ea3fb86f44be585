"""Unit tests of the run loop with in-memory doubles: batching, checkpoints, retries, stopping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from connectors.memory import MemoryCheckpointStore, MemorySink, MemorySource
from worker.actions import CacheAction
from worker.errors import ConfigError, PositionLost
from worker.events import Heartbeat, Op, Position, Row, RowChange, SourceItem, TableRef, Transaction
from worker.rules import KeyTemplate, Rule, RuleSet
from worker.runner import Runner, RunOptions

USERS = TableRef("shop", "users")
COLUMNS = {USERS: ["id", "name"]}


def rules() -> RuleSet:
    return RuleSet([Rule("u", USERS, (KeyTemplate.parse("user:{id}"),), jitter=0.0)])


def tx(version: int, *rows: tuple[Op, Row | None, Row | None]) -> Transaction:
    changes = [RowChange(op, USERS, before, after, version) for op, before, after in rows]
    return Transaction(changes, Position(version, {"i": version}), committed_at=time.time())


def ins(i: int, name: str = "n") -> tuple[Op, None, Row]:
    return (Op.INSERT, None, {"id": i, "name": name})


def make(
    items: Sequence[SourceItem], **opts: Any
) -> tuple[MemorySource, MemorySink, MemoryCheckpointStore, Runner]:
    source = MemorySource(items, COLUMNS)
    sink = MemorySink()
    store = MemoryCheckpointStore()
    options = RunOptions(batch_max_delay_s=0.001, progress_interval_s=3600, **opts)
    return source, sink, store, Runner(source, sink, store, rules(), options)


def saved_version(store: MemoryCheckpointStore) -> int:
    """The version of the checkpoint the run saved last; fails the test if it saved none."""
    assert store.position is not None, "no checkpoint saved"
    return store.position.version


def test_applies_until_idle_and_checkpoints_last_position() -> None:
    source, sink, store, runner = make(
        [tx(10, ins(1)), tx(20, ins(2, "b")), tx(30, ins(1, "c"))], until_idle=True
    )
    stats = runner.run()
    assert stats.transactions == 3 and stats.rows == 3
    assert sink.values == {"user:1": '{"id":1,"name":"c"}', "user:2": '{"id":2,"name":"b"}'}
    assert saved_version(store) == 30
    assert source.acked[-1].version == 30


def test_initial_position_is_saved_before_reading() -> None:
    source, _sink, store, runner = make([tx(10, ins(1))], until_idle=True)
    source.initial = Position(5, {"i": 5})
    runner.run()
    assert store.saves[0].version == 5
    assert source.started_from is not None and source.started_from.version == 5


def test_resumes_after_checkpoint_without_replaying_earlier() -> None:
    _source, sink, store, runner = make([tx(10, ins(1)), tx(20, ins(2))], until_idle=True)
    store.position = Position(10, {"i": 10})
    runner.run()
    assert set(sink.values) == {"user:2"}


def test_max_transactions_burst_stops_after_n() -> None:
    _source, sink, store, runner = make([tx(v, ins(v)) for v in range(1, 11)], max_transactions=4)
    stats = runner.run()
    assert stats.transactions == 4
    assert saved_version(store) == 4
    assert set(sink.values) == {f"user:{i}" for i in range(1, 5)}


def test_sink_failures_are_retried_and_never_advance_checkpoint_early() -> None:
    _source, sink, store, runner = make([tx(10, ins(1))], until_idle=True)
    sink.fail_next = 3
    saves_during_failure = []
    real_apply = sink.apply

    def apply(actions: Sequence[CacheAction]) -> None:
        saves_during_failure.append(store.position.version if store.position else None)
        real_apply(actions)

    sink.apply = apply  # type: ignore[method-assign]  # a spy around the double's apply
    runner.run()
    assert sink.values == {"user:1": '{"id":1,"name":"n"}'}
    # Every failed attempt saw only the initial checkpoint (version 0), never 10.
    assert saves_during_failure == [0, 0, 0, 0]
    assert saved_version(store) == 10


def test_large_batch_is_coalesced_into_few_applies() -> None:
    items = [tx(v, ins(v % 3, str(v))) for v in range(1, 301)]
    _source, sink, _store, runner = make(items, until_idle=True)
    runner.run()
    assert sink.values["user:0"] == '{"id":0,"name":"300"}'
    assert sum(len(batch) for batch in sink.applied) < 300


def test_chunked_transaction_checkpoints_only_at_its_end() -> None:
    chunk1 = Transaction([RowChange(Op.INSERT, USERS, None, {"id": 1, "name": "a"}, 50)], None)
    chunk2 = Transaction(
        [RowChange(Op.INSERT, USERS, None, {"id": 2, "name": "b"}, 50)], Position(60, {})
    )
    _source, _sink, store, runner = make(
        [chunk1, chunk2], until_idle=True, batch_max_transactions=1
    )
    runner.run()
    assert [p.version for p in store.saves] == [0, 60]


def test_heartbeat_moves_checkpoint_past_irrelevant_log() -> None:
    _source, _sink, store, runner = make(
        [tx(10, ins(1)), Heartbeat(Position(99, {}), caught_up=False)], until_idle=True
    )
    runner.run()
    assert saved_version(store) == 99


def test_missing_column_stops_with_config_error() -> None:
    source = MemorySource([], {USERS: ["id"]})
    bad = RuleSet([Rule("u", USERS, (KeyTemplate.parse("user:{uid}"),))])
    runner = Runner(source, MemorySink(), MemoryCheckpointStore(), bad, RunOptions(until_idle=True))
    with pytest.raises(
        ConfigError, match=r"rules\[0\].keys\[0\]: template 'user:\{uid\}' names column 'uid'"
    ):
        runner.run()


def test_fatal_source_error_applies_what_came_before_then_raises() -> None:
    class FailingSource(MemorySource):
        def stream(self, start: Position) -> Iterator[SourceItem]:
            yield tx(10, ins(1))
            raise PositionLost("binlog purged")

    source = FailingSource([], COLUMNS)
    sink, store = MemorySink(), MemoryCheckpointStore()
    runner = Runner(source, sink, store, rules(), RunOptions(batch_max_delay_s=0.01))
    with pytest.raises(PositionLost):
        runner.run()
    assert "user:1" in sink.values
    assert saved_version(store) == 10


def test_request_stop_finishes_batch_and_returns() -> None:
    source, _sink, store, runner = make([tx(10, ins(1))])
    thread = threading.Thread(target=runner.run)
    thread.start()
    deadline = time.monotonic() + 5
    while store.position is None or store.position.version != 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    runner.request_stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert source._closed.is_set()


def test_checkpoint_interval_saves_seldom_and_acks_only_what_was_saved() -> None:
    # One transaction per batch, so every transaction is its own apply and its own ack.
    items = [tx(v, ins(v)) for v in range(1, 21)]
    source, sink, store, runner = make(
        items, until_idle=True, checkpoint_interval_s=3600, batch_max_transactions=1
    )
    runner.run()
    assert len(sink.values) == 20
    # The source is never acked past the saved checkpoint (a slot ahead of the checkpoint
    # would read as lost data after a crash).
    saved = {p.version for p in store.saves}
    assert source.acked and all(p.version in saved for p in source.acked)
    assert source.acked[-1].version == 20
    # The initial position, the first batch (the interval starts at zero), then the last
    # position once (caught up, or on the way out): never once per batch.
    versions = [p.version for p in store.saves]
    assert versions[-1] == 20
    assert len(versions) <= 4, versions
    assert saved_version(store) == 20


def test_checkpoint_interval_zero_saves_after_every_batch() -> None:
    items = [tx(v, ins(v)) for v in range(1, 6)]
    _source, _sink, store, runner = make(items, until_idle=True, batch_max_transactions=1)
    runner.run()
    assert [p.version for p in store.saves][-5:] == [1, 2, 3, 4, 5]


def test_unsaved_position_is_saved_when_the_loop_fails() -> None:
    # Applied but inside the interval when the source fails: the exit saves it, since Redis
    # has every change up to it, and never a position past what was applied.
    class FailingSource(MemorySource):
        def stream(self, start: Position) -> Iterator[SourceItem]:
            yield tx(10, ins(1))
            yield tx(20, ins(2))
            raise PositionLost("binlog purged")

    source = FailingSource([], COLUMNS)
    sink, store = MemorySink(), MemoryCheckpointStore()
    options = RunOptions(
        batch_max_delay_s=0.001, batch_max_transactions=1, checkpoint_interval_s=3600
    )
    runner = Runner(source, sink, store, rules(), options)
    with pytest.raises(PositionLost):
        runner.run()
    assert set(sink.values) == {"user:1", "user:2"}
    assert saved_version(store) == 20
    assert [p.version for p in store.saves][-1] == 20


class _AckGatedSource(MemorySource):
    """Like postgres-notify: after a batch it says so, then reads on only once it is acked."""

    def __init__(self) -> None:
        super().__init__([], COLUMNS)
        self.acked_in_time = threading.Event()

    def stream(self, start: Position) -> Iterator[SourceItem]:
        first = tx(10, ins(1))
        yield first
        yield Heartbeat(None, flush=True)
        # Bounded: a runner that kept collecting would hold the batch for batch_max_delay_s
        # (an hour here), and this wait would give up long before.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.acked:
            time.sleep(0.005)
        if self.acked:
            self.acked_in_time.set()
        yield Heartbeat(first.position, caught_up=True)
        self._closed.wait()


def test_a_source_awaiting_its_ack_gets_the_batch_applied_at_once() -> None:
    source = _AckGatedSource()
    sink, store = MemorySink(), MemoryCheckpointStore()
    options = RunOptions(batch_max_delay_s=3600, progress_interval_s=3600, until_idle=True)
    Runner(source, sink, store, rules(), options).run()
    assert source.acked_in_time.is_set()
    assert sink.values == {"user:1": '{"id":1,"name":"n"}'}
    assert saved_version(store) == 10
