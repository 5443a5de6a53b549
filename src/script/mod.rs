//! Lua scripts (README: Scripts): a module's `handle(msg)` and server.conf's
//! `route(msg)`, run embedded (Lua 5.4 through `mlua`), sandboxed and
//! bounded in time and memory.
//!
//! A [`Script`] is a file as the configuration read it; [`check`] loads it
//! once in a throw-away state, which is how `-t` and `-s reload` refuse a
//! script that does not load. An [`Engine`] runs it: each thread that
//! calls it gets its own Lua state, made on first use and kept in a
//! thread-local map, so that the worker's threads never share a state nor
//! wait on a lock (a Lua state is not thread-safe; one state behind a
//! mutex would serialize the worker).
//!
//! One call costs the building of the `msg` table (done in Lua by one
//! wrapper function from a few scalar arguments, which is cheaper than
//! setting its fields from Rust one by one) and the user function itself.
//! `msg.json` is decoded on first use only, through the table's metatable.
//!
//! Bounds: an instruction-count hook looks at the clock every
//! [`HOOK_EVERY`] instructions and stops the call past its time budget
//! (`script-timeout`); `pcall` and `xpcall` cannot swallow that stop. The
//! allocator of each state refuses to grow past `script-memory`. After
//! either, the thread's state is thrown away and made again on the next
//! call, so that a script left half-way cannot poison later messages.
//!
//! This module depends on nothing of mkc: the configuration uses it to
//! check scripts, the pipeline to run them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use mlua::{Function, HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, Table, Value, VmState};

/// `script-timeout` default: the budget of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// `script-memory` default: what one Lua state may allocate.
pub const DEFAULT_MEMORY: usize = 64 * 1024 * 1024;
/// How many VM instructions run between two looks at the clock. A look
/// costs a clock read (tens of nanoseconds); an instruction a few.
pub const HOOK_EVERY: u32 = 1000;
/// What a call stopped for its budget says.
const BUDGET_EXCEEDED: &str = "script stopped: time budget (script-timeout) exceeded";

/// Where `print` of a script goes: the log (a worker) or standard error
/// (`mkc script-test`).
static PRINT_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Makes a script's `print` write to standard error instead of the log.
pub fn print_to_stderr() {
    PRINT_TO_STDERR.store(true, Ordering::Relaxed);
}

/// The bounds of every call (server.conf `script-timeout`, `script-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call (and of the script's loading).
    pub timeout: Duration,
    /// Bytes one Lua state may allocate.
    pub memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            memory: DEFAULT_MEMORY,
        }
    }
}

/// Which function a script must define.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// server.conf `route FILE`: `route(msg)`.
    Route,
    /// module.conf `script FILE`: `handle(msg)`.
    Handle,
}

impl Entry {
    /// The name of the function.
    pub fn function(self) -> &'static str {
        match self {
            Entry::Route => "route",
            Entry::Handle => "handle",
        }
    }
}

/// A script file as the configuration read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// The resolved path (for `-T` and messages).
    pub path: PathBuf,
    /// The file's bytes as read when the configuration was loaded: a
    /// worker runs exactly what `-t` checked.
    pub source: Arc<[u8]>,
    pub entry: Entry,
}

impl Script {
    /// The chunk name Lua shows in messages and tracebacks: the file name.
    fn chunk_name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(|| "script".into(), |n| n.to_string_lossy().into_owned())
    }
}

/// Why a script does not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The line of the script the problem is on, when Lua names one.
    pub line: Option<usize>,
    /// Lua's message without its `file:line:` prefix.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A failed call: Lua's message with its traceback, or a return value the
/// contract does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScriptError(pub String);

/// What a call sees of the message (README: Scripts, "msg").
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    /// `kafka`, `redis-list` or `redis-subscribe`.
    pub source: &'a str,
    /// The topic, list key or channel.
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka message key.
    pub key: Option<&'a [u8]>,
    /// The Kafka timestamp (Redis: when mkc took the message).
    pub timestamp_ms: Option<i64>,
    /// As text: the full u64 range fits no Lua number.
    pub command_id: &'a str,
    pub commit_id: Option<&'a str>,
    /// The payload, byte for byte (`msg.json` is decoded from it).
    pub payload: &'a [u8],
}

/// What `handle(msg)` decided for one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `false` or `nil`: not sent to this module (outcome `filtered`).
    Drop,
    /// `true` (everything `None`/empty) or a table.
    Send(Reshape),
}

/// What a `handle` table changes in the request; nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reshape {
    /// `body`: sent instead of the payload.
    pub body: Option<Bytes>,
    /// `headers`: added to (or replacing) mkc's headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `path`: starting with `/` replaces the uri's path, else appended.
    pub path: Option<String>,
    /// `query`: appended to the uri's query (`?` or `&` added).
    pub query: Option<String>,
    /// `delay_ms`: replaces the module's `delay` for this message.
    pub delay: Option<Duration>,
}

/// Loads `script` in a throw-away state, as a worker will, and checks that
/// it defines its function. For the configuration (`-t`, start, reload).
pub fn check(script: &Script, limits: Limits) -> Result<(), LoadError> {
    State::open(script, limits).map(drop)
}

/// Numbers engines, so that each thread keys its states by engine.
static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's Lua state of each engine it ran.
    static STATES: RefCell<HashMap<u64, Rc<State>>> = RefCell::new(HashMap::new());
}

/// A script ready to run on any thread (see the module's overview).
#[derive(Debug)]
pub struct Engine {
    script: Arc<Script>,
    limits: Limits,
    id: u64,
}

impl Engine {
    pub fn new(script: Arc<Script>, limits: Limits) -> Engine {
        Engine {
            script,
            limits,
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub fn script(&self) -> &Script {
        &self.script
    }

    /// `handle(msg)`.
    pub fn handle(&self, msg: &Msg) -> Result<Verdict, ScriptError> {
        self.call(msg, |_, value| verdict(value))
    }

    /// `route(msg)`: the names of the modules that get the message, or
    /// `None` to fall back to the modules' filters.
    pub fn route(&self, msg: &Msg) -> Result<Option<Vec<String>>, ScriptError> {
        self.call(msg, |_, value| route_names(value))
    }

    fn state(&self) -> Result<Rc<State>, ScriptError> {
        if let Some(state) = STATES.with(|s| s.borrow().get(&self.id).cloned()) {
            return Ok(state);
        }
        let state = State::open(&self.script, self.limits).map_err(|e| {
            let line = e.line.map(|l| format!(":{l}")).unwrap_or_default();
            ScriptError(format!("{}{line}: {}", self.script.chunk_name(), e.message))
        })?;
        let state = Rc::new(state);
        STATES.with(|s| s.borrow_mut().insert(self.id, state.clone()));
        Ok(state)
    }

    /// Throws this thread's state away: made again on the next call.
    fn forget(&self) {
        STATES.with(|s| s.borrow_mut().remove(&self.id));
    }

    fn call<T>(
        &self,
        msg: &Msg,
        convert: impl FnOnce(&Lua, Value) -> Result<T, String>,
    ) -> Result<T, ScriptError> {
        let state = self.state()?;
        state.arm(self.limits.timeout);
        let result = state.invoke(msg);
        let stopped = state.expired.get();
        state.disarm();
        match result {
            Ok(value) => convert(&state.lua, value).map_err(|e| {
                ScriptError(format!(
                    "{}: {} returned {e}",
                    self.script.chunk_name(),
                    self.script.entry.function()
                ))
            }),
            Err(err) => {
                let memory = is_memory_error(&err);
                if stopped || memory {
                    self.forget();
                }
                let text = if stopped {
                    format!("{BUDGET_EXCEEDED} ({} ms)", self.limits.timeout.as_millis())
                } else if memory {
                    format!(
                        "script stopped: memory limit (script-memory {} bytes) reached\n{}",
                        self.limits.memory,
                        describe(&err)
                    )
                } else {
                    describe(&err)
                };
                Err(ScriptError(text))
            }
        }
    }
}

/// One Lua state of one engine on one thread.
struct State {
    lua: Lua,
    /// The wrapper that builds `msg` and calls the user's function.
    call: Function,
    /// When the running call's budget ends.
    deadline: Rc<Cell<Instant>>,
    /// The hook stopped the running call.
    expired: Rc<Cell<bool>>,
}

/// Removes what could reach the file system, processes, native code or
/// bytecode, and makes the budget stop uncatchable. Runs before the
/// script, in the state's real globals (which are the script's too).
const SANDBOX: &str = r#"
local expired, null, encode, decode, print_fn, BUDGET = ...
local G = _G
G.dofile, G.loadfile, G.require, G.package, G.io, G.debug = nil, nil, nil, nil, nil, nil
G.collectgarbage, G.coroutine = nil, nil
string.dump = nil
local os = os
G.os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime }
local rawload, rawpcall, rawxpcall, error = load, pcall, xpcall, error
local function check(...)
  if expired() then error(BUDGET, 0) end
  return ...
end
G.pcall = function(...) return check(rawpcall(...)) end
G.xpcall = function(...) return check(rawxpcall(...)) end
G.load = function(chunk, name, mode, env)
  return rawload(chunk, name, "t", env or G)
end
G.json = { encode = encode, decode = decode, null = null }
G.print = print_fn
"#;

/// Builds `msg` from scalar arguments and calls the user's function.
const WRAPPER: &str = r#"
local fn, decode = ...
local setmetatable, rawget, rawset = setmetatable, rawget, rawset
local MT = {
  __index = function(t, k)
    if k == "json" then
      local v = decode(rawget(t, "payload"))
      rawset(t, "json", v)
      return v
    end
  end,
}
return function(source, topic, partition, offset, key, ts, cmd, commit, payload)
  return fn(setmetatable({
    source = source, topic = topic, partition = partition, offset = offset,
    key = key, timestamp_ms = ts, command_id = cmd, commit_id = commit,
    payload = payload,
  }, MT))
end
"#;

impl State {
    fn open(script: &Script, limits: Limits) -> Result<State, LoadError> {
        let internal = |e: mlua::Error| LoadError {
            line: None,
            message: format!("cannot start Lua: {e}"),
        };
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::OS;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(internal)?;
        // Every call leaves young garbage (msg, the decoded JSON): the
        // generational collector frees it for less than the incremental one.
        lua.gc_set_mode(mlua::state::GcMode::Generational(
            mlua::state::GcGenParams::default(),
        ));
        let deadline = Rc::new(Cell::new(Instant::now() + limits.timeout));
        let expired = Rc::new(Cell::new(false));
        let (d, e) = (deadline.clone(), expired.clone());
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                if e.get() || Instant::now() >= d.get() {
                    e.set(true);
                    return Err(mlua::Error::runtime(BUDGET_EXCEEDED));
                }
                Ok(VmState::Continue)
            },
        )
        .map_err(internal)?;
        let e = expired.clone();
        let is_expired = lua
            .create_function(move |_, ()| Ok(e.get()))
            .map_err(internal)?;
        let (encode, decode) = json_functions(&lua).map_err(internal)?;
        let name = script.chunk_name();
        let print = lua
            .create_function(move |_, args: mlua::Variadic<Value>| {
                let line = args
                    .iter()
                    .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                    .collect::<Vec<_>>()
                    .join("\t");
                if PRINT_TO_STDERR.load(Ordering::Relaxed) {
                    eprintln!("{line}");
                } else {
                    tracing::info!(script = %name, "{line}");
                }
                Ok(())
            })
            .map_err(internal)?;
        lua.load(SANDBOX)
            .set_name("=sandbox")
            .call::<()>((
                is_expired,
                lua.null(),
                encode,
                decode.clone(),
                print,
                BUDGET_EXCEEDED,
            ))
            .map_err(internal)?;
        lua.set_memory_limit(limits.memory).map_err(internal)?;

        let name = script.chunk_name();
        let chunk_error = |err: mlua::Error| load_error(&name, &err, expired.get());
        lua.load(&script.source[..])
            .set_name(format!("@{name}"))
            .set_mode(mlua::chunk::ChunkMode::Text)
            .exec()
            .map_err(chunk_error)?;
        let function = script.entry.function();
        let user = match lua.globals().raw_get::<Value>(function) {
            Ok(Value::Function(f)) => f,
            Ok(Value::Nil) => {
                return Err(LoadError {
                    line: None,
                    message: format!("{name} defines no function {function}(msg)"),
                })
            }
            Ok(other) => {
                return Err(LoadError {
                    line: None,
                    message: format!("{name}: {function} is {}, not a function", a_type(&other)),
                })
            }
            Err(err) => return Err(chunk_error(err)),
        };
        let call = lua
            .load(WRAPPER)
            .set_name("=msg")
            .call::<Function>((user, decode))
            .map_err(internal)?;
        Ok(State {
            lua,
            call,
            deadline,
            expired,
        })
    }

    fn arm(&self, budget: Duration) {
        self.expired.set(false);
        self.deadline.set(Instant::now() + budget);
    }

    fn disarm(&self) {
        // Far enough: nothing runs outside a call but the GC.
        self.deadline
            .set(Instant::now() + Duration::from_secs(365 * 24 * 3600));
    }

    fn invoke(&self, msg: &Msg) -> mlua::Result<Value> {
        let lua = &self.lua;
        let key = msg.key.map(|k| lua.create_string(k)).transpose()?;
        let payload = lua.create_string(msg.payload)?;
        self.call.call::<Value>((
            msg.source,
            msg.topic,
            msg.partition,
            msg.offset,
            key,
            msg.timestamp_ms,
            msg.command_id,
            msg.commit_id,
            payload,
        ))
    }
}

/// `json.encode` and `json.decode`.
fn json_functions(lua: &Lua) -> mlua::Result<(Function, Function)> {
    let encode = lua.create_function(|lua, value: Value| {
        let options = mlua::serde::DeserializeOptions::new().sort_keys(true);
        let json: serde_json::Value = lua.from_value_with(value, options)?;
        serde_json::to_string(&json).map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))
    })?;
    let decode = lua.create_function(|lua, text: mlua::LuaString| {
        let bytes = text.as_bytes();
        let mut json = serde_json::Deserializer::from_slice(&bytes);
        let value = serde::de::DeserializeSeed::deserialize(LuaSeed(lua), &mut json)
            .and_then(|value| json.end().map(|()| value))
            .map_err(|e| mlua::Error::runtime(format!("json.decode: not JSON: {e}")))?;
        Ok(value)
    })?;
    Ok((encode, decode))
}

/// Builds Lua values straight from the JSON parser, without an
/// intermediate `serde_json::Value` (half the cost of `msg.json`):
/// objects and arrays are tables (arrays marked with mlua's array
/// metatable, so that `json.encode` writes them back as arrays), `null`
/// is `json.null`, integers within i64 are integers, other numbers floats.
struct LuaSeed<'a>(&'a Lua);

impl<'de> serde::de::DeserializeSeed<'de> for LuaSeed<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for LuaSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Number(v as f64), Value::Integer))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0
            .create_string(v)
            .map(Value::String)
            .map_err(E::custom)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(self.0.null())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        use serde::de::Error as _;
        let lua = self.0;
        let table = lua
            .create_table_with_capacity(seq.size_hint().unwrap_or(0), 0)
            .map_err(A::Error::custom)?;
        let mut i = 1;
        while let Some(v) = seq.next_element_seed(LuaSeed(lua))? {
            table.raw_seti(i, v).map_err(A::Error::custom)?;
            i += 1;
        }
        table
            .set_metatable(Some(lua.array_metatable()))
            .map_err(A::Error::custom)?;
        Ok(Value::Table(table))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        use serde::de::Error as _;
        let lua = self.0;
        let table = lua
            .create_table_with_capacity(0, map.size_hint().unwrap_or(0))
            .map_err(A::Error::custom)?;
        while let Some(k) = map.next_key_seed(LuaSeed(lua))? {
            let v = map.next_value_seed(LuaSeed(lua))?;
            table.raw_set(k, v).map_err(A::Error::custom)?;
        }
        Ok(Value::Table(table))
    }
}

fn is_memory_error(err: &mlua::Error) -> bool {
    match err {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// A Lua error as a message: Lua's text and, when there is one, its
/// traceback.
fn describe(err: &mlua::Error) -> String {
    match err {
        mlua::Error::RuntimeError(text) | mlua::Error::MemoryError(text) => text.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::CallbackError { traceback, cause } => {
            format!("{}\n{traceback}", describe(cause))
        }
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", describe(cause)),
        other => other.to_string(),
    }
}

/// A loading error with its line taken out of Lua's `name:LINE: ` prefix.
fn load_error(name: &str, err: &mlua::Error, stopped: bool) -> LoadError {
    if stopped {
        return LoadError {
            line: None,
            message: format!("{name}: {BUDGET_EXCEEDED} while loading"),
        };
    }
    let text = describe(err);
    let first = text.lines().next().unwrap_or_default();
    let parsed = first
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(line, message)| Some((line.parse::<usize>().ok()?, message)));
    match parsed {
        Some((line, message)) => LoadError {
            line: Some(line),
            message: message.to_string(),
        },
        None => LoadError {
            line: None,
            message: first.to_string(),
        },
    }
}

/// A Lua value's type as a message names it, with its article.
fn a_type(value: &Value) -> &'static str {
    match value {
        Value::Integer(_) | Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Table(_) => "a table",
        Value::Function(_) => "a function",
        Value::Boolean(_) => "a boolean",
        Value::Nil => "nil",
        Value::UserData(_) | Value::LightUserData(_) => "a userdata",
        Value::Thread(_) => "a thread",
        _ => "an unsupported value",
    }
}

/// `handle`'s return value.
fn verdict(value: Value) -> Result<Verdict, String> {
    match value {
        Value::Nil | Value::Boolean(false) => Ok(Verdict::Drop),
        Value::Boolean(true) => Ok(Verdict::Send(Reshape::default())),
        Value::Table(t) => reshape(&t).map(Verdict::Send),
        other => Err(format!(
            "{}: it must return nil, false, true or a table",
            a_type(&other)
        )),
    }
}

fn text_of(field: &str, value: &Value) -> Result<Vec<u8>, String> {
    match value {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(n) => Ok(n.to_string().into_bytes()),
        Value::Number(n) => Ok(n.to_string().into_bytes()),
        other => Err(format!(
            "a table whose {field} is {}, not a string",
            a_type(other)
        )),
    }
}

fn reshape(t: &Table) -> Result<Reshape, String> {
    let mut out = Reshape::default();
    for pair in t.pairs::<Value, Value>() {
        let (key, value) = pair.map_err(|e| e.to_string())?;
        let Value::String(key) = key else {
            return Err(format!("a table with {} key", a_type(&key)));
        };
        let key = key
            .to_str()
            .map_err(|_| "a table with a key that is not UTF-8".to_string())?;
        let key: &str = &key;
        match key {
            "body" => out.body = Some(Bytes::from(text_of("body", &value)?)),
            "path" | "query" => {
                let text = String::from_utf8(text_of(key, &value)?)
                    .map_err(|_| format!("a table whose {key} is not UTF-8"))?;
                if key == "path" {
                    out.path = Some(text);
                } else {
                    out.query = Some(text);
                }
            }
            "delay_ms" => {
                let ms = match value {
                    Value::Integer(n) if n >= 0 => n as u64,
                    Value::Number(n) if n >= 0.0 && n.fract() == 0.0 && n < 1e15 => n as u64,
                    _ => return Err("a table whose delay_ms is not a whole number >= 0".into()),
                };
                out.delay = Some(Duration::from_millis(ms));
            }
            "headers" => {
                let Value::Table(headers) = value else {
                    return Err(format!(
                        "a table whose headers is {}, not a table",
                        a_type(&value)
                    ));
                };
                for pair in headers.pairs::<Value, Value>() {
                    let (name, value) = pair.map_err(|e| e.to_string())?;
                    let name = text_of("header name", &name)?;
                    let value = text_of("header value", &value)?;
                    let name = HeaderName::from_bytes(&name).map_err(|_| {
                        format!(
                            "a header name {:?} HTTP does not allow",
                            String::from_utf8_lossy(&name)
                        )
                    })?;
                    let value = HeaderValue::from_bytes(&value).map_err(|_| {
                        format!(
                            "a value of header {name} HTTP does not allow (control characters?)"
                        )
                    })?;
                    out.headers.push((name, value));
                }
                out.headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            }
            other => {
                return Err(format!(
                "a table with the unknown field {other:?} (body, headers, path, query, delay_ms)"
            ))
            }
        }
    }
    Ok(out)
}

/// `route`'s return value.
fn route_names(value: Value) -> Result<Option<Vec<String>>, String> {
    match value {
        Value::Nil => Ok(None),
        Value::Table(t) => {
            let mut names = Vec::new();
            for v in t.sequence_values::<Value>() {
                match v.map_err(|e| e.to_string())? {
                    Value::String(s) => names.push(s.to_string_lossy()),
                    other => {
                        return Err(format!(
                            "a list holding {}, not a module name",
                            a_type(&other)
                        ))
                    }
                }
            }
            Ok(Some(names))
        }
        other => Err(format!(
            "{}: it must return nil or a list of module names",
            a_type(&other)
        )),
    }
}

#[cfg(test)]
mod tests;
