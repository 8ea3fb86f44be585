"""Reading cache keys for ``verify``: the Redis ``CacheReader``, one pipeline per batch of keys.

A json key is read with GET and a hash key with HGETALL, all of a batch in one non-transactional
pipeline round trip. A key holding another Redis type answers WRONGTYPE, which is not an error
here but a finding (``WrongType``, named with TYPE). Values are decoded as UTF-8 (the worker
writes Python strings); Redis failures become ``worker.errors`` classes with redacted messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import redis
from redis.exceptions import RedisError, ResponseError

from connectors.redis import describe
from worker.errors import SinkError, SinkUnavailable
from worker.redact import redact
from worker.rules import Format
from worker.verify import CachedValue, WrongType


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisCacheReader:
    """Implements ``worker.verify.CacheReader`` over a ``redis.Redis`` client."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._target = describe(client)

    def read(self, keys: Sequence[tuple[str, Format]]) -> list[CachedValue]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key, fmt in keys:
            if fmt == "hash":
                pipe.hgetall(key)
            else:
                pipe.get(key)
        try:
            replies = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            self._raise(exc)
        values: list[CachedValue] = []
        wrong: list[int] = []
        for i, reply in enumerate(replies):
            if isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
                wrong.append(i)
                values.append(WrongType("value of another type"))
            elif isinstance(reply, Exception):
                self._raise(reply)
            elif isinstance(reply, dict):
                # Redis keeps no empty hash: HGETALL answers {} for an absent key.
                values.append({_text(k): _text(v) for k, v in reply.items()} or None)
            else:
                values.append(None if reply is None else _text(reply))
        if wrong:
            self._name_types(keys, wrong, values)
        return values

    def _name_types(
        self, keys: Sequence[tuple[str, Format]], wrong: list[int], values: list[CachedValue]
    ) -> None:
        pipe = self._client.pipeline(transaction=False)
        for i in wrong:
            pipe.type(keys[i][0])
        try:
            types = pipe.execute()
        except RedisError as exc:
            self._raise(exc)
        for i, kind in zip(wrong, types, strict=True):
            values[i] = WrongType(_text(kind))

    def _raise(self, exc: BaseException) -> NoReturn:
        password = self._client.connection_pool.connection_kwargs.get("password")
        text = redact(str(exc) or type(exc).__name__, [password])
        message = f"redis {self._target}: reading keys failed: {text}"
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            raise SinkUnavailable(message) from exc
        raise SinkError(message) from exc

    def close(self) -> None:
        self._client.close()
