// Read-through of cache-worker keys with fill leases, for a Node.js web tier.
//
// Implements docs/read-protocol.md, section 5, with the `redis` npm package (node-redis v4):
// render the key like the worker, answer hits from Redis, and on a miss load the row and fill the
// key only while this reader's lease is in place (the worker deletes the lease with every action
// on the key, so a fill that raced with a change is dropped). Not a published package: copy it,
// keep the scripts byte for byte, and give `readThrough` the rule as the worker's TOML declares it.
//
//   npm install redis@4
//   REDIS_URL=redis://127.0.0.1:6379/0 node read-through.mjs

import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient } from 'redis';

// KEYS: key, lease key. ARGV: token, ttl_ms, "json" | "hash", JSON text | field/value pairs.
export const FILL_SCRIPT = `if redis.call('GET', KEYS[2]) ~= ARGV[1] then
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
`;

// KEYS: lease key. ARGV: token. Compare-and-delete: after lease_ms it may be someone else's.
export const RELEASE_SCRIPT = `if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`;

// Key text of a value (section 1). Only the unambiguous types: anything else (floats, Date
// objects) is printed differently by the worker, so it must arrive here already as a string.
function keyText(value) {
  if (typeof value === 'string') return value;
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number' && Number.isSafeInteger(value)) return String(value);
  throw new TypeError(`no portable key text for ${typeof value} ${value}; pass a string`);
}

// Splits "{{x:{id}}}:{name}" into literal text and column placeholders.
function parseTemplate(template) {
  const parts = [];
  let literal = '';
  for (let i = 0; i < template.length; i++) {
    const ch = template[i];
    if ((ch === '{' || ch === '}') && template[i + 1] === ch) {
      literal += ch;
      i++;
    } else if (ch === '{') {
      const end = template.indexOf('}', i);
      parts.push(literal, { column: template.slice(i + 1, end) });
      literal = '';
      i = end;
    } else {
      literal += ch;
    }
  }
  parts.push(literal);
  return parts;
}

/** The key for `values`, or null when a key column is NULL/absent or the key is empty. */
export function renderKey(template, values) {
  let key = '';
  for (const part of parseTemplate(template)) {
    if (typeof part === 'string') {
      key += part;
    } else {
      const value = values[part.column];
      if (value === null || value === undefined) return null;
      key += keyText(value);
    }
  }
  return key || null;
}

function hasHashTag(key) {
  const start = key.indexOf('{');
  if (start < 0) return false;
  const end = key.indexOf('}', start + 1);
  return end > start + 1;
}

/** The lease key beside `key`, in its cluster slot (section 3). */
export function leaseKey(key) {
  const anchor = hasHashTag(key) || key.includes('}') ? key : `{${key}}`;
  return `${anchor}:cw:lease`;
}

// The stored payload of a row (section 2). The loader's values must already be JSON-ready and
// encoded like the worker's: DECIMAL as exact strings, dates as ISO 8601 strings, and so on.
function encode(rule, row) {
  const names = rule.columns ?? Object.keys(row);
  const projected = {};
  for (const name of names) if (name in row) projected[name] = row[name];
  if (rule.format === 'hash') {
    return Object.entries(projected)
      .filter(([, value]) => value !== null && value !== undefined)
      .map(([name, value]) => [
        name,
        typeof value === 'object' ? JSON.stringify(value) : keyText(value),
      ]);
  }
  return JSON.stringify(projected);
}

function decode(rule, payload) {
  return rule.format === 'hash' ? Object.fromEntries(payload) : JSON.parse(payload);
}

function ttlForWrite(rule) {
  return Math.max(1, Math.floor(rule.ttlMs * (1 - rule.jitter * Math.random())));
}

async function read(client, rule, key) {
  if (rule.format === 'hash') {
    const fields = await client.hGetAll(key);
    // Spread: node-redis answers a null-prototype object; a miss returns a plain one.
    return Object.keys(fields).length > 0 ? { ...fields } : null;
  }
  const raw = await client.get(key);
  if (raw === null) return null;
  const value = JSON.parse(raw);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new TypeError(`key ${key} holds JSON that is not an object`);
  }
  return value;
}

function warn(doing, key, error) {
  // Rate-limit this in production: during an outage every request lands here.
  console.warn(JSON.stringify({ event: 'cache_unavailable', doing, key, error: String(error) }));
}

async function release(client, lease, token) {
  try {
    await client.eval(RELEASE_SCRIPT, { keys: [lease], arguments: [token] });
  } catch (error) {
    warn('release', lease, error);
  }
}

/**
 * The cached row for `columns` (an object of key column values), loading it with
 * `load(columns)` on a miss. `rule` is { keys, format, columns, ttlMs, jitter } as in the
 * worker's config. Redis errors fall back to `load`; `load`'s errors propagate.
 */
export async function readThrough(client, rule, load, columns, options = {}) {
  const { leaseMs = 2000, waitMs = 200, pollMs = 10 } = options;
  const template = rule.keys.find((t) =>
    parseTemplate(t).every((part) => typeof part === 'string' || part.column in columns),
  );
  if (template === undefined) {
    throw new Error(`no key template of ${JSON.stringify(rule.keys)} fits the given columns`);
  }
  const loadShaped = async () => {
    const row = await load(columns);
    return row === null || row === undefined ? null : decode(rule, encode(rule, row));
  };
  const key = renderKey(template, columns);
  if (key === null) return loadShaped();

  const lease = leaseKey(key);
  const token = randomBytes(16).toString('hex');
  let leased;
  try {
    const hit = await read(client, rule, key);
    if (hit !== null) return hit;
    leased = (await client.set(lease, token, { NX: true, PX: leaseMs })) === 'OK';
  } catch (error) {
    warn('read', key, error);
    return loadShaped();
  }

  if (!leased) {
    // Another reader is filling: wait briefly for its value, then load without filling.
    const deadline = performance.now() + waitMs;
    while (performance.now() < deadline) {
      await sleep(Math.max(0, Math.min(pollMs, deadline - performance.now())));
      try {
        const hit = await read(client, rule, key);
        if (hit !== null) return hit;
      } catch (error) {
        warn('read', key, error);
        break;
      }
    }
    return loadShaped();
  }

  let payload;
  try {
    const row = await load(columns);
    payload = row === null || row === undefined ? null : encode(rule, row);
  } catch (error) {
    await release(client, lease, token);
    throw error;
  }
  if (payload === null) {
    await release(client, lease, token); // no negative caching
    return null;
  }
  const value = rule.format === 'hash' ? ['hash', ...payload.flat()] : ['json', payload];
  try {
    await client.eval(FILL_SCRIPT, {
      keys: [key, lease],
      arguments: [token, String(ttlForWrite(rule)), ...value],
    });
  } catch (error) {
    warn('fill', key, error);
  }
  return decode(rule, payload);
}

// Example: the worker's rule `user-profile` and a loader standing in for a database query.
if (import.meta.url === `file://${process.argv[1]}`) {
  const rule = {
    keys: ['user:{id}', 'user:email:{email}'],
    format: 'json',
    columns: ['id', 'name', 'email'],
    ttlMs: 3_600_000,
    jitter: 0.1,
  };
  const client = createClient({ url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379/0' });
  client.on('error', (error) => warn('connect', '-', error));
  await client.connect();
  const load = async ({ id }) => ({ id, name: 'Ann', email: 'ann@example.com', status: 'active' });
  console.log(await readThrough(client, rule, load, { id: 42 })); // miss: loads and fills
  console.log(await readThrough(client, rule, load, { id: 42 })); // hit
  await client.quit();
}
