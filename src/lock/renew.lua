-- Renew a lease, only if the caller still owns it (compare-and-expire).
-- KEYS[1] lock key; ARGV[1] lock value (OWNER#TOKEN); ARGV[2] lease in ms. Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
