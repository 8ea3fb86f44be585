"""The ``cache-worker`` command line: the only place that wires adapters to the core.

Commands: ``run`` (the daemon), ``check`` (preflight, one line per check, non-zero on any FAIL),
``setup``/``teardown`` (what a Postgres source needs), ``verify`` (the staleness inspector),
``dlq list|replay|purge`` (dead letters), ``reset-checkpoint`` (forget the position, after a
PositionLost) and ``--version``. Exit codes are ``worker.errors.ExitCode`` and are listed in
``--help`` and the README.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import click
import structlog

from worker import __version__
from worker.errors import CacheWorkerError, ExitCode
from worker.interfaces import CheckResult, DeadLetterStore
from worker.logs import SecretScrubber, configure_logging
from worker.redact import redact_url
from worker.runner import Runner, RunOptions, describe_error
from worker.settings import Settings, compile_rules, load_settings
from worker.signals import StopSignals

log = structlog.get_logger("cache_worker")

EXIT_CODES_HELP = """\b
Exit codes:
  0  stopped cleanly (SIGTERM/SIGINT, burst complete, all checks ok)
  1  internal error (a bug: please report it)
  2  usage error (bad command line)
  3  configuration error (the message names the field)
  4  database or Redis unavailable, or the checkpoint could not be saved
  5  position lost (binlog purged past the checkpoint): reset-checkpoint and rewarm
  6  precondition failed (binlog settings, privileges, missing table)
  7  check found a FAIL, or verify found a stale key
  130 forced exit on a second signal
"""

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CACHE_WORKER_CONFIG",
    required=True,
    help="TOML config file (env: CACHE_WORKER_CONFIG). Env vars CACHE_WORKER_* override fields.",
)


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cache-worker")
def cli() -> None:
    """Keep a Redis cache warm and correct from the MySQL/MariaDB binlog or Postgres."""


def redacted_config(settings: Settings) -> dict[str, Any]:
    """The settings as JSON data with every secret masked, for the ``started`` event."""
    data = settings.model_dump(mode="json")
    data["source"]["dsn"] = redact_url(settings.source.dsn)
    data["redis"]["url"] = redact_url(settings.redis.url)
    return data


def _load(config_path: Path) -> Settings:
    return load_settings(config_path)


def _setup_logging(settings: Settings | None, fmt: str | None, level: str | None) -> SecretScrubber:
    from connectors import secrets_of

    scrubber = configure_logging(
        level=level or (settings.log.level if settings else "info"),
        fmt=fmt or (settings.log.format if settings else "auto"),
    )
    if settings is not None:
        scrubber.add(secrets_of(settings))
    return scrubber


def _fail(exc: CacheWorkerError, scrubber: SecretScrubber | None = None) -> int:
    fields = describe_error(exc)
    if scrubber is not None:
        fields["error"] = scrubber.scrub(str(fields["error"]))
    log.error("fatal", **fields)
    return int(exc.exit_code)


@cli.command()
@_config_option
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default=None,
    help="JSON lines or console output; default: JSON unless stdout is a terminal.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option(
    "--max-transactions",
    type=click.IntRange(min=1),
    default=None,
    help="Burst mode: stop after applying this many transactions.",
)
@click.option("--until-idle", is_flag=True, help="Burst mode: stop once caught up with the log.")
def run(
    config_path: Path,
    log_format: str | None,
    log_level: str | None,
    max_transactions: int | None,
    until_idle: bool,
) -> None:
    """Follow the database log and apply every change to Redis until stopped."""
    sys.exit(_run(config_path, log_format, log_level, max_transactions, until_idle))


def _run(
    config_path: Path,
    log_format: str | None,
    log_level: str | None,
    max_transactions: int | None,
    until_idle: bool,
) -> int:
    scrubber: SecretScrubber | None = None
    try:
        settings = _load(config_path)
    except CacheWorkerError as exc:
        _setup_logging(None, log_format, log_level)
        return _fail(exc)
    scrubber = _setup_logging(settings, log_format, log_level)
    log.info("started", version=__version__, pid=os.getpid(), config=redacted_config(settings))

    import connectors

    try:
        rules = compile_rules(settings)
        source = connectors.build_source(settings)
        client = connectors.redis_client(settings)
        sink = connectors.build_sink(client)
        store = connectors.build_checkpoint_store(settings, client)
        dead_letters = connectors.build_dead_letter_store(settings, client)
    except CacheWorkerError as exc:
        return _fail(exc, scrubber)
    options = RunOptions(
        batch_max_transactions=settings.batch.max_transactions,
        batch_max_actions=settings.batch.max_actions,
        batch_max_delay_s=settings.batch.max_delay,
        queue_size=settings.batch.queue_size,
        queue_rows=settings.batch.queue_rows,
        progress_interval_s=settings.log.progress_interval,
        retry_max_backoff_s=settings.batch.retry_max_backoff,
        poison_retries=settings.batch.poison_retries,
        # Postgres sources release their slot or outbox rows only on an ack, which follows the
        # saved checkpoint; a slower checkpoint would hold them back, so they save every batch.
        checkpoint_interval_s=(
            settings.checkpoint.interval if settings.source.kind == "mysql" else 0.0
        ),
        max_transactions=max_transactions,
        until_idle=until_idle,
    )
    runner = Runner(
        source,
        sink,
        store,
        rules,
        options,
        describe_position=getattr(source, "describe_position", None),
        preflight=connectors.preflight(settings),
        dead_letters=dead_letters,
    )
    _tune_gc()
    try:
        with StopSignals(runner.request_stop, force_exit_code=int(ExitCode.INTERRUPTED)):
            stats = runner.run()
    except CacheWorkerError as exc:
        return _fail(exc, scrubber)
    finally:
        sink.close()
    log.info("exited", transactions=stats.transactions, rows=stats.rows, actions=stats.actions)
    return int(ExitCode.OK)


# Collect the youngest generation after this many new container objects, not the default 700.
_GC_YOUNG_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the stream that follows.

    Every row change allocates several containers (row images, the change, its actions) that
    reference counting frees; hardly any form a cycle. With the default thresholds the collector
    still ran about a thousand times per 200k rows, and the full collections it triggered walked
    every object the imports and setup had made: together about a fifth of the worker's CPU time
    on a bulk statement (measured with a gc callback). Freezing what exists now takes those
    objects out of every later collection; a higher young threshold makes collections rarer.
    Cycles (exceptions with their tracebacks, mostly) are still collected, a little later.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


@cli.command()
@_config_option
def check(config_path: Path) -> None:
    """Check config, database, binlog settings, privileges, rule columns and Redis."""
    sys.exit(_check(config_path))


def _print_check(result: CheckResult, scrubber: SecretScrubber) -> None:
    status = "ok  " if result.ok and not result.warning else ("warn" if result.ok else "FAIL")
    detail = f": {scrubber.scrub(result.detail)}" if result.detail else ""
    click.echo(f"{status}  {result.name}{detail}")


def _check(config_path: Path) -> int:
    from connectors import secrets_of

    configure_logging(level="warning", fmt="auto", stream=sys.stderr)
    try:
        settings = _load(config_path)
    except CacheWorkerError as exc:
        click.echo(f"FAIL  config {config_path}:")
        for line in str(exc).splitlines():
            click.echo(f"        {line}")
        return int(ExitCode.CHECK_FAILED)
    scrubber = SecretScrubber(secrets_of(settings))
    results = [CheckResult("config", True, f"{config_path} ({len(settings.rules)} rules)")]
    results.extend(_check_all(settings))
    for result in results:
        _print_check(result, scrubber)
    failed = sum(1 for r in results if not r.ok)
    click.echo(f"{len(results) - failed} ok, {failed} failed")
    return int(ExitCode.CHECK_FAILED if failed else ExitCode.OK)


def _check_all(settings: Settings) -> list[CheckResult]:
    import connectors

    results: list[CheckResult] = []
    rules = compile_rules(settings)
    source = connectors.build_source(settings)
    try:
        source_checks = connectors.source_checks(settings, source, rules)
        results.extend(source_checks)
        if all(r.ok for r in source_checks if r.name.endswith("reachable")):
            columns = {table: source.columns(table) for table in rules.tables}
            problems = rules.problems_with_columns(columns)
            results.extend(CheckResult("rules match schema", False, p) for p in problems)
            if not problems:
                results.append(
                    CheckResult(
                        "rules match schema",
                        True,
                        f"{len(rules.rules)} rules, {len(rules.tables)} tables",
                    )
                )
    except CacheWorkerError as exc:
        results.append(CheckResult("source", False, str(exc)))
    finally:
        source.close()

    try:
        client = connectors.redis_client(settings)
        sink = connectors.build_sink(client)
        redis_checks = sink.checks()
        results.extend(redis_checks)
        if all(r.ok for r in redis_checks):
            results.append(_checkpoint_check(settings, client, source))
        sink.close()
    except CacheWorkerError as exc:
        results.append(CheckResult("redis", False, str(exc)))
    return results


def _checkpoint_check(settings: Settings, client: Any, source: Any) -> CheckResult:
    import connectors

    store = connectors.build_checkpoint_store(settings, client)
    try:
        position = store.load()
    except CacheWorkerError as exc:
        return CheckResult("checkpoint", False, str(exc))
    if position is None:
        return CheckResult(
            "checkpoint", True, f"none yet: run starts at the {settings.source.start} of the log"
        )
    available = getattr(source, "position_available", None)
    if available is not None:
        result: CheckResult = available(position)
        return result
    return CheckResult("checkpoint", True, str(position.to_dict()))


def _schema_command(config_path: Path, dry_run: bool, action: str) -> int:
    import connectors

    configure_logging(level="warning", fmt="auto", stream=sys.stderr)
    try:
        settings = _load(config_path)
        source = connectors.build_source(settings)
    except CacheWorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        return int(exc.exit_code)
    method = getattr(source, action, None)
    if method is None:
        click.echo(f"{settings.source.kind} needs no {action}: nothing to do")
        return int(ExitCode.OK)
    try:
        statements: list[str] = method(dry_run=dry_run)
    except CacheWorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        return int(exc.exit_code)
    finally:
        source.close()
    for statement in statements:
        click.echo(statement.rstrip().rstrip(";") + ";")
    if not dry_run:
        click.echo(f"-- {action} done: {len(statements)} statements", err=True)
    return int(ExitCode.OK)


@cli.command()
@_config_option
@click.option("--dry-run", is_flag=True, help="Print the SQL instead of running it.")
def setup(config_path: Path, dry_run: bool) -> None:
    """Create what a Postgres source needs (idempotent).

    postgres-notify: the outbox schema, trigger function and a trigger on every rule table.
    postgres-logical: the publication of the rule tables and the logical replication slot.
    """
    sys.exit(_schema_command(config_path, dry_run, "setup"))


@cli.command()
@_config_option
@click.option("--dry-run", is_flag=True, help="Print the SQL instead of running it.")
def teardown(config_path: Path, dry_run: bool) -> None:
    """Remove everything ``setup`` created (triggers, outbox, or slot and publication)."""
    sys.exit(_schema_command(config_path, dry_run, "teardown"))


@cli.group()
def dlq() -> None:
    """Dead letters: changes Redis kept refusing, or that a rule failed on.

    They live in the Redis stream cache-worker:dlq:<name> (at most about 100000 entries); their
    keys were evicted when they were dead-lettered.
    """


def _open_dead_letters(
    config_path: Path,
) -> tuple[Settings, Any, DeadLetterStore, SecretScrubber]:
    """Settings, Redis client, dead-letter store and scrubber; exits with the error's code."""
    import connectors

    configure_logging(level="warning", fmt="auto", stream=sys.stderr)
    try:
        settings = _load(config_path)
        client = connectors.redis_client(settings)
        store = connectors.build_dead_letter_store(settings, client)
    except CacheWorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    return settings, client, store, SecretScrubber(connectors.secrets_of(settings))


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dlq.command("list")
@_config_option
@click.option(
    "--count", type=click.IntRange(min=1), default=100, show_default=True, help="At most N."
)
def dlq_list(config_path: Path, count: int) -> None:
    """Print the oldest dead letters, one per line: id, at, rule, key, action, error."""
    settings, client, store, scrubber = _open_dead_letters(config_path)
    try:
        entries = store.list(count)
    except CacheWorkerError as exc:
        click.echo(f"error: {scrubber.scrub(str(exc))}", err=True)
        sys.exit(int(exc.exit_code))
    finally:
        client.close()
    for entry in entries:
        fields = (entry.id, entry.at, entry.rule, entry.key, entry.action, entry.error)
        click.echo("  ".join(scrubber.scrub(_one_line(f)) or "-" for f in fields))
    click.echo(f"{len(entries)} dead letters shown ({settings.dead_letter_key()})", err=True)


@dlq.command("replay")
@_config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_replay(config_path: Path, yes: bool) -> None:
    """Re-apply every dead letter through the normal sink; delete those that succeed.

    Refreshes keep their version, so a key Redis holds at a newer version is never overwritten;
    evicts delete their key again. Entries of rule failures cannot be replayed and stay (fix the
    rule or the data, then purge). Exits 4 when some entries were refused again.
    """
    import connectors
    from worker.dead_letters import replay

    settings, client, store, scrubber = _open_dead_letters(config_path)
    if not yes:
        click.confirm(
            f"replay the dead letters of {settings.dead_letter_key()} onto "
            f"{redact_url(settings.redis.url)}?",
            abort=True,
        )
    sink = connectors.build_sink(client)
    try:
        result = replay(store, sink)
    except CacheWorkerError as exc:
        click.echo(f"error: {scrubber.scrub(str(exc))}", err=True)
        sys.exit(int(exc.exit_code))
    finally:
        sink.close()
    for entry, error in result.failed:
        click.echo(f"failed  {entry.id}  {entry.key}  {scrubber.scrub(_one_line(error))}")
    for entry in result.skipped:
        click.echo(f"skipped  {entry.id}  {entry.rule}  {entry.action}: cannot be replayed")
    click.echo(
        f"{result.replayed} replayed, {len(result.failed)} failed, {len(result.skipped)} skipped"
    )
    if result.failed:
        sys.exit(int(ExitCode.UNAVAILABLE))


@dlq.command("purge")
@_config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(config_path: Path, yes: bool) -> None:
    """Delete every dead letter."""
    settings, client, store, scrubber = _open_dead_letters(config_path)
    try:
        if not yes:
            click.confirm(f"delete every dead letter in {settings.dead_letter_key()}?", abort=True)
        purged = store.purge()
    except CacheWorkerError as exc:
        click.echo(f"error: {scrubber.scrub(str(exc))}", err=True)
        sys.exit(int(exc.exit_code))
    finally:
        client.close()
    click.echo(f"{purged} dead letters purged")


@cli.command("reset-checkpoint")
@_config_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset_checkpoint(config_path: Path, yes: bool) -> None:
    """Forget the saved position: the next run starts at [source] start (end or beginning).

    Use after exit code 5 (position lost). Keys changed while the position was lost may be
    stale until they expire or are rewarmed; flush them if that matters.
    """
    import connectors

    configure_logging(level="warning", fmt="auto", stream=sys.stderr)
    try:
        settings = _load(config_path)
        client = connectors.redis_client(settings)
        store = connectors.build_checkpoint_store(settings, client)
        position = store.load()
    except CacheWorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    if position is None:
        click.echo("no checkpoint saved; nothing to reset")
        return
    if not yes:
        click.confirm(f"forget checkpoint {position.to_dict()}?", abort=True)
    forget = getattr(store, "delete", None)
    if forget is None:
        click.echo("error: this checkpoint store cannot delete", err=True)
        sys.exit(int(ExitCode.INTERNAL))
    forget()
    click.echo("checkpoint removed")


@cli.command()
@_config_option
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    help="Check N random rows per rule instead of the whole table.",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows per SELECT (keyset pagination in primary-key order) and per Redis round trip.",
)
@click.option(
    "--examples",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Stale keys to show per rule, with expected and actual values.",
)
@click.option(
    "--recheck-delay",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds a stale candidate waits before its re-check; at least the worker's lag. "
    "Default: 1, plus source.poll_interval for postgres-logical (it polls its slot).",
)
def verify(
    config_path: Path,
    sample: int | None,
    chunk: int,
    examples: int,
    recheck_delay: float | None,
) -> None:
    """Compare every refresh rule's keys in Redis with what the worker would write for the rows.

    Each key is fresh (holds that value), missing (absent: allowed) or stale (holds something
    else, or exists for a row outside `when`). A stale key is checked once more before it counts,
    so a running worker does not cause false alarms. Exit 0 when nothing is stale, 7 otherwise.
    """
    sys.exit(_verify(config_path, sample, chunk, examples, recheck_delay))


def _verify(
    config_path: Path,
    sample: int | None,
    chunk: int,
    examples: int,
    recheck_delay: float | None,
) -> int:
    import connectors
    from worker.rules import Rule
    from worker.verify import (
        Progress,
        RuleReport,
        VerifyOptions,
        any_stale,
        format_report,
        format_totals,
        verify_rules,
    )

    configure_logging(level="warning", fmt="auto", stream=sys.stderr)
    try:
        settings = _load(config_path)
    except CacheWorkerError as exc:
        click.echo(f"error: {exc}", err=True)
        return int(exc.exit_code)
    scrubber = SecretScrubber(connectors.secrets_of(settings))
    rules = compile_rules(settings)

    def show(report: RuleReport) -> None:
        for line in format_report(report):
            click.echo(scrubber.scrub(line))

    def progress_bar(rule: Rule, total: int | None) -> Progress:
        from tqdm import tqdm

        # A bar only on a terminal; in a pipe or a log the per-rule lines say everything.
        return tqdm(
            total=total,
            desc=rule.name,
            unit="rows",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    if recheck_delay is None:
        # The logical source reads its slot every poll_interval; the others stream (ms of lag).
        recheck_delay = 1.0
        if settings.source.kind == "postgres-logical":
            recheck_delay += settings.source.poll_interval
    options = VerifyOptions(
        chunk=chunk, sample=sample, examples=examples, recheck_delay_s=recheck_delay
    )
    try:
        rows, cache = connectors.build_verify_readers(settings)
    except CacheWorkerError as exc:
        click.echo(f"error: {scrubber.scrub(str(exc))}", err=True)
        return int(exc.exit_code)
    try:
        reports = verify_rules(
            rules.rules,
            rows,
            cache,
            options,
            on_report=show,
            progress=progress_bar if sys.stderr.isatty() else None,
        )
    except CacheWorkerError as exc:
        click.echo(f"error: {scrubber.scrub(str(exc))}", err=True)
        return int(exc.exit_code)
    finally:
        rows.close()
        cache.close()
    click.echo(format_totals(reports))
    return int(ExitCode.CHECK_FAILED if any_stale(reports) else ExitCode.OK)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
