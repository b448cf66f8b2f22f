-- Store the PSPL-fit rule's new states (compare-and-set on n_done) and its triggers.
-- KEYS[1..n] state keys P:pf:<params hash>:<id>, KEYS[n+1..2n] trigger (outbox) keys P:tp:<id>
-- ARGV[1] state ttl, ARGV[2] trigger ttl, ARGV[2+i]: u32 old n_done | u8 fire | state (S bytes,
-- its u32 n_done at byte 4) | trigger JSON (when fire); ARGV[3+n] S
-- Codes as the score script: N, T, P, D, A (already stored: this state or a later one),
-- C (the stored state is older than this update's start: it was reset meanwhile).
-- A state that is ahead of the stored one (old < stored n_done < new n_done: another member
-- processed the first points meanwhile) replaces it: its fit has seen every point.
local TTL = tonumber(ARGV[1])
local TTL_T = tonumber(ARGV[2])
local n = #KEYS / 2
local S = tonumber(ARGV[3 + n])
local out = {}

local function outbox(tk)
  if redis.call('GETRANGE', tk, 0, 0) == 'P' then return 'P' end
  return 'D'
end

for i = 1, n do
  local a = ARGV[2 + i]
  local old, fire = struct.unpack('<IB', a)
  local body = string.sub(a, 6, 5 + S)
  local new_done = struct.unpack('<I', body, 5)
  local tk = KEYS[n + i]
  local cur = redis.call('GETRANGE', KEYS[i], 4, 7)
  local cur_done = 0
  if #cur == 4 then cur_done = struct.unpack('<I', cur) end
  if cur_done < old then
    out[i] = 'C'
  elseif cur_done >= new_done then
    out[i] = 'A'
    if redis.call('EXISTS', tk) == 1 and outbox(tk) == 'P' then out[i] = 'P' end
  else
    redis.call('SET', KEYS[i], body, 'EX', TTL)
    local res = 'N'
    if fire == 1 then
      if redis.call('SET', tk, 'P' .. string.sub(a, 6 + S), 'NX', 'EX', TTL_T) then res = 'T'
      else res = outbox(tk) end
    elseif redis.call('EXPIRE', tk, TTL_T) == 1 then
      if outbox(tk) == 'P' then res = 'P' end
    end
    out[i] = res
  end
end
return out
