-- wrk pacing for owca-sine: each connection pauses before every request, so that
-- `connections` connections make `connections * 1000 / delay_ms` requests per second
-- (less the round trips, which owca-sine's correction makes up for).
--   wrk -t1 -c8 -d2s --latency -s pace.lua URL -- DELAY_MS
-- wrk takes whole milliseconds: the fraction is dithered, so that the mean pause
-- is DELAY_MS.
local delay_ms = 10

function init(args)
  local asked = tonumber(args[1])
  if asked ~= nil and asked > 0 then
    delay_ms = asked
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function delay()
  local whole = math.floor(delay_ms)
  if math.random() < delay_ms - whole then
    return whole + 1
  end
  return whole
end
