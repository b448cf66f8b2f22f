-- Store a batch's new probabilities and decisions (the TD-CNN rule).
-- KEYS[1..n] event keys, KEYS[n+1..2n] trigger keys
-- ARGV[1] trigger ttl, ARGV[2] M, ARGV[3] model tag,
-- ARGV[3+i]: u32 old n_scored | u32 u | u8 fire | f32 x M ring | u8 x u probabilities | trigger JSON
-- Per event one code: N stored, T stored and fired (trigger pending in the outbox), P the
-- event's trigger is still pending (produce it again), D its trigger was sent, A already
-- stored (this update or a later one: a script run twice, two members racing), C conflict
-- (the state was reset or rescored by another model meanwhile), G gone (expired).
-- An update that overlaps what is stored (old < n_scored < old + u: another member scored
-- the first points meanwhile) stores its remaining points: no point is left unscored.
local TTL_T = tonumber(ARGV[1])
local M = tonumber(ARGV[2])
local TAG = tonumber(ARGV[3])
local H = HSIZE + 4 * M
local n = #KEYS / 2
local out = {}

local function outbox(tk)  -- P pending, D sent
  if redis.call('GETRANGE', tk, 0, 0) == 'P' then return 'P' end
  return 'D'
end

for i = 1, n do
  local a = ARGV[3 + i]
  local old, u, fire = struct.unpack('<IIB', a)
  local key, tk = KEYS[i], KEYS[n + i]
  local h = redis.call('GETRANGE', key, 0, H - 1)
  if #h < H then
    out[i] = 'G'
  else
    local ver, m, flags, rsv, ntot, nsc, ndrop, lastid, maxid, lastt, tag = struct.unpack(HFMT, h)
    if ver ~= VERSION or m ~= M or tag ~= TAG or nsc < old or old + u > ntot then
      out[i] = 'C'
    elseif nsc >= old + u then
      out[i] = 'A'
      if bit.band(flags, FLAG_TRIGGERED) == FLAG_TRIGGERED and outbox(tk) == 'P' then out[i] = 'P' end
    else
      local pb = 10 + 4 * M
      for j = nsc - old, u - 1 do
        local g = old + j
        if g >= ndrop then
          redis.call('SETRANGE', key, H + (g - ndrop) * REC + P_OFF, string.sub(a, pb + j, pb + j))
        end
      end
      local res = 'N'
      if fire == 1 then
        if bit.band(flags, FLAG_TRIGGERED) == 0 then
          flags = flags + FLAG_TRIGGERED
          if redis.call('SET', tk, 'P' .. string.sub(a, pb + u), 'NX', 'EX', TTL_T) then res = 'T'
          else res = outbox(tk) end
        else
          res = outbox(tk)
        end
      end
      -- the fixed header (n_scored, flags) and the ring; the band block between is the
      -- append script's
      redis.call('SETRANGE', key, 0,
        struct.pack(HFMT, ver, m, flags, 0, ntot, old + u, ndrop, lastid, maxid, lastt, tag))
      redis.call('SETRANGE', key, HSIZE, string.sub(a, 10, 9 + 4 * M))
      out[i] = res
    end
  end
end
return out
