-- pace.lua's pacing, each request a 64 KiB range at a random offset of a file of SIZE
-- bytes, so that the server's working set is the whole file's pages:
--   wrk -t1 -c8 -d2s --latency -s pace-range.lua URL -- DELAY_MS SIZE
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "pace.lua")

local chunk = 64 * 1024
local size = chunk
local pace_init = init

function init(args)
  pace_init(args)
  local bytes = tonumber(args[2])
  if bytes ~= nil and bytes > chunk then
    size = bytes
  end
end

function request()
  local first = math.random(0, math.floor((size - chunk) / chunk)) * chunk
  return wrk.format(nil, nil, {Range = "bytes=" .. first .. "-" .. (first + chunk - 1)})
end
