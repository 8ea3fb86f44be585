"""The run loop: source thread (log → rules) → bounded queue → batches → sink → checkpoint.

The source thread parses the log, turns each transaction's changes into actions with the rules, and
blocks on a bounded queue when the apply side is behind (back-pressure). The main thread collects
items into a batch that closes on size or after a few milliseconds, coalesces their actions,
applies them in one sink call, and only then saves the checkpoint (the last transaction-boundary
position in the batch) and acks the source. A failure of Redis or of the database is retried with
backoff and never advances the checkpoint. Actions Redis refuses for good (NOPERM, OOM, a value it
rejects) while it applies the rest are retried a few times on their own; what still fails is
written to the dead-letter store and its key evicted, and so is a change a rule cannot evaluate, so
one poison change costs a cache miss instead of stopping the worker. ``request_stop`` (first
SIGTERM) finishes the current batch; burst options stop the loop after N transactions or once the
source is caught up, which makes the loop testable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from worker.actions import CacheAction, Evict, coalesce
from worker.dead_letters import DeadLetter, entries_for
from worker.errors import CacheWorkerError, ConfigError, PartialApplyError, SinkError, SourceError
from worker.events import Heartbeat, Position, TableRef, Transaction
from worker.handoff import Handoff
from worker.interfaces import CheckpointStore, DeadLetterStore, Sink, Source
from worker.retry import retry_call
from worker.rules import RuleFailure, RuleSet

log = structlog.get_logger("cache_worker.runner")


@dataclass(frozen=True)
class RunOptions:
    """How the loop batches, reports and stops."""

    batch_max_transactions: int = 2000
    batch_max_actions: int = 5000
    batch_max_delay_s: float = 0.005
    queue_size: int = 20000
    # Rows parsed ahead, whatever the transaction sizes: what bounds the worker's memory.
    queue_rows: int = 50000
    progress_interval_s: float = 10.0
    retry_max_backoff_s: float = 30.0
    poison_retries: int = 3
    poison_backoff_s: float = 0.1
    # While changes stream, the position is saved (and then acked to the source) at most this
    # often, and always when caught up and on the way out: a crash replays at most this much,
    # which versioned writes make harmless, and a busy stream stops paying a durable write per
    # batch. 0: every batch.
    checkpoint_interval_s: float = 0.0
    stop_grace_s: float = 5.0
    max_transactions: int | None = None
    until_idle: bool = False


@dataclass
class RunStats:
    """Counters since start; the progress event reports their rates."""

    transactions: int = 0
    rows: int = 0
    actions: int = 0
    refreshes: int = 0
    evictions: int = 0
    batches: int = 0
    dead_letters: int = 0
    last_position: Position | None = None
    last_committed_at: float | None = None
    caught_up: bool = False


@dataclass
class _SourceFailed:
    error: BaseException


@dataclass(slots=True)
class _Evaluated:
    """A transaction's actions, worked out on the source thread, and what the batch needs of
    the transaction itself (not its rows, which can go once their actions exist)."""

    position: Position | None
    committed_at: float | None
    rows: int
    actions: list[CacheAction]
    failures: list[RuleFailure]


_QueueItem = Heartbeat | _Evaluated | _SourceFailed


@dataclass
class _Batch:
    actions: list[CacheAction] = field(default_factory=list)
    rule_failures: list[RuleFailure] = field(default_factory=list)
    position: Position | None = None
    transactions: int = 0
    rows: int = 0
    caught_up: bool = False
    committed_at: float | None = None
    failure: BaseException | None = None


class Runner:
    """Drives one source into one sink, checkpointing after every applied batch.

    ``dead_letters`` receives what the sink keeps refusing and changes the rules fail on; without
    one (unit tests) those are only logged.
    """

    def __init__(
        self,
        source: Source,
        sink: Sink,
        checkpoints: CheckpointStore,
        rules: RuleSet,
        options: RunOptions | None = None,
        describe_position: Callable[[Position], str] | None = None,
        preflight: Callable[[Position | None], None] | None = None,
        dead_letters: DeadLetterStore | None = None,
    ) -> None:
        self.source = source
        self.dead_letters = dead_letters
        self.sink = sink
        self.checkpoints = checkpoints
        self.rules = rules
        self.options = options or RunOptions()
        self.stats = RunStats()
        self._preflight = preflight
        self._describe = describe_position or (lambda p: str(p.to_dict()))
        self._queue: Handoff[_QueueItem] = Handoff(self.options.queue_size, self.options.queue_rows)
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved: Position | None = None
        self._saved_at = 0.0
        # Applied but not yet saved (waiting for the checkpoint interval).
        self._unsaved: Position | None = None

    # -- control ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish and checkpoint the current batch, then return from ``run``."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + self.options.stop_grace_s
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _give_up_retrying(self) -> bool:
        return self._stop_deadline is not None and time.monotonic() >= self._stop_deadline

    def _sleep(self, seconds: float) -> None:
        if self._stop_deadline is None:
            # A stop request wakes the backoff so the grace period starts counting at once.
            self._stop.wait(seconds)
        else:
            time.sleep(max(0.0, min(seconds, self._stop_deadline - time.monotonic())))

    def _retry(self, what: str, fn: Callable[[], object]) -> None:
        retry_call(
            what,
            fn,
            max_backoff_s=self.options.retry_max_backoff_s,
            should_stop=self._give_up_retrying,
            sleep=self._sleep,
        )

    # -- start-up --------------------------------------------------------------------------

    def validate_schema(self) -> None:
        """Stop with a ConfigError naming every rule field whose table or column is missing."""
        columns: dict[TableRef, list[str] | None] = {}

        def describe() -> None:
            for table in self.rules.tables:
                columns[table] = self.source.columns(table)

        self._retry("describe_tables", describe)
        problems = self.rules.problems_with_columns(columns)
        if problems:
            raise ConfigError("\n".join(problems))

    def load_checkpoint(self) -> Position | None:
        loaded: list[Position | None] = []
        self._retry("load_checkpoint", lambda: loaded.append(self.checkpoints.load()))
        return loaded[0]

    def start_position(self, checkpoint: Position | None) -> Position:
        """The checkpoint, or the source's initial position saved before anything is read."""
        if checkpoint is not None:
            log.info("checkpoint_loaded", position=self._describe(checkpoint))
            self._saved = checkpoint
            return checkpoint
        initial: list[Position] = []
        self._retry("initial_position", lambda: initial.append(self.source.initial_position()))
        # Saved before the first read, so a crash before the first batch cannot skip changes
        # committed between now and the restart.
        self._retry("save_checkpoint", lambda: self.checkpoints.save(initial[0]))
        self._saved = initial[0]
        log.info("checkpoint_initialized", position=self._describe(initial[0]))
        return initial[0]

    # -- source thread ---------------------------------------------------------------------

    def _put(self, item: _QueueItem, rows: int = 0) -> bool:
        while not self._closing.is_set():
            if self._queue.put(item, rows, timeout=0.2):
                return True
        return False

    def _evaluate(self, transaction: Transaction) -> _Evaluated:
        actions: list[CacheAction] = []
        failures: list[RuleFailure] = []
        evaluate = self.rules.evaluate
        for change in transaction.changes:
            produced, failed = evaluate(change)
            actions.extend(produced)
            if failed:
                failures.extend(failed)
        return _Evaluated(
            transaction.position,
            transaction.committed_at,
            len(transaction.changes),
            actions,
            failures,
        )

    def _pump(self, start: Position) -> None:
        # The rules run here, not on the apply side: while the main thread waits for Redis to
        # run a batch (the refresh script costs Redis about as much as the rules cost us), this
        # thread turns the next transactions into actions instead of idling on a full queue.
        try:
            for item in self.source.stream(start):
                queued: _QueueItem
                if isinstance(item, Transaction):
                    queued, rows = self._evaluate(item), len(item.changes)
                else:
                    queued, rows = item, 0
                if not self._put(queued, rows):
                    return
            if not self._closing.is_set():
                self._put(_SourceFailed(SourceError("the source stream ended unexpectedly")))
        except BaseException as exc:
            if not self._closing.is_set():
                self._put(_SourceFailed(exc))

    def _start_source(self, start: Position) -> None:
        self._thread = threading.Thread(
            target=self._pump, args=(start,), name="cache-worker-source", daemon=True
        )
        self._thread.start()

    def _stop_source(self) -> None:
        self._closing.set()
        try:
            self.source.close()
        except Exception as exc:
            log.warning("source_close_failed", error_class=type(exc).__name__, error=str(exc))
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # -- batching --------------------------------------------------------------------------

    def _next_item(self, timeout: float) -> _QueueItem | None:
        return self._queue.get(timeout)

    def _collect(self) -> _Batch:
        opts = self.options
        batch = _Batch()
        raw_actions: list[CacheAction] = []
        first = self._next_item(0.1)
        if first is None:
            return batch
        tx_limit = opts.batch_max_transactions
        if opts.max_transactions is not None:
            tx_limit = min(tx_limit, opts.max_transactions - self.stats.transactions)
        deadline = time.monotonic() + opts.batch_max_delay_s
        item: _QueueItem | None = first
        while item is not None:
            if isinstance(item, _SourceFailed):
                batch.failure = item.error
                break
            if isinstance(item, _Evaluated):
                raw_actions.extend(item.actions)
                if item.failures:
                    batch.rule_failures.extend(item.failures)
                batch.rows += item.rows
                batch.caught_up = False
                if item.position is not None:
                    batch.position = item.position
                    batch.transactions += 1
                    if item.committed_at is not None:
                        batch.committed_at = item.committed_at
            else:
                if item.position is not None:
                    batch.position = item.position
                batch.caught_up = item.caught_up
                if item.flush or item.caught_up:
                    # Nothing more comes for a moment (the source waits for an ack or reads its
                    # next batch), or for now at all: holding the batch for batch_max_delay_s
                    # would only add lag.
                    break
            if batch.transactions >= tx_limit or len(raw_actions) >= opts.batch_max_actions:
                break
            item = self._next_item(deadline - time.monotonic())
        batch.actions = coalesce(raw_actions)
        return batch

    # -- applying --------------------------------------------------------------------------

    def _apply_once(self, actions: list[CacheAction]) -> list[tuple[CacheAction, str]]:
        """Apply, retrying while the sink is unavailable; the actions it refused for good."""
        refused: list[tuple[CacheAction, str]] = []

        def attempt() -> None:
            nonlocal refused
            try:
                self.sink.apply(actions)
                refused = []
            except PartialApplyError as exc:
                refused = exc.failed

        self._retry("apply", attempt)
        return refused

    def _apply_actions(self, actions: list[CacheAction]) -> list[tuple[CacheAction, str]]:
        """Apply, then retry refused actions alone; those refused every time."""
        refused = self._apply_once(actions)
        for attempt in range(1, self.options.poison_retries + 1):
            if not refused:
                break
            backoff = min(self.options.poison_backoff_s * 2 ** (attempt - 1), 2.0)
            log.warning(
                "actions_refused",
                refused=len(refused),
                key=refused[0][0].key,
                rule=refused[0][0].rule,
                error=refused[0][1],
                attempt=attempt,
                retries=self.options.poison_retries,
                backoff_s=round(backoff, 3),
            )
            self._sleep(backoff)
            refused = self._apply_once([action for action, _ in refused])
        return refused

    def _dead_letter(
        self, refused: list[tuple[CacheAction, str]], failures: list[RuleFailure]
    ) -> None:
        """Record what could not be applied, evict the refused keys, log every entry.

        Either record is enough to go on: an evicted key is correct (readers load the row), and
        a key that could not be evicted is named in the store. Only when both fail does the batch
        fail, so the checkpoint stays behind and a restart tries again.
        """
        entries = entries_for(refused, failures)
        stored = self._store_dead_letters(entries)
        fallback: list[CacheAction] = [
            Evict(action.key, action.rule, action.version) for action, _ in refused
        ]
        not_evicted = self._apply_once(fallback) if fallback else []
        for entry in entries:
            self.stats.dead_letters += 1
            log.warning(
                "dead_lettered",
                key=entry.key,
                rule=entry.rule,
                action=entry.action,
                version=entry.version,
                error=entry.error,
                stored=stored,
                dead_letters_total=self.stats.dead_letters,
            )
        for failure in failures:
            if failure.evicted:
                log.info("rule_failure_evicted", rule=failure.rule, keys=list(failure.evicted))
        for action, error in not_evicted:
            log.error(
                "dead_letter_evict_failed",
                key=action.key,
                rule=action.rule,
                error=error,
                stored=stored,
            )
        if not_evicted and not stored:
            action, error = not_evicted[0]
            raise SinkError(
                f"{len(not_evicted)} refused cache actions could neither be dead-lettered nor "
                f"evicted; first: key {action.key!r}: {error}"
            )

    def _store_dead_letters(self, entries: list[DeadLetter]) -> bool:
        store = self.dead_letters
        if store is None or not entries:
            return False
        try:
            self._retry("dead_letter", lambda: store.add(entries))
        except CacheWorkerError as exc:
            if exc.retryable:
                raise  # the stop grace period ran out while the store was unreachable
            log.error(
                "dead_letter_store_failed",
                entries=len(entries),
                error_class=type(exc).__name__,
                error=str(exc),
            )
            return False
        return True

    def _apply(self, batch: _Batch) -> None:
        refused = self._apply_actions(batch.actions) if batch.actions else []
        if refused or batch.rule_failures:
            self._dead_letter(refused, batch.rule_failures)
        position = batch.position
        latest = self._unsaved or self._saved
        if position is not None and (latest is None or latest < position):
            self._unsaved = position
        if batch.caught_up:
            self._save_checkpoint()
        else:
            self._maybe_save_checkpoint()
        stats = self.stats
        stats.batches += 1
        stats.transactions += batch.transactions
        stats.rows += batch.rows
        stats.actions += len(batch.actions)
        evictions = sum(1 for a in batch.actions if isinstance(a, Evict))
        stats.evictions += evictions
        stats.refreshes += len(batch.actions) - evictions
        if position is not None:
            stats.last_position = position
        if batch.committed_at is not None:
            stats.last_committed_at = batch.committed_at
        if batch.transactions or batch.rows:
            stats.caught_up = False
        if batch.caught_up:
            stats.caught_up = True

    def _save_checkpoint(self) -> None:
        position = self._unsaved
        if position is None:
            return
        self._retry("save_checkpoint", lambda: self.checkpoints.save(position))
        self._saved, self._unsaved = position, None
        self._saved_at = time.monotonic()
        # Only now may the source release what precedes it (a slot, outbox rows): a source
        # ahead of the saved checkpoint would look, after a crash, like one that lost data.
        self.source.ack(position)

    def _maybe_save_checkpoint(self) -> None:
        if (
            self._unsaved is not None
            and time.monotonic() - self._saved_at >= self.options.checkpoint_interval_s
        ):
            self._save_checkpoint()

    def _save_checkpoint_on_exit(self) -> None:
        # Everything up to _unsaved is applied, so saving it is right even when the loop failed;
        # one attempt only, as the stop grace period may already be used up.
        position = self._unsaved
        if position is None:
            return
        try:
            self.checkpoints.save(position)
        except Exception as exc:
            log.warning(
                "checkpoint_not_saved_on_exit",
                position=self._describe(position),
                error_class=type(exc).__name__,
                error=str(exc),
            )
            return
        self._saved, self._unsaved = position, None
        try:
            self.source.ack(position)
        except Exception as exc:
            log.warning("source_ack_failed", error_class=type(exc).__name__, error=str(exc))

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> RunStats:
        """Validate, resume, then apply until stopped, burst-complete or failed."""
        checkpoint = self.load_checkpoint()
        preflight = self._preflight
        if preflight is not None:
            # The source judges its settings knowing whether we resume: a missing replication
            # slot is "run setup" on a first start but a lost position after one.
            self._retry("preflight", lambda: preflight(checkpoint))
        self.validate_schema()
        start = self.start_position(checkpoint)
        self._start_source(start)
        progress = _Progress(self, self.options.progress_interval_s)
        log.info(
            "streaming", start=self._describe(start), tables=[str(t) for t in self.rules.tables]
        )
        try:
            while not self._stop.is_set():
                batch = self._collect()
                if batch.actions or batch.position is not None or batch.rows:
                    self._apply(batch)
                else:
                    self.stats.caught_up = self.stats.caught_up or batch.caught_up
                self._maybe_save_checkpoint()
                progress.maybe_report()
                if batch.failure is not None:
                    raise batch.failure
                if self._burst_done():
                    log.info("burst_complete", transactions=self.stats.transactions)
                    break
        finally:
            self._save_checkpoint_on_exit()
            self._stop_source()
            progress.report(final=True)
        return self.stats

    def _burst_done(self) -> bool:
        opts = self.options
        if opts.max_transactions is not None and self.stats.transactions >= opts.max_transactions:
            return True
        return opts.until_idle and self.stats.caught_up and self._queue.empty()


class _Progress:
    """Emits the periodic ``progress`` event with rates, lag and position."""

    def __init__(self, runner: Runner, interval_s: float) -> None:
        self._runner = runner
        self._interval = interval_s
        self._last_at = time.monotonic()
        self._last_rows = 0
        self._last_tx = 0

    def maybe_report(self) -> None:
        if time.monotonic() - self._last_at >= self._interval:
            self.report()

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_at, 1e-9)
        stats = self._runner.stats
        lag: float | None
        if stats.caught_up:
            lag = 0.0
        elif stats.last_committed_at is not None:
            lag = max(0.0, time.time() - stats.last_committed_at)
        else:
            lag = None
        sink_refusals = getattr(self._runner.sink, "stale_refusals", None)
        # Source-specific health (retained WAL of a slot, outbox backlog); optional and never
        # allowed to break the loop: a failing probe just leaves the fields out.
        extra: dict[str, object] = {}
        probe = getattr(self._runner.source, "progress_fields", None)
        if probe is not None:
            try:
                extra = dict(probe())
            except Exception as exc:
                extra = {"source_probe_error": type(exc).__name__}
        log.info(
            "stopped" if final else "progress",
            rows_per_s=round((stats.rows - self._last_rows) / elapsed, 1),
            tx_per_s=round((stats.transactions - self._last_tx) / elapsed, 1),
            transactions=stats.transactions,
            rows=stats.rows,
            actions=stats.actions,
            refreshes=stats.refreshes,
            evictions=stats.evictions,
            stale_refusals=sink_refusals,
            dead_letters=stats.dead_letters,
            lag_s=None if lag is None else round(lag, 3),
            queue_depth=self._runner._queue.qsize(),
            position=(self._runner._describe(stats.last_position) if stats.last_position else None),
            **extra,
        )
        self._last_at = now
        self._last_rows = stats.rows
        self._last_tx = stats.transactions


def describe_error(exc: BaseException) -> dict[str, object]:
    """Fields for an error event."""
    fields: dict[str, object] = {"error_class": type(exc).__name__, "error": str(exc)}
    if isinstance(exc, CacheWorkerError):
        fields["exit_code"] = int(exc.exit_code)
    return fields


__all__: Sequence[str] = ["RunOptions", "RunStats", "Runner", "describe_error"]
