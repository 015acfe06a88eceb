-- Release leases, each only if the caller still owns it (compare-and-delete).
-- KEYS[i] lock key; ARGV[i] its lock value (OWNER#TOKEN).
-- Returns one 1 (released) or 0 (not ours) per lease.
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    out[i] = redis.call('DEL', KEYS[i])
  else
    out[i] = 0
  end
end
return out
