-- Judge a batch of bids on one auction, in order (fenced: the caller holds its lease).
-- KEYS: 1 state hash, 2 lock, 3 bids stream, 4 outcomes hash, 5 auctions:open
-- ARGV: 1 lock value, 2 token, 3 auction id, then per bid: bid_id, bidder, amount,
--       max_amount ('' when the bid carries none)
-- Returns one string per bid:
--   'new|<outcome>'  judged now;   'dup|<outcome>'  bid_id seen before (first outcome);
--   'x|<reason>[|<next_min>]'  refused without touching history or storing anything:
--     unknown / closed / past deadline, and a price too low (too_low, equal_to_high,
--     below_min_increment, with the next_min it must reach). A price refusal needs no
--     stored outcome to be idempotent: the price only rises, so a retry is refused again;
--     not storing it is what keeps a flood of junk bids from filling Redis.
-- <outcome> = status|seq|reason|next_min|amount|bidder|deadline[|p_seq|p_amount|p_bidder]
--   deadline: the new deadline (Redis ms) when this outcome moved it (soft close), else ''.
--   p_*: only for reason 'outbid_by_proxy': the leader's raise that outbid the bid, stored
--   in history as an accepted bid with bid_id '<bid_id>+proxy' ('+' is never in a client's
--   bid_id) and announced before the rejection.
-- Names never hold '|' (the wire refuses it), so the fields split cleanly.
-- Proxy bids: the leader's max (high_max) is kept in the state hash and never leaves the
-- scripts. A bid from another bidder whose max (its amount when it gave none) does not
-- beat the leader's max loses at once, and the leader's price rises to just above it
-- (at most to its own max); one that beats it leads, at no more than one increment above
-- the old max. O(1) per bid: no loop of increments.
-- Soft close: an accepted bid (or proxy raise) less than soft_close_ms before the deadline
-- moves the deadline to its time + soft_close_ms, in the hash and in auctions:open.
-- The deadline is judged by Redis TIME, the one clock every server shares.
-- Cost: one HMGET for every bid_id's prior outcome, one XADD per accepted bid, and one HSET
-- for all new outcomes, whatever the batch size (a redis.call costs about a microsecond).
local out = {}
local per = 4
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 4, #ARGV, per do out[#out + 1] = 'x|unknown_auction' end
  return out
end
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms', 'starting_price',
  'min_increment', 'high_amount', 'seq', 'bid_count', 'high_bidder', 'high_max',
  'soft_close_ms', 'high_bid_id')
local state, deadline = f[1], tonumber(f[2])
local start, inc = tonumber(f[3]), tonumber(f[4])
local high = f[5] and tonumber(f[5]) or nil
local seq, count = tonumber(f[6]), tonumber(f[7])
local high_bidder, high_bid_id = f[8], f[11]
-- Auctions stored before proxy bids existed have no high_max: the leader's max is its bid.
local high_max = f[9] and tonumber(f[9]) or high
local soft = tonumber(f[10] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = {}
for i = 4, #ARGV, per do ids[#ids + 1] = ARGV[i] end
local prior = redis.call('HMGET', KEYS[4], unpack(ids))
-- Outcomes judged in this batch, by bid_id, so a bid_id repeated within it is a duplicate.
local judged = {}
local writes = {}
local now_s, fence = fmt(now), ARGV[2]
local changed, moved = false, false

-- A new high bid: history, and the deadline pushed back when it came late (soft close).
-- Returns the new deadline as a string when this bid moved it, else ''.
local function lead(bid_id, bidder, amount, max)
  seq = seq + 1
  high, high_bidder, high_bid_id, high_max = amount, bidder, bid_id, max
  count = count + 1
  changed = true
  redis.call('XADD', KEYS[3], '*', 'bid_id', bid_id, 'bidder', bidder, 'amount', fmt(amount),
    'seq', fmt(seq), 'fence', fence, 'at_ms', now_s)
  if soft > 0 and deadline - now < soft then
    deadline = now + soft
    moved = true
    return fmt(deadline)
  end
  return ''
end

for i = 4, #ARGV, per do
  local bid_id, bidder, amount_s, max_s = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local first = prior[i / per] or judged[bid_id]
  if first then
    out[#out + 1] = 'dup|' .. first
  elseif state ~= 'open' then
    out[#out + 1] = 'x|auction_closed'
  elseif now >= deadline then
    out[#out + 1] = 'x|deadline_passed'
  else
    local amount = tonumber(amount_s)
    local max = amount
    if max_s ~= '' then max = math.max(amount, tonumber(max_s)) end
    local next_min = high and (high + inc) or start
    local reason, status, price, moved_s, proxy = '', 'rejected', amount, '', ''
    if high and amount == high then reason = 'equal_to_high'
    elseif (high and amount < high) or (not high and amount < start) then reason = 'too_low'
    elseif amount < next_min then reason = 'below_min_increment'
    end
    if reason ~= '' then
      out[#out + 1] = 'x|' .. reason .. '|' .. fmt(next_min)
    else
      if high and bidder ~= high_bidder and max <= high_max then
        -- The leader's max holds (the earlier max wins ties): its price rises to just
        -- above this bid's max, and this bid loses.
        local raise = math.min(high_max, math.max(amount, max) + inc)
        local raise_id = bid_id .. '+proxy'
        local p_deadline = lead(raise_id, high_bidder, raise, high_max)
        proxy = '|' .. fmt(seq) .. '|' .. fmt(raise) .. '|' .. high_bidder
        moved_s = p_deadline
        reason = 'outbid_by_proxy'
        next_min = raise + inc
        seq = seq + 1
      else
        if high and bidder ~= high_bidder then
          -- Beats the leader's max: leads at one increment above it, within its own.
          price = math.max(amount, math.min(max, high_max + inc))
        elseif high then
          -- The leader raising itself keeps the larger of its two maxes.
          max = math.max(max, high_max)
        end
        status = 'accepted'
        moved_s = lead(bid_id, bidder, price, max)
        next_min = price + inc
      end
      local outcome = status .. '|' .. fmt(seq) .. '|' .. reason .. '|' .. fmt(next_min) ..
        '|' .. fmt(price) .. '|' .. bidder .. '|' .. moved_s .. proxy
      judged[bid_id] = outcome
      writes[#writes + 1] = bid_id
      writes[#writes + 1] = outcome
      out[#out + 1] = 'new|' .. outcome
    end
  end
end
if #writes > 0 then
  redis.call('HSET', KEYS[4], unpack(writes))
  redis.call('HSET', KEYS[1], 'seq', fmt(seq), 'fence', fence, 'bid_count', fmt(count))
  if changed then
    redis.call('HSET', KEYS[1], 'high_amount', fmt(high), 'high_bidder', high_bidder,
      'high_bid_id', high_bid_id, 'high_max', fmt(high_max))
  end
  if moved then
    redis.call('HSET', KEYS[1], 'deadline_ms', fmt(deadline))
    redis.call('ZADD', KEYS[5], 'XX', fmt(deadline), ARGV[3])
  end
end
return out
