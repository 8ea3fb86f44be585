"""The fast row decoder (``connectors.mysql_decode``) against the library, on a real MariaDB binlog.

One table holds every column type MariaDB can put in a row image, with each type's edge values
(limits, zero dates, negative times, every fractional precision, long and multi-byte text, empty
SETs, NULLs) plus a few hundred seeded random rows. The same binlog range is streamed twice by
``MySQLSource``: with the fast decoder, and with it switched off so that mysql-replication decodes
every row. The two must give identical changes, and the fast run must really have decoded them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

import pymysql
import pytest

import connectors.mysql as mysql_module
from connectors import mysql_decode
from connectors.mysql import MySQLSource
from tests.integration.test_mysql_source import (
    _end,
    _options,
    _sql,
    _Streamer,
    _transactions,
)
from tests.services import MariaDBServer
from worker.events import Op, Position, RowChange, TableRef

COLUMNS = """
    id INT PRIMARY KEY,
    ti TINYINT, uti TINYINT UNSIGNED, si SMALLINT, usi SMALLINT UNSIGNED,
    mi MEDIUMINT, umi MEDIUMINT UNSIGNED, i INT, ui INT UNSIGNED, bi BIGINT, ubi BIGINT UNSIGNED,
    d1 DECIMAL(1,0), d2 DECIMAL(5,2), d3 DECIMAL(20,6), d4 DECIMAL(65,30), d5 DECIMAL(10,10),
    d6 DECIMAL(18,9) UNSIGNED,
    f FLOAT, db DOUBLE,
    dt DATE, tm TIME, tm1 TIME(1), tm3 TIME(3), tm6 TIME(6),
    dtm DATETIME, dtm2 DATETIME(2), dtm5 DATETIME(5), dtm6 DATETIME(6),
    ts TIMESTAMP NULL, ts3 TIMESTAMP(3) NULL, ts6 TIMESTAMP(6) NULL, yr YEAR,
    ch CHAR(5), chl CHAR(100) CHARACTER SET utf8mb4, vc VARCHAR(50), vcl VARCHAR(1000),
    l1 VARCHAR(10) CHARACTER SET latin1, asc_ VARCHAR(10) CHARACTER SET ascii,
    tt TINYTEXT, tx TEXT, mt MEDIUMTEXT, lt LONGTEXT,
    tb TINYBLOB, bl BLOB, mb MEDIUMBLOB, lb LONGBLOB,
    bn BINARY(4), vb VARBINARY(300),
    en ENUM('one','two','three'), st SET('c','a','b','d','e','f','g','h','i','j'),
    bt1 BIT(1), bt8 BIT(8), bt9 BIT(9), bt64 BIT(64),
    js JSON, g POINT, u UUID, ip INET6
"""

EDGE_ROWS = [
    # Limits and negatives.
    """(1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
        -9223372036854775808, 18446744073709551615,
        -9, -999.99, '-12345678901234.123456', -1e35, -0.9999999999, 999999999.999999999,
        -3.4e38, -1.7976931348623157e308,
        '1000-01-01', '-838:59:59', '-838:59:58.9', '-00:00:00.001', '-12:34:56.000001',
        '1000-01-01 00:00:00', '9999-12-31 23:59:59.99', '2024-02-29 12:00:00.00001',
        '1970-01-01 00:00:00.000001', '1970-01-01 00:00:01', '2038-01-19 03:14:07.999',
        '2000-01-01 00:00:00.5', 1901,
        '', REPEAT('é', 100), 'héllo 🌍', REPEAT('🌍', 1000), X'FF80', 'abc',
        '', 'x', REPEAT('y', 70000), REPEAT('z', 17000000 DIV 1000),
        X'', X'00', X'0102', REPEAT(X'FF', 300),
        X'00', REPEAT(X'AB', 300), 'one', '', b'0', b'0', b'0', 0,
        '[]', ST_GeomFromText('POINT(0 0)'), '00000000-0000-0000-0000-000000000000', '::')""",
    # Limits and positives.
    """(2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0,
        9, 999.99, '99999999999999.999999', 1e35, 0.9999999999, 0,
        3.4e38, 1.7976931348623157e308,
        '9999-12-31', '838:59:59', '838:59:58.9', '00:00:00.001', '12:34:56.000001',
        '9999-12-31 23:59:59', '1000-01-01 00:00:00.01', '2024-02-29 12:00:00.99999',
        '9999-12-31 23:59:59.999999', '2038-01-19 03:14:07', '1970-01-01 00:00:01.001',
        '2038-01-19 03:14:07.999999', 2155,
        'abcde', REPEAT('字', 100), REPEAT('v', 50), REPEAT('w', 1000), X'E9E8', 'z~',
        REPEAT('t', 255), REPEAT('u', 65535), 'm', 'l',
        REPEAT(X'01', 255), REPEAT(X'02', 65535), X'03', X'04',
        X'FFFFFFFF', X'', 'three', 'c,a,b,d,e,f,g,h,i,j', b'1', b'11111111',
        b'111111111', 18446744073709551615,
        '{"a": {"b": [1, "x", null, true, 1.5, -2, 1e300]}, "k": "é", "e": {}}',
        ST_GeomFromText('POINT(1.5 -2.25)'), 'ffffffff-ffff-ffff-ffff-ffffffffffff',
        'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff')""",
    # Zero values.
    """(3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        '0000-00-00', '00:00:00', '00:00:00.0', '00:00:00.000', '00:00:00.000000',
        '0000-00-00 00:00:00', '0000-00-00 00:00:00.00', '0000-00-00 00:00:00.00000',
        '0000-00-00 00:00:00.000000', '0000-00-00 00:00:00', '0000-00-00 00:00:00.000',
        '0000-00-00 00:00:00.000000', 0,
        '', '', '', '', '', '', '', '', '', '', '', '', '', '', X'00000000', '', 'two', '',
        0, 0, 0, 0, 'null', ST_GeomFromText('POINT(0 0)'), '01234567-89ab-cdef-0123-456789abcdef',
        '::ffff:1.2.3.4')""",
]


def _random_row(rng: random.Random, row_id: int) -> str:
    def maybe(text: str) -> str:
        return "NULL" if rng.random() < 0.15 else text

    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n)) or "0"

    def text(n: int) -> str:
        alphabet = "abcxyz é字🌍'\\"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(n + 1)))

    def quoted(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

    sign: Callable[[], str] = lambda: rng.choice(["", "-"])  # noqa: E731
    frac: Callable[[int], str] = lambda n: f".{digits(n)}" if n else ""  # noqa: E731
    year = rng.randrange(1971, 2037)
    stamp = (
        f"{year}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
        f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    )
    members = ",".join(m for m in "cabdefghij" if rng.random() < 0.3)
    values = [
        str(row_id),
        maybe(str(rng.randrange(-128, 128))),
        maybe(str(rng.randrange(256))),
        maybe(str(rng.randrange(-32768, 32768))),
        maybe(str(rng.randrange(65536))),
        maybe(str(rng.randrange(-(2**23), 2**23))),
        maybe(str(rng.randrange(2**24))),
        maybe(str(rng.randrange(-(2**31), 2**31))),
        maybe(str(rng.randrange(2**32))),
        maybe(str(rng.randrange(-(2**63), 2**63))),
        maybe(str(rng.randrange(2**64))),
        maybe(f"{sign()}{digits(1)}"),
        maybe(f"{sign()}{digits(rng.randrange(4))}{frac(2)}"),
        maybe(f"{sign()}{digits(rng.randrange(15))}{frac(rng.randrange(7))}"),
        maybe(f"{sign()}{digits(rng.randrange(36))}{frac(rng.randrange(31))}"),
        maybe(f"{sign()}0{frac(rng.randrange(11))}"),
        maybe(f"{digits(rng.randrange(10))}{frac(rng.randrange(10))}"),
        maybe(repr(rng.uniform(-1e6, 1e6))),
        maybe(repr(rng.uniform(-1e300, 1e300))),
        maybe(f"'{stamp[:10]}'"),
        maybe(f"'{sign()}{rng.randrange(839)}:{rng.randrange(60):02d}:{rng.randrange(60):02d}'"),
        maybe(f"'{sign()}{rng.randrange(839)}:{rng.randrange(60):02d}:00{frac(1)}'"),
        maybe(f"'{sign()}{rng.randrange(24)}:00:{rng.randrange(60):02d}{frac(3)}'"),
        maybe(f"'{sign()}{rng.randrange(100)}:{rng.randrange(60):02d}:59{frac(6)}'"),
        maybe(f"'{stamp}'"),
        maybe(f"'{stamp}{frac(2)}'"),
        maybe(f"'{stamp}{frac(5)}'"),
        maybe(f"'{stamp}{frac(6)}'"),
        maybe(f"'{stamp}'"),
        maybe(f"'{stamp}{frac(3)}'"),
        maybe(f"'{stamp}{frac(6)}'"),
        maybe(str(rng.randrange(1901, 2156))),
        maybe(quoted(text(5))),
        maybe(quoted(text(100))),
        maybe(quoted(text(50))),
        maybe(quoted(text(1000))),
        maybe(quoted("".join(rng.choice("aé¤ÿ") for _ in range(rng.randrange(11))))),
        maybe(quoted("".join(rng.choice("az09 ~") for _ in range(rng.randrange(11))))),
        maybe(quoted(text(80))),
        maybe(quoted(text(3000))),
        maybe(quoted(text(300))),
        maybe(quoted(text(300))),
        maybe(f"X'{rng.randbytes(rng.randrange(256)).hex()}'"),
        maybe(f"X'{rng.randbytes(rng.randrange(3000)).hex()}'"),
        maybe(f"X'{rng.randbytes(rng.randrange(300)).hex()}'"),
        maybe(f"X'{rng.randbytes(rng.randrange(300)).hex()}'"),
        maybe(f"X'{rng.randbytes(rng.randrange(5)).hex()}'"),
        maybe(f"X'{rng.randbytes(rng.randrange(301)).hex()}'"),
        maybe(rng.choice(["'one'", "'two'", "'three'"])),
        maybe(f"'{members}'"),
        maybe(f"b'{rng.randrange(2)}'"),
        maybe(str(rng.randrange(256))),
        maybe(str(rng.randrange(512))),
        maybe(str(rng.randrange(2**64))),
        maybe(
            quoted(rng.choice(['{"a": 1}', "[1, 2.5, null]", '"s"', "true", '{"x": {"y": "é"}}']))
        ),
        maybe(f"ST_GeomFromText('POINT({rng.uniform(-90, 90)} {rng.uniform(-90, 90)})')"),
        maybe(f"'{uuid_text(rng)}'"),
        maybe(f"'{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.1'"),
    ]
    return "(" + ", ".join(values) + ")"


def uuid_text(rng: random.Random) -> str:
    raw = rng.randbytes(16).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def _stream(source: MySQLSource, start: Position, end: Position) -> list[RowChange]:
    with _Streamer(source, start) as streamer:
        txs = _transactions(streamer.through(end, timeout=120))
    return [change for tx in txs for change in tx.changes]


def _write_every_type(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> tuple[list[TableRef], Position, Position]:
    """Create ``t`` and write the edge and random rows, then update and delete some of them."""
    _sql(
        mysql_conn,
        "SET SESSION time_zone = '+00:00', SESSION sql_mode = ''",
        f"CREATE TABLE t ({COLUMNS}) DEFAULT CHARSET=utf8mb4",
    )
    tables = [TableRef(mysql_db, "t")]
    start = MySQLSource(_options(mariadb, tables)).initial_position()
    rng = random.Random(20261122)
    statements = [f"INSERT INTO t VALUES {row}" for row in EDGE_ROWS]
    statements.append("INSERT INTO t (id) VALUES (4)")
    for batch in range(30):
        rows = [_random_row(rng, 100 + batch * 10 + i) for i in range(10)]
        statements.append("INSERT INTO t VALUES " + ", ".join(rows))
    statements += [
        "UPDATE t SET i = i + 1, st = 'b,c', vc = CONCAT('é', id) WHERE id % 3 = 0",
        "UPDATE t SET js = '{\"n\": 1}', tm6 = NULL WHERE id < 50",
        "DELETE FROM t WHERE id % 7 = 0",
        "DELETE FROM t WHERE id < 4",
    ]
    _sql(mysql_conn, "SET SESSION time_zone = '+00:00', SESSION sql_mode = ''", *statements)
    return tables, start, _end(mariadb)


def _counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows decoded by each fast ``TableDecoder.decode`` call from now on (0: it gave up)."""
    decoded: list[int] = []
    original_decode = mysql_decode.TableDecoder.decode

    def counting_decode(self: mysql_decode.TableDecoder, *args: Any) -> Any:
        rows = original_decode(self, *args)
        decoded.append(0 if rows is None else len(rows))
        return rows

    monkeypatch.setattr(mysql_decode.TableDecoder, "decode", counting_decode)
    return decoded


@pytest.fixture
def every_type(
    mariadb: MariaDBServer, mysql_db: str, mysql_conn: pymysql.Connection[Any]
) -> tuple[list[TableRef], Position, Position]:
    """The table of every column type, written; its tables and the binlog range of the rows."""
    return _write_every_type(mariadb, mysql_db, mysql_conn)


def test_fast_decoder_equals_the_library_on_every_column_type(
    mariadb: MariaDBServer,
    every_type: tuple[list[TableRef], Position, Position],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tables, start, end = every_type

    decoded = _counting_decodes(monkeypatch)
    fast = _stream(MySQLSource(_options(mariadb, tables)), start, end)
    monkeypatch.setattr(mysql_module._Session, "decoder_for", lambda *_args: None)
    library = _stream(MySQLSource(_options(mariadb, tables)), start, end)

    assert len(library) > 400
    assert sum(decoded) == len(fast) and 0 not in decoded, "the fast decoder was not used"
    for fast_change, library_change in zip(fast, library, strict=True):
        assert fast_change == library_change
    # The fast path gives the very same Python types, not just equal values (1 == 1.0 == True).
    for fast_change, library_change in zip(fast, library, strict=True):
        for image, reference in (
            (fast_change.before, library_change.before),
            (fast_change.after, library_change.after),
        ):
            assert _types(image) == _types(reference)


def _types(image: dict[str, Any] | None) -> dict[str, type] | None:
    return None if image is None else {name: type(value) for name, value in image.items()}


# Which columns to keep: the last one alone (every other type is stepped over before it), every
# third one (a skipped column between each pair of kept ones), and the key plus a text column.
PROJECTIONS = [
    frozenset({"ip"}),
    frozenset(re.findall(r"(?:^|,)\s*(\w+) [A-Z]", COLUMNS)[::3]),
    frozenset({"id", "vcl"}),
]


def _fast_stream(
    mariadb: MariaDBServer,
    every_type: tuple[list[TableRef], Position, Position],
    monkeypatch: pytest.MonkeyPatch,
    **overrides: Any,
) -> list[RowChange]:
    """The every-type range streamed with ``overrides``, all of it decoded on the fast path."""
    tables, start, end = every_type
    decoded = _counting_decodes(monkeypatch)
    changes = _stream(MySQLSource(_options(mariadb, tables, **overrides)), start, end)
    monkeypatch.undo()
    assert sum(decoded) == len(changes) and 0 not in decoded, "not decoded on the fast path"
    return changes


def _cut(image: dict[str, Any] | None, keep: frozenset[str] | None) -> dict[str, Any] | None:
    return image if image is None or keep is None else {k: image[k] for k in keep}


def test_projected_images_equal_the_full_images_cut_to_the_kept_columns(
    mariadb: MariaDBServer,
    every_type: tuple[list[TableRef], Position, Position],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (columns, old_columns): one projection for both images, then old images cut apart from
    # new ones, as for a refresh rule that stores whole new rows but reads only its key
    # columns from the old ones (updates and deletes).
    tables, start, end = every_type
    full = _stream(MySQLSource(_options(mariadb, tables)), start, end)
    assert len(full) > 400
    assert {c.op for c in full} >= {Op.INSERT, Op.UPDATE, Op.DELETE}
    cases: list[tuple[frozenset[str] | None, frozenset[str] | None]] = [
        (keep, None) for keep in PROJECTIONS
    ]
    cases += [(None, frozenset({"id"})), (PROJECTIONS[1], PROJECTIONS[2])]
    for keep, keep_old in cases:
        overrides: dict[str, Any] = {"columns": {tables[0]: keep} if keep else {}}
        if keep_old is not None:
            overrides["old_columns"] = {tables[0]: keep_old}
        projected = _fast_stream(mariadb, every_type, monkeypatch, **overrides)
        for cut, whole in zip(projected, full, strict=True):
            assert (cut.op, cut.table, cut.version) == (whole.op, whole.table, whole.version)
            old, new = _cut(whole.before, keep_old or keep), _cut(whole.after, keep)
            assert (cut.before, cut.after) == (old, new)
            assert (_types(cut.before), _types(cut.after)) == (_types(old), _types(new))
    # An old-image column the map does not name: the old images fall back to the new ones'.
    lacking = _options(mariadb, tables, old_columns={tables[0]: frozenset({"id", "gone"})})
    assert _stream(MySQLSource(lacking), start, end) == full


def test_a_projection_naming_a_column_the_map_lacks_decodes_every_column(
    mariadb: MariaDBServer,
    mysql_db: str,
    mysql_conn: pymysql.Connection[Any],
) -> None:
    # A rule naming a column dropped since start-up must see it missing (and say so), never a
    # row silently cut short of the columns it did ask for.
    _sql(mysql_conn, "CREATE TABLE p (id INT PRIMARY KEY, a INT, b VARCHAR(10))")
    tables = [TableRef(mysql_db, "p")]
    start = MySQLSource(_options(mariadb, tables)).initial_position()
    _sql(mysql_conn, "INSERT INTO p VALUES (1, 2, 'x')")
    end = _end(mariadb)
    keep = frozenset({"id", "gone"})
    changes = _stream(MySQLSource(_options(mariadb, tables, columns={tables[0]: keep})), start, end)
    assert [c.after for c in changes] == [{"id": 1, "a": 2, "b": "x"}]
