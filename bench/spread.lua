-- wrk script: requests spread over $HOSTS hosts (h<i>.bench.test) × $ROUTES routes (/r<j>/item),
-- stepping through hosts by a prime so consecutive requests land far apart in any table.
local hosts = tonumber(os.getenv("HOSTS") or "10000")
local routes = tonumber(os.getenv("ROUTES") or "10")
local n = 0

request = function()
  n = n + 1
  local host = (n * 7919) % hosts
  return wrk.format("GET", "/r" .. (n % routes) .. "/item", { Host = "h" .. host .. ".bench.test" })
end
