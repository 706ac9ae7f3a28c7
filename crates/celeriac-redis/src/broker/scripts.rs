//! The Lua scripts that make each broker step atomic on the server.
//!
//! kombu does these steps with `MULTI`/`EXEC` transactions (`WATCH unacked` for restores). A
//! script is atomic too, and it changes the keys a kombu transaction watches, so Python workers
//! doing their own restores see their transaction fail and retry; either way a message is pushed
//! back once. Scripts are sent with `EVAL` (they are small), so a restarted server with an empty
//! script cache needs nothing special.

/// Pop up to `ARGV[1]` messages and record each in `unacked` and `unacked_index` (score
/// `ARGV[2]`), in one step, so a message is never out of both the queue and `unacked`.
///
/// `KEYS[1]` = `unacked`, `KEYS[2]` = `unacked_index`, `KEYS[3..]` = the lists in consumption
/// order (popped from the right, as kombu's `BRPOP`). Returns `{key index (1 = KEYS[3]), item,
/// delivery tag}` per message; the tag is `""` for an item that is not a kombu envelope, which
/// is popped but not recorded (the caller dead-letters it).
///
/// The `unacked` value is `[<item verbatim>, <exchange>, <routing_key>]`, the strings JSON-encoded
/// by cjson (which escapes `/` as `\/`: undone here, to write what Python writes).
pub const FETCH: &str = r#"
local want = tonumber(ARGV[1])
local out = {}
local function enc(s)
  if type(s) ~= 'string' then s = '' end
  local e = string.gsub(cjson.encode(s), '\\/', '/')
  return e
end
for i = 3, #KEYS do
  while #out < want do
    local items = redis.call('RPOP', KEYS[i], want - #out)
    if not items then break end
    for _, item in ipairs(items) do
      local ok, env = pcall(cjson.decode, item)
      local tag = ''
      if ok and type(env) == 'table' and type(env.properties) == 'table'
          and type(env.properties.delivery_tag) == 'string' then
        tag = env.properties.delivery_tag
        local info = env.properties.delivery_info
        local ex, rk = '', ''
        if type(info) == 'table' then ex = info.exchange; rk = info.routing_key end
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ', ' .. enc(ex) .. ', ' .. enc(rk) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
      end
      out[#out + 1] = {i - 2, item, tag}
    end
  end
  if #out >= want then break end
end
return out
"#;

/// Put an unacknowledged message back, once.
///
/// `KEYS[1]` = `unacked`, `KEYS[2]` = `unacked_index`, `KEYS[3..]` = the lists to push to.
/// `ARGV[1]` = delivery tag, `ARGV[2]` = the envelope to push, `ARGV[3]` = `L` (`LPUSH`: the
/// back of the queue, kombu's reject-requeue) or `R` (`RPUSH`: the front, kombu's restore),
/// `ARGV[4]` = the highest index score at which to act (`""`: always), so an expired message
/// whose lease was renewed in the meantime is left alone.
///
/// Returns 1 if this call pushed it back; 0 if it was not (or no longer) in `unacked`: settled,
/// or already put back by someone else (a stray index entry is removed).
pub const REQUEUE: &str = r#"
if ARGV[4] ~= '' then
  local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if not s or tonumber(s) > tonumber(ARGV[4]) then return 0 end
end
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 0 then return 0 end
for i = 3, #KEYS do
  if ARGV[3] == 'L' then redis.call('LPUSH', KEYS[i], ARGV[2]) else redis.call('RPUSH', KEYS[i], ARGV[2]) end
end
return 1
"#;

/// Move a message to the dead letters, once.
///
/// `KEYS[1]` = `unacked`, `KEYS[2]` = `unacked_index`, `KEYS[3]` = the dead-letter list,
/// `KEYS[4]` = its counter, `KEYS[5]` = the per-queue counts. `ARGV[1]` = delivery tag (`""`
/// for a message that was never recorded in `unacked`), `ARGV[2]` = the record as a JSON object
/// without its id, `ARGV[3]` = the queue.
///
/// Returns the dead letter's id, or 0 if the message was no longer in `unacked` (already put
/// back by someone else: it is not dead-lettered twice).
pub const DEAD_LETTER: &str = r#"
if ARGV[1] ~= '' then
  local removed = redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if removed == 0 then return 0 end
end
local id = redis.call('INCR', KEYS[4])
redis.call('LPUSH', KEYS[3], '{"id": ' .. id .. ', ' .. string.sub(ARGV[2], 2))
redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
return id
"#;

/// Take or renew a lease: `KEYS[1]` the lease key, `ARGV[1]` the holder, `ARGV[2]` the lease in
/// milliseconds. The holder renews its own; anyone takes a free one; 1 if held afterwards.
pub const LEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

/// Record beat runs, never moving one back: `KEYS[1]` the schedule's hash, `ARGV` pairs of entry
/// name and scheduled time (Unix ms).
pub const RECORD_RUNS: &str = r#"
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"#;

/// Release a lock taken with `SET key token NX PX ms` if it still holds our token (redis-py's
/// `Lock.release`, which kombu's `Mutex` uses).
pub const RELEASE_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// `EVAL script numkeys keys...`; the caller appends the arguments.
pub fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd
}
