"""The keys of a campaign in Redis and the Lua scripts that change them.

Owns the layout. Every key of campaign NAME starts with ``asmtp:{NAME}:`` (the braces:
one hash slot, so the scripts may touch several keys on a Redis Cluster too):

========================  ===========================================================
``spec``                  the campaign's identity and Mailer settings (JSON)
``msg``                   hash: message reference -> the prepared message
``j``                     hash: journal key -> ``dot|RUN`` or ``STATUS|RUN|HOST``
``n``                     hash: how many keys are in each last state (``dot``,
                          ``delivered``, ...), kept by :data:`RECORD`
``out``                   stream of results, one entry per journal write (``run``,
                          ``rs``: a JSON array of result rows, see :mod:`.rows`)
``runs``                  the number of the last run
``run:N``                 hash: ``chunks``, ``recipients`` (set once enqueued), ``start``
                          (the stream id its results follow), ``cancel``
``run:N:done``            set of the chunks done; ``run:N:skipped``: hash chunk -> count
``lease:N:I``             the lease of chunk I of run N (its worker's token)
``rate``, ``rate:DOMAIN`` GCRA: the theoretical arrival time, in microseconds
``conn:DOMAIN``           sorted set: connection leases -> expiry (milliseconds)
========================  ===========================================================
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "RECORD", "RELEASE_LEASE", "RENEW", "RENEW_LEASE", "TAKE", "prefix"]


def prefix(campaign: str) -> str:
    """The start of every key of ``campaign``."""
    return "asmtp:{" + campaign + "}:"


#: Record journal states, atomically: KEYS j, n, out; ARGV run, stream length, the
#: batch's results (one JSON array of result rows, or "" when it has none), and its
#: (key, state) pairs as one string, each key and state followed by a newline (a
#: journal key is JSON text and a state names a host: neither holds a newline; one
#: argument costs the client one string to send, not two per record). A state's first
#: field is counted in ``n`` (the key's earlier state uncounted); the results go to the
#: stream as one entry. The keys are read and written a thousand at a time (one HMGET
#: and one HSET each: Lua's stack is bounded), the counts changed once per state: a
#: batch costs Redis a handful of commands, not several per record.
RECORD = """
local counts, latest = {}, {}
local function count(value, by)
  local state = string.match(value, '^[^|]*')
  counts[state] = (counts[state] or 0) + by
end
local function write(records)
  local fields = {}
  for i = 1, #records, 2 do fields[#fields + 1] = records[i] end
  local old = redis.call('HMGET', KEYS[1], unpack(fields))
  for i = 1, #fields do
    local before = latest[fields[i]]
    if before == nil then before = old[i] end
    if before then count(before, -1) end
    local value = records[2 * i]
    latest[fields[i]] = value
    count(value, 1)
  end
  redis.call('HSET', KEYS[1], unpack(records))
end
local batch = {}
for field in string.gmatch(ARGV[4], '([^\\n]*)\\n') do
  batch[#batch + 1] = field
  if #batch == 2000 then
    write(batch)
    batch = {}
  end
end
if #batch > 0 then write(batch) end
for state, by in pairs(counts) do
  if by ~= 0 then redis.call('HINCRBY', KEYS[2], state, by) end
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'run', ARGV[1], 'rs', ARGV[3])
end
return 1
"""

#: GCRA (the generic cell rate algorithm): KEYS the rate's key; ARGV the interval
#: between tokens (microseconds), the burst (tokens), tokens wanted. Returns
#: {tokens granted, microseconds to wait before asking again}. In any window of W
#: microseconds at most burst + W / interval tokens are granted, whoever asks.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local room = math.floor((now + burst * interval - tat) / interval)
if room < 1 then
  return {0, math.ceil(tat + interval - burst * interval - now)}
end
local got = math.min(room, want)
tat = tat + got * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {got, 0}
"""

#: A connection lease: KEYS the domain's sorted set; ARGV cap, ttl (ms), lease id.
#: Leases past their expiry are dropped first (their worker died). 1: held, 0: full.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""

#: Renew connection leases still held: KEYS sorted sets; ARGV ttl (ms), then one lease
#: id per key. A lease already dropped is not added back (XX).
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return 1
"""

#: Renew a chunk's lease if it is still this worker's: KEYS lease; ARGV token, ttl (ms).
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: Give a chunk's lease back if it is still this worker's: KEYS lease; ARGV token.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
