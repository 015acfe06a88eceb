-- Judge a batch of bids on one auction, in order (fenced: the caller holds its lease).
-- KEYS: 1 state hash, 2 lock, 3 bids stream, 4 outcomes hash
-- ARGV: 1 lock value, 2 token, then per bid: bid_id, bidder, amount
-- Returns one string per bid:
--   'new|<outcome>'  judged now;   'dup|<outcome>'  bid_id seen before (first outcome);
--   'x|<reason>'     refused without touching history (unknown / closed / past deadline).
-- <outcome> = status|seq|reason|next_min|amount|bidder  (bidder last: it never holds '|')
-- The deadline is judged by Redis TIME, the one clock every server shares.
-- Cost: one HMGET for every bid_id's prior outcome, one XADD per accepted bid, and one HSET
-- for all new outcomes, whatever the batch size (a redis.call costs about a microsecond).
local out = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 3, #ARGV, 3 do out[#out + 1] = 'x|unknown_auction' end
  return out
end
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms', 'starting_price',
  'min_increment', 'high_amount', 'seq', 'bid_count')
local state, deadline = f[1], tonumber(f[2])
local start, inc = tonumber(f[3]), tonumber(f[4])
local high = f[5] and tonumber(f[5]) or nil
local seq, count = tonumber(f[6]), tonumber(f[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = {}
for i = 3, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
local prior = redis.call('HMGET', KEYS[4], unpack(ids))
-- Outcomes judged in this batch, by bid_id, so a bid_id repeated within it is a duplicate.
local judged = {}
local writes = {}
local now_s, fence = fmt(now), ARGV[2]
local high_bidder, high_bid_id, high_s
for i = 3, #ARGV, 3 do
  local bid_id, bidder, amount_s = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local first = prior[i / 3] or judged[bid_id]
  if first then
    out[#out + 1] = 'dup|' .. first
  elseif state ~= 'open' then
    out[#out + 1] = 'x|auction_closed'
  elseif now >= deadline then
    out[#out + 1] = 'x|deadline_passed'
  else
    local amount = tonumber(amount_s)
    local next_min = high and (high + inc) or start
    local reason = ''
    if high and amount == high then reason = 'equal_to_high'
    elseif (high and amount < high) or (not high and amount < start) then reason = 'too_low'
    elseif amount < next_min then reason = 'below_min_increment'
    end
    seq = seq + 1
    local seq_s = fmt(seq)
    local status = 'rejected'
    if reason == '' then
      status = 'accepted'
      high, high_s, high_bidder, high_bid_id = amount, amount_s, bidder, bid_id
      count = count + 1
      next_min = amount + inc
      redis.call('XADD', KEYS[3], '*', 'bid_id', bid_id, 'bidder', bidder, 'amount', amount_s,
        'seq', seq_s, 'fence', fence, 'at_ms', now_s)
    end
    local outcome = status .. '|' .. seq_s .. '|' .. reason .. '|' .. fmt(next_min) .. '|' ..
      amount_s .. '|' .. bidder
    judged[bid_id] = outcome
    writes[#writes + 1] = bid_id
    writes[#writes + 1] = outcome
    out[#out + 1] = 'new|' .. outcome
  end
end
if #writes > 0 then
  redis.call('HSET', KEYS[4], unpack(writes))
  redis.call('HSET', KEYS[1], 'seq', fmt(seq), 'fence', fence, 'bid_count', fmt(count))
  if high_s then
    redis.call('HSET', KEYS[1], 'high_amount', high_s, 'high_bidder', high_bidder,
      'high_bid_id', high_bid_id)
  end
end
return out
