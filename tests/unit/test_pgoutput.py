"""Unit tests of ``connectors.postgres_logical.PgOutputDecoder`` on hand-built pgoutput v1 messages.

The builders below write messages byte for byte as the protocol documentation describes them, so
the decoder is checked against the format itself rather than against a server; the integration
tests cover what a real server sends. The pure helpers of ``connectors.postgres_common`` the
logical source relies on (error translation, old-image columns) are checked at the end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from connectors.postgres_common import PostgresOptions, translate_error
from connectors.postgres_logical import (
    PgOutputDecoder,
    ProtocolError,
    _Yielded,
    describe_position,
    format_lsn,
    human_bytes,
    make_position,
    parse_lsn,
    position_lsn,
)
from worker.errors import SourceError, SourceMisconfigured, SourceUnavailable
from worker.events import UNCHANGED, Op, Position, TableRef, Transaction
from worker.rules import KeyTemplate, Rule, RuleSet

INT4, TEXT, NUMERIC = 23, 25, 1700
ITEMS = TableRef("public", "items")
OTHER = TableRef("public", "other")
PG_EPOCH = 946_684_800

# -- message builders ---------------------------------------------------------------------


def _string(text: str) -> bytes:
    return text.encode() + b"\x00"


def begin(final_lsn: int, ts_us: int = 0, xid: int = 700) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts_us, xid)


def commit(end_lsn: int, commit_lsn: int | None = None, ts_us: int = 0) -> bytes:
    lsn = commit_lsn if commit_lsn is not None else max(0, end_lsn - 8)
    return b"C" + struct.pack(">BQQq", 0, lsn, end_lsn, ts_us)


def relation(
    relid: int,
    namespace: str,
    name: str,
    columns: Sequence[tuple[str, int, bool]],
    identity: str = "d",
) -> bytes:
    body = struct.pack(">I", relid) + _string(namespace) + _string(name)
    body += identity.encode() + struct.pack(">H", len(columns))
    for column, oid, key in columns:
        body += struct.pack(">B", 1 if key else 0) + _string(column) + struct.pack(">Ii", oid, -1)
    return b"R" + body


def tuple_data(values: Sequence[Any]) -> bytes:
    body = struct.pack(">H", len(values))
    for value in values:
        if value is None:
            body += b"n"
        elif value is UNCHANGED:
            body += b"u"
        else:
            raw = value if isinstance(value, bytes) else str(value).encode()
            body += b"t" + struct.pack(">I", len(raw)) + raw
    return body


def insert(relid: int, values: Sequence[Any]) -> bytes:
    return b"I" + struct.pack(">I", relid) + b"N" + tuple_data(values)


def update(
    relid: int, new: Sequence[Any], old: Sequence[Any] | None = None, old_kind: bytes = b"O"
) -> bytes:
    body = b"U" + struct.pack(">I", relid)
    if old is not None:
        body += old_kind + tuple_data(old)
    return body + b"N" + tuple_data(new)


def delete(relid: int, old: Sequence[Any], old_kind: bytes = b"K") -> bytes:
    return b"D" + struct.pack(">I", relid) + old_kind + tuple_data(old)


def truncate(relids: Sequence[int], options: int = 0) -> bytes:
    return (
        b"T"
        + struct.pack(">IB", len(relids), options)
        + b"".join(struct.pack(">I", r) for r in relids)
    )


def type_message(oid: int, namespace: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + _string(namespace) + _string(name)


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + _string(name)


# -- the decoder under test ----------------------------------------------------------------

_LOADERS: dict[int, Callable[[bytes], Any]] = {
    INT4: int,
    TEXT: lambda b: bytes(b).decode(),
    NUMERIC: lambda b: Decimal(bytes(b).decode()),
}


def _fallback(oid: int, data: bytes) -> Any:
    return ("fallback", oid, bytes(data).decode())


def make_decoder(tables: Sequence[TableRef] = (ITEMS,), chunk_rows: int = 5000) -> PgOutputDecoder:
    return PgOutputDecoder(
        tables, lambda oid: _LOADERS.get(oid, _LOADERS[TEXT]), _fallback, chunk_rows
    )


ITEMS_REL = relation(
    16001, "public", "items", [("id", INT4, True), ("name", TEXT, False), ("price", NUMERIC, False)]
)
OTHER_REL = relation(16002, "public", "other", [("id", INT4, True)])


def feed_all(decoder: PgOutputDecoder, messages: Sequence[bytes]) -> list[Transaction]:
    out = []
    for message in messages:
        item = decoder.feed(message)
        if item is not None:
            out.append(item)
    return out


# -- tests ---------------------------------------------------------------------------------


def test_insert_transaction_carries_position_version_and_commit_time() -> None:
    decoder = make_decoder()
    ts_us = 789_012_345_678_901
    [tx] = feed_all(
        decoder,
        [
            begin(0x1000, ts_us),
            ITEMS_REL,
            insert(16001, [1, "a", "1.50"]),
            commit(0x1100, ts_us=ts_us),
        ],
    )
    assert tx.position == Position(0x1100)
    assert tx.position is not None and tx.position.coords == {"lsn": "0/1100"}
    assert tx.committed_at == pytest.approx(ts_us / 1e6 + PG_EPOCH)
    [change] = tx.changes
    assert change.op is Op.INSERT
    assert change.table == ITEMS
    assert change.before is None
    assert change.after == {"id": 1, "name": "a", "price": Decimal("1.50")}
    assert change.version == 0x1000
    assert change.partial is False
    assert decoder.last_commit_end == 0x1100
    assert not decoder.in_transaction


def test_update_with_full_old_row_and_unchanged_toast() -> None:
    decoder = make_decoder()
    [tx] = feed_all(
        decoder,
        [
            begin(0x2000),
            ITEMS_REL,
            update(16001, [1, UNCHANGED, "2.00"], old=[1, "big", "1.00"], old_kind=b"O"),
            commit(0x2100),
        ],
    )
    [change] = tx.changes
    assert change.op is Op.UPDATE
    assert change.before == {"id": 1, "name": "big", "price": Decimal("1.00")}
    assert change.after == {"id": 1, "name": UNCHANGED, "price": Decimal("2.00")}
    assert change.partial is True


def test_update_without_old_row_has_no_before() -> None:
    decoder = make_decoder()
    [tx] = feed_all(
        decoder, [begin(0x2000), ITEMS_REL, update(16001, [1, None, "2.00"]), commit(0x2100)]
    )
    assert tx.changes[0].before is None
    assert tx.changes[0].after == {"id": 1, "name": None, "price": Decimal("2.00")}


def test_update_of_key_sends_key_only_old_row() -> None:
    decoder = make_decoder()
    [tx] = feed_all(
        decoder,
        [
            begin(0x2000),
            ITEMS_REL,
            update(16001, [2, "a", "1"], old=[1, None, None], old_kind=b"K"),
            commit(0x2100),
        ],
    )
    # Non-key columns of a key-only old row are not known, so they are left out, not None.
    assert tx.changes[0].before == {"id": 1}


def test_delete_key_only_drops_unsent_columns_full_keeps_nulls() -> None:
    decoder = make_decoder()
    txs = feed_all(
        decoder,
        [
            begin(0x3000),
            ITEMS_REL,
            delete(16001, [7, None, None], old_kind=b"K"),
            delete(16001, [8, None, "3"], old_kind=b"O"),
            commit(0x3100),
        ],
    )
    first, second = txs[0].changes
    assert (first.op, first.before, first.after) == (Op.DELETE, {"id": 7}, None)
    assert second.before == {"id": 8, "name": None, "price": Decimal("3")}


def test_rows_carry_only_the_columns_the_rules_read() -> None:
    loaded: list[bytes] = []

    def loader(oid: int) -> Callable[[bytes], Any]:
        def load(raw: bytes) -> Any:
            loaded.append(bytes(raw))
            return _LOADERS.get(oid, _LOADERS[TEXT])(raw)

        return load

    decoder = PgOutputDecoder(
        [ITEMS], loader, _fallback, columns={ITEMS: frozenset({"id", "price"})}
    )
    [tx] = feed_all(
        decoder,
        [
            begin(0x2000),
            ITEMS_REL,
            insert(16001, [1, "skipped", "1.50"]),
            update(16001, [1, UNCHANGED, None], old=[1, "old", "1.00"], old_kind=b"O"),
            update(16001, [2, UNCHANGED, "2"], old=[1, None, None], old_kind=b"K"),
            delete(16001, [2, None, None], old_kind=b"K"),
            commit(0x2100),
        ],
    )
    insert_, update_, key_change, delete_ = tx.changes
    assert insert_.after == {"id": 1, "price": Decimal("1.50")}
    # An unchanged TOAST value of a column nobody reads does not make the row partial.
    assert (update_.before, update_.after) == (
        {"id": 1, "price": Decimal("1.00")},
        {"id": 1, "price": None},
    )
    assert update_.partial is False
    assert (key_change.before, key_change.after) == ({"id": 1}, {"id": 2, "price": Decimal("2")})
    assert delete_.before == {"id": 2}
    assert b"skipped" not in loaded and b"old" not in loaded


def test_rules_naming_a_column_the_relation_lacks_get_every_column() -> None:
    decoder = PgOutputDecoder(
        [ITEMS],
        lambda oid: _LOADERS.get(oid, _LOADERS[TEXT]),
        _fallback,
        columns={ITEMS: frozenset({"id", "dropped"})},
    )
    [tx] = feed_all(
        decoder, [begin(0x2000), ITEMS_REL, insert(16001, [1, "a", "1"]), commit(0x2100)]
    )
    assert tx.changes[0].after == {"id": 1, "name": "a", "price": Decimal("1")}


def test_truncate_lists_only_wanted_tables() -> None:
    decoder = make_decoder()
    [tx] = feed_all(
        decoder,
        [begin(0x4000), ITEMS_REL, OTHER_REL, truncate([16001, 16002], 1), commit(0x4100)],
    )
    assert [(c.op, c.table, c.before, c.after) for c in tx.changes] == [
        (Op.TRUNCATE, ITEMS, None, None)
    ]


def test_transaction_of_unwanted_tables_yields_nothing_but_is_seen() -> None:
    decoder = make_decoder()
    out = feed_all(decoder, [begin(0x5000), OTHER_REL, insert(16002, [1]), commit(0x5100)])
    assert out == []
    assert decoder.last_commit_end == 0x5100


def test_transactions_before_skip_point_are_skipped_but_relations_are_kept() -> None:
    decoder = make_decoder()
    decoder.skip_before = 0x6100
    out = feed_all(
        decoder,
        [
            begin(0x6000),
            ITEMS_REL,
            insert(16001, [1, "a", "1"]),
            commit(0x6100),
            # The commit record of this one starts exactly at the skip point: delivered.
            begin(0x6100),
            insert(16001, [2, "b", "2"]),
            commit(0x6200),
        ],
    )
    assert [tx.changes[0].after["id"] for tx in out if tx.changes[0].after] == [2]
    assert decoder.last_commit_end == 0x6200


def test_skipped_messages_are_counted() -> None:
    decoder = make_decoder()
    decoder.skip_before = 0x6100
    messages = [begin(0x6000), ITEMS_REL, insert(16001, [1, "a", "1"]), commit(0x6100)]
    messages += [begin(0x6100), insert(16001, [2, "b", "2"]), commit(0x6200)]
    feed_all(decoder, messages)
    # Begin, the row and Commit of the first transaction; the Relation message is always read.
    assert decoder.skipped == 3


def test_yielded_rows_are_counted_per_position_until_the_slot_passes_them() -> None:
    yielded = _Yielded()
    assert yielded.after(0) == 0
    for lsn, rows in ((0x100, 3), (0x200, 7), (0x300, 7), (0x400, 12)):
        yielded.mark(lsn, rows)
    assert yielded.rows == 12
    assert [yielded.after(lsn) for lsn in (0, 0x100, 0x1FF, 0x200, 0x300, 0x400)] == [
        12,
        9,
        9,
        5,
        5,
        0,
    ]
    yielded.release(0x250)
    assert yielded.after(0x200) == 5
    assert yielded.after(0x400) == 0
    for i in range(5000):
        yielded.mark(0x500 + i, 13 + i)
    yielded.release(0x500 + 4000)  # compacts
    assert yielded.after(0x500 + 4000) == 999
    assert yielded.after(0) == 999  # everything before the slot counts from where it is


def test_large_transaction_is_chunked_with_position_on_last_chunk_only() -> None:
    decoder = make_decoder(chunk_rows=2)
    messages = [begin(0x7000), ITEMS_REL]
    messages += [insert(16001, [i, "x", "1"]) for i in range(5)]
    messages.append(commit(0x7100))
    chunks = feed_all(decoder, messages)
    assert [len(c.changes) for c in chunks] == [2, 2, 1]
    assert [c.position for c in chunks] == [None, None, Position(0x7100)]
    assert {ch.version for c in chunks for ch in c.changes} == {0x7000}


def test_chunked_transaction_ending_exactly_on_a_chunk_boundary_still_commits() -> None:
    decoder = make_decoder(chunk_rows=2)
    messages = [begin(0x7000), ITEMS_REL]
    messages += [insert(16001, [i, "x", "1"]) for i in range(4)]
    messages.append(commit(0x7100))
    chunks = feed_all(decoder, messages)
    assert [len(c.changes) for c in chunks] == [2, 2]
    assert chunks[-1].position == Position(0x7100)


def test_new_relation_message_replaces_the_old_definition() -> None:
    decoder = make_decoder()
    altered = relation(
        16001, "public", "items", [("id", INT4, True), ("name", TEXT, False), ("qty", INT4, False)]
    )
    txs = feed_all(
        decoder,
        [
            begin(0x8000),
            ITEMS_REL,
            insert(16001, [1, "a", "1.5"]),
            commit(0x8100),
            begin(0x8200),
            altered,
            insert(16001, [2, "b", "3"]),
            commit(0x8300),
        ],
    )
    assert txs[0].changes[0].after == {"id": 1, "name": "a", "price": Decimal("1.5")}
    assert txs[1].changes[0].after == {"id": 2, "name": "b", "qty": 3}


def test_value_the_loader_rejects_goes_to_the_fallback() -> None:
    decoder = make_decoder()
    [tx] = feed_all(
        decoder, [begin(0x9000), ITEMS_REL, insert(16001, ["nope", "a", "1"]), commit(0x9100)]
    )
    assert tx.changes[0].after is not None
    assert tx.changes[0].after["id"] == ("fallback", INT4, "nope")


def test_type_origin_and_message_messages_are_accepted() -> None:
    decoder = make_decoder()
    txs = feed_all(
        decoder,
        [
            begin(0xA000),
            origin(0x9999, "upstream"),
            type_message(50001, "public", "mood"),
            b"M" + b"\x00" * 12,
            ITEMS_REL,
            insert(16001, [1, "a", "1"]),
            commit(0xA100),
        ],
    )
    assert len(txs) == 1
    assert decoder.types[50001] == "public.mood"


def test_pg_catalog_namespace_is_sent_empty() -> None:
    decoder = make_decoder(tables=[TableRef("pg_catalog", "t")])
    [tx] = feed_all(
        decoder,
        [begin(1), relation(5, "", "t", [("id", INT4, True)]), insert(5, [1]), commit(2)],
    )
    assert tx.changes[0].table == TableRef("pg_catalog", "t")


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([begin(1), insert(16001, [1, "a", "1"])], "before its Relation"),
        ([b"Z"], "unknown pgoutput message"),
        ([b""], "empty"),
        ([begin(1), begin(2)], "Begin inside"),
        ([commit(5)], "Commit without Begin"),
        ([ITEMS_REL, insert(16001, [1, "a", "1"])], "outside a transaction"),
        ([begin(1), ITEMS_REL, insert(16001, [1, "a"])], "has 2 columns"),
        (
            [begin(1), ITEMS_REL, b"I" + struct.pack(">I", 16001) + b"N\x00\x03b"],
            "tuple data kind 'b'",
        ),
        ([begin(1), b"R\x00\x00"], "malformed"),
        (
            [begin(1), ITEMS_REL, b"D" + struct.pack(">I", 16001) + b"N" + tuple_data([1, 2, 3])],
            "Delete without",
        ),
    ],
)
def test_protocol_errors(messages: list[bytes], fragment: str) -> None:
    decoder = make_decoder()
    with pytest.raises(ProtocolError, match=fragment):
        feed_all(decoder, messages)


def test_reset_forgets_an_open_transaction() -> None:
    decoder = make_decoder()
    feed_all(decoder, [begin(1), ITEMS_REL, insert(16001, [1, "a", "1"])])
    decoder.reset()
    assert not decoder.in_transaction
    [tx] = feed_all(decoder, [begin(1), insert(16001, [2, "b", "2"]), commit(3)])
    assert [c.after["id"] for c in tx.changes if c.after] == [2]


# -- positions -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0x16B3748, (0x2A << 32) | 0xFF, (1 << 64) - 1])
def test_lsn_round_trip(value: int) -> None:
    assert parse_lsn(format_lsn(value)) == value


def test_lsn_text() -> None:
    assert format_lsn(0x16B3748) == "0/16B3748"
    assert parse_lsn("2A/FF") == (0x2A << 32) | 0xFF
    with pytest.raises(ValueError):
        parse_lsn("16B3748")


def test_positions() -> None:
    position = make_position(0x16B3748)
    assert position.version == 0x16B3748
    assert describe_position(position) == "lsn 0/16B3748"
    assert position_lsn(Position.from_dict(position.to_dict())) == 0x16B3748
    with pytest.raises(SourceError, match="not a Postgres LSN position"):
        position_lsn(Position(5, {"file": "binlog.000001", "pos": 4}))


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"


# -- postgres_common helpers ---------------------------------------------------------------


def _pg_options(password: str | None = "s3cret-pw") -> PostgresOptions:
    return PostgresOptions(
        dsn="postgresql://app:dsn-pw@db.example:5432/app",
        password=password,
        tables=(ITEMS,),
        name="t",
    )


def test_refused_login_is_misconfigured_without_secrets() -> None:
    exc = psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "app" (s3cret-pw)'
    )
    error = translate_error(exc, _pg_options())
    assert isinstance(error, SourceMisconfigured)
    assert "s3cret-pw" not in str(error)
    assert "dsn-pw" not in str(error)
    assert "db.example:5432" in str(error)


def test_unreachable_server_is_retryable() -> None:
    exc = psycopg.OperationalError("connection failed: Connection refused")
    error = translate_error(exc, _pg_options())
    assert isinstance(error, SourceUnavailable)
    assert error.retryable
    starting = psycopg.OperationalError("FATAL:  the database system is starting up")
    assert isinstance(translate_error(starting, _pg_options()), SourceUnavailable)


def test_old_image_columns_are_key_and_when_columns() -> None:
    rules = [
        Rule("a", ITEMS, (KeyTemplate.parse("item:{id}"), KeyTemplate.parse("sku:{sku}"))),
        Rule("b", ITEMS, (KeyTemplate.parse("x:{id}"),), when={"status": "live"}),
        Rule(
            "c", OTHER, (KeyTemplate.parse("o:{id}"),), columns=("id", "v"), watch=frozenset({"v"})
        ),
    ]
    assert RuleSet(rules).needed_old_columns(watch=False) == {
        ITEMS: {"id", "sku", "status"},
        OTHER: {"id"},
    }
