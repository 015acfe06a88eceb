-- Judge a batch of bids on one auction, in order (fenced: the caller holds its lease).
-- KEYS: 1 state hash, 2 lock, 3 bids stream, 4 outcomes hash
-- ARGV: 1 lock value, 2 token, then per bid: bid_id, bidder, amount
-- Returns one string per bid:
--   'new|<outcome>'  judged now;   'dup|<outcome>'  bid_id seen before (first outcome);
--   'x|<reason>'     refused without touching history (unknown / closed / past deadline).
-- <outcome> = status|seq|reason|next_min|amount|bidder  (bidder last: it never holds '|')
-- The deadline is judged by Redis TIME, the one clock every server shares.
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
local high_bidder, high_bid_id, high_s
for i = 3, #ARGV, 3 do
  local bid_id, bidder, amount_s = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local amount = tonumber(amount_s)
  local prior = redis.call('HGET', KEYS[4], bid_id)
  if prior then
    out[#out + 1] = 'dup|' .. prior
  elseif state ~= 'open' then
    out[#out + 1] = 'x|auction_closed'
  elseif now >= deadline then
    out[#out + 1] = 'x|deadline_passed'
  else
    local next_min = high and (high + inc) or start
    local reason = ''
    if high and amount == high then reason = 'equal_to_high'
    elseif (high and amount < high) or (not high and amount < start) then reason = 'too_low'
    elseif amount < next_min then reason = 'below_min_increment'
    end
    seq = seq + 1
    local status = 'rejected'
    if reason == '' then
      status = 'accepted'
      high, high_s, high_bidder, high_bid_id = amount, amount_s, bidder, bid_id
      count = count + 1
      next_min = amount + inc
      redis.call('XADD', KEYS[3], '*', 'bid_id', bid_id, 'bidder', bidder, 'amount', amount_s,
        'seq', fmt(seq), 'fence', ARGV[2], 'at_ms', fmt(now))
    end
    local outcome = status .. '|' .. fmt(seq) .. '|' .. reason .. '|' .. fmt(next_min) .. '|' ..
      amount_s .. '|' .. bidder
    redis.call('HSET', KEYS[4], bid_id, outcome)
    out[#out + 1] = 'new|' .. outcome
  end
end
if seq ~= tonumber(f[6]) then
  redis.call('HSET', KEYS[1], 'seq', fmt(seq), 'fence', ARGV[2], 'bid_count', fmt(count))
  if high_s then
    redis.call('HSET', KEYS[1], 'high_amount', high_s, 'high_bidder', high_bidder,
      'high_bid_id', high_bid_id)
  end
end
return out
