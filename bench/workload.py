"""Reproducible workloads for the benchmark: the seed table, small transactions and bulk statements.

Small transactions follow sysbench's oltp_write_only: two UPDATEs, one DELETE and one INSERT that
puts the deleted id back, so the table keeps its size and each transaction yields exactly four row
changes. Bulk statements are one UPDATE of every seed row and one ``INSERT ... SELECT`` copying
them under new ids; the memory backlog is the same UPDATE repeated. Generation is pure (a
``random.Random`` seeded by the caller) and the SQL is plain enough for MariaDB and Postgres
alike (only the DDL differs), so every source replays the same changes and the unit tests can
check the shape. ``render_batch`` turns transactions into one multi-statement string, because
sending each statement separately would make loading slower than the benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

CHANGES_PER_TRANSACTION = 4
# A fixed base time so the timestamp values, too, are the same on every run.
BASE_TIME = datetime(2024, 1, 1)
# The bulk INSERT ... SELECT copies row ``id`` to ``id + BULK_ID_OFFSET``; far above any seed id.
BULK_ID_OFFSET = 10_000_000
DEFAULT_TABLE = "bench.items"

Dialect = Literal["mysql", "postgres"]
_TIMESTAMP = {"mysql": "DATETIME(6)", "postgres": "TIMESTAMP(6)"}


def table_ddl(table: str = DEFAULT_TABLE, dialect: Dialect = "mysql") -> str:
    """``CREATE TABLE`` of the items table (id primary key, text, int, decimal, timestamp)."""
    return (
        f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(64), qty INT, "
        f"price DECIMAL(10,2), updated {_TIMESTAMP[dialect]})"
    )


@dataclass(frozen=True, slots=True)
class Row:
    """One items row."""

    id: int
    name: str
    qty: int
    price: Decimal
    updated: datetime


@dataclass(frozen=True, slots=True)
class Transaction:
    """Two updated rows, one deleted id and the row re-inserted under that same id."""

    updates: tuple[Row, Row]
    delete_id: int
    insert: Row


def _row(rng: random.Random, row_id: int, updated: datetime) -> Row:
    return Row(
        id=row_id,
        name=f"item-{rng.getrandbits(40):010x}",
        qty=rng.randrange(0, 10_000),
        price=Decimal(rng.randrange(0, 10_000_000)) / 100,
        updated=updated,
    )


def initial_rows(rows: int, seed: int) -> Iterator[Row]:
    """The ``rows`` rows (ids 1..rows) the table holds before the workload starts."""
    rng = random.Random(f"rows-{seed}")
    for row_id in range(1, rows + 1):
        yield _row(rng, row_id, BASE_TIME)


def generate_transactions(rows: int, changes: int, seed: int) -> Iterator[Transaction]:
    """``changes // 4`` transactions over ids 1..rows; the same arguments give the same result."""
    if rows < 3:
        raise ValueError("the workload needs at least 3 rows (3 distinct ids per transaction)")
    rng = random.Random(f"workload-{seed}")
    for index in range(changes // CHANGES_PER_TRANSACTION):
        updated = BASE_TIME + timedelta(microseconds=index + 1)
        first, second, deleted = rng.sample(range(1, rows + 1), 3)
        yield Transaction(
            updates=(_row(rng, first, updated), _row(rng, second, updated)),
            delete_id=deleted,
            insert=_row(rng, deleted, updated),
        )


def _literal(row: Row) -> str:
    # Values come from the generator (hex names, numbers), never from outside, so plain
    # formatting cannot inject anything and keeps the batch one round trip.
    return f"({row.id},'{row.name}',{row.qty},{row.price},'{row.updated.isoformat(sep=' ')}')"


def insert_rows_sql(rows: Sequence[Row], table: str = DEFAULT_TABLE) -> str:
    """One multi-row INSERT of ``rows`` (for loading the table)."""
    values = ",".join(_literal(row) for row in rows)
    return f"INSERT INTO {table} (id, name, qty, price, updated) VALUES {values}"


def transaction_statements(tx: Transaction, table: str = DEFAULT_TABLE) -> list[str]:
    """The statements of one transaction, without BEGIN/COMMIT."""
    statements = [
        f"UPDATE {table} SET name='{row.name}', qty={row.qty}, price={row.price}, "
        f"updated='{row.updated.isoformat(sep=' ')}' WHERE id={row.id}"
        for row in tx.updates
    ]
    statements.append(f"DELETE FROM {table} WHERE id={tx.delete_id}")
    statements.append(
        f"INSERT INTO {table} (id, name, qty, price, updated) VALUES " + _literal(tx.insert)
    )
    return statements


def render_batch(transactions: Sequence[Transaction], table: str = DEFAULT_TABLE) -> str:
    """Several transactions as one multi-statement string, each in its own BEGIN ... COMMIT."""
    parts: list[str] = []
    for tx in transactions:
        parts.append("BEGIN")
        parts.extend(transaction_statements(tx, table))
        parts.append("COMMIT")
    return ";".join(parts)


def bulk_statements(rows: int, table: str = DEFAULT_TABLE) -> list[str]:
    """One UPDATE of the ``rows`` seed rows and one INSERT ... SELECT copying them: 2 x rows."""
    updated = (BASE_TIME + timedelta(days=1)).isoformat(sep=" ")
    return [
        f"UPDATE {table} SET qty = qty + 1, updated = '{updated}' WHERE id <= {rows}",
        f"INSERT INTO {table} (id, name, qty, price, updated) "
        f"SELECT id + {BULK_ID_OFFSET}, name, qty, price, updated FROM {table} "
        f"WHERE id <= {rows}",
    ]


def backlog_statements(rows: int, changes: int, table: str = DEFAULT_TABLE) -> list[str]:
    """UPDATEs of the ``rows`` seed rows, repeated until they make ``changes`` row changes.

    A cheap way to a large backlog: each statement changes every seed row once (qty grows by
    one, so no UPDATE is a no-op the binlog would skip).
    """
    if rows < 1 or changes < rows:
        raise ValueError("a backlog needs at least one full statement of rows")
    return [f"UPDATE {table} SET qty = qty + 1 WHERE id <= {rows}"] * (changes // rows)
