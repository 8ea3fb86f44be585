"""Reading Postgres rows with SELECT as the log sources decode them (``verify``'s RowReader).

Both Postgres sources produce the values ``postgres_common.TextDecoder`` makes of each column's
text form (pgoutput sends that text; the notify source's ``to_jsonb`` values are converted to the
same). So this reader does not let psycopg load the values: it takes every column's text as the
server's output function printed it, in a session set up by ``postgres_common.connect`` (UTC,
ISO dates, exact floats, hex bytea), and decodes it with the same ``TextDecoder``. It also finds
a table's key (primary key, else a NOT NULL unique index), pages through it with keyset
pagination, samples random rows and re-reads rows by key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from connectors.postgres_common import (
    PostgresOptions,
    TextDecoder,
    close_quietly,
    connect,
    qualified,
    table_oid,
    translate_error,
)
from worker.errors import CacheWorkerError, SchemaError
from worker.events import Row, TableRef

# The key a table is paged by: its primary key, else its replica identity index, else the first
# unique index; only plain (no expression, no predicate) indexes over NOT NULL columns qualify.
_KEY_SQL = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indisvalid
  AND i.indexprs IS NULL AND i.indpred IS NULL
GROUP BY i.indexrelid, i.indisprimary, i.indisreplident
HAVING bool_and(a.attnotnull)
ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid
LIMIT 1
"""


class PostgresRowReader:
    """Implements ``worker.verify.RowReader`` for Postgres with one psycopg connection."""

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self._conn: psycopg.Connection[Any] | None = None
        self._decoder: TextDecoder | None = None
        self._keys: dict[TableRef, list[str]] = {}

    def _connection(self) -> tuple[psycopg.Connection[Any], TextDecoder]:
        if self._conn is None or self._decoder is None:
            # Autocommit: every statement sees the latest commits (a re-check must not read an
            # old snapshot).
            conn = connect(self.options)
            self._conn, self._decoder = conn, TextDecoder(conn)
        return self._conn, self._decoder

    def close(self) -> None:
        conn, self._conn, self._decoder = self._conn, None, None
        close_quietly(conn)

    def _fail(self, exc: Exception) -> CacheWorkerError:
        self.close()
        return translate_error(exc, self.options)

    def _table_oid(self, table: TableRef) -> int:
        conn, _ = self._connection()
        oid = table_oid(conn, table)
        if oid is None:
            raise SchemaError(f"table {table} does not exist")
        return oid

    def primary_key(self, table: TableRef) -> list[str]:
        if table not in self._keys:
            try:
                conn, _ = self._connection()
                row = conn.execute(_KEY_SQL, (self._table_oid(table),)).fetchone()
            except CacheWorkerError:
                raise
            except Exception as exc:
                raise self._fail(exc) from exc
            self._keys[table] = [str(c) for c in row[0]] if row is not None else []
        return self._keys[table]

    def estimate_rows(self, table: TableRef) -> int | None:
        try:
            conn, _ = self._connection()
            row = conn.execute(
                "SELECT reltuples::bigint FROM pg_catalog.pg_class WHERE oid = %s",
                (self._table_oid(table),),
            ).fetchone()
        except CacheWorkerError:
            raise
        except Exception as exc:
            raise self._fail(exc) from exc
        # reltuples is -1 for a table never vacuumed or analyzed.
        return int(row[0]) if row is not None and row[0] >= 0 else None

    def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
        key = self.primary_key(table)
        if not key:
            raise SchemaError(f"table {table} has no primary key to page by")
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in key)
        args: list[Any] = []
        where: sql.Composable = sql.SQL("")
        if after is not None:
            # A row comparison is what a btree index serves for a multi-column key.
            marks = sql.SQL(", ").join(sql.Placeholder() for _ in key)
            where = sql.SQL(" WHERE ({}) > ({})").format(columns, marks)
            args.extend(after)
        query = sql.SQL("SELECT * FROM {}{} ORDER BY {} LIMIT {}").format(
            qualified(table), where, columns, sql.Placeholder()
        )
        return self._rows(query, [*args, limit])

    def sample(self, table: TableRef, n: int) -> list[Row]:
        query = sql.SQL("SELECT * FROM {} ORDER BY random() LIMIT {}").format(
            qualified(table), sql.Placeholder()
        )
        return self._rows(query, [n])

    def fetch(self, table: TableRef, keys: Sequence[tuple[Any, ...]]) -> list[Row]:
        key = self.primary_key(table)
        if not key or not keys:
            return []
        one = sql.SQL("({})").format(
            sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in key
            )
        )
        query = sql.SQL("SELECT * FROM {} WHERE {}").format(
            qualified(table), sql.SQL(" OR ").join([one] * len(keys))
        )
        return self._rows(query, [v for values in keys for v in values])

    def _rows(self, query: sql.Composed, args: Sequence[Any]) -> list[Row]:
        try:
            conn, decoder = self._connection()
            with conn.cursor() as cur:
                cur.execute(query, args)
                result = cur.pgresult
                if result is None:
                    return []
                names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
                oids = [result.ftype(i) for i in range(result.nfields)]
                raw = [
                    [result.get_value(r, i) for i in range(result.nfields)]
                    for r in range(result.ntuples)
                ]
            # Decoded after the statement: an unknown type makes the decoder query the catalog.
            return [
                {
                    name: decoder.decode(oid, value)
                    for name, oid, value in zip(names, oids, values, strict=True)
                }
                for values in raw
            ]
        except CacheWorkerError:
            raise
        except Exception as exc:
            raise self._fail(exc) from exc
