-- An mkc route script (README: Scripts). Enable it in server.conf with
-- `route route.lua` (relative to server.conf's directory).
--
-- route(msg) runs once per message, after server.conf's global `filters`
-- allow-list, and returns the names of the modules that get the message
-- (instead of their `filters` lines), or nil to let the filters decide.
-- An empty list sends the message nowhere (committed, counted as
-- unrouted). A name no module has is ignored with a warning. An error is
-- logged, counted under module "(route)", dead-lettered to server.conf's
-- dead-letter-topic and committed.
--
-- msg is the same as for a module's handle(msg): see module-example.lua.

function route(msg)
  local data = msg.json.data
  if type(data) ~= "table" then
    return nil -- by filters
  end
  -- Route on a field inside data: orders to billing, refunds to billing
  -- and audit, everything else by the modules' filters.
  if data.kind == "order" then
    return { "example" }
  elseif data.kind == "refund" then
    return { "example", "audit" }
  end
  return nil
end
