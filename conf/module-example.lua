-- An mkc module script (README: Scripts). Enable it in module-example.conf
-- with `script module-example.lua` (relative to conf-path), check it with
-- `mkc -c server.conf -t`, try it without Kafka with
--   mkc -c server.conf script-test --module example --message msg.json
-- and pick up changes with `mkc -c server.conf -s reload`.
--
-- handle(msg) runs once per message for this module, before the first
-- attempt; what it returns holds for every retry:
--   false or nil  the message is not sent to this module (outcome
--                 "filtered": committed and counted);
--   true          sent unchanged;
--   a table       sent with changes, any of:
--                   body     = "string"   (instead of the payload)
--                   headers  = { ["X-Name"] = "value", ... }
--                   path     = "/abs" (replaces the uri's path) or
--                              "rel" (appended to it)
--                   query    = "a=1&b=2" (appended to the uri's query)
--                   delay_ms = 5000 (instead of the module's delay)
-- An error (or more than script-timeout ms, or script-memory bytes) is
-- this module's failure for this message: status script_error in the
-- dispatch log, dead-lettered, committed.
--
-- msg: source, topic, partition, offset, key, timestamp_ms, command_id and
-- commit_id (strings), payload (the raw bytes), and msg.json, the payload
-- decoded on first use (JSON null is json.null, arrays are 1-based
-- tables, integers that fit 64 bits stay integers).
-- Sandboxed: no io, os.execute, require, debug or binary chunks.

-- Top-level code runs once per worker thread: set up constants here.
local LEGACY_PATH = "/legacy/commit"

function handle(msg)
  local data = msg.json.data
  -- Drop test traffic.
  if type(data) == "table" and data.test == true then
    return false
  end
  -- Old clients get a flat form body on another path.
  if type(data) == "table" and data.version == 1 then
    return {
      path = LEGACY_PATH,
      headers = { ["Content-Type"] = "application/x-www-form-urlencoded" },
      body = "commandId=" .. msg.command_id .. "&payload=" .. msg.payload:gsub("[^%w]", function(c)
        return string.format("%%%02X", c:byte())
      end),
    }
  end
  -- Everyone else: the payload unchanged, with a header saying its kind.
  return { headers = { ["X-Mkc-Kind"] = tostring(type(data) == "table" and data.kind or "none") } }
end
