-- Release a lease, only if the caller still owns it (compare-and-delete).
-- KEYS[1] lock key; ARGV[1] lock value (OWNER#TOKEN). Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
