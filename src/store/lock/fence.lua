-- Fence check, prepended to every script that writes auction state.
-- fence_ok(state hash, lock key, the caller's lock value OWNER#TOKEN, its token[, the
-- auction's fence if already read]): the write
-- may go ahead only if the caller still holds the lock *now*, inside Redis, and its token is
-- not older than the last token that wrote this auction. A holder paused past its lease, or
-- one whose lock vanished in a failover, is refused here.
-- Single-auction scripts follow the convention KEYS[1] = state hash, KEYS[2] = lock key,
-- ARGV[1] = lock value, ARGV[2] = token, and start by checking it (see ledger.rs).
-- Integers only (amounts are capped at 10^15, well inside a double's exact range); '%d'
-- formats through a C long, several times cheaper than '%.0f'.
local function fmt(n) return string.format('%d', n) end
-- The fence rule: a token may write only if it is not older than the auction's fence (the
-- last token that wrote it).
local function token_current(token, fence) return tonumber(token) >= fence end
-- A fresh token: above every token ever handed out (the counter) and every token that ever
-- wrote the auction (its fence), even if the counter was lost, e.g. not yet replicated when
-- a failover happened.
local function token_after(counter, fence) return fmt(math.max(counter, fence) + 1) end
local function fence_ok(state_key, lock_key, value, token, fence)
  if redis.call('GET', lock_key) ~= value then return false end
  fence = fence or tonumber(redis.call('HGET', state_key, 'fence') or '0')
  return token_current(token, fence)
end
-- The next fencing token for an auction (see token_after); its fence may be passed when
-- already read.
local function next_token(state_key, counter_key, fence)
  local counter = tonumber(redis.call('GET', counter_key) or '0')
  fence = fence or tonumber(redis.call('HGET', state_key, 'fence') or '0')
  return token_after(counter, fence)
end
