"""Reproducible workload for the benchmark: the seed table and oltp_write_only-like transactions.

Every transaction is two UPDATEs, one DELETE and one INSERT that puts the deleted id back, so the
table keeps its size and each transaction yields exactly four binlog row changes. Generation is
pure (a ``random.Random`` seeded by the caller) so the same seed always produces the same SQL and
the unit tests can check the shape; ``render_batch`` turns transactions into one multi-statement
string, because sending each statement separately would make loading slower than the benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

CHANGES_PER_TRANSACTION = 4
# A fixed base time so the DATETIME(6) values, too, are the same on every run.
BASE_TIME = datetime(2024, 1, 1)

TABLE_DDL = (
    "CREATE TABLE bench.items (id INT PRIMARY KEY, name VARCHAR(64), qty INT, "
    "price DECIMAL(10,2), updated DATETIME(6))"
)


@dataclass(frozen=True, slots=True)
class Row:
    """One ``bench.items`` row."""

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


def insert_rows_sql(rows: Sequence[Row]) -> str:
    """One multi-row INSERT of ``rows`` (for loading the table)."""
    values = ",".join(_literal(row) for row in rows)
    return f"INSERT INTO bench.items (id, name, qty, price, updated) VALUES {values}"


def transaction_statements(tx: Transaction) -> list[str]:
    """The statements of one transaction, without BEGIN/COMMIT."""
    statements = [
        f"UPDATE bench.items SET name='{row.name}', qty={row.qty}, price={row.price}, "
        f"updated='{row.updated.isoformat(sep=' ')}' WHERE id={row.id}"
        for row in tx.updates
    ]
    statements.append(f"DELETE FROM bench.items WHERE id={tx.delete_id}")
    statements.append(
        "INSERT INTO bench.items (id, name, qty, price, updated) VALUES " + _literal(tx.insert)
    )
    return statements


def render_batch(transactions: Sequence[Transaction]) -> str:
    """Several transactions as one multi-statement string, each in its own BEGIN ... COMMIT."""
    parts: list[str] = []
    for tx in transactions:
        parts.append("BEGIN")
        parts.extend(transaction_statements(tx))
        parts.append("COMMIT")
    return ";".join(parts)
