-- Forget closed auctions whose retention has run out: take them out of every index (their
-- keys expired by themselves, see close.lua). Idempotent, so any server may run it, and
-- several at once do no harm. An id opened again after its keys expired is no longer in
-- auctions:closed (open.lua takes it out), so the new auction stays listed.
-- KEYS: 1 auctions:closed, 2 auctions:all
-- ARGV: 1 most auctions to forget in this call (bounds how long Redis is busy with it)
-- Returns the number forgotten; fewer than ARGV[1] means none is left due.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[1])
if #due > 0 then
  redis.call('ZREM', KEYS[2], unpack(due))
  redis.call('ZREM', KEYS[1], unpack(due))
end
return #due
