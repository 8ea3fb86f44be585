"""The Redis adapter: the client (``connect``), the cache sink, checkpoint and dead-letter stores.

``RedisSink`` is the hot path. It sends a whole coalesced batch in one non-transactional pipeline
round trip: an ``Evict`` is one ``DEL`` of the key and its companions, a ``Refresh`` is one
``EVALSHA`` of a Lua script that writes the value only if Redis does not already hold a newer
version, so replaying the log never moves a key backwards. Every command is idempotent, which is
what lets the caller retry a whole batch after ``SinkUnavailable``. Commands Redis refuses for good
(NOPERM, OOM, a value it rejects) fail alone: the sink raises ``PartialApplyError`` naming them,
and the rest of the batch stands. ``RedisCheckpointStore`` keeps a checkpoint in one Redis key (as
durable as that Redis's persistence settings make it); ``RedisDeadLetterStore`` keeps dead letters
in a capped stream. Redis
exceptions are translated into ``worker.errors`` classes here and never leave this module;
messages name the server by its redacted URL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NoReturn

import hiredis
import redis
import structlog
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    DataError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from worker.actions import CacheAction, Refresh
from worker.checkpoint import Checkpoint, decode_checkpoint, encode_checkpoint
from worker.dead_letters import DeadLetter
from worker.errors import (
    CheckpointError,
    ConfigError,
    PartialApplyError,
    SinkError,
    SinkUnavailable,
)
from worker.events import Position
from worker.interfaces import CheckResult
from worker.keys import companion_keys
from worker.redact import redact, redact_url, url_secrets

log = structlog.get_logger(__name__)

# KEYS: the cache key, its version key, its lease key.
# ARGV: version, ttl_ms, "json" | "hash", then the JSON text or the hash's field/value pairs.
# A ttl_ms <= 0 writes without expiry. Versions stay below 2**53, so Lua numbers compare exactly.
REFRESH_SCRIPT = """\
redis.call('DEL', KEYS[3])
local stored = tonumber(redis.call('GET', KEYS[2]))
if stored and stored > tonumber(ARGV[1]) then
  return 0
end
local ttl = tonumber(ARGV[2])
local format = ARGV[3]
if format == 'json' then
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[4])
  end
elseif format == 'hash' then
  redis.call('DEL', KEYS[1])
  local n = #ARGV
  -- unpack() fails beyond a few thousand values, so wide hashes go in slices (of whole pairs).
  for i = 4, n, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, n)))
  end
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  return redis.error_reply('cache-worker: unknown refresh format ' .. format)
end
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""

# What the worker sends: REFRESH_SCRIPT's logic for up to _REFRESH_GROUP keys per call. Redis
# spends more on starting a script than on the four commands inside it, so one call per key
# made refresh rules cost twice what evict rules do. KEYS are three per key as above; ARGV are,
# per key, version, ttl_ms, format, the number of payload values, then the payload. Each key is
# applied under pcall, so one refused key (WRONGTYPE, say) is that key's error reply in the
# returned array and the other keys still apply, as with separate calls.
REFRESH_BATCH_SCRIPT = """\
local function refresh(key, vkey, lkey, a, last)
  redis.call('DEL', lkey)
  local stored = tonumber(redis.call('GET', vkey))
  if stored and stored > tonumber(ARGV[a]) then
    return 0
  end
  local ttl = tonumber(ARGV[a + 1])
  local format = ARGV[a + 2]
  if format == 'json' then
    if ttl > 0 then
      redis.call('SET', key, ARGV[a + 4], 'PX', ttl)
    else
      redis.call('SET', key, ARGV[a + 4])
    end
  elseif format == 'hash' then
    redis.call('DEL', key)
    for i = a + 4, last, 1000 do
      redis.call('HSET', key, unpack(ARGV, i, math.min(i + 999, last)))
    end
    if ttl > 0 then
      redis.call('PEXPIRE', key, ttl)
    end
  else
    return redis.error_reply('cache-worker: unknown refresh format ' .. format)
  end
  if ttl > 0 then
    redis.call('SET', vkey, ARGV[a], 'PX', ttl)
  else
    redis.call('SET', vkey, ARGV[a])
  end
  return 1
end
local results = {}
local a = 1
for i = 1, #KEYS, 3 do
  local last = a + 3 + tonumber(ARGV[a + 3])
  local ok, result = pcall(refresh, KEYS[i], KEYS[i + 1], KEYS[i + 2], a, last)
  if ok then
    results[#results + 1] = result
  elseif type(result) == 'table' then
    results[#results + 1] = result
  else
    results[#results + 1] = redis.error_reply(tostring(result))
  end
  a = last + 1
end
return results
"""
REFRESH_BATCH_SHA = hashlib.sha1(REFRESH_BATCH_SCRIPT.encode()).hexdigest()
# Refreshes per script call (and evicts per DEL): enough to spread the call's cost, few enough
# that one call never keeps Redis busy for long (a script blocks every other client while it
# runs).
_REFRESH_GROUP = 64

# Command names as bytes: the driver's packer splits str names on spaces for every command.
_EVALSHA = b"EVALSHA"
_DEL = b"DEL"
_JSON = b"json"
_HASH = b"hash"

# What an applied evict reports per action: DEL answers with one count for all its keys.
_EVICTED = 1

# Commands per socket write (see _round_trip); a few tens of KB for typical payloads.
_SLICE = 256

# hiredis is a declared dependency (redis[hiredis]); its C packer is what keeps packing cheap.
_pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command

# Error replies that say "not now" rather than "never": a replica promoted a moment ago, a busy
# script, a master link down. BusyLoadingError (LOADING) is a ConnectionError already.
_TRANSIENT_REPLIES = ("BUSY ", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


@dataclass(frozen=True)
class RedisOptions:
    """How to reach Redis; ``password``/``username`` override what the URL carries."""

    url: str
    password: str | None = None
    username: str | None = None
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    ssl_verify: bool = True
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0


def connect(options: RedisOptions) -> redis.Redis:
    """Build a client for ``options`` (lazy: nothing is sent until the first command).

    Raises ``ConfigError`` for a malformed URL or TLS files given for a plain ``redis://`` URL.
    """
    secrets = [options.password, *url_secrets(options.url)]
    shown = redact(redact_url(options.url), secrets)
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": options.socket_timeout_s,
        "socket_connect_timeout": options.connect_timeout_s,
        "client_name": "cache-worker",
        # One immediate reconnect covers a pooled connection the server or a proxy closed while
        # idle; waiting out a real outage is the run loop's backoff, not the driver's.
        "retry": Retry(NoBackoff(), 1),
    }
    tls_files = (options.ssl_ca_file, options.ssl_cert_file, options.ssl_key_file)
    if options.url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = "required" if options.ssl_verify else "none"
        kwargs["ssl_check_hostname"] = options.ssl_verify
        if options.ssl_ca_file:
            kwargs["ssl_ca_certs"] = options.ssl_ca_file
        if options.ssl_cert_file:
            kwargs["ssl_certfile"] = options.ssl_cert_file
        if options.ssl_key_file:
            kwargs["ssl_keyfile"] = options.ssl_key_file
    elif any(tls_files):
        raise ConfigError(f"redis url {shown}: TLS files are set but the url is not rediss://")
    try:
        pool = redis.ConnectionPool.from_url(options.url, **kwargs)
    except ValueError as exc:
        reason = redact(str(exc), secrets)
        raise ConfigError(f"redis url {shown} is invalid: {reason}") from None
    # from_url lets the URL win over keyword arguments, but a password from a secret file or the
    # environment must win over one left in the URL.
    if options.password is not None:
        pool.connection_kwargs["password"] = options.password
    if options.username is not None:
        pool.connection_kwargs["username"] = options.username
    return redis.Redis.from_pool(pool)


def describe(client: redis.Redis) -> str:
    """The client's target as a URL without password, for messages and check output."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    connection_class = getattr(pool, "connection_class", None)
    user = kwargs.get("username")
    userinfo = f"{user}@" if user else ""
    db = kwargs.get("db", 0)
    if isinstance(connection_class, type) and issubclass(
        connection_class, UnixDomainSocketConnection
    ):
        target = f"unix://{userinfo}{kwargs.get('path', '')}?db={db}"
    else:
        is_tls = isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)
        scheme = "rediss" if is_tls else "redis"
        host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
        target = f"{scheme}://{userinfo}{host}:{port}/{db}"
    return redact_url(target)


def _secrets(client: redis.Redis) -> list[str | None]:
    return [client.connection_pool.connection_kwargs.get("password")]


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, AuthenticationError | AuthorizationError):
        # A wrong password or missing permission does not heal by retrying; it is a
        # configuration error and the worker should stop and say so.
        return False
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | ReadOnlyError):
        return True
    if isinstance(exc, TryAgainError | ClusterDownError):
        # The driver strips "TRYAGAIN"/"MASTERDOWN"/"CLUSTERDOWN" from these messages.
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def _error_text(client: redis.Redis, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # The driver strips the reply's code (NOPERM, OOM) from the message; it is the useful part.
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code and not text.startswith(code):
        text = f"{code} {text}"
    return redact(text, _secrets(client))


class RedisSink:
    """Applies cache actions to one Redis (implements ``worker.interfaces.Sink``).

    ``stale_refusals`` counts refreshes the script refused because Redis held a newer version
    (replays after a restart); the run loop reports it.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._target = describe(client)
        self._script_loaded = False
        self.stale_refusals = 0

    def apply(self, actions: Sequence[CacheAction]) -> None:
        if not actions:
            return
        given = actions
        if len(actions) > 1 and len({action.key for action in actions}) == len(actions):
            # One action per key (the run loop coalesces), so order between keys is free:
            # evicts first, then every refresh together, in as few script calls as possible.
            actions = sorted(actions, key=_is_refresh)
        commands, spans, refreshes = _commands(actions)
        if refreshes and not self._script_loaded:
            self._load_script()
        results = self._execute(commands)
        if refreshes and any(type(result) is NoScriptError for result in results):
            # The script cache is empty after a restart, a failover or SCRIPT FLUSH. Every
            # command is idempotent, so the whole batch runs again once the script is back.
            log.warning("redis_script_missing", redis=self._target, commands=len(commands))
            self._script_loaded = False
            self._load_script()
            results = self._execute(commands)
        flat, refused_calls = _per_action(spans, results)
        # A call refused as a whole (an ACL user without access to one of its keys, say) says
        # nothing about the other keys in it: those refreshes go again one key per call, so the
        # refusal lands on the keys it is about and the rest apply.
        if refused_calls:
            again, again_spans, _ = _commands([actions[i] for i in refused_calls], group=1)
            alone, _ = _per_action(again_spans, self._execute(again))
            for index, result in zip(refused_calls, alone, strict=True):
                flat[index] = result
        self._check(actions, flat, given)

    def _load_script(self) -> None:
        try:
            sha = self._client.script_load(REFRESH_BATCH_SCRIPT)
        except RedisError as exc:
            self._raise(exc, "loading the refresh script")
        if sha != REFRESH_BATCH_SHA:
            # Would mean the server hashes scripts differently; EVALSHA with our SHA would
            # fail forever, so stop here with a clear message.
            raise SinkError(f"redis {self._target} returned SHA {sha} for the refresh script")
        self._script_loaded = True
        log.info("redis_script_loaded", redis=self._target, sha=sha)

    def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pool = self._client.connection_pool
        try:
            # Typed loosely: the driver's connection methods carry no annotations.
            conn: Any = pool.get_connection()
        except RedisError as exc:
            self._raise(exc, f"applying {len(commands)} cache actions")
        try:
            # Like the driver's pipeline: on a connection error the connection is dropped and,
            # if its retry policy allows, the whole batch is sent again (it is idempotent).
            results: list[Any] = conn.retry.call_with_retry(
                lambda: _round_trip(conn, commands), lambda _error: conn.disconnect()
            )
            return results
        except RedisError as exc:
            self._raise(exc, f"applying {len(commands)} cache actions")
        finally:
            pool.release(conn)

    def _check(
        self, actions: Sequence[CacheAction], results: list[Any], given: Sequence[CacheAction]
    ) -> None:
        stale = 0
        failed: list[tuple[CacheAction, Exception]] = []
        for action, result in zip(actions, results, strict=True):
            if result == 0:
                if type(action) is Refresh:
                    stale += 1
            elif isinstance(result, Exception):
                failed.append((action, result))
        self.stale_refusals += stale
        if not failed:
            return
        if given is not actions:
            # Report in the caller's order, whatever order the actions were sent in.
            order = {id(action): index for index, action in enumerate(given)}
            failed.sort(key=lambda pair: order[id(pair[0])])
        first_action, first = failed[0]
        message = (
            f"redis {self._target} refused {len(failed)} of {len(actions)} cache actions; "
            f"first: key {first_action.key!r}: {_error_text(self._client, first)}"
        )
        if any(_is_unavailable(exc) for _, exc in failed):
            # "Not now" replies are about the server, not a key: every command is idempotent,
            # so the whole batch goes again rather than dead-lettering what would heal.
            raise SinkUnavailable(message) from first
        refused = [(action, _error_text(self._client, exc)) for action, exc in failed]
        raise PartialApplyError(message, refused) from first

    def _raise(self, exc: RedisError, doing: str) -> NoReturn:
        message = f"redis {self._target}: {doing} failed: {_error_text(self._client, exc)}"
        if _is_unavailable(exc):
            raise SinkUnavailable(message) from exc
        raise SinkError(message) from exc

    def checks(self) -> list[CheckResult]:
        return [self._check_reachable(), self._check_eviction_policy()]

    def _check_reachable(self) -> CheckResult:
        name = "redis reachable"
        try:
            info = self._client.info("server")
        except Exception as exc:  # a check reports every failure instead of raising
            return CheckResult(name, False, f"{self._target}: {_error_text(self._client, exc)}")
        return CheckResult(name, True, f"{self._target} (redis {info.get('redis_version', '?')})")

    def _check_eviction_policy(self) -> CheckResult:
        name = "redis eviction policy"
        try:
            config = self._client.config_get("maxmemory*")
        except ResponseError:
            # Managed Redis services often rename or forbid CONFIG (unknown command, NOPERM);
            # the policy is then theirs to set.
            return CheckResult(name, True, "unknown (CONFIG GET is not allowed)")
        except Exception as exc:  # a check reports every failure instead of raising
            return CheckResult(name, False, f"{self._target}: {_error_text(self._client, exc)}")
        values = {_text(k): _text(v) for k, v in dict(config).items()}
        policy = values.get("maxmemory-policy")
        if not policy:
            return CheckResult(name, True, "unknown")
        maxmemory = values.get("maxmemory", "?")
        detail = f"maxmemory-policy {policy}, maxmemory {maxmemory}"
        if policy.startswith(("volatile-", "allkeys-")) or maxmemory == "0":
            # With no memory limit the policy never comes into play.
            return CheckResult(name, True, detail)
        # noeviction: once maxmemory is reached Redis refuses writes and the worker stops with
        # a sink error instead of old entries making room.
        return CheckResult(
            name, True, detail + ": writes fail once maxmemory is reached", warning=True
        )

    def close(self) -> None:
        self._client.close()


def _is_refresh(action: CacheAction) -> bool:
    return type(action) is Refresh


def _packable(value: str | tuple[tuple[str, str], ...]) -> bool:
    """Whether hiredis can pack the payload (text with a lone surrogate cannot be UTF-8)."""
    texts = (value,) if isinstance(value, str) else chain.from_iterable(value)
    for text in texts:
        if not isinstance(text, str):
            return False
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                return False
    return True


def _commands(
    actions: Sequence[CacheAction], group: int = _REFRESH_GROUP
) -> tuple[list[tuple[Any, ...]], list[int], int]:
    """The wire commands for the actions, which actions each covers, and the refreshes.

    Consecutive refreshes share one batch-script call and consecutive evicts one multi-key DEL,
    up to ``group`` actions each. A refresh whose payload cannot be packed gets a call of its
    own, so that the packing error (reported per command) fails that action alone. A span is
    the number of refreshes a script call covers, or minus the number of evicts a DEL covers.
    """
    commands: list[tuple[Any, ...]] = []
    spans: list[int] = []
    refreshes = 0
    keys: list[str] = []
    args: list[Any] = []
    evicted: list[str] = []

    def close_refreshes() -> None:
        if keys:
            commands.append((_EVALSHA, REFRESH_BATCH_SHA, len(keys), *keys, *args))
            spans.append(len(keys) // 3)
            keys.clear()
            args.clear()

    def close_evicts() -> None:
        if evicted:
            commands.append((_DEL, *evicted))
            spans.append(-(len(evicted) // 3))
            evicted.clear()

    for action in actions:
        key = action.key
        version, lease = companion_keys(key)
        if type(action) is Refresh:
            close_evicts()
            refreshes += 1
            value = action.value
            if isinstance(value, str):
                payload: tuple[Any, ...] = (action.version, action.ttl_ms, _JSON, 1, value)
            else:
                fields = tuple(chain.from_iterable(value))
                payload = (action.version, action.ttl_ms, _HASH, len(fields), *fields)
            if not _packable(value):
                close_refreshes()
                commands.append((_EVALSHA, REFRESH_BATCH_SHA, 3, key, version, lease, *payload))
                spans.append(1)
                continue
            keys += (key, version, lease)
            args += payload
            if len(keys) >= 3 * group:
                close_refreshes()
        else:
            close_refreshes()
            evicted += (key, version, lease)
            if len(evicted) >= 3 * group:
                close_evicts()
    close_refreshes()
    close_evicts()
    return commands, spans, refreshes


def _per_action(spans: list[int], results: list[Any]) -> tuple[list[Any], list[int]]:
    """One result per action (a script call's array spread out, a DEL's count or one error
    repeated), and the indices of the actions whose multi-key call was refused as a whole."""
    flat: list[Any] = []
    refused_calls: list[int] = []
    for span, result in zip(spans, results, strict=True):
        count = -span if span < 0 else span
        if isinstance(result, Exception):
            if count > 1 and not _is_unavailable(result):
                refused_calls.extend(range(len(flat), len(flat) + count))
            flat.extend([result] * count)
        elif span < 0 and type(result) is int:
            # How many of the keys existed; an evict has no result of its own beyond success.
            flat.extend([_EVICTED] * count)
        elif span > 0 and isinstance(result, list) and len(result) == span:
            flat.extend(result)
        else:
            error = ResponseError(f"unexpected reply to a cache write: {result!r:.100}")
            flat.extend([error] * count)
    return flat, refused_calls


def _round_trip(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send every command, then read every reply: one pipelined round trip on ``conn``.

    This is what ``pipeline(transaction=False).execute(raise_on_error=False)`` does, without the
    driver's per-command bookkeeping, which cost more than packing and parsing themselves (about
    2.5x the time per evict). The batch is written in slices so that Redis starts executing the
    first commands while later ones are still being packed; no reply is read before the last
    slice is sent. Error replies come back in place as exceptions.
    """
    count = len(commands)
    unsent: dict[int, Exception] = {}
    try:
        for start in range(0, count, _SLICE):
            chunk = commands[start : start + _SLICE]
            try:
                packed = b"".join(map(_pack, chunk))
            except (TypeError, ValueError):
                packed = _pack_each(chunk, start, unsent)
            if packed:
                conn.send_packed_command([packed], check_health=start == 0)
        read = conn.read_response
        results: list[Any] = []
        append = results.append
        for index in range(count):
            if unsent and index in unsent:
                # Never sent, so no reply to read: the failure takes the reply's place.
                append(unsent[index])
                continue
            try:
                append(read())
            except ResponseError as exc:
                append(exc)
        return results
    except BaseException:
        # Replies left unread would be handed to the next user of this pooled connection.
        conn.disconnect()
        raise


def _pack_each(chunk: list[tuple[Any, ...]], start: int, unsent: dict[int, Exception]) -> bytes:
    """Pack a slice one command at a time, recording those hiredis cannot pack by batch index.

    A value that is not text or holds a lone surrogate fails that action alone, like a refusal
    by the server.
    """
    parts: list[bytes] = []
    for offset, command in enumerate(chunk):
        try:
            parts.append(_pack(command))
        except (TypeError, ValueError) as exc:
            unsent[start + offset] = DataError(
                f"key {_key_of(command)!r}: cannot encode the command: {exc}"
            )
    return b"".join(parts)


def _key_of(command: tuple[Any, ...]) -> str:
    return str(command[3] if command[0] is _EVALSHA else command[1])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCheckpointStore:
    """Keeps one source's checkpoint in a Redis key (implements ``CheckpointStore``).

    The key has no TTL. The value is the JSON of ``worker.checkpoint``.
    """

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self.key = key
        self._target = describe(client)

    def load(self) -> Position | None:
        checkpoint = self.load_checkpoint()
        return checkpoint.position if checkpoint is not None else None

    def load_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint with its timestamp, or ``None`` when the key does not exist."""
        try:
            data = self._client.get(self.key)
        except RedisError as exc:
            self._raise(exc, "reading")
        if data is None:
            return None
        return decode_checkpoint(data, f"key {self.key!r} on redis {self._target}")

    def save(self, position: Position) -> None:
        try:
            self._client.set(self.key, encode_checkpoint(position))
        except RedisError as exc:
            self._raise(exc, "writing")
        log.debug("checkpoint_saved", store="redis", key=self.key, version=position.version)

    def delete(self) -> None:
        """Forget the checkpoint (``cache-worker reset-checkpoint``); no key is fine."""
        try:
            self._client.delete(self.key)
        except RedisError as exc:
            self._raise(exc, "deleting")
        log.info("checkpoint_deleted", store="redis", key=self.key)

    def _raise(self, exc: RedisError, doing: str) -> NoReturn:
        message = (
            f"{doing} checkpoint key {self.key!r} on redis {self._target} failed: "
            f"{_error_text(self._client, exc)}"
        )
        if _is_unavailable(exc):
            raise SinkUnavailable(message) from exc
        raise CheckpointError(message) from exc


def checkpoint_key(name: str) -> str:
    """The conventional checkpoint key of the source named ``name``."""
    return f"cache-worker:checkpoint:{name}"


# A bound on the stream's memory: Redis trims the oldest entries past roughly this many.
DEAD_LETTER_MAXLEN = 100_000


class RedisDeadLetterStore:
    """Dead letters in one Redis stream (implements ``worker.interfaces.DeadLetterStore``).

    ``XADD key MAXLEN ~ 100000 * field value ...``: ids are the stream's, entries are the flat
    text fields of ``DeadLetter``. Errors are redacted with the client's password once more
    before they are stored.
    """

    def __init__(self, client: redis.Redis, key: str, maxlen: int = DEAD_LETTER_MAXLEN) -> None:
        self._client = client
        self.key = key
        self._maxlen = maxlen
        self._target = describe(client)

    def add(self, entries: Sequence[DeadLetter]) -> list[str]:
        if not entries:
            return []
        secrets = _secrets(self._client)
        try:
            pipe = self._client.pipeline(transaction=False)
            for entry in entries:
                fields: dict[Any, Any] = entry.fields()
                fields["error"] = redact(fields["error"], secrets)
                pipe.xadd(self.key, fields, maxlen=self._maxlen, approximate=True)
            replies = pipe.execute()
        except RedisError as exc:
            self._raise(exc, f"adding {len(entries)} entries to")
        return [_text(reply) for reply in replies]

    def delete(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        try:
            return int(self._client.xdel(self.key, *ids))
        except RedisError as exc:
            self._raise(exc, "deleting entries from")

    def purge(self) -> int:
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.xlen(self.key)
            pipe.delete(self.key)
            length, _deleted = pipe.execute()
        except RedisError as exc:
            self._raise(exc, "purging")
        return int(length)

    def list(self, count: int, start: str = "-") -> list[DeadLetter]:
        try:
            # Typed loosely: the driver's stubs allow None and undecoded mixes.
            rows: Any = self._client.xrange(self.key, min=start, max="+", count=count)
        except RedisError as exc:
            self._raise(exc, "reading")
        return [
            DeadLetter.from_fields(
                _text(entry_id), {_text(k): _text(v) for k, v in dict(data).items()}
            )
            for entry_id, data in rows
        ]

    def _raise(self, exc: RedisError, doing: str) -> NoReturn:
        message = (
            f"{doing} dead-letter stream {self.key!r} on redis {self._target} failed: "
            f"{_error_text(self._client, exc)}"
        )
        if _is_unavailable(exc):
            raise SinkUnavailable(message) from exc
        raise SinkError(message) from exc
