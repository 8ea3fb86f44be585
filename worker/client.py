"""The read helper a Python web tier imports: lease-guarded cache-aside over the worker's keys.

``CacheClient.get(rule, loader, **key_columns)`` renders the key with the worker's own rule (same
template, scalar formatting, payload format, projection and TTL with jitter), answers from Redis
on a hit, and on a miss loads the row through the caller's ``loader`` and fills the key only if
the fill lease it took is still in place. The worker deletes that lease with every action on the
key, so a fill that raced with a database change is dropped instead of caching a stale row. The
client owns no driver: it talks to any object with the four redis-py methods of
``RedisCommands``; ``CacheClient.from_config`` builds the real client from the worker's TOML.
Other languages implement the same protocol from ``docs/read-protocol.md``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from worker.keys import lease_key
from worker.rules import KeyTemplate, Rule, RuleSet
from worker.settings import compile_rules, load_settings

log = structlog.get_logger("cache_worker.client")

# KEYS: the cache key, its lease key. ARGV: lease token, ttl_ms, "json" | "hash", then the JSON
# text or the hash's field/value pairs. The value is written only while the reader's own lease is
# in place: the worker deletes the lease with every action on the key, and a lease that expired
# or was taken over by another reader holds another token. No version key is written (see
# docs/read-protocol.md, "Why the fill writes no version").
FILL_SCRIPT = """\
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[2])
if ARGV[3] == 'json' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
elseif ARGV[3] == 'hash' then
  redis.call('DEL', KEYS[1])
  local n = #ARGV
  -- unpack() fails beyond a few thousand values, so wide hashes go in slices (of whole pairs).
  for i = 4, n, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, n)))
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  return redis.error_reply('cache-worker: unknown fill format ' .. ARGV[3])
end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: the lease key. ARGV: lease token. Deletes the lease only if it is still this reader's.
RELEASE_SCRIPT = """\
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Loader = Callable[..., Mapping[str, Any] | None]
Payload = str | tuple[tuple[str, str], ...]

# A cache outage makes every request fail the same way; one line per interval says so without
# flooding the web tier's log.
_WARNING_INTERVAL_S = 10.0


class RedisCommands(Protocol):
    """The redis-py methods the client uses; ``redis.Redis`` has them, and so can a test double.

    Replies may be bytes or str (``decode_responses`` either way).
    """

    def get(self, name: str) -> Any: ...

    def hgetall(self, name: str) -> Any: ...

    def set(self, name: str, value: str, *, px: int | None = None, nx: bool = False) -> Any: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: str | int) -> Any: ...


class CacheClient:
    """Cache-aside reads of the worker's keys with fill leases (thread-safe).

    ``lease_ms`` bounds how long a fill may take before its lease lapses (a later fill is then
    dropped); ``wait_ms`` is how long a reader that finds the lease taken polls, every
    ``poll_ms``, for the first reader's fill before it loads the row itself without filling.
    """

    def __init__(
        self,
        redis: RedisCommands,
        rules: RuleSet,
        *,
        lease_ms: int = 2000,
        wait_ms: int = 200,
        poll_ms: int = 10,
    ) -> None:
        if lease_ms < 1 or wait_ms < 0 or poll_ms < 1:
            raise ValueError(
                f"need lease_ms >= 1, wait_ms >= 0, poll_ms >= 1 "
                f"(got {lease_ms}, {wait_ms}, {poll_ms})"
            )
        self.redis = redis
        self._rules = {rule.name: rule for rule in rules.rules}
        self._lease_ms = lease_ms
        self._wait_s = wait_ms / 1000
        self._poll_s = poll_ms / 1000
        self._warn_lock = threading.Lock()
        self._warned_at: float | None = None
        self._suppressed = 0

    @classmethod
    def from_config(
        cls,
        path: str | Path,
        redis: RedisCommands | None = None,
        *,
        lease_ms: int = 2000,
        wait_ms: int = 200,
        poll_ms: int = 10,
    ) -> CacheClient:
        """A client over the rules of the worker's config file (environment overrides apply).

        Without ``redis``, a client is built from the config's ``[redis]`` section; it connects
        on its first command. Raises ``worker.errors.ConfigError`` for an invalid config.
        """
        settings = load_settings(Path(path))
        rules = compile_rules(settings)
        if redis is None:
            # Imported here so that importing the read helper never imports a driver.
            from connectors import redis_client

            redis = redis_client(settings)
        return cls(redis, rules, lease_ms=lease_ms, wait_ms=wait_ms, poll_ms=poll_ms)

    def get(self, rule_name: str, loader: Loader, /, **key_columns: Any) -> dict[str, Any] | None:
        """The row the rule caches for these key columns: from Redis, else from ``loader``.

        ``loader(**key_columns)`` reads the database and returns the row (a mapping of column
        to value) or None; it must read current committed data (the primary, a fresh statement),
        since it runs after the lease is taken and that ordering is what makes the fill safe, and
        return the value types the worker's source produces (TIMESTAMP as UTC, JSON decoded) so
        that its encoding matches the worker's. Hit and miss return the same shape: the rule's
        ``columns`` projection after the payload encoding's round trip (json: decoded JSON;
        hash: str values, NULL columns absent). Redis failures fall back to the loader; loader
        exceptions propagate.
        """
        rule, template = self._select(rule_name, key_columns)
        key = template.render(key_columns)
        if key is None:
            # The worker skips such a key too (NULL key column), so nothing can be cached.
            return _load(rule, loader, key_columns)
        try:
            cached = _read(self.redis, rule, key)
        except Exception as exc:  # any client failure: the database still answers
            self._warn("read", rule, key, exc)
            return _load(rule, loader, key_columns)
        if cached is not None:
            return cached
        lease = lease_key(key)
        token = secrets.token_hex(16)
        try:
            leased = bool(self.redis.set(lease, token, nx=True, px=self._lease_ms))
        except Exception as exc:  # any client failure: the database still answers
            self._warn("lease", rule, key, exc)
            return _load(rule, loader, key_columns)
        if not leased:
            return self._wait_then_load(rule, key, loader, key_columns)
        try:
            row = loader(**key_columns)
            payload = None if row is None else rule.payload(dict(row))
        except BaseException:
            self._release(rule, key, lease, token)
            raise
        if payload is None:
            # No negative caching: the row may be inserted a moment later, and an INSERT on an
            # absent key would have nothing to correct.
            self._release(rule, key, lease, token)
            return None
        self._fill(rule, key, lease, token, payload)
        return _decode_payload(payload)

    def _select(self, rule_name: str, given: Mapping[str, Any]) -> tuple[Rule, KeyTemplate]:
        rule = self._rules.get(rule_name)
        if rule is None:
            known = ", ".join(repr(name) for name in self._rules) or "none"
            raise ValueError(f"unknown rule {rule_name!r}; the config has rules {known}")
        for template in rule.keys:
            if all(column in given for column in template.columns):
                return rule, template
        needs = "; ".join(f"{t.text!r} needs {', '.join(t.columns)}" for t in rule.keys)
        raise ValueError(
            f"rule {rule_name!r}: no key template can be rendered from the given columns "
            f"({', '.join(sorted(given)) or 'none'}); templates: {needs}"
        )

    def _wait_then_load(
        self, rule: Rule, key: str, loader: Loader, key_columns: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        # Another reader is filling: its value usually lands within a round trip or two. The
        # wait is bounded so a slow or dead filler costs at most wait_ms, never an outage.
        deadline = time.monotonic() + self._wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(self._poll_s, remaining))
            try:
                cached = _read(self.redis, rule, key)
            except Exception as exc:  # any client failure: the database still answers
                self._warn("read", rule, key, exc)
                break
            if cached is not None:
                return cached
        # Only the lease holder may fill; this reader's row could be older than its fill.
        return _load(rule, loader, key_columns)

    def _fill(self, rule: Rule, key: str, lease: str, token: str, payload: Payload) -> None:
        if isinstance(payload, str):
            args: tuple[str, ...] = ("json", payload)
        else:
            args = ("hash", *(part for pair in payload for part in pair))
        try:
            filled = self.redis.eval(FILL_SCRIPT, 2, key, lease, token, rule.ttl_for_write(), *args)
        except Exception as exc:  # the row is loaded; only the cache missed out
            self._warn("fill", rule, key, exc)
            return
        if not filled:
            log.debug("cache_fill_dropped", rule=rule.name, key=key, reason="lease gone")

    def _release(self, rule: Rule, key: str, lease: str, token: str) -> None:
        try:
            self.redis.eval(RELEASE_SCRIPT, 1, lease, token)
        except Exception as exc:  # the lease then lapses after lease_ms
            self._warn("release", rule, key, exc)

    def _warn(self, doing: str, rule: Rule, key: str, exc: Exception) -> None:
        now = time.monotonic()
        with self._warn_lock:
            if self._warned_at is not None and now - self._warned_at < _WARNING_INTERVAL_S:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._warned_at = self._suppressed, 0, now
        log.warning(
            "cache_unavailable",
            doing=doing,
            rule=rule.name,
            key=key,
            error=f"{type(exc).__name__}: {exc}",
            suppressed_since_last=suppressed,
            fallback="loader",
        )


def _load(rule: Rule, loader: Loader, key_columns: Mapping[str, Any]) -> dict[str, Any] | None:
    row = loader(**key_columns)
    return None if row is None else _decode_payload(rule.payload(dict(row)))


def _read(redis: RedisCommands, rule: Rule, key: str) -> dict[str, Any] | None:
    """The decoded value at ``key``, or None when absent; raises ValueError when undecodable."""
    if rule.format == "hash":
        fields = redis.hgetall(key)
        # HGETALL answers an empty hash for a missing key; the worker never stores one.
        return {_text(k): _text(v) for k, v in fields.items()} if fields else None
    raw = redis.get(key)
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"key {key!r} holds JSON that is not an object")
    return value


def _decode_payload(payload: Payload) -> dict[str, Any]:
    if isinstance(payload, str):
        decoded: dict[str, Any] = json.loads(payload)
        return decoded
    return dict(payload)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["FILL_SCRIPT", "RELEASE_SCRIPT", "CacheClient", "Loader", "RedisCommands"]
