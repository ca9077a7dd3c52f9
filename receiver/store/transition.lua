-- The transition script (see store/tasks.py and ARCHITECTURE.md): one atomic, idempotent,
-- monotonic transition of a task. store.TRANSITION is this file after a header that Python
-- writes from core.constants.TASK_FIELDS: N (the field count), CORE and EXTRA (the field
-- indexes kept in `v` and in `x`), CREATED_AT, UPDATED_AT, IMAGE_URL and IMAGE_URLS (field
-- indexes), INFERRED (an inferred failure's rank); defaults() (every field's default value,
-- a new table), render(v, kind, id) (the snapshot JSON of the values v, with its event),
-- join_core(v) and join_extra(v) (what `v` and `x` store); the functions it uses as locals
-- (call, find, sub, byte, concat); and from TransitionKeys: STATUS_INDEX, ARCHIVE and CLAIM
-- (positions in KEYS).
--
-- Cost: Redis runs this for every callback, and its CPU there slows the whole ingest (the
-- receiver's own CPU per callback rises with it on a 2-core host: bench/ingest). So the
-- per-field work is straight-line code from the header, strings become numbers with `+ 0`
-- (one strtod; tonumber() runs two), and a patch names its fields in one byte each.
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
local op, new_rank, status, kind, ptid = ARGV[1], ARGV[2] + 0, ARGV[3], ARGV[4], ARGV[5]
local task, job, tenant = KEYS[1], ARGV[8], ARGV[15]

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
local cur = call('HMGET', task, 'r', 's', 'p', 'v', 'c', 'a', 'x')
local exists = cur[1] ~= false
-- A provider task id binds a task only with its claim (see claims.py): held by the caller
-- (ARGV[18]), or taken here when its key is given (KEYS[CLAIM], a single Redis), else `unclaimed`
-- for the caller to take it (a cluster: the claim is in a slot of its own). A task the
-- submitter sent needs none: its callback token went to the provider alone.
local function claim()
  if not KEYS[CLAIM] then return {'unclaimed'} end
  local member = tenant .. '/' .. job
  local held = call('SET', KEYS[CLAIM], member, 'NX', 'GET', 'EX', ARGV[23])
  if held and held ~= member then return {'claimed'} end
end
local must_claim = ptid ~= '' and ARGV[18] ~= '1' and not cur[3] and not cur[6]
local charged = cur[5]
local function parse_billing(b)
  local e1 = find(b, '\0', 1, true)
  local e2 = find(b, '\0', e1 + 1, true)
  -- the amount stays a string: a Lua number would print 1e+17 for HINCRBY
  return sub(b, 1, e1 - 1), sub(b, e1 + 1, e2 - 1), sub(b, e2 + 1) == '1'
end
local function billing()
  local b = call('HGET', task, 'b')
  if not b then return nil end
  return parse_billing(b)
end
local function commit(field, amount, sign)  -- the budget's count, in the field's unit
  call('HINCRBY', KEYS[6], '@committed|' .. string.match(field, '([^|]*)$'),
    sign < 0 and '-' .. amount or amount)
end
local function uncharged(c) return not c or c == 'r' or c == '0' end
local function failed(s) return s == 'FAILURE' or s == 'CANCEL' end
local vals = defaults()
if exists then
  if op == 'create' then return {'exists'} end
  if ptid ~= '' and cur[3] and cur[3] ~= ptid then return {'conflict'} end
  -- The provider has the submitter's task (it answered the submit, or a callback or poll
  -- names its id): charge it once, whatever came before (a callback may have beaten the
  -- answer, even with a failure, which is refunded at once).
  if uncharged(charged) and cur[6] and (op == 'submit' or ptid ~= '') then
    local field, amount, refunds = billing()
    if field then
      call('HINCRBY', KEYS[6], field .. '|tasks', 1)
      call('HINCRBY', KEYS[6], field .. '|spent', amount)
      if charged ~= 'r' then commit(field, amount, 1) end  -- (a reservation counts it)
      charged = '1'
      if refunds and failed(cur[2]) then
        call('HINCRBY', KEYS[6], field .. '|refunded', amount)
        commit(field, amount, -1)
        charged = '2'
      end
      call('HSET', task, 'c', charged)
    end
  end
  local function split(text, at)  -- the k-th value of `text` is field at[k]
    local pos = 1
    for k = 1, #at - 1 do  -- plain find (memchr): pattern matching costs more
      local e = find(text, '\0', pos, true)
      vals[at[k]] = sub(text, pos, e - 1); pos = e + 1
    end
    vals[at[#at]] = sub(text, pos)
  end
  split(cur[4], CORE)
  if cur[7] then split(cur[7], EXTRA) end  -- (else: their defaults)
  local cur_rank = cur[1] + 0
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
  vals[1], vals[2], vals[3] = '"' .. job .. '"', '"' .. tenant .. '"', '"' .. ARGV[16] .. '"'
  vals[CREATED_AT] = ARGV[7]
end
local before = op == 'archive' and concat(vals, '\0')
local patch, pos = ARGV[13], 1  -- index byte, json, NUL, index byte, json, NUL ...
local size = #patch
while pos <= size do
  local f = find(patch, '\0', pos + 1, true) or size + 1
  vals[byte(patch, pos)] = sub(patch, pos + 1, f - 1)
  pos = f + 1
end
-- the same images archived again (two workers, a retry) is one transition
if before and concat(vals, '\0') == before then return {'duplicate', vals[N]} end
local version = exists and vals[N] + 1 or 1
vals[N] = tostring(version)
vals[UPDATED_AT] = ARGV[7]

-- Event ids are ours (the caller's clock in ms, then a sequence) so the JSON can carry its
-- own id; the same id goes into the tenant stream and the task history.
local ms, seq = ARGV[14] + 0, 0
local last = call('GET', KEYS[4])
if last then
  local dash = find(last, '-', 1, true)
  local lms = sub(last, 1, dash - 1) + 0
  if ms <= lms then ms, seq = lms, sub(last, dash + 1) + 1 end
end
local id = string.format('%d-%d', ms, seq)  -- (`..` would print 1e+14 past 14 digits)
local data = render(vals, kind, id)

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
  local committed = tonumber(call('HGET', KEYS[6], '@committed|' .. unit)) or 0
  if committed + tonumber(amount) > tonumber(ARGV[25]) then
    return {'budget', tostring(committed), unit}
  end
end

-- The tenant's quotas: tasks created and bytes written in the last TASK_TTL, counted by time
-- bucket (t<n>, b<n>) and as totals (T, B) over the window as of bucket N: the last 8. One
-- read and one write of the hash.
if ARGV[19] ~= '0' then
  local quota, bucket = KEYS[7], ARGV[19] + 0
  local tn, bn = 't' .. ARGV[19], 'b' .. ARGV[19]
  local q = call('HMGET', quota, 'N', 'T', 'B', tn, bn)
  local tasks, bytes, at = tonumber(q[2]) or 0, tonumber(q[3]) or 0, tonumber(q[1])
  local rolled = not at or at < bucket
  if rolled then  -- buckets left the window since: off the totals
    for b = (at or bucket) - 7, math.min(at or bucket, bucket - 8) do
      local gone = call('HMGET', quota, 't' .. b, 'b' .. b)
      tasks = tasks - (tonumber(gone[1]) or 0); bytes = bytes - (tonumber(gone[2]) or 0)
      call('HDEL', quota, 't' .. b, 'b' .. b)
    end
  end
  local written = #ARGV[6] + 3 * #data
  for i = 26, #ARGV do written = written + #ARGV[i] end
  local max_tasks, max_bytes = ARGV[20] + 0, ARGV[21] + 0
  local refused = (not exists and max_tasks > 0 and tasks >= max_tasks and 'tasks')
    or (max_bytes > 0 and bytes + written > max_bytes and 'bytes')
  local in_bucket = (tonumber(q[5]) or 0) + written
  if refused then
    if rolled then call('HSET', quota, 'N', bucket, 'T', tasks, 'B', bytes) end
  elseif exists then  -- (a bucket's task count is written by a create only)
    if rolled then
      call('HSET', quota, 'N', bucket, 'T', tasks, 'B', bytes + written, bn, in_bucket)
    else
      call('HSET', quota, 'B', bytes + written, bn, in_bucket)
    end
  elseif rolled then
    call('HSET', quota, 'N', bucket, 'T', tasks + 1, 'B', bytes + written,
      tn, (tonumber(q[4]) or 0) + 1, bn, in_bucket)
  else
    call('HSET', quota, 'T', tasks + 1, 'B', bytes + written, tn, (tonumber(q[4]) or 0) + 1,
      bn, in_bucket)
  end
  -- the window's hash goes when its last bucket would (set once the hash exists)
  if rolled then call('EXPIRE', quota, ARGV[22]) end
  if refused then return {'quota', refused} end
end

-- The XADDs go first: they are the only writes that could refuse, and a script that fails
-- part way keeps what it already wrote.
call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], id, 'event', kind, 'data', data)
call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[11], id, 'event', kind, 'data', data, 'raw', ARGV[6])
call('SET', KEYS[4], id)
-- `x` (the EXTRA fields) changes only by an archive: other writes leave it as it is (a task
-- without it reads as their defaults).
local stored = join_core(vals)
if op == 'archive' then
  call('HSET', task, 'r', ARGV[2], 's', status, 'v', stored, 'x', join_extra(vals))
elseif ptid ~= '' then
  call('HSET', task, 'r', ARGV[2], 's', status, 'p', ptid, 'v', stored)
else
  call('HSET', task, 'r', ARGV[2], 's', status, 'v', stored)
end
if op == 'create' and #ARGV > 25 then  -- the submitter's control fields
  call('HSET', task, unpack(ARGV, 26))
end
if price then  -- a priced task reserves its price at once
  commit(price_field, price_amount, 1)
  call('HSET', task, 'c', 'r')
end
-- A reserved task that ended without a charge (never sent, refused) gives its price back.
if exists and charged == 'r' and failed(status) then
  local field, amount = billing()
  commit(field, amount, -1)
  call('HSET', task, 'c', '0')
end
-- Refund a charged task that fails, where the provider refunds; take the refund back when a
-- provider SUCCESS replaces a failure we inferred.
if exists and ((charged == '1' and failed(status)) or (charged == '2' and status == 'SUCCESS'))
then
  local field, amount, refunds = billing()
  if field and refunds then
    call('HINCRBY', KEYS[6], field .. '|refunded', status == 'SUCCESS' and '-' .. amount or amount)
    commit(field, amount, status == 'SUCCESS' and 1 or -1)
    call('HSET', task, 'c', status == 'SUCCESS' and '1' or '2')
  end
end
-- Retention runs from creation and again from the end; progress need not refresh it.
if not exists or (new_rank >= INFERRED and op ~= 'archive') then
  call('EXPIRE', task, ARGV[12])
  call('EXPIRE', KEYS[2], ARGV[12])
elseif op == 'archive' then  -- a compacted history's stream starts again: it goes with the task
  local ttl = call('PTTL', task)
  if ttl > 0 then call('PEXPIRE', KEYS[2], ttl) end
end
-- Indexes: all tasks (KEYS[5]) and one per status (KEYS[STATUS_INDEX[status]]).
if not exists then call('ZADD', KEYS[5], 0, job) end
if cur[2] ~= status then
  if exists then call('ZREM', KEYS[STATUS_INDEX[cur[2]]], job) end
  call('ZADD', KEYS[STATUS_INDEX[status]], 0, job)
end
call('PUBLISH', ARGV[9], data)
-- A SUCCESS with images: the archive takes them (the worker; never this path).
if status == 'SUCCESS' and op ~= 'archive' and ARGV[24] == '1'
    and (vals[IMAGE_URL] ~= 'null' or vals[IMAGE_URLS] ~= '[]') then
  call('ZADD', KEYS[ARCHIVE], 'NX', ARGV[14], job)
end
-- A final state frees the task's admission slot (the slot holders are pruned by status):
-- wake the account's dispatchers.
if cur[6] and new_rank >= INFERRED and op ~= 'archive' then
  call('PUBLISH', ARGV[17], cur[6])
end
if op == 'create' then return {'stored', version, id, data} end
return {'stored', version, id}
