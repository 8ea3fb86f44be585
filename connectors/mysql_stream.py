"""The replication packet loop of the MySQL/MariaDB source: raw binlog packets in, events out.

mysql-replication's ``BinLogStreamReader`` connects, registers as a replica and starts the dump;
after its first event this module reads the packets itself. The events that make up almost all of
a busy binlog (table maps, row images of the followed tables, XIDs and MariaDB GTIDs) are decoded
here straight from the bytes (``connectors.mysql_decode``) into small ``Fast*`` objects; every
other packet, and any rows event the fast decoder declines, is handed to the library's own
``BinLogPacketWrapper`` so it yields exactly the event objects it always did. The table-map
bookkeeping follows the library's ``freeze_schema`` rule (one map per table id until the caller
invalidates it after a DDL or a new binlog file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pymysql
from pymysql.constants import CR
from pymysql.protocol import MysqlPacket
from pymysqlreplication.event import FormatDescriptionEvent, RotateEvent
from pymysqlreplication.packet import BinLogPacketWrapper

from connectors.mysql_decode import (
    CHECKSUM_LEN,
    HEADER,
    MARIADB_GTID_EVENT,
    ROWS_V1,
    ROWS_V2,
    TABLE_MAP_EVENT,
    XID_EVENT,
    Image,
    TableDecoder,
    table_id_of,
)

_ROWS_EVENTS = ROWS_V1 | ROWS_V2
_EOF = 0xFE
_ERROR = 0xFF
_MAX_PACKET = 0xFFFFFF


class FastEvent:
    """Header fields the source needs of every event; ``packet`` mirrors the library's events."""

    __slots__ = ("event_size", "log_pos", "timestamp")

    def __init__(self, timestamp: int, log_pos: int, event_size: int) -> None:
        self.timestamp = timestamp
        self.log_pos = log_pos
        self.event_size = event_size

    @property
    def packet(self) -> FastEvent:
        return self


class FastXid(FastEvent):
    """A transaction's commit."""

    __slots__ = ()


class FastMariaGtid(FastEvent):
    """MariaDB's GTID event, which also opens the transaction."""

    __slots__ = ("domain_id", "flags", "gtid_seq_no", "server_id")

    def __init__(self, header: tuple[int, ...], data: bytes) -> None:
        super().__init__(header[0], header[4], header[3])
        self.server_id = header[2]
        self.gtid_seq_no = int.from_bytes(data[20:28], "little")
        self.domain_id = int.from_bytes(data[28:32], "little")
        self.flags = data[32]


class FastRows(FastEvent):
    """Decoded row images of one rows event of a followed table."""

    __slots__ = ("event_type", "rows", "table_id")

    def __init__(
        self,
        header: tuple[int, ...],
        table_id: int,
        rows: list[tuple[Image | None, Image | None]],
    ) -> None:
        super().__init__(header[0], header[4], header[3])
        self.event_type = header[1]
        self.table_id = table_id
        self.rows = rows


# table id -> (schema, table) -> the decoder for it, or None to let the library decode.
DecoderFor = Callable[[int, Any], TableDecoder | None]


class PacketEvents:
    """Reads one dump connection's packets after the library has connected it."""

    def __init__(
        self,
        reader: Any,
        table_keys: frozenset[tuple[str, str]],
        decoder_for: DecoderFor,
    ) -> None:
        self._reader = reader
        self._table_keys = table_keys
        self._decoder_for = decoder_for
        self._started = False
        self._ignored: set[int] = set()
        self._decoders: dict[int, TableDecoder | None] = {}
        self._conn: Any = None
        self.log_pos = 0

    def forget_tables(self) -> None:
        """Drop every table map (the caller clears the library's map at the same time)."""
        self._ignored.clear()
        self._decoders.clear()

    def _library_settings(self) -> dict[str, Any]:
        # The reader keeps what BinLogPacketWrapper needs in name-mangled attributes; read them
        # after it connected (checksum use and metadata support are probed at connect time).
        reader = self._reader

        def private(name: str) -> Any:
            return getattr(reader, f"_BinLogStreamReader__{name}")

        return {
            "wanted_events": private("allowed_events"),
            "allowed_events": private("allowed_events_in_packet"),
            "use_checksum": private("use_checksum"),
            "only_tables": private("only_tables"),
            "ignored_tables": private("ignored_tables"),
            "only_schemas": private("only_schemas"),
            "ignored_schemas": private("ignored_schemas"),
            "freeze_schema": private("freeze_schema"),
            "ignore_decode_errors": private("ignore_decode_errors"),
            "verify_checksum": private("verify_checksum"),
            "optional_meta_data": private("optional_meta_data"),
            "enable_logging": private("enable_logging"),
            "use_column_name_cache": private("use_column_name_cache"),
            "post_header_lengths": private("post_header_lengths"),
        }

    def read_data(self) -> bytes:
        """The next packet's payload, read straight off pymysql's buffered socket.

        pymysql's ``_read_packet`` costs several times the decoding of a small event; this does
        the same checks (sequence numbers, packets split at 16 MiB, error packets raised as
        pymysql errors, a short read as a lost connection) with less work per packet.
        """
        conn = self._conn
        rfile = conn._rfile
        parts: list[bytes] = []
        while True:
            header: bytes = rfile.read(4)
            if len(header) < 4:
                conn._force_close()
                raise pymysql.err.OperationalError(
                    CR.CR_SERVER_LOST, "Lost connection to MySQL server during query"
                )
            length = header[0] | header[1] << 8 | header[2] << 16
            if header[3] != conn._next_seq_id:
                conn._force_close()
                raise pymysql.err.OperationalError(
                    CR.CR_SERVER_LOST,
                    f"packet sequence number {header[3]}, expected {conn._next_seq_id}",
                )
            conn._next_seq_id = (header[3] + 1) % 256
            data: bytes = rfile.read(length)
            if len(data) < length:
                conn._force_close()
                raise pymysql.err.OperationalError(
                    CR.CR_SERVER_LOST, "Lost connection to MySQL server during query"
                )
            if length < _MAX_PACKET and not parts:
                break
            parts.append(data)
            if length < _MAX_PACKET:
                data = b"".join(parts)
                break
        if data and data[0] == _ERROR:
            MysqlPacket(data, conn.encoding).raise_for_error()
        return data

    def _library_event(self, data: bytes, settings: dict[str, Any]) -> Any:
        reader = self._reader
        wrapper = BinLogPacketWrapper(
            MysqlPacket(data, self._conn.encoding),
            reader.table_map,
            reader._ctl_connection,
            reader.mysql_version,
            settings["use_checksum"],
            settings["allowed_events"],
            settings["only_tables"],
            settings["ignored_tables"],
            settings["only_schemas"],
            settings["ignored_schemas"],
            settings["freeze_schema"],
            settings["ignore_decode_errors"],
            settings["verify_checksum"],
            settings["optional_meta_data"],
            settings["enable_logging"],
            settings["use_column_name_cache"],
            settings["post_header_lengths"],
        )
        event = wrapper.event
        if isinstance(event, FormatDescriptionEvent):
            # What the library's fetchone does with it: later events are parsed by this.
            reader.mysql_version = event.mysql_version
            settings["post_header_lengths"] = event.post_header_len
        elif isinstance(event, RotateEvent):
            reader.log_file, reader.log_pos = event.next_binlog, event.position
        return event

    def events(self) -> Any:
        """Yield events until the server ends the dump (non-blocking mode) or the caller stops."""
        reader = self._reader
        first = reader.fetchone()  # connects, registers and starts the dump
        if first is None:
            return
        yield first
        settings = self._library_settings()
        self._conn = reader._stream_connection
        read_data = self.read_data
        table_map = reader.table_map
        table_keys = self._table_keys
        ignored = self._ignored
        decoders = self._decoders
        unpack_header = HEADER.unpack_from
        checksum = CHECKSUM_LEN if settings["use_checksum"] else 0
        wanted = settings["wanted_events"]
        while True:
            try:
                data = read_data()
            except OSError as exc:
                # What pymysql makes of a failed read, so callers see one kind of error.
                self._conn._force_close()
                raise pymysql.err.OperationalError(
                    CR.CR_SERVER_LOST, f"Lost connection to MySQL server during query ({exc})"
                ) from exc
            first_byte = data[0]
            if first_byte == _EOF and len(data) < 9:
                reader.close()
                return
            if first_byte != 0:
                continue
            header = unpack_header(data, 1)
            event_type = header[1]
            if header[4]:
                self.log_pos = header[4]
            if event_type in _ROWS_EVENTS:
                table_id = table_id_of(data)
                if table_id in ignored:
                    continue
                table = table_map.get(table_id)
                if table is None or (table.schema, table.table) not in table_keys:
                    continue
                if table_id in decoders:
                    decoder = decoders[table_id]
                else:
                    decoder = decoders[table_id] = self._decoder_for(table_id, table)
                if decoder is not None:
                    rows = decoder.decode(data, event_type, len(data) - checksum)
                    if rows is not None:
                        yield FastRows(header, table_id, rows)
                        continue
                event = self._library_event(data, settings)
            elif event_type == TABLE_MAP_EVENT:
                table_id = table_id_of(data)
                if table_id in table_map or table_id in ignored:
                    continue
                self._library_event(data, settings)
                if table_id not in table_map:
                    ignored.add(table_id)
                continue
            elif event_type == XID_EVENT:
                yield FastXid(header[0], header[4], header[3])
                continue
            elif event_type == MARIADB_GTID_EVENT:
                yield FastMariaGtid(header, data)
                continue
            else:
                event = self._library_event(data, settings)
                if isinstance(event, FormatDescriptionEvent):
                    checksum = CHECKSUM_LEN if settings["use_checksum"] else 0
            if event is not None and type(event) in wanted:
                yield event
