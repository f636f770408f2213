"""The Lua scripts of the Redis store: each a single atomic step on one login's keys.

The KEYS are one login's ``sidecar:{NAME}:pair``, ``sidecar:{NAME}:lock``
and events channel ``sidecar:{NAME}:events``: one hash slot, so a Redis
Cluster can run them.  Numbers cross as strings made with
``string.format('%d')`` (Lua 5.1's ``tostring`` writes large ones as 1e+12).
"""

from __future__ import annotations

# Write the pair only if its generation is still the one that was read (ARGV[1];
# "" for "no pair"), keeping the client key field.  A new record starts at ARGV[2] (a time-based number, so
# a Redis that came back empty never repeats an old generation); then +1.
# ARGV[3..] are field, value pairs.  Returns the new generation, or -1.
COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'generation')
if ARGV[1] == '' then
  if current then return -1 end
elseif current ~= ARGV[1] then
  return -1
end
local new
if current then new = string.format('%d', tonumber(current) + 1) else new = ARGV[2] end
local client_key = redis.call('HGET', KEYS[1], 'clientKey')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'generation', new, unpack(ARGV, 3))
if client_key then redis.call('HSET', KEYS[1], 'clientKey', client_key) end
redis.call('PUBLISH', KEYS[2], new)
return new
"""

# Just before a refresh token is spent: is this sidecar still the lock's holder
# (ARGV[1]; "" for a write outside the lock) and the pair still at the
# generation it read (ARGV[2]; "" for "no record")?  KEYS[1] the lock,
# KEYS[2] the pair.  Returns 1, 0 (the lock was taken over) or -1 (written since).
FENCE = """
if ARGV[1] ~= '' then
  local value = redis.call('GET', KEYS[1])
  if not value or string.sub(value, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ' ' then return 0 end
end
local current = redis.call('HGET', KEYS[2], 'generation')
if ARGV[2] == '' then
  if current then return -1 end
elseif current ~= ARGV[2] then
  return -1
end
return 1
"""

# Forget the pair (the client key stays: it belongs to the login's name); announce it.
# Returns 1 if there was a pair.
CLEAR = """
local had = redis.call('HEXISTS', KEYS[1], 'generation')
local client_key = redis.call('HGET', KEYS[1], 'clientKey')
redis.call('DEL', KEYS[1])
if client_key then redis.call('HSET', KEYS[1], 'clientKey', client_key) end
redis.call('PUBLISH', KEYS[2], 'cleared')
return had
"""

# The client key (SPEC §9), made from ARGV[1] if there is none yet; KEYS[1] the pair.
ENSURE_CLIENT_KEY = """
redis.call('HSETNX', KEYS[1], 'clientKey', ARGV[1])
return redis.call('HGET', KEYS[1], 'clientKey')
"""

# Take the lock: ARGV[1] "HOLDER DEADLINE_MS", ARGV[2] the TTL in ms.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# Renew only if still the holder (ARGV[1]): new value ARGV[2], TTL ARGV[3] ms.
RENEW = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# Release only if still the holder; tell the waiters.
RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], 'unlocked')
  return 1
end
return 0
"""
