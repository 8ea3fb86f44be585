"""Unit tests of the benchmark's pure parts: workload generation and result formatting.

No servers and no timing: the workload must be the same for a seed (so every run replays the
same binlog) and keep the oltp_write_only shape, and the table must show rows/s and the ratio to
the parse-only baseline.
"""

from __future__ import annotations

import json
from itertools import islice

import pytest

from bench.report import Result, markdown_table, write_json
from bench.workload import (
    generate_transactions,
    initial_rows,
    render_batch,
    transaction_statements,
)


def test_workload_is_deterministic_for_a_seed() -> None:
    first = list(generate_transactions(100, 400, seed=7))
    assert first == list(generate_transactions(100, 400, seed=7))
    assert first != list(generate_transactions(100, 400, seed=8))
    assert list(initial_rows(10, 7)) == list(initial_rows(10, 7))


def test_every_transaction_is_two_updates_one_delete_one_reinsert() -> None:
    txs = list(generate_transactions(50, 1000, seed=1))
    assert len(txs) == 250
    for tx in txs:
        ids = {tx.updates[0].id, tx.updates[1].id, tx.delete_id}
        assert len(ids) == 3 and all(1 <= i <= 50 for i in ids)
        assert tx.insert.id == tx.delete_id  # the table keeps its size
        kinds = [s.split()[0] for s in transaction_statements(tx)]
        assert kinds == ["UPDATE", "UPDATE", "DELETE", "INSERT"]


def test_batch_wraps_each_transaction_in_its_own_commit() -> None:
    txs = list(islice(generate_transactions(10, 100, seed=3), 3))
    statements = render_batch(txs).split(";")
    assert statements.count("BEGIN") == 3 and statements.count("COMMIT") == 3
    assert len(statements) == 3 * 6


def test_workload_needs_three_ids() -> None:
    with pytest.raises(ValueError):
        list(generate_transactions(2, 4, seed=0))


def test_markdown_table_has_rates_and_ratio_to_first(tmp_path) -> None:
    results = [Result("parse-only", 1000, 2.0), Result("worker", 1000, 1.0, "note")]
    table = markdown_table(results).splitlines()
    assert table[0].startswith("| contender | rows | seconds | rows/s | ratio")
    assert table[2] == "| parse-only | 1000 | 2.00 | 500 | 1.00 |  |"
    assert table[3] == "| worker | 1000 | 1.00 | 1,000 | 2.00 | note |"

    path = tmp_path / "out" / "r.json"
    write_json(path, results, {"quick": True})
    document = json.loads(path.read_text())
    assert document["quick"] is True
    assert document["results"][1]["rows_per_s"] == 1000.0
