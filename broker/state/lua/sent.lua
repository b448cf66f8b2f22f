-- KEYS: trigger keys confirmed delivered: status byte P -> S
local n = 0
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('SETRANGE', KEYS[i], 0, 'S')
    n = n + 1
  end
end
return n
