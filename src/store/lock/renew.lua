-- Renew leases, each only if the caller still owns it (compare-and-expire).
-- KEYS[i] lock key; ARGV[2i-1] its lock value (OWNER#TOKEN), ARGV[2i] lease in ms.
-- Returns one 1 (renewed) or 0 (not ours any more) per lease.
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2 * i - 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
