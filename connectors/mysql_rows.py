"""Reading MySQL/MariaDB rows by SELECT as the binlog source decodes them (verify's RowReader).

pymysql's SELECT values differ from what ``connectors.mysql`` makes of the same row in the binlog;
this module owns closing that gap, column by column from information_schema, so that a row read
here and encoded by a rule gives exactly the payload the worker wrote: JSON columns (MariaDB's
JSON is LONGTEXT with a ``json_valid`` check) parsed, BIT as an int, SET as a sorted list,
TIMESTAMP read in a ``+00:00`` session and made UTC-aware, zero and invalid dates and YEAR 0000 as
None, FLOAT read as the exact DOUBLE it widens to and then shortened as the binlog source does.
It also pages through a table by its primary key (keyset pagination), samples random rows and
re-reads rows by key. Connection errors are translated by ``connectors.mysql.translate_error``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql

from connectors.mysql import (
    MySQLOptions,
    _enum_values,  # the binlog source's parser of enum(...)/set(...) column types
    _float32,  # the binlog source's FLOAT shortening: both paths must round alike
    _json_text,  # MariaDB JSON text -> value, kept as text when invalid, as the binlog does
    open_connection,
    translate_error,
)
from worker.errors import CacheWorkerError, SchemaError
from worker.events import Row, TableRef


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _table_sql(table: TableRef) -> str:
    return f"{_ident(table.schema)}.{_ident(table.name)}"


# -- value conversion: SELECT value -> binlog source value ------------------------------------


def _json_value(value: Any) -> Any:
    # MySQL's JSON comes back as text (bytes when the connection does not decode it).
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return json.loads(text) if isinstance(text, str) else text


def _maria_json(value: Any) -> Any:
    return _json_text(value) if isinstance(value, str) else value


def _bit(value: Any) -> Any:
    return int.from_bytes(value, "big") if isinstance(value, bytes) else value


def _set(value: Any) -> Any:
    # pymysql gives a SET as "a,b" (a set of str with other converters); the binlog source gives
    # a sorted list, [] for the empty set.
    if isinstance(value, str):
        return sorted(value.split(",")) if value else []
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def _date_or_none(value: Any) -> Any:
    # pymysql hands back zero and invalid dates ("0000-00-00", "2024-01-00") as text; the binlog
    # source reads them as NULL.
    return None if isinstance(value, str) else value


def _timestamp(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        # The session time zone is +00:00, so the server already converted to UTC.
        return value.replace(tzinfo=dt.UTC)
    return None if isinstance(value, str) else value


def _year(value: Any) -> Any:
    return None if value == 0 else value


def _float(value: Any) -> Any:
    return _float32(value) if isinstance(value, float) else value


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "json": _json_value,
    "bit": _bit,
    "set": _set,
    "date": _date_or_none,
    "datetime": _date_or_none,
    "timestamp": _timestamp,
    "year": _year,
    "float": _float,
}


# -- key values -> SQL parameters -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    data_type: str
    column_type: str
    is_json: bool

    def select_sql(self) -> str:
        if self.data_type == "float":
            # MariaDB prints a FLOAT with 6 significant digits (3.14159 for 3.1415927); the
            # DOUBLE it widens to is exact, and _float32 then finds the shortest form.
            return f"CAST({_ident(self.name)} AS DOUBLE) AS {_ident(self.name)}"
        return _ident(self.name)

    def convert(self) -> Callable[[Any], Any] | None:
        if self.is_json:
            return _maria_json
        return _CONVERTERS.get(self.data_type)

    def param(self, value: Any) -> Any:
        """A decoded key value as a parameter that compares like the stored one."""
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            return value.astimezone(dt.UTC).replace(tzinfo=None)
        if self.data_type == "enum" and isinstance(value, str):
            # An ENUM sorts by its index; compared with a string it would compare as text.
            values = _enum_values(self.column_type)
            return values.index(value) + 1 if value in values else 0
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return value


@dataclass(frozen=True, slots=True)
class _Plan:
    table: TableRef
    columns: list[_Column]
    converters: list[tuple[str, Callable[[Any], Any]]]
    pk: list[_Column]
    select: str


class MySQLRowReader:
    """Implements ``worker.verify.RowReader`` for MySQL and MariaDB with one pymysql connection."""

    def __init__(self, options: MySQLOptions, read_timeout_s: float = 600.0) -> None:
        self.options = options
        self.read_timeout_s = read_timeout_s
        self._conn: pymysql.Connection[Any] | None = None
        self._mariadb = False
        self._plans: dict[TableRef, _Plan] = {}

    # -- connection -------------------------------------------------------------------------

    def _connection(self) -> pymysql.Connection[Any]:
        if self._conn is None:
            opts = self.options
            kwargs: dict[str, Any] = {
                "host": opts.host,
                "port": opts.port,
                "user": opts.user,
                "password": opts.password or "",
                "connect_timeout": opts.connect_timeout_s,
                # ORDER BY RAND() over a large table sorts it all before answering.
                "read_timeout": self.read_timeout_s,
                "write_timeout": self.read_timeout_s,
                "charset": "utf8mb4",
                # Every statement sees the latest commits: a re-check must not read a snapshot.
                "autocommit": True,
            }
            if opts.ssl is not None:
                kwargs["ssl"] = opts.ssl
            conn = open_connection(**kwargs)
            try:
                with conn.cursor() as cur:
                    cur.execute("SET time_zone = '+00:00'")
                    cur.execute("SELECT VERSION()")
                    row = cur.fetchone()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._mariadb = row is not None and "mariadb" in str(row[0]).lower()
            self._conn = conn
        return self._conn

    def _query(self, sql: str, args: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            conn = self._connection()
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except CacheWorkerError:
            raise
        except Exception as exc:
            self.close()
            raise translate_error(exc, self.options) from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- table metadata ---------------------------------------------------------------------

    def _plan(self, table: TableRef) -> _Plan:
        plan = self._plans.get(table)
        if plan is not None:
            return plan
        rows = self._query(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (table.schema, table.name),
        )
        if not rows:
            raise SchemaError(f"table {table} does not exist")
        json_columns = self._maria_json_columns(table) if self._mariadb else set()
        columns = [
            _Column(str(n), str(d).lower(), str(t).lower(), str(n) in json_columns)
            for n, d, t in rows
        ]
        converters = [(c.name, fn) for c in columns if (fn := c.convert()) is not None]
        by_name = {c.name: c for c in columns}
        pk = [by_name[name] for name in self._key_columns(table) if name in by_name]
        select = ", ".join(c.select_sql() for c in columns)
        plan = _Plan(table, columns, converters, pk, select)
        self._plans[table] = plan
        return plan

    def _maria_json_columns(self, table: TableRef) -> set[str]:
        # Exactly the binlog source's test: a CHECK named after the column, json_valid(`col`).
        found: set[str] = set()
        for _name, clause in self._query(
            "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
            "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s",
            (table.schema, table.name),
        ):
            match = re.fullmatch(r"json_valid\(`((?:[^`]|``)+)`\)", str(clause).strip())
            if match:
                found.add(match.group(1).replace("``", "`"))
        return found

    def _key_columns(self, table: TableRef) -> list[str]:
        """The primary key, else the first unique index over NOT NULL columns only."""
        rows = self._query(
            "SELECT INDEX_NAME, COLUMN_NAME, NULLABLE FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0 "
            "ORDER BY INDEX_NAME = 'PRIMARY' DESC, INDEX_NAME, SEQ_IN_INDEX",
            (table.schema, table.name),
        )
        indexes: dict[str, list[tuple[Any, Any]]] = {}
        for index, column, nullable in rows:
            indexes.setdefault(str(index), []).append((column, nullable))
        for parts in indexes.values():
            # An expression part (MySQL 8 functional index) has no column name.
            if all(column is not None and str(nullable) != "YES" for column, nullable in parts):
                return [str(column) for column, _ in parts]
        return []

    # -- RowReader --------------------------------------------------------------------------

    def primary_key(self, table: TableRef) -> list[str]:
        return [c.name for c in self._plan(table).pk]

    def estimate_rows(self, table: TableRef) -> int | None:
        rows = self._query(
            "SELECT TABLE_ROWS FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (table.schema, table.name),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def scan(self, table: TableRef, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
        plan = self._plan(table)
        if not plan.pk:
            raise SchemaError(f"table {table} has no primary key to page by")
        order = ", ".join(_ident(c.name) for c in plan.pk)
        args: list[Any] = []
        where = ""
        if after is not None:
            # (a > x) OR (a = x AND b > y) ...: unlike a row constructor, both MySQL and
            # MariaDB turn this into an index range.
            terms = []
            for i, column in enumerate(plan.pk):
                equal = [f"{_ident(c.name)} = %s" for c in plan.pk[:i]]
                terms.append("(" + " AND ".join([*equal, f"{_ident(column.name)} > %s"]) + ")")
                args.extend(c.param(v) for c, v in zip(plan.pk[: i + 1], after, strict=False))
            where = " WHERE " + " OR ".join(terms)
        args.append(limit)
        sql = f"SELECT {plan.select} FROM {_table_sql(table)}{where} ORDER BY {order} LIMIT %s"
        return self._rows(plan, sql, args)

    def sample(self, table: TableRef, n: int) -> list[Row]:
        plan = self._plan(table)
        sql = f"SELECT {plan.select} FROM {_table_sql(table)} ORDER BY RAND() LIMIT %s"
        return self._rows(plan, sql, [n])

    def fetch(self, table: TableRef, keys: Sequence[tuple[Any, ...]]) -> list[Row]:
        plan = self._plan(table)
        if not plan.pk or not keys:
            return []
        one = "(" + " AND ".join(f"{_ident(c.name)} = %s" for c in plan.pk) + ")"
        args = [c.param(v) for key in keys for c, v in zip(plan.pk, key, strict=True)]
        where = " OR ".join([one] * len(keys))
        sql = f"SELECT {plan.select} FROM {_table_sql(table)} WHERE {where}"
        return self._rows(plan, sql, args)

    def _rows(self, plan: _Plan, sql: str, args: Sequence[Any]) -> list[Row]:
        names = [c.name for c in plan.columns]
        out: list[Row] = []
        for values in self._query(sql, args):
            row = dict(zip(names, values, strict=True))
            for name, convert in plan.converters:
                value = row[name]
                if value is not None:
                    row[name] = convert(value)
            out.append(row)
        return out
