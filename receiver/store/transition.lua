-- The transition script (see store/tasks.py and ARCHITECTURE.md): one atomic, idempotent,
-- monotonic transition of a task. store.TRANSITION is this file after a header that Python
-- writes from core.constants.TASK_FIELDS: N (the field count), NAMES (the snapshot's key
-- texts), DEFAULTS, CORE and EXTRA (the field indexes kept in `v` and in `x`), CREATED_AT,
-- UPDATED_AT, IMAGE_URL and IMAGE_URLS (field indexes), INFERRED (an inferred failure's
-- rank); and from TransitionKeys: STATUS_INDEX, ARCHIVE and CLAIM (positions in KEYS).
--
-- KEYS (store.tasks.TransitionKeys, in this order):
--   1 task, 2 history, 3 stream, 4 last_event_id, 5 task_index, 6 usage, 7 quota,
--   8 index_not_start, 9 index_submitted, 10 index_in_progress, 11 index_modal,
--   12 index_success, 13 index_failure, 14 index_cancel (one index per status:
--   STATUS_INDEX in the header maps a status to its key's position), 15 archive (the
--   tenant's tasks whose images are to be archived),
--   16 claim (only on a single Redis, for an update that may bind a provider task id)
-- ARGV (store.TransitionArgs, in this order):
--   1 op, 2 rank, 3 status, 4 kind, 5 ptid, 6 raw, 7 now, 8 job, 9 channel,
--   10 stream_maxlen, 11 history_maxlen, 12 ttl, 13 patch, 14 ms, 15 tenant, 16 provider,
--   17 admission, 18 claimed, 19 bucket, 20 max_tasks, 21 max_bytes, 22 quota_ttl,
--   23 claim_ttl, 24 archive ('1': a SUCCESS with images queues them for the archive),
--   25 budget (on create: the most the tenant may commit in the task's unit; '': none),
--   26... control (the submitter's fields, name and value, on create)
-- op: create, apply, submit (apply, and charge the ledger), or archive (the worker stored
-- the task's images: a SUCCESS gains its archived URLs, the only change after a final).
local op, new_rank, status, kind, ptid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

-- r: rank, s: status, p: provider task id, v: the CORE field values (JSON texts) joined by
-- NUL, a byte JSON text never holds, and x: the EXTRA ones (fields added later, kept apart so
-- that a process of an earlier version, during a rolling upgrade, reads and writes `v` as it
-- always did; a task without `x` has their defaults). The submitter's tasks also have a: the
-- provider account,
-- b: billing (ledger counter prefix NUL amount NUL refunds 0|1), c: reserved ('r': created,
-- its price committed, not yet charged), charged ('1'), charged and refunded ('2'), or ended
-- without a charge ('0': its reservation given back), q: the request to send. The ledger's
-- '@committed|<unit>' is what the tenant's budget (TENANT_BUDGETS) counts: the net charged,
-- plus the tasks reserved.
local cur = redis.call('HMGET', KEYS[1], 'r', 's', 'p', 'v', 'c', 'a', 'x')
local exists = cur[1] ~= false
-- A provider task id binds a task only with its claim (see claims.py): held by the caller
-- (ARGV[18]), or taken here when its key is given (KEYS[CLAIM], a single Redis), else `unclaimed`
-- for the caller to take it (a cluster: the claim is in a slot of its own). A task the
-- submitter sent needs none: its callback token went to the provider alone.
local function claim()
  if not KEYS[CLAIM] then return {'unclaimed'} end
  local member = ARGV[15] .. '/' .. ARGV[8]
  local held = redis.call('SET', KEYS[CLAIM], member, 'NX', 'GET', 'EX', ARGV[23])
  if held and held ~= member then return {'claimed'} end
end
local must_claim = ptid ~= '' and ARGV[18] ~= '1' and not cur[3] and not cur[6]
local charged = cur[5]
local function parse_billing(b)
  local e1 = string.find(b, '\0', 1, true)
  local e2 = string.find(b, '\0', e1 + 1, true)
  -- the amount stays a string: a Lua number would print 1e+17 for HINCRBY
  return string.sub(b, 1, e1 - 1), string.sub(b, e1 + 1, e2 - 1), string.sub(b, e2 + 1) == '1'
end
local function billing()
  local b = redis.call('HGET', KEYS[1], 'b')
  if not b then return nil end
  return parse_billing(b)
end
local function commit(field, amount, sign)  -- the budget's count, in the field's unit
  redis.call('HINCRBY', KEYS[6], '@committed|' .. string.match(field, '([^|]*)$'),
    sign < 0 and '-' .. amount or amount)
end
local function uncharged(c) return not c or c == 'r' or c == '0' end
local function failed(s) return s == 'FAILURE' or s == 'CANCEL' end
local vals = {}
if exists then
  if op == 'create' then return {'exists'} end
  if ptid ~= '' and cur[3] and cur[3] ~= ptid then return {'conflict'} end
  -- The provider has the submitter's task (it answered the submit, or a callback or poll
  -- names its id): charge it once, whatever came before (a callback may have beaten the
  -- answer, even with a failure, which is refunded at once).
  if uncharged(charged) and cur[6] and (op == 'submit' or ptid ~= '') then
    local field, amount, refunds = billing()
    if field then
      redis.call('HINCRBY', KEYS[6], field .. '|tasks', 1)
      redis.call('HINCRBY', KEYS[6], field .. '|spent', amount)
      if charged ~= 'r' then commit(field, amount, 1) end  -- (a reservation counts it)
      charged = '1'
      if refunds and failed(cur[2]) then
        redis.call('HINCRBY', KEYS[6], field .. '|refunded', amount)
        commit(field, amount, -1)
        charged = '2'
      end
      redis.call('HSET', KEYS[1], 'c', charged)
    end
  end
  local function split(text, at)  -- the k-th value of `text` is field at[k]
    local pos = 1
    for k = 1, #at - 1 do  -- plain find (memchr): pattern matching costs more
      local e = string.find(text, '\0', pos, true)
      vals[at[k]] = string.sub(text, pos, e - 1); pos = e + 1
    end
    vals[at[#at]] = string.sub(text, pos)
  end
  split(cur[4], CORE)
  if cur[7] then split(cur[7], EXTRA)
  else for _, i in ipairs(EXTRA) do vals[i] = DEFAULTS[i] or 'null' end end
  local cur_rank = tonumber(cur[1])
  if op == 'archive' then
    if cur[2] ~= 'SUCCESS' then return {'stale', vals[N]} end
  elseif new_rank == cur_rank then return {'duplicate', vals[N]}
  elseif new_rank < cur_rank then return {'stale', vals[N]} end
  if must_claim then
    local refused = claim()
    if refused then return refused end
  end
else  -- tenant and provider are from a verified token: safe inside quotes
  if op == 'archive' then return {'stale'} end  -- the task expired meanwhile
  if must_claim then
    local refused = claim()
    if refused then return refused end
  end
  for i = 1, N do vals[i] = DEFAULTS[i] or 'null' end
  vals[1], vals[2], vals[3] = '"' .. ARGV[8] .. '"', '"' .. ARGV[15] .. '"', '"' .. ARGV[16] .. '"'
  vals[CREATED_AT] = ARGV[7]
end
local before = op == 'archive' and table.concat(vals, '\0')
local patch, pos = ARGV[13], 1  -- index NUL json NUL index NUL json ...
while pos <= #patch do
  local e = string.find(patch, '\0', pos, true)
  local f = string.find(patch, '\0', e + 1, true) or #patch + 1
  vals[tonumber(string.sub(patch, pos, e - 1))] = string.sub(patch, e + 1, f - 1)
  pos = f + 1
end
-- the same images archived again (two workers, a retry) is one transition
if before and table.concat(vals, '\0') == before then return {'duplicate', vals[N]} end
local version = exists and tonumber(vals[N]) + 1 or 1
vals[N] = tostring(version)
vals[UPDATED_AT] = ARGV[7]

-- Event ids are ours (the caller's clock in ms, then a sequence) so the JSON can carry its
-- own id; the same id goes into the tenant stream and the task history.
local ms, seq = tonumber(ARGV[14]), 0
local last = redis.call('GET', KEYS[4])
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  if ms <= tonumber(lms) then ms, seq = tonumber(lms), tonumber(lseq) + 1 end
end
local id = string.format('%d-%d', ms, seq)

local parts = {}
for i = 1, N do parts[2 * i - 1] = NAMES[i]; parts[2 * i] = vals[i] end
local data = table.concat(parts) .. ',"event":"' .. kind .. '","event_id":"' .. id .. '"}'

-- A create's price (its control field b), reserved below; within the tenant's budget
-- (ARGV[25]): what it committed in the unit plus this price, or nothing is written.
local price, price_field, price_amount
if op == 'create' then
  for i = 26, #ARGV, 2 do
    if ARGV[i] == 'b' then price = ARGV[i + 1] end
  end
  if price then price_field, price_amount = parse_billing(price) end
end
if price and ARGV[25] ~= '' then
  local field, amount = price_field, price_amount
  local unit = string.match(field, '([^|]*)$')
  local committed = tonumber(redis.call('HGET', KEYS[6], '@committed|' .. unit)) or 0
  if committed + tonumber(amount) > tonumber(ARGV[25]) then
    return {'budget', tostring(committed), unit}
  end
end

-- The tenant's quotas: tasks created and bytes written in the last TASK_TTL, counted by time
-- bucket (t<n>, b<n>) and as totals (T, B) over the window as of bucket N: the last 8.
local bucket = tonumber(ARGV[19])
if bucket > 0 then
  local q = redis.call('HMGET', KEYS[7], 'N', 'T', 'B')
  local tasks, bytes, at = tonumber(q[2]) or 0, tonumber(q[3]) or 0, tonumber(q[1])
  if not at or at < bucket then  -- buckets left the window since: off the totals
    for b = (at or bucket) - 7, math.min(at or bucket, bucket - 8) do
      local gone = redis.call('HMGET', KEYS[7], 't' .. b, 'b' .. b)
      tasks = tasks - (tonumber(gone[1]) or 0); bytes = bytes - (tonumber(gone[2]) or 0)
      redis.call('HDEL', KEYS[7], 't' .. b, 'b' .. b)
    end
    redis.call('HSET', KEYS[7], 'N', bucket, 'T', tasks, 'B', bytes)
    redis.call('EXPIRE', KEYS[7], ARGV[22])
  end
  local size = #ARGV[6] + 3 * #data
  for i = 26, #ARGV do size = size + #ARGV[i] end
  local max_tasks, max_bytes = tonumber(ARGV[20]), tonumber(ARGV[21])
  if not exists and max_tasks > 0 and tasks >= max_tasks then return {'quota', 'tasks'} end
  if max_bytes > 0 and bytes + size > max_bytes then return {'quota', 'bytes'} end
  if not exists then
    redis.call('HINCRBY', KEYS[7], 'T', 1)
    redis.call('HINCRBY', KEYS[7], 't' .. bucket, 1)
  end
  redis.call('HINCRBY', KEYS[7], 'B', size)
  redis.call('HINCRBY', KEYS[7], 'b' .. bucket, size)
end

-- The XADDs go first: they are the only writes that could refuse, and a script that fails
-- part way keeps what it already wrote.
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], id, 'event', kind, 'data', data)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[11], id,
  'event', kind, 'data', data, 'raw', ARGV[6])
redis.call('SET', KEYS[4], id)
local function join(at)
  local t = {}
  for k, i in ipairs(at) do t[k] = vals[i] end
  return table.concat(t, '\0')
end
-- `x` (the EXTRA fields) changes only by an archive: other writes leave it as it is (a task
-- without it reads as their defaults).
local stored = join(CORE)
if op == 'archive' then
  redis.call('HSET', KEYS[1], 'r', ARGV[2], 's', status, 'v', stored, 'x', join(EXTRA))
elseif ptid ~= '' then
  redis.call('HSET', KEYS[1], 'r', ARGV[2], 's', status, 'p', ptid, 'v', stored)
else
  redis.call('HSET', KEYS[1], 'r', ARGV[2], 's', status, 'v', stored)
end
if op == 'create' and #ARGV > 25 then  -- the submitter's control fields
  redis.call('HSET', KEYS[1], unpack(ARGV, 26))
end
if price then  -- a priced task reserves its price at once
  commit(price_field, price_amount, 1)
  redis.call('HSET', KEYS[1], 'c', 'r')
end
-- A reserved task that ended without a charge (never sent, refused) gives its price back.
if exists and charged == 'r' and failed(status) then
  local field, amount = billing()
  commit(field, amount, -1)
  redis.call('HSET', KEYS[1], 'c', '0')
end
-- Refund a charged task that fails, where the provider refunds; take the refund back when a
-- provider SUCCESS replaces a failure we inferred.
if exists and ((charged == '1' and failed(status)) or (charged == '2' and status == 'SUCCESS'))
then
  local field, amount, refunds = billing()
  if field and refunds then
    redis.call('HINCRBY', KEYS[6], field .. '|refunded',
      status == 'SUCCESS' and '-' .. amount or amount)
    commit(field, amount, status == 'SUCCESS' and 1 or -1)
    redis.call('HSET', KEYS[1], 'c', status == 'SUCCESS' and '1' or '2')
  end
end
-- Retention runs from creation and again from the end; progress need not refresh it.
if not exists or (new_rank >= INFERRED and op ~= 'archive') then
  redis.call('EXPIRE', KEYS[1], ARGV[12])
  redis.call('EXPIRE', KEYS[2], ARGV[12])
elseif op == 'archive' then  -- a compacted history's stream starts again: it goes with the task
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
-- Indexes: all tasks (KEYS[5]) and one per status (KEYS[STATUS_INDEX[status]]).
if not exists then redis.call('ZADD', KEYS[5], 0, ARGV[8]) end
if cur[2] ~= status then
  if exists then redis.call('ZREM', KEYS[STATUS_INDEX[cur[2]]], ARGV[8]) end
  redis.call('ZADD', KEYS[STATUS_INDEX[status]], 0, ARGV[8])
end
redis.call('PUBLISH', ARGV[9], data)
-- A SUCCESS with images: the archive takes them (the worker; never this path).
if status == 'SUCCESS' and op ~= 'archive' and ARGV[24] == '1'
    and (vals[IMAGE_URL] ~= 'null' or vals[IMAGE_URLS] ~= '[]') then
  redis.call('ZADD', KEYS[ARCHIVE], 'NX', ARGV[14], ARGV[8])
end
-- A final state frees the task's admission slot (the slot holders are pruned by status):
-- wake the account's dispatchers.
if cur[6] and new_rank >= INFERRED and op ~= 'archive' then
  redis.call('PUBLISH', ARGV[17], cur[6])
end
if op == 'create' then return {'stored', version, id, data} end
return {'stored', version, id}
