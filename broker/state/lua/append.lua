-- Append a poll batch's points to their events' light curves, idempotently.
-- (The prelude with REC, IN_SIZE, HFMT, BFMT, HSIZE, VERSION, the offsets, flags and status
-- codes is made from broker/state/layout.py; tests/integration/test_state_guarantees.py
-- holds this script against the plain-Python reference of the same rules,
-- broker/state/reference.py, on seeded random streams.)
-- KEYS[1..n] event keys P:ev:<id>, KEYS[n+1..2n] their trigger keys P:tr:<id>
-- ARGV: K (reference points), RF (receptive field), max_points, event ttl, M, counts
--       (u32 per event), points (IN_SIZE bytes each: f64 t | i64 diaSourceId | f32 mag |
--       f32 err | u8 band (bit 7: forced photometry; stored as it is) | u8 kind), exact_limit (bytes: values up to this size are
--       rewritten whole), model tag (u32), trigger ttl
local K = tonumber(ARGV[1])
local RF = tonumber(ARGV[2])
local MAXP = tonumber(ARGV[3])
local TTL = tonumber(ARGV[4])
local M = tonumber(ARGV[5])
local counts = ARGV[6]
local pts = ARGV[7]
local EXACT = tonumber(ARGV[8])
local TAG = tonumber(ARGV[9])
local TTL_T = tonumber(ARGV[10])
local SLACK = math.max(16, math.floor(MAXP / 8))
local H = HSIZE + 4 * M
local n = #KEYS / 2
local out = {}
local ppos = 1
local ZERO8 = string.rep('\0', 8)

-- a <= b for two non-negative little-endian int64 (8-byte strings). Lua numbers are
-- doubles (exact to 2^53 only, Rubin ids are ~1e17) and string order follows the locale:
-- compare the two 32-bit halves as numbers.
local function id_le(a, b)
  local ah, bh = struct.unpack('<I', a, 5), struct.unpack('<I', b, 5)
  if ah ~= bh then return ah < bh end
  return struct.unpack('<I', a, 1) <= struct.unpack('<I', b, 1)
end

-- the same measurement: magnitude and error within 1e-5 mag (a re-delivery decoded on
-- another machine may round the magnitude differently in the last bit) and the same band
-- byte (band and kind: a detection re-sent as forced photometry is changed content)
local function same_content(a, b)
  local ma, ea = struct.unpack('<ff', a, 17)
  local mb, eb = struct.unpack('<ff', b, 17)
  return math.abs(ma - mb) <= 1e-5 and math.abs(ea - eb) <= 1e-5
    and string.byte(a, BAND_OFF + 1) == string.byte(b, BAND_OFF + 1)
end

-- header slot (1-based) of a band byte: its code (the FORCED bit cleared) 0..5 ugrizy,
-- anything else the unknown slot
local function slot(code)
  code = bit.band(code, BAND_MASK)
  if code < NBANDS then return code + 1 end
  return NSLOT
end

-- the header as a table; h.b holds the band block's values: b[s] the reference of slot s
-- (NaN: none yet), b[NSLOT + s] its count of points
local function read_header(v)
  local h = {}
  local rsv
  h.ver, h.m, h.flags, rsv, h.ntot, h.nsc, h.ndrop, h.lastid, h.maxid, h.lastt, h.tag =
    struct.unpack(HFMT, v)
  h.b = {struct.unpack(BFMT, v, HFIX + 1)}
  if h.lastt ~= h.lastt then h.lastt = nil end
  return h
end

local function pack_header(h)
  return struct.pack(HFMT, VERSION, h.m, h.flags, 0, h.ntot, h.nsc, h.ndrop, h.lastid, h.maxid,
    h.lastt or 0 / 0, h.tag) .. struct.pack(BFMT, unpack(h.b, 1, 2 * NSLOT))
end

local function median(vals)
  table.sort(vals)
  local c = #vals
  if c % 2 == 1 then return vals[(c + 1) / 2] end
  return (vals[c / 2] + vals[c / 2 + 1]) / 2
end

for i = 1, n do
  local cnt = struct.unpack('<I', counts, (i - 1) * 4 + 1)
  local key, tkey = KEYS[i], KEYS[n + i]
  -- small values come whole (one call); long ones by pieces (GETRANGE)
  local v = redis.call('GETRANGE', key, 0, EXACT - 1)
  local whole = #v < EXACT
  local h, ring
  local dirty = false      -- the value must be written even if no point is appended
  local switched = 0
  if #v == 0 then
    h = {m = M, flags = 0, ntot = 0, nsc = 0, ndrop = 0, lastid = ZERO8, maxid = ZERO8,
         lastt = nil, tag = TAG, b = {}}
    for s = 1, NSLOT do
      h.b[s] = 0 / 0
      h.b[NSLOT + s] = 0
    end
    ring = string.rep('\0', 4 * M)
    -- an event forgotten (TTL) and seen again: its trigger outlives it, never a second one
    if redis.call('EXISTS', tkey) == 1 then h.flags = FLAG_TRIGGERED end
  else
    local ver = string.byte(v, 1)
    if ver ~= VERSION then
      return redis.error_reply('ULENS state version ' .. ver .. ' in ' .. key .. ': this broker reads version '
        .. VERSION .. ' only (drain the prefix with the broker that wrote it, or use a new redis.key_prefix)')
    end
    h = read_header(v)
    if h.tag ~= TAG or h.m ~= M then
      -- another model (or smoothing window) scored this event: keep the points, the band
      -- counts and the triggered flag; every stored point is scored again by this model
      if not whole then v = redis.call('GET', key) end
      local oldh = HSIZE + 4 * h.m
      local recs = {}
      for q = 0, h.ntot - h.ndrop - 1 do
        local pos = oldh + q * REC
        recs[#recs + 1] = string.sub(v, pos + 1, pos + P_OFF) .. '\255'
      end
      -- the first stored point of a trimmed event only gives prev_time: scored from the next
      h.nsc = h.ndrop
      if h.ndrop == 0 then
        for s = 1, NSLOT do h.b[s] = 0 / 0 end   -- references taken again (K may differ)
      else
        h.nsc = h.ndrop + 1
      end
      h.flags = bit.band(h.flags, FLAG_TRIGGERED)
      h.m, h.tag = M, TAG
      ring = string.rep('\0', 4 * M)
      v = pack_header(h) .. ring .. table.concat(recs)
      whole = true
      dirty = true
      switched = 1
    else
      ring = string.sub(v, HSIZE + 1, H)
    end
  end
  local nst = h.ntot - h.ndrop
  local first = h.ndrop
  local hb = h.b
  local lastt = h.lastt
  if nst == 0 then lastt = nil end
  local function time_at(q)  -- time of stored record q (0-based)
    local pos = H + q * REC
    if whole then return (struct.unpack('<d', v, pos + 1)) end
    return (struct.unpack('<d', redis.call('GETRANGE', key, pos, pos + 7)))
  end
  local function rec_at(q)
    local pos = H + q * REC
    if whole then return string.sub(v, pos + 1, pos + REC) end
    return redis.call('GETRANGE', key, pos, pos + REC - 1)
  end
  local full = nil           -- the whole value, fetched once when needed
  local function whole_value()
    if full == nil then
      if whole then full = v else full = redis.call('GET', key) end
    end
    return full
  end
  local oldlast = lastt
  local newrecs = {}
  local st = {}
  -- is this diaSourceId stored already (at another time)?
  local function id_known(id8)
    if not id_le(id8, h.maxid) then return false end  -- newer than every id seen: the usual case
    for q = 1, #newrecs do
      if string.sub(newrecs[q], 9, 16) == id8 then return true end
    end
    if nst == 0 then return false end
    local f = whole_value()
    local s = H + 9
    while true do
      local p = string.find(f, id8, s, true)
      if p == nil then return false end
      if (p - 1 - H - 8) % REC == 0 then return true end  -- at a record's id field
      s = p + 1
    end
  end
  for j = 1, cnt do
    local inrec = string.sub(pts, ppos, ppos + IN_SIZE - 1)
    local tb = string.sub(inrec, 1, 8)
    local id8 = string.sub(inrec, 9, 16)
    local t = struct.unpack('<d', tb)
    local same = nil         -- the stored record at this time, if any
    if string.byte(inrec, KIND_OFF + 1) == KIND_HISTORY and lastt ~= nil and t <= lastt then
      st[j] = ST_HISTORY                    -- history the event has already
    else
      if lastt ~= nil and t <= lastt then
        if oldlast == nil or t > oldlast then
          for q = 1, #newrecs do
            if string.sub(newrecs[q], 1, 8) == tb then same = newrecs[q] break end
          end
        elseif nst > 0 then
          local lo, hi = 0, nst - 1
          while lo <= hi do
            local mid = math.floor((lo + hi) / 2)
            local tm = time_at(mid)
            if tm == t then same = rec_at(mid) break
            elseif tm < t then lo = mid + 1 else hi = mid - 1 end
          end
        end
      end
      if same ~= nil then
        if string.sub(same, 9, 16) ~= id8 then st[j] = ST_CONFLICT
        elseif same_content(same, inrec) then st[j] = ST_DUPLICATE
        else st[j] = ST_CHANGED end
      elseif id_known(id8) then
        st[j] = ST_CHANGED                    -- this diaSourceId is stored with another time
      elseif lastt == nil or t > lastt then
        newrecs[#newrecs + 1] = string.sub(inrec, 1, P_OFF) .. '\255'
        lastt = t
        h.lastid = id8
        if not id_le(id8, h.maxid) then h.maxid = id8 end
        local c = NSLOT + slot(string.byte(inrec, BAND_OFF + 1))
        if hb[c] < COUNT_MAX then hb[c] = hb[c] + 1 end
        st[j] = ST_APPENDED
      elseif first > 0 and t < time_at(0) then
        st[j] = ST_UNVERIFIED                 -- older than every stored point: maybe a dropped one
      else
        st[j] = ST_OUT_OF_ORDER
      end
    end
    ppos = ppos + IN_SIZE
  end
  local added = #newrecs
  local dropnow = 0
  local header = nil   -- the header after this call, once packed
  local after = nil   -- the new value when it was built here (small values)
  -- per band reference: the median magnitude of the band's first K points (of those
  -- stored, when older points were dropped before the band had K)
  for s = 1, NSLOT do
    if hb[s] ~= hb[s] and hb[NSLOT + s] >= K then
      local mags = {}
      local f = nil
      if nst > 0 then f = whole_value() end
      for q = 0, nst - 1 do
        if #mags >= K then break end
        local pos = H + q * REC
        if slot(string.byte(f, pos + BAND_OFF + 1)) == s then
          mags[#mags + 1] = struct.unpack('<f', f, pos + 17)
        end
      end
      for q = 1, added do
        if #mags >= K then break end
        if slot(string.byte(newrecs[q], BAND_OFF + 1)) == s then
          mags[#mags + 1] = struct.unpack('<f', newrecs[q], 17)
        end
      end
      if #mags > 0 then
        hb[s] = median(mags)
        dirty = true
      end
    end
  end
  h.lastt = lastt
  if added > 0 or dirty then
    local ntot2 = h.ntot + added
    -- keep max_points; long values trim in steps of SLACK points (amortised); never
    -- drop the context of unscored points
    local newlen = H + (nst + added) * REC
    local small = newlen <= EXACT
    local drop = 0
    if nst + added > MAXP + SLACK or (small and nst + added > MAXP) then
      drop = nst + added - MAXP
      local lim = h.nsc - RF
      if lim < K then lim = 0 end
      if drop > lim - first then drop = lim - first end
      if drop < 0 then drop = 0 end
    end
    h.ntot = ntot2
    h.ndrop = h.ndrop + drop
    header = pack_header(h) .. ring
    local tail = table.concat(newrecs)
    if small or drop > 0 or #v == 0 or switched == 1 then
      -- rewrite at the exact size (APPEND would over-allocate up to 2x)
      local body
      if whole then body = string.sub(v, H + drop * REC + 1)
      else body = redis.call('GETRANGE', key, H + drop * REC, -1) end
      after = header .. body .. tail
      redis.call('SET', key, after, 'EX', TTL)
    else
      if added > 0 then redis.call('APPEND', key, tail) end
      redis.call('SETRANGE', key, 0, header)
      redis.call('EXPIRE', key, TTL)
    end
    first = first + drop
    dropnow = drop
    nst = nst + added - drop
  end
  local hdr = header or (pack_header(h) .. ring)
  local trg = '\0'
  if bit.band(h.flags, FLAG_TRIGGERED) == FLAG_TRIGGERED then
    local s = redis.call('GETRANGE', tkey, 0, 0)
    if s ~= '' then trg = s end
    if added > 0 then redis.call('EXPIRE', tkey, TTL_T) end
  end
  local function window_from(s0)
    local pos = H + (s0 - first) * REC
    if after ~= nil then return string.sub(after, pos + 1)
    elseif added == 0 and whole then return string.sub(v, pos + 1) end
    return redis.call('GETRANGE', key, pos, -1)
  end
  local win = ''
  local s0 = h.ntot
  if h.nsc < h.ntot then
    s0 = h.nsc - RF
    if s0 < first then s0 = first end
    win = window_from(s0)
    if s0 > first then
      -- a tail window (its first point gives prev_time only) is scored with the bands'
      -- fixed references: every band in its rows needs one that holds for all its rows
      -- (each row at least the band's K-th point); else the window starts at the first
      -- stored point (the whole event: references taken causally, as offline)
      local rows = h.ntot - s0 - 1
      local sure = true
      for s = 1, NSLOT do
        local c = hb[NSLOT + s]
        if c > 0 and (hb[s] ~= hb[s] or c - rows < K - 1) then
          sure = false
          break
        end
      end
      if not sure then
        local inrow = {}
        for s = 1, NSLOT do inrow[s] = 0 end
        for q = 1, rows do
          local s = slot(string.byte(win, q * REC + BAND_OFF + 1))
          inrow[s] = inrow[s] + 1
        end
        for s = 1, NSLOT do
          if inrow[s] > 0 and (hb[s] ~= hb[s] or hb[NSLOT + s] - inrow[s] < K - 1) then
            s0 = first
            win = window_from(s0)
            break
          end
        end
      end
    end
  end
  out[i] = struct.pack('<IIBB', s0, dropnow, string.byte(trg), switched) .. hdr .. table.concat(st) .. win
end
return out
