//! server.conf's keys: [`ServerDraft`] takes its directives one by one
//! and [`ServerDraft::finish`] fills in defaults and validates what
//! involves several lines.

use super::*;

/// The `mysql SUBKEY VALUE` lines, combined at the end.
#[derive(Default)]
pub(super) struct MysqlDraft {
    /// The first `mysql` line: where "incomplete" errors point.
    first: Option<Location>,
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
}

/// server.conf as read so far; defaults filled in by [`ServerDraft::finish`].
pub(super) struct ServerDraft {
    /// server.conf's directory: the base of relative paths.
    dir: PathBuf,
    seen: Seen,
    daemonize: bool,
    brokers: Vec<String>,
    group_id: String,
    fallback: Option<String>,
    kafka_debug: Option<String>,
    properties: Vec<(String, String)>,
    /// `offset.store.method`: `Some(true)` for file.
    offset_file: Option<bool>,
    offset_path: Option<(PathBuf, Location)>,
    offset_sync_interval: Duration,
    conf_path: Option<PathBuf>,
    poll_timeout: Duration,
    log_level: LogLevel,
    log_file: Option<PathBuf>,
    pid_path: Option<(PathBuf, Location)>,
    pid_file: Option<String>,
    user: Option<RunAs>,
    topics: Vec<(TopicConfig, Location)>,
    redis: Option<RedisServer>,
    redis_lists: Vec<(RedisListConfig, Location)>,
    redis_subscriptions: Vec<(RedisSubscribeConfig, Location)>,
    redis_notify_keyspace_events: Option<String>,
    /// The source the previous line configured, for a `command` line.
    last_source: Option<SourceLine>,
    filters: Vec<(CommandId, Location)>,
    /// `module FILE` lines; resolved once `conf-path` is known.
    modules: Vec<(String, Location)>,
    mysql: MysqlDraft,
    shutdown_timeout: Duration,
    max_message_bytes: u64,
    max_inflight_messages: u64,
    max_inflight_bytes: u64,
    /// `dispatch-log`, resolved, with where it was set.
    dispatch_log: Option<(DispatchLogTarget, Location)>,
    dispatch_log_success: bool,
    dispatch_log_queue: u64,
    dead_letter_topic: Option<String>,
    dead_letter_at: Option<Location>,
    admin_listen: Option<std::net::SocketAddr>,
    /// Where `admin-listen` was set, for the open-to-the-network warning.
    admin_listen_at: Option<Location>,
    admin_token: Option<String>,
    stuck_threshold: Duration,
    /// The `route FILE` line, loaded once the script limits are known.
    route: Option<(Directive, String)>,
    script_limits: crate::script::Limits,
}

impl ServerDraft {
    pub(super) fn new(dir: PathBuf) -> Self {
        ServerDraft {
            dir,
            seen: Seen::default(),
            daemonize: true,
            brokers: Vec::new(),
            group_id: DEFAULT_GROUP_ID.to_string(),
            fallback: None,
            kafka_debug: None,
            properties: Vec::new(),
            offset_file: None,
            offset_path: None,
            offset_sync_interval: ms(DEFAULT_OFFSET_SYNC_MS),
            conf_path: None,
            poll_timeout: ms(DEFAULT_POLL_TIMEOUT_MS),
            log_level: LogLevel::Notice,
            log_file: None,
            pid_path: None,
            pid_file: None,
            user: None,
            topics: Vec::new(),
            redis: None,
            redis_lists: Vec::new(),
            redis_subscriptions: Vec::new(),
            redis_notify_keyspace_events: None,
            last_source: None,
            filters: Vec::new(),
            modules: Vec::new(),
            mysql: MysqlDraft::default(),
            shutdown_timeout: secs(DEFAULT_SHUTDOWN_TIMEOUT_S),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_inflight_messages: DEFAULT_MAX_INFLIGHT_MESSAGES,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            dispatch_log: None,
            dispatch_log_success: false,
            dispatch_log_queue: DEFAULT_DISPATCH_LOG_QUEUE,
            dead_letter_topic: None,
            dead_letter_at: None,
            admin_listen: Some(DEFAULT_ADMIN_LISTEN),
            admin_listen_at: None,
            admin_token: None,
            stuck_threshold: secs(DEFAULT_STUCK_THRESHOLD_S),
            route: None,
            script_limits: crate::script::Limits::default(),
        }
    }

    pub(super) fn apply(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        // `command` belongs to the source configured on the line before.
        let previous = self.last_source.take();
        match key {
            "command" => self.command(d, previous, report),
            "redis" | "redis-list" | "redis-subscribe" | "redis-notify-keyspace-events" => {
                self.redis(d, report)
            }
            "daemonize" => {
                let Some(value) = report.single(d, "daemonize on|off") else {
                    return;
                };
                match parse_switch(value) {
                    Some(on) => {
                        self.seen.note(key, d, report);
                        self.daemonize = on;
                    }
                    None => report.error(
                        &d.location,
                        format!("daemonize: \"{value}\" is not on or off"),
                    ),
                }
            }
            "brokers" => {
                let Some(args) = report.args(d, 1, usize::MAX, "brokers HOST:PORT[,HOST:PORT...]")
                else {
                    return;
                };
                for broker in args.iter().flat_map(|arg| arg.split(',')) {
                    let broker = broker.trim();
                    if broker.is_empty() {
                        continue;
                    }
                    if !valid_broker(broker) {
                        report.error(
                            &d.location,
                            format!("brokers: \"{broker}\" is not host:port"),
                        );
                    } else if !self.brokers.iter().any(|known| known == broker) {
                        self.brokers.push(broker.to_string());
                    }
                }
            }
            "groupid" => {
                if let Some(value) = report.single(d, "groupid NAME") {
                    if value.is_empty() {
                        report.error(&d.location, "groupid: empty group id");
                    } else {
                        self.seen.note(key, d, report);
                        self.group_id = value.to_string();
                    }
                }
            }
            "fallback" => {
                if let Some(value) = report.single(d, "fallback VERSION") {
                    self.seen.note(key, d, report);
                    self.fallback = Some(value.to_string());
                }
            }
            "kafka-debug" => {
                if let Some(value) = report.single(d, "kafka-debug CONTEXTS") {
                    match librdkafka_accepts("debug", value) {
                        Ok(()) => {
                            self.seen.note(key, d, report);
                            self.kafka_debug = Some(value.to_string());
                        }
                        Err(why) => report.error(&d.location, format!("kafka-debug: {why}")),
                    }
                }
            }
            "property" => self.property(d, report),
            "conf-path" => {
                if let Some(value) = report.single(d, "conf-path DIR") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.conf_path = Some(path);
                    }
                }
            }
            "timeout" => {
                if let Some(value) = report.single(d, "timeout MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_MS, "(milliseconds)") {
                        self.seen.note(key, d, report);
                        self.poll_timeout = ms(n);
                    }
                }
            }
            "log-level" => {
                let usage = "log-level error|warning|notice|info|verbose|debug";
                let Some(value) = report.single(d, usage) else {
                    return;
                };
                match parse_log_level(value) {
                    Some(level) => {
                        self.seen.note(key, d, report);
                        self.log_level = level;
                    }
                    None => report.error(
                        &d.location,
                        format!(
                            "log-level: \"{value}\" is not one of error, warning, notice, \
                             info, verbose, debug"
                        ),
                    ),
                }
            }
            "log-file" => {
                if let Some(value) = report.single(d, "log-file PATH") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.log_file = Some(path);
                    }
                }
            }
            "pid-path" => {
                if let Some(value) = report.single(d, "pid-path DIR") {
                    if let Some(path) = report.path(d, value, &self.dir) {
                        self.seen.note(key, d, report);
                        self.pid_path = Some((path, d.location.clone()));
                    }
                }
            }
            "pid-file" => {
                if let Some(value) = report.single(d, "pid-file NAME") {
                    if value.is_empty() {
                        report.error(&d.location, "pid-file: empty path");
                    } else {
                        self.seen.note(key, d, report);
                        self.pid_file = Some(value.to_string());
                    }
                }
            }
            "user" => {
                if let Some(args) = report.args(d, 1, 2, "user NAME [GROUP]") {
                    match run_as(&args[0], args.get(1).map(String::as_str)) {
                        Ok(user) => {
                            self.seen.note(key, d, report);
                            self.user = Some(user);
                        }
                        Err(e) => report.error(&d.location, format!("user: {e}")),
                    }
                }
            }
            "topic" => self.topic(d, report),
            "filters" => report.command_ids(d, &mut self.filters),
            "module" => {
                if let Some(value) = report.single(d, "module FILE") {
                    if value.is_empty() {
                        report.error(&d.location, "module: empty path");
                    } else {
                        self.modules.push((value.to_string(), d.location.clone()));
                    }
                }
            }
            "mysql" => self.mysql(d, report),
            "shutdown_timeout" => {
                if let Some(value) = report.single(d, "shutdown_timeout SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_SECS, "(seconds)") {
                        self.seen.note(key, d, report);
                        self.shutdown_timeout = secs(n);
                    }
                }
            }
            "max-message-bytes" => {
                if let Some(value) = report.single(d, "max-message-bytes BYTES") {
                    let limit = MAX_MESSAGE_BYTES_LIMIT;
                    if let Some(n) = report.uint(d, "", value, 1, limit, "(bytes)") {
                        self.seen.note(key, d, report);
                        self.max_message_bytes = n;
                    }
                }
            }
            "max-inflight-messages" | "max-inflight-bytes" => {
                let usage = format!("{key} N");
                if let Some(value) = report.single(d, &usage) {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_MESSAGE_BYTES_LIMIT * 4, "") {
                        self.seen.note(key, d, report);
                        if key == "max-inflight-messages" {
                            self.max_inflight_messages = n;
                        } else {
                            self.max_inflight_bytes = n;
                        }
                    }
                }
            }
            "dispatch-log" => {
                if let Some(value) = report.single(d, "dispatch-log PATH|mysql://URL|sqlite://PATH")
                {
                    if let Some(target) = dispatch_log_target(d, value, &self.dir, report) {
                        self.seen.note(key, d, report);
                        self.dispatch_log = Some((target, d.location.clone()));
                    }
                }
            }
            "dispatch-log-success" => {
                let Some(value) = report.single(d, "dispatch-log-success on|off") else {
                    return;
                };
                match parse_switch(value) {
                    Some(on) => {
                        self.seen.note(key, d, report);
                        self.dispatch_log_success = on;
                    }
                    None => report.error(
                        &d.location,
                        format!("dispatch-log-success: \"{value}\" is not on or off"),
                    ),
                }
            }
            "dispatch-log-queue" => {
                if let Some(value) = report.single(d, "dispatch-log-queue RECORDS") {
                    let max = MAX_DISPATCH_LOG_QUEUE;
                    if let Some(n) = report.uint(d, "", value, 1, max, "(records)") {
                        self.seen.note(key, d, report);
                        self.dispatch_log_queue = n;
                    }
                }
            }
            "dead-letter-topic" => {
                if let Some(value) = report.single(d, "dead-letter-topic NAME") {
                    if let Some(name) = dead_letter_topic(d, value, report) {
                        self.seen.note(key, d, report);
                        self.dead_letter_topic = Some(name);
                        self.dead_letter_at = Some(d.location.clone());
                    }
                }
            }
            "admin-listen" | "admin-token" | "stuck-threshold" => self.admin(d, report),
            "route" => {
                if let Some(value) = report.single(d, "route FILE") {
                    self.seen.note(key, d, report);
                    self.route = Some((d.clone(), value.to_string()));
                }
            }
            "script-timeout" => {
                if let Some(value) = report.single(d, "script-timeout MILLISECONDS") {
                    let max = MAX_SCRIPT_TIMEOUT_MS;
                    if let Some(n) = report.uint(d, "", value, 1, max, "(milliseconds)") {
                        self.seen.note(key, d, report);
                        self.script_limits.timeout = ms(n);
                    }
                }
            }
            "script-memory" => {
                if let Some(value) = report.single(d, "script-memory BYTES") {
                    let max = MAX_SCRIPT_MEMORY;
                    if let Some(n) = report.uint(d, "", value, 1, max, "(bytes)") {
                        if n < MIN_SCRIPT_MEMORY {
                            report.error(
                                &d.location,
                                format!("script-memory: {n} is less than {MIN_SCRIPT_MEMORY} bytes (Lua needs some for itself)"),
                            );
                            return;
                        }
                        self.seen.note(key, d, report);
                        self.script_limits.memory = usize::try_from(n).unwrap_or(usize::MAX);
                    }
                }
            }
            "zookeeper" | "zookeeper-debug" => report.warn(
                &d.location,
                format!("{key} is ignored: mkc talks to the Kafka brokers directly"),
            ),
            _ => report.error(&d.location, format!("unknown key \"{key}\"")),
        }
    }

    pub(super) fn property(&mut self, d: &Directive, report: &mut Report) {
        let Some(args) = report.args(d, 2, 2, "property KEY VALUE") else {
            return;
        };
        let (name, value) = (args[0].as_str(), args[1].as_str());
        match name.to_ascii_lowercase().as_str() {
            "offset.store.method" => match value.to_ascii_lowercase().as_str() {
                method @ ("broker" | "file") => {
                    self.seen.note("property offset.store.method", d, report);
                    self.offset_file = Some(method == "file");
                }
                _ => report.error(
                    &d.location,
                    format!("property: offset.store.method \"{value}\" is not broker or file"),
                ),
            },
            "offset.store.path" => {
                if let Some(path) = report.path(d, value, &self.dir) {
                    self.seen.note("property offset.store.path", d, report);
                    self.offset_path = Some((path, d.location.clone()));
                }
            }
            "offset.store.sync.interval.ms" => {
                let what = "offset.store.sync.interval.ms";
                if let Some(n) = report.uint(d, what, value, 1, MAX_MS, "") {
                    self.seen
                        .note("property offset.store.sync.interval.ms", d, report);
                    self.offset_sync_interval = ms(n);
                }
            }
            "auto.offset.rest" => {
                report.warn(
                    &d.location,
                    "property auto.offset.rest is read as auto.offset.reset \
                     (a typo of the old documentation)",
                );
                self.properties
                    .push(("auto.offset.reset".to_string(), value.to_string()));
            }
            "enable.auto.commit" | "enable.auto.offset.store" => report.warn(
                &d.location,
                format!(
                    "property {name} is ignored: mkc commits offsets itself, \
                     only after delivery"
                ),
            ),
            _ => match librdkafka_accepts(name, value) {
                Ok(()) => self.properties.push((name.to_string(), value.to_string())),
                Err(why) => report.error(&d.location, format!("property {name}: {why}")),
            },
        }
    }

    pub(super) fn topic(&mut self, d: &Directive, report: &mut Report) {
        let Some(args) = report.args(d, 1, 2, "topic NAME [WORKERS]") else {
            return;
        };
        let name = args[0].as_str();
        let workers = match args.get(1) {
            Some(text) => report.uint(d, "worker count", text, 1, MAX_WORKERS, ""),
            None => Some(1),
        };
        if !valid_topic_name(name) {
            report.error(
                &d.location,
                format!(
                    "topic: \"{name}\" is not a valid Kafka topic name \
                     (letters, digits, '.', '_', '-'; at most {MAX_TOPIC_NAME})"
                ),
            );
            return;
        }
        if let Some((_, first)) = self.topics.iter().find(|(t, _)| t.name == name) {
            report.error(
                &d.location,
                format!(
                    "topic: \"{name}\" is already configured at line {}",
                    first.line
                ),
            );
            return;
        }
        // A bad count is already reported; the topic is still recorded so
        // that it does not also read as "no topic" or escape the duplicate
        // check.
        let workers = workers.and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
        let topic = TopicConfig {
            name: name.to_string(),
            workers,
            command: None,
        };
        self.topics.push((topic, d.location.clone()));
        self.last_source = Some(SourceLine::Topic(self.topics.len() - 1));
    }

    /// `command ID`, right after a source line.
    pub(super) fn command(
        &mut self,
        d: &Directive,
        previous: Option<SourceLine>,
        report: &mut Report,
    ) {
        let Some(value) = report.single(d, "command ID") else {
            return;
        };
        let Some(id) = CommandId::parse(value) else {
            report.error(
                &d.location,
                format!(
                    "command: \"{value}\" is not a command id (an integer in the 64-bit range)"
                ),
            );
            return;
        };
        let slot = match previous {
            Some(SourceLine::Topic(i)) => &mut self.topics[i].0.command,
            Some(SourceLine::List(i)) => &mut self.redis_lists[i].0.command,
            Some(SourceLine::Subscribe(i)) => &mut self.redis_subscriptions[i].0.command,
            None => {
                report.error(
                    &d.location,
                    "command: must follow a topic, redis-list or redis-subscribe line \
                     (it names the commandId of that source's non-envelope messages)",
                );
                return;
            }
        };
        *slot = Some(id);
    }

    /// `redis`, `redis-list`, `redis-subscribe`, `redis-notify-keyspace-events`.
    pub(super) fn redis(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        match key {
            "redis" => {
                let Some(value) = report.single(d, "redis redis://[:PASSWORD@]HOST:PORT[/DB]")
                else {
                    return;
                };
                match redis_server(value) {
                    Ok(server) => {
                        self.seen.note(key, d, report);
                        self.redis = Some(server);
                    }
                    Err(e) => report.error(&d.location, format!("redis: {e}")),
                }
            }
            "redis-list" => {
                let Some(args) = report.args(d, 1, 2, "redis-list KEY [WORKERS]") else {
                    return;
                };
                let name = args[0].as_str();
                let workers = match args.get(1) {
                    Some(text) => report.uint(d, "worker count", text, 1, MAX_WORKERS, ""),
                    None => Some(1),
                };
                if name.is_empty() {
                    report.error(&d.location, "redis-list: empty key");
                    return;
                }
                if let Some((_, first)) = self.redis_lists.iter().find(|(l, _)| l.key == name) {
                    report.error(
                        &d.location,
                        format!(
                            "redis-list: \"{name}\" is already configured at line {}",
                            first.line
                        ),
                    );
                    return;
                }
                let workers = workers.and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
                let list = RedisListConfig {
                    key: name.to_string(),
                    workers,
                    command: None,
                };
                self.redis_lists.push((list, d.location.clone()));
                self.last_source = Some(SourceLine::List(self.redis_lists.len() - 1));
            }
            "redis-subscribe" => {
                let Some(name) = report.single(d, "redis-subscribe CHANNEL|PATTERN") else {
                    return;
                };
                if name.is_empty() {
                    report.error(&d.location, "redis-subscribe: empty channel");
                    return;
                }
                if let Some((_, first)) = self
                    .redis_subscriptions
                    .iter()
                    .find(|(s, _)| s.channel == name)
                {
                    report.error(
                        &d.location,
                        format!(
                            "redis-subscribe: \"{name}\" is already configured at line {}",
                            first.line
                        ),
                    );
                    return;
                }
                let subscription = RedisSubscribeConfig {
                    channel: name.to_string(),
                    pattern: name.contains(['*', '?', '[']),
                    command: None,
                };
                self.redis_subscriptions
                    .push((subscription, d.location.clone()));
                self.last_source = Some(SourceLine::Subscribe(self.redis_subscriptions.len() - 1));
            }
            _ => {
                let Some(flags) = report.single(d, "redis-notify-keyspace-events FLAGS") else {
                    return;
                };
                if !flags.chars().all(|c| "KEg$lshzxetmdnA".contains(c)) {
                    report.error(
                        &d.location,
                        format!(
                            "redis-notify-keyspace-events: \"{flags}\" has a flag Redis does not \
                             know (K E g $ l s h z x e t m d n A)"
                        ),
                    );
                    return;
                }
                self.seen.note(key, d, report);
                self.redis_notify_keyspace_events = Some(flags.to_string());
            }
        }
    }

    /// `admin-listen`, `admin-token`, `stuck-threshold` (docs/admin.md).
    pub(super) fn admin(&mut self, d: &Directive, report: &mut Report) {
        let key = d.key.as_str();
        match key {
            "admin-listen" => {
                let Some(value) = report.single(d, "admin-listen ADDR:PORT|off") else {
                    return;
                };
                if value.eq_ignore_ascii_case("off") {
                    self.seen.note(key, d, report);
                    self.admin_listen = None;
                    return;
                }
                match value.parse::<std::net::SocketAddr>() {
                    Ok(addr) => {
                        self.seen.note(key, d, report);
                        self.admin_listen = Some(addr);
                        self.admin_listen_at = Some(d.location.clone());
                    }
                    Err(_) => report.error(
                        &d.location,
                        format!("admin-listen: \"{value}\" is not IP:PORT or off"),
                    ),
                }
            }
            "admin-token" => {
                let Some(value) = report.single(d, "admin-token TOKEN") else {
                    return;
                };
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
                    report.error(
                        &d.location,
                        "admin-token: must be non-empty printable ASCII without spaces",
                    );
                } else {
                    self.seen.note(key, d, report);
                    self.admin_token = Some(value.to_string());
                }
            }
            _ => {
                if let Some(value) = report.single(d, "stuck-threshold SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        self.seen.note(key, d, report);
                        self.stuck_threshold = secs(n);
                    }
                }
            }
        }
    }

    pub(super) fn mysql(&mut self, d: &Directive, report: &mut Report) {
        let usage = "mysql host|port|user_name|password|db_name VALUE";
        let Some(args) = report.args(d, 2, 2, usage) else {
            return;
        };
        let (field, value) = (args[0].to_ascii_lowercase(), args[1].as_str());
        let slot = match field.as_str() {
            "host" => &mut self.mysql.host,
            "user_name" => &mut self.mysql.user,
            "password" => &mut self.mysql.password,
            "db_name" => &mut self.mysql.database,
            "port" => {
                if let Some(port) = report.uint(d, "port", value, 1, u64::from(u16::MAX), "") {
                    self.seen.note("mysql port", d, report);
                    self.mysql.port = u16::try_from(port).ok();
                    self.mysql.first.get_or_insert_with(|| d.location.clone());
                }
                return;
            }
            _ => {
                report.error(
                    &d.location,
                    format!(
                        "mysql: unknown setting \"{}\" (host, port, user_name, password, db_name)",
                        args[0]
                    ),
                );
                return;
            }
        };
        *slot = Some(value.to_string());
        self.seen.note(&format!("mysql {field}"), d, report);
        self.mysql.first.get_or_insert_with(|| d.location.clone());
    }

    /// Applies defaults, reads the module files and checks the rules that
    /// need the whole file (reporting what is missing).
    pub(super) fn finish(
        self,
        path: &Path,
        read_module: &impl Fn(&Path) -> io::Result<Vec<u8>>,
        report: &mut Report,
    ) -> ServerConfig {
        let shown = path.display();
        let redis_sources = self.redis_lists.len() + self.redis_subscriptions.len();
        // A Redis-only configuration needs no Kafka, unless it produces
        // dead letters to a Kafka topic.
        let needs_kafka = !self.topics.is_empty() || self.dead_letter_topic.is_some();
        if self.brokers.is_empty() && needs_kafka {
            report.error_unplaced(format!(
                "{shown}: no brokers configured (add a `brokers HOST:PORT` line)"
            ));
        }
        if self.topics.is_empty() && redis_sources == 0 {
            report.error_unplaced(format!(
                "{shown}: no source configured (add a `topic NAME [WORKERS]`, \
                 `redis-list KEY [WORKERS]` or `redis-subscribe CHANNEL` line)"
            ));
        }
        if redis_sources > 0 && self.redis.is_none() {
            report.error_unplaced(format!(
                "{shown}: redis-list and redis-subscribe need the Redis server \
                 (add a `redis redis://HOST:PORT` line)"
            ));
        }
        if self.modules.is_empty() {
            report.error_unplaced(format!(
                "{shown}: no module configured (add a `module FILE` line)"
            ));
        }

        let offset_store = match (self.offset_file, self.offset_path) {
            (Some(true), Some((dir, _))) => OffsetStore::File { dir },
            // librdkafka's default path was ".", which mkc reads as
            // server.conf's directory like every other relative path.
            (Some(true), None) => OffsetStore::File {
                dir: self.dir.clone(),
            },
            (_, Some((_, at))) => {
                report.warn(
                    &at,
                    "property offset.store.path is ignored: offset.store.method is not file",
                );
                OffsetStore::Broker
            }
            (_, None) => OffsetStore::Broker,
        };

        let pid_name = self.pid_file.as_deref().unwrap_or(DEFAULT_PID_FILE);
        let pid_file = if Path::new(pid_name).is_absolute() {
            if let Some((_, at)) = &self.pid_path {
                report.warn(at, "pid-path is ignored: pid-file is an absolute path");
            }
            PathBuf::from(pid_name)
        } else {
            let dir = self
                .pid_path
                .map_or_else(|| self.dir.clone(), |(dir, _)| dir);
            dir.join(pid_name)
        };

        let mysql_at = self.mysql.first.clone();
        if let (Some(addr), Some(at)) = (self.admin_listen, &self.admin_listen_at) {
            if !addr.ip().is_loopback() && self.admin_token.is_none() {
                report.warn(
                    at,
                    format!(
                        "admin-listen {addr} is not a loopback address: metrics and the \
                         status page are readable from the network (read-only: no \
                         admin-token is set)"
                    ),
                );
            }
        }
        let mysql = finish_mysql(self.mysql, report);
        let dispatch_log = match (self.dispatch_log, &mysql) {
            (Some((target, _)), Some(_)) => {
                if let Some(at) = &mysql_at {
                    report.warn(
                        at,
                        "the mysql lines are not used for the dispatch log: dispatch-log is set",
                    );
                }
                target
            }
            (Some((target, _)), None) => target,
            (None, Some(m)) => DispatchLogTarget::Mysql(m.clone()),
            (None, None) => DispatchLogTarget::Sqlite(
                pid_file
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(DEFAULT_DISPATCH_LOG_FILE),
            ),
        };
        let conf_path = self.conf_path.unwrap_or_else(|| self.dir.clone());
        let modules = load_modules(
            &self.modules,
            &conf_path,
            &self.filters,
            read_module,
            self.script_limits,
            report,
        );
        let route = self.route.as_ref().and_then(|(d, value)| {
            let scripts = ScriptLoader {
                base: &self.dir,
                read: read_module,
                limits: self.script_limits,
            };
            scripts.load(d, value, crate::script::Entry::Route, report)
        });
        // A dead-letter topic that is also consumed would feed its letters
        // back in (an invalid message, forever).
        let consumed = |name: &str| self.topics.iter().any(|(t, _)| t.name == name);
        if let (Some(name), Some(at)) = (&self.dead_letter_topic, &self.dead_letter_at) {
            if consumed(name) {
                report.error(
                    at,
                    format!("dead-letter-topic: {name} is a consumed topic (letters would loop)"),
                );
            }
        }
        for m in &modules {
            if let Some(name) = m.dead_letter_topic.as_deref().filter(|n| consumed(n)) {
                report.error_unplaced(format!(
                    "{}: dead_letter_topic: {name} is a consumed topic (letters would loop)",
                    m.file.display()
                ));
            }
            // Dead-letter topics are Kafka topics: without brokers (a
            // Redis-only configuration) every letter would be retried
            // forever and its message would never be acknowledged.
            if let Some(name) = m.dead_letter_topic.as_deref() {
                if self.brokers.is_empty() && !needs_kafka {
                    report.error_unplaced(format!(
                        "{}: dead_letter_topic {name} is a Kafka topic: no brokers configured \
                         (add a `brokers HOST:PORT` line)",
                        m.file.display()
                    ));
                }
            }
        }

        ServerConfig {
            path: path.to_path_buf(),
            daemonize: self.daemonize,
            brokers: self.brokers,
            group_id: self.group_id,
            fallback: self.fallback,
            kafka_debug: self.kafka_debug,
            properties: self.properties,
            offset_store,
            offset_sync_interval: self.offset_sync_interval,
            conf_path,
            poll_timeout: self.poll_timeout,
            log_level: self.log_level,
            log_file: self.log_file,
            pid_file,
            user: self.user,
            topics: self.topics.into_iter().map(|(topic, _)| topic).collect(),
            redis: self.redis,
            redis_lists: self.redis_lists.into_iter().map(|(l, _)| l).collect(),
            redis_subscriptions: self
                .redis_subscriptions
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            redis_notify_keyspace_events: self.redis_notify_keyspace_events,
            filters: self.filters.into_iter().map(|(id, _)| id).collect(),
            modules,
            mysql,
            shutdown_timeout: self.shutdown_timeout,
            max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
            max_inflight_messages: usize::try_from(self.max_inflight_messages)
                .unwrap_or(usize::MAX),
            max_inflight_bytes: usize::try_from(self.max_inflight_bytes).unwrap_or(usize::MAX),
            dispatch_log,
            dispatch_log_success: self.dispatch_log_success,
            dispatch_log_queue: usize::try_from(self.dispatch_log_queue).unwrap_or(usize::MAX),
            dead_letter_topic: self.dead_letter_topic,
            admin_listen: self.admin_listen,
            admin_token: self.admin_token,
            stuck_threshold: self.stuck_threshold,
            route,
            script_limits: self.script_limits,
        }
    }
}

/// `user NAME [GROUP]`, looked up in the system's user and group
/// databases: GROUP defaults to the user's primary group; without GROUP
/// the supplementary groups are the user's own, with it only GROUP.
pub(super) fn run_as(name: &str, group: Option<&str>) -> Result<RunAs, String> {
    use nix::unistd::{getgrouplist, Group, User};
    let user = match User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(format!("unknown user \"{name}\"")),
        Err(e) => return Err(format!("cannot look up user \"{name}\": {e}")),
    };
    let (group_name, gid, groups) = match group {
        Some(g) => match Group::from_name(g) {
            Ok(Some(found)) => (g.to_string(), found.gid, vec![found.gid]),
            Ok(None) => return Err(format!("unknown group \"{g}\"")),
            Err(e) => return Err(format!("cannot look up group \"{g}\": {e}")),
        },
        None => {
            let shown = match Group::from_gid(user.gid) {
                Ok(Some(found)) => found.name,
                _ => user.gid.to_string(),
            };
            let groups = std::ffi::CString::new(name)
                .ok()
                .and_then(|c| getgrouplist(&c, user.gid).ok())
                .unwrap_or_else(|| vec![user.gid]);
            (shown, user.gid, groups)
        }
    };
    Ok(RunAs {
        user: name.to_string(),
        group: group_name,
        uid: user.uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    })
}

/// Which source a line configured (index into its list of the draft).
#[derive(Debug, Clone, Copy)]
pub(super) enum SourceLine {
    Topic(usize),
    List(usize),
    Subscribe(usize),
}

/// `redis`'s value: `redis://[:PASSWORD@]HOST:PORT[/DB]` or `HOST:PORT`.
pub(super) fn redis_server(value: &str) -> Result<RedisServer, String> {
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("redis://{value}")
    };
    let url = Url::parse(&text).map_err(|e| format!("\"{value}\" is not a Redis URL: {e}"))?;
    if url.scheme() != "redis" {
        return Err(format!(
            "\"{value}\": only redis:// URLs are supported (scheme {})",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("\"{value}\" has no host"));
    }
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        db => db
            .parse::<u32>()
            .map_err(|_| format!("\"{value}\": database \"{db}\" is not a number"))?,
    };
    Ok(RedisServer {
        url: url.to_string(),
        db,
    })
}

/// `dispatch-log`'s value: `mysql://...` / `mariadb://...` (MySQL or
/// MariaDB), `sqlite://PATH` or a plain PATH (SQLite, relative to `dir`).
pub(super) fn dispatch_log_target(
    d: &Directive,
    value: &str,
    dir: &Path,
    report: &mut Report,
) -> Option<DispatchLogTarget> {
    let lower = value.to_ascii_lowercase();
    if lower.starts_with("mysql://") || lower.starts_with("mariadb://") {
        return match Url::parse(value) {
            Ok(url) if url.has_host() && url.path().trim_start_matches('/').is_empty() => {
                report.error(
                    &d.location,
                    "dispatch-log: the URL names no database (mysql://USER:PASSWORD@HOST:PORT/DATABASE)",
                );
                None
            }
            Ok(url) if url.has_host() => {
                match crate::record::dispatch_log::mysql_options_from_url(value) {
                    Ok(_) => Some(DispatchLogTarget::MysqlUrl(value.to_string())),
                    Err(err) => {
                        report.error(&d.location, format!("dispatch-log: {err}"));
                        None
                    }
                }
            }
            Ok(_) => {
                report.error(&d.location, "dispatch-log: the URL names no host");
                None
            }
            Err(err) => {
                report.error(&d.location, format!("dispatch-log: not a URL: {err}"));
                None
            }
        };
    }
    let path = if lower.starts_with("sqlite://") {
        &value["sqlite://".len()..]
    } else if lower.contains("://") {
        report.error(
            &d.location,
            format!("dispatch-log: \"{value}\" is not a mysql://, mariadb:// or sqlite:// URL nor a path"),
        );
        return None;
    } else {
        value
    };
    report.path(d, path, dir).map(DispatchLogTarget::Sqlite)
}

/// A dead-letter topic name, checked like a `topic` line's.
pub(super) fn dead_letter_topic(d: &Directive, value: &str, report: &mut Report) -> Option<String> {
    if valid_topic_name(value) {
        Some(value.to_string())
    } else {
        report.error(
            &d.location,
            format!(
                "{}: \"{value}\" is not a valid Kafka topic name \
                 (letters, digits, '.', '_', '-'; at most {MAX_TOPIC_NAME})",
                d.key
            ),
        );
        None
    }
}

pub(super) fn finish_mysql(draft: MysqlDraft, report: &mut Report) -> Option<MysqlConfig> {
    let first = draft.first?;
    let mut required = |value: Option<String>, name: &str| {
        if value.is_none() {
            report.error(
                &first,
                format!("mysql: {name} is not set (add a `mysql {name} VALUE` line)"),
            );
        }
        value
    };
    let host = required(draft.host, "host");
    let user = required(draft.user, "user_name");
    let database = required(draft.database, "db_name");
    Some(MysqlConfig {
        host: host?,
        port: draft.port.unwrap_or(3306),
        user: user?,
        password: draft.password.unwrap_or_default(),
        database: database?,
    })
}

/// Whether librdkafka takes `name = value` (a known property, a value of
/// its type and range), asked the way a worker's consumer will be built,
/// so that `-t` and `-s reload` refuse what would otherwise stop every
/// worker at start. Only a configuration object is made: no client, no
/// thread, nothing sent (safe in the master before it forks).
pub(super) fn librdkafka_accepts(name: &str, value: &str) -> Result<(), String> {
    let mut config = rdkafka::ClientConfig::new();
    config.set(name, value);
    match config.create_native_config() {
        Ok(_) => Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, why, _, _)) => Err(why),
        Err(other) => Err(other.to_string()),
    }
}
