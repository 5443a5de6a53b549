use super::*;

const DIR: &str = "/etc/mkc";
const SERVER: &str = "/etc/mkc/server.conf";

/// A valid server.conf needing only `m.conf` (see [`MODULE_M`]).
const MINIMAL: &str = "brokers 127.0.0.1:9092\ntopic orders\nmodule m.conf\n";
const MODULE_M: &str = "name m\nuri http://127.0.0.1:8080/m\nfilters 1\n";

/// Loads `server` as /etc/mkc/server.conf; module files are looked up
/// in `modules` by their path relative to /etc/mkc.
fn load_with(server: &str, modules: &[(&str, &str)]) -> Result<Loaded, Vec<Diagnostic>> {
    let files: HashMap<PathBuf, Vec<u8>> = modules
        .iter()
        .map(|(name, text)| (Path::new(DIR).join(name), text.as_bytes().to_vec()))
        .collect();
    load_str(Path::new(SERVER), server, |path| {
        files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    })
}

fn render(diagnostics: &[Diagnostic]) -> Vec<String> {
    diagnostics.iter().map(ToString::to_string).collect()
}

#[track_caller]
fn accepted(server: &str, modules: &[(&str, &str)]) -> Loaded {
    match load_with(server, modules) {
        Ok(loaded) => loaded,
        Err(errors) => panic!("rejected: {:#?}", render(&errors)),
    }
}

#[track_caller]
fn rejected(server: &str, modules: &[(&str, &str)]) -> Vec<String> {
    match load_with(server, modules) {
        Ok(loaded) => panic!("accepted: {:#?}", loaded.config),
        Err(errors) => render(&errors),
    }
}

/// The minimal configuration plus `extra` server lines.
fn server_with(extra: &str) -> Loaded {
    accepted(&format!("{MINIMAL}{extra}"), &[("m.conf", MODULE_M)])
}

/// The minimal configuration with `extra` lines in the module file.
fn module_with(extra: &str) -> Loaded {
    accepted(MINIMAL, &[("m.conf", &format!("{MODULE_M}{extra}"))])
}

fn warnings(loaded: &Loaded) -> Vec<String> {
    render(&loaded.warnings)
}

fn parse(text: &[u8]) -> Result<Vec<Directive>, Vec<Diagnostic>> {
    parse_reader(Path::new("x.conf"), text)
}

fn keys_and_args(directives: &[Directive]) -> Vec<(usize, String, Vec<String>)> {
    directives
        .iter()
        .map(|d| (d.location.line, d.key.clone(), d.args.clone()))
        .collect()
}

fn owned(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---- stage 1: the line format ----

#[test]
fn comments_blank_and_indented_lines() {
    let text = b"# comment\n\n   \n\t# indented comment\n  name a # trailing\n\tfilters 1 2\n";
    let directives = parse(text).unwrap();
    assert_eq!(
        keys_and_args(&directives),
        vec![
            (5, "name".to_string(), owned(&["a"])),
            (6, "filters".to_string(), owned(&["1", "2"])),
        ]
    );
    assert_eq!(directives[0].location.path, PathBuf::from("x.conf"));
}

#[test]
fn hash_inside_a_token_is_not_a_comment() {
    let directives = parse(b"uri http://h/p#frag #comment\n").unwrap();
    assert_eq!(directives[0].args, owned(&["http://h/p#frag"]));
}

#[test]
fn quoted_values_and_escapes() {
    let text = br##"password "a b  c" "" "say \"hi\"" "back\\slash" "keep \n" "#x""##;
    let directives = parse(text).unwrap();
    assert_eq!(
        directives[0].args,
        owned(&["a b  c", "", "say \"hi\"", "back\\slash", "keep \\n", "#x"])
    );
}

#[test]
fn quote_inside_an_unquoted_token_is_literal() {
    let directives = parse(b"uri http://h/?a=\"b\"\n").unwrap();
    assert_eq!(directives[0].args, owned(&["http://h/?a=\"b\""]));
}

#[test]
fn unterminated_quote_and_text_after_quote_are_errors() {
    let errors = render(&parse(b"ok 1\nname \"abc\nname \"a\"b\n").unwrap_err());
    assert_eq!(
        errors,
        vec![
            "x.conf:2: unterminated quoted string",
            "x.conf:3: a closing quote must be followed by a space or the end of the line",
        ]
    );
}

#[test]
fn keys_are_case_insensitive() {
    let directives = parse(b"LOG-Level Verbose\nTopic Orders 2\n").unwrap();
    assert_eq!(
        keys_and_args(&directives),
        vec![
            (1, "log-level".to_string(), owned(&["Verbose"])),
            (2, "topic".to_string(), owned(&["Orders", "2"])),
        ]
    );
    let loaded = server_with("LOG-LEVEL VERBOSE\nDaemonize OFF\n");
    assert_eq!(loaded.config.log_level, LogLevel::Debug);
    assert!(!loaded.config.daemonize);
}

#[test]
fn crlf_bom_and_non_utf8_comments_are_tolerated() {
    let text = b"\xEF\xBB\xBFname a\r\n# \xC4\xE3\xBA\xC3 gbk\r\n\t#\xFF\xFE\r\nuri x\r\n";
    let directives = parse(text).unwrap();
    assert_eq!(
        keys_and_args(&directives),
        vec![
            (1, "name".to_string(), owned(&["a"])),
            (4, "uri".to_string(), owned(&["x"])),
        ]
    );
    let directives = parse(b"name a # \xFF trailing comment\n").unwrap();
    assert_eq!(directives[0].args, owned(&["a"]));
}

#[test]
fn non_utf8_value_is_an_error_naming_the_line() {
    let errors = render(&parse(b"name ok\nname caf\xE9\n").unwrap_err());
    assert_eq!(
        errors,
        vec!["x.conf:2: the line is not valid UTF-8 (only comments may hold other bytes)"]
    );
}

#[test]
fn non_utf8_module_file_is_reported_by_load() {
    let read = |path: &Path| -> io::Result<Vec<u8>> {
        if path == Path::new("/etc/mkc/m.conf") {
            Ok(b"name m\nuri http://h/\nfilters 1\nname \xFF\n".to_vec())
        } else {
            Err(io::Error::from(io::ErrorKind::NotFound))
        }
    };
    let errors = render(&load_str(Path::new(SERVER), MINIMAL, read).unwrap_err());
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf:4: the line is not valid UTF-8 (only comments may hold other bytes)"]
    );
}

#[test]
fn empty_quoted_key_is_an_error() {
    let errors = render(&parse(b"\"\" value\n").unwrap_err());
    assert_eq!(errors, vec!["x.conf:1: empty key"]);
}

#[test]
fn hostile_input_never_panics() {
    let inputs: [&[u8]; 10] = [
        b"\"",
        b"\"\\",
        b"\"\\\"",
        b"\\\"\"\"\"",
        b"\xEF\xBB",
        b"\xEF\xBB\xBF",
        b"\r\r\r\n\n\x00\x0b",
        b"topic \"\" \"\"",
        b"# \xFF\n\xFF",
        b"a\tb\x0cc\"d\"\"",
    ];
    for input in inputs {
        let _ = parse(input);
        let text = String::from_utf8_lossy(input);
        let _ = load_with(&text, &[("m.conf", &text)]);
    }
    for text in [
        "topic a 99999999999999999999999999",
        "timeout -1",
        "mysql port 70000",
        "filters 99999999999999999999999",
        "brokers :,::,:0,a:",
        "pid-file \"\"",
        "module \"\"",
        "property",
    ] {
        assert!(load_with(text, &[]).is_err(), "{text}");
    }
}

#[test]
fn read_error_is_reported() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    let errors = render(&parse_reader(Path::new("x.conf"), Failing).unwrap_err());
    assert_eq!(errors, vec!["cannot read x.conf: disk on fire"]);
}

// ---- server.conf ----

#[test]
fn every_server_key_is_read_into_its_field() {
    let server = r#"
daemonize off
brokers k1:9092,k2:9093
brokers k3:9094
groupid group-a
fallback 0.8.2
kafka-debug consumer,cgrp
property fetch.min.bytes 1
property auto.offset.reset earliest
property offset.store.method file
property offset.store.path /var/lib/mkc/offsets
property offset.store.sync.interval.ms 250
conf-path modules
timeout 500
log-level info
log-file /var/log/mkc.log
pid-path /run
pid-file mkc-a.pid
topic orders 4
topic "siren"
filters 7 8
filters 9
module m.conf
mysql host db.local
mysql port 3307
mysql user_name mkc
mysql password "p w"
mysql db_name queue
shutdown_timeout 10
max-message-bytes 1024
"#;
    let loaded = accepted(
        server,
        &[("modules/m.conf", "name m\nuri http://h/\nfilters 7\n")],
    );
    let config = loaded.config;
    assert_eq!(config.path, PathBuf::from(SERVER));
    assert!(!config.daemonize);
    assert_eq!(config.brokers, owned(&["k1:9092", "k2:9093", "k3:9094"]));
    assert_eq!(config.group_id, "group-a");
    assert_eq!(config.fallback.as_deref(), Some("0.8.2"));
    assert_eq!(config.kafka_debug.as_deref(), Some("consumer,cgrp"));
    assert_eq!(
        config.properties,
        vec![
            ("fetch.min.bytes".to_string(), "1".to_string()),
            ("auto.offset.reset".to_string(), "earliest".to_string()),
        ]
    );
    assert_eq!(
        config.offset_store,
        OffsetStore::File {
            dir: PathBuf::from("/var/lib/mkc/offsets")
        }
    );
    assert_eq!(config.offset_sync_interval, Duration::from_millis(250));
    assert_eq!(config.conf_path, PathBuf::from("/etc/mkc/modules"));
    assert_eq!(config.poll_timeout, Duration::from_millis(500));
    assert_eq!(config.log_level, LogLevel::Info);
    assert_eq!(config.log_file, Some(PathBuf::from("/var/log/mkc.log")));
    assert_eq!(config.pid_file, PathBuf::from("/run/mkc-a.pid"));
    assert_eq!(
        config.topics,
        vec![
            TopicConfig {
                name: "orders".to_string(),
                workers: 4,
                command: None
            },
            TopicConfig {
                name: "siren".to_string(),
                workers: 1,
                command: None
            },
        ]
    );
    assert_eq!(
        config.filters,
        vec![CommandId(7), CommandId(8), CommandId(9)]
    );
    assert_eq!(config.modules.len(), 1);
    assert_eq!(
        config.modules[0].file,
        PathBuf::from("/etc/mkc/modules/m.conf")
    );
    assert_eq!(
        config.mysql,
        Some(MysqlConfig {
            host: "db.local".to_string(),
            port: 3307,
            user: "mkc".to_string(),
            password: "p w".to_string(),
            database: "queue".to_string(),
        })
    );
    assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(config.max_message_bytes, 1024);
    // Global filters 8 and 9 have no module: one warning each.
    assert_eq!(
        render(&loaded.warnings),
        vec![
            "/etc/mkc/server.conf:21: filters: no module lists 8; its messages are \
             acknowledged without dispatch",
            "/etc/mkc/server.conf:22: filters: no module lists 9; its messages are \
             acknowledged without dispatch",
        ]
    );
}

#[test]
fn server_defaults() {
    let loaded = server_with("");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let config = loaded.config;
    assert!(config.daemonize);
    assert_eq!(config.group_id, "mkc");
    assert_eq!(config.fallback, None);
    assert_eq!(config.kafka_debug, None);
    assert!(config.properties.is_empty());
    assert_eq!(config.offset_store, OffsetStore::Broker);
    assert_eq!(config.offset_sync_interval, Duration::from_millis(1000));
    assert_eq!(config.conf_path, PathBuf::from(DIR));
    assert_eq!(config.poll_timeout, Duration::from_millis(1000));
    assert_eq!(config.log_level, LogLevel::Notice);
    assert_eq!(config.log_file, None);
    assert_eq!(config.pid_file, PathBuf::from("/etc/mkc/mkc.pid"));
    assert_eq!(config.topics[0].workers, 1);
    assert!(config.filters.is_empty());
    assert_eq!(config.mysql, None);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.max_message_bytes, 4_194_304);
}

#[test]
fn daemonize_values() {
    for (text, expected) in [
        ("on", true),
        ("yes", true),
        ("true", true),
        ("1", true),
        ("off", false),
        ("No", false),
        ("FALSE", false),
        ("0", false),
    ] {
        let loaded = server_with(&format!("daemonize {text}\n"));
        assert_eq!(loaded.config.daemonize, expected, "{text}");
    }
    let errors = rejected(
        &format!("{MINIMAL}daemonize maybe\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:4: daemonize: \"maybe\" is not on or off"]
    );
}

#[test]
fn log_levels() {
    for (text, expected) in [
        ("error", LogLevel::Error),
        ("warning", LogLevel::Warning),
        ("notice", LogLevel::Notice),
        ("info", LogLevel::Info),
        ("verbose", LogLevel::Debug),
        ("debug", LogLevel::Debug),
    ] {
        let loaded = server_with(&format!("log-level {text}\n"));
        assert_eq!(loaded.config.log_level, expected, "{text}");
    }
    let errors = rejected(
        &format!("{MINIMAL}log-level loud\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: log-level: \"loud\" is not one of error, warning, \
             notice, info, verbose, debug"
        ]
    );
}

#[test]
fn unknown_key_is_an_error_with_path_and_line() {
    let errors = rejected(
        &format!("{MINIMAL}\n  colour blue\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:5: unknown key \"colour\""]
    );
    let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}priority 1\n"))]);
    assert_eq!(errors, vec!["/etc/mkc/m.conf:4: unknown key \"priority\""]);
}

#[test]
fn bad_number_is_an_error_with_path_and_line() {
    let errors = rejected(
        "brokers h:1\nmodule m.conf\ntopic orders x\n",
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:3: topic: worker count \"x\" is not a positive integer",]
    );
    let errors = rejected(&format!("{MINIMAL}timeout 1.5\n"), &[("m.conf", MODULE_M)]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:4: timeout: \"1.5\" is not a positive integer (milliseconds)"]
    );
    let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}delay -5\n"))]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf:4: delay: \"-5\" is not a non-negative integer (milliseconds)"]
    );
    let errors = rejected(
        &format!("{MINIMAL}shutdown_timeout 99999999999999999999999\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: shutdown_timeout: 99999999999999999999999 is too \
             large (at most 31536000 (seconds))"
        ]
    );
}

#[test]
fn wrong_argument_count_is_an_error() {
    let errors = rejected(
        &format!("{MINIMAL}groupid\ntopic a 1 2\nproperty a\nbrokers\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: groupid: expected 1 argument (`groupid NAME`), found 0",
            "/etc/mkc/server.conf:5: topic: expected 1 to 2 arguments \
             (`topic NAME [WORKERS]`), found 3",
            "/etc/mkc/server.conf:6: property: expected 2 arguments \
             (`property KEY VALUE`), found 1",
            "/etc/mkc/server.conf:7: brokers: expected at least 1 argument \
             (`brokers HOST:PORT[,HOST:PORT...]`), found 0",
        ]
    );
}

#[test]
fn all_errors_of_all_files_are_reported() {
    let server = "brokers nope\ntopic a 0\ncolour x\nmodule m.conf\nmodule gone.conf\n";
    let module = "name m\nuri ftp://h/\nretrynum many\nfilters x\n";
    let errors = rejected(server, &[("m.conf", module)]);
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:1: brokers: \"nope\" is not host:port",
            "/etc/mkc/server.conf:2: topic: worker count \"0\" is not a positive integer",
            "/etc/mkc/server.conf:3: unknown key \"colour\"",
            "/etc/mkc/server.conf: no brokers configured (add a `brokers HOST:PORT` line)",
            "/etc/mkc/m.conf:2: uri: \"ftp://h/\" is not an http or https URL",
            "/etc/mkc/m.conf:3: retrynum: \"many\" is not a non-negative integer",
            "/etc/mkc/m.conf:4: filters: \"x\" is not a command id (an integer in the \
             64-bit range)",
            "/etc/mkc/server.conf:5: module: cannot read /etc/mkc/gone.conf: entity not found",
        ]
    );
}

#[test]
fn requirements_broker_topic_module() {
    let errors = rejected("", &[]);
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf: no source configured (add a `topic NAME [WORKERS]`, \
             `redis-list KEY [WORKERS]` or `redis-subscribe CHANNEL` line)",
            "/etc/mkc/server.conf: no module configured (add a `module FILE` line)",
        ]
    );
    // A topic needs brokers.
    let errors = rejected("topic t\nmodule m.conf\n", &[("m.conf", MODULE_M)]);
    assert_eq!(
        errors,
        ["/etc/mkc/server.conf: no brokers configured (add a `brokers HOST:PORT` line)"]
    );
    // So does a module's dead-letter topic in a Redis-only configuration.
    let module = format!("{MODULE_M}dead_letter_topic dead\n");
    let errors = rejected(
        "redis 127.0.0.1:6379\nredis-list jobs\nmodule m.conf\n",
        &[("m.conf", module.as_str())],
    );
    assert_eq!(
        errors,
        [
            "/etc/mkc/m.conf: dead_letter_topic dead is a Kafka topic: no brokers configured \
          (add a `brokers HOST:PORT` line)"
        ]
    );
}

#[test]
fn zookeeper_keys_are_accepted_with_a_warning() {
    let loaded = server_with("zookeeper 127.0.0.1:2181\nzookeeper-debug all\n");
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/server.conf:4: zookeeper is ignored: mkc talks to the Kafka brokers \
             directly",
            "/etc/mkc/server.conf:5: zookeeper-debug is ignored: mkc talks to the Kafka \
             brokers directly",
        ]
    );
}

#[test]
fn auto_offset_rest_is_renamed_with_a_warning() {
    let loaded = server_with("property auto.offset.rest smallest\n");
    assert_eq!(
        loaded.config.properties,
        vec![("auto.offset.reset".to_string(), "smallest".to_string())]
    );
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/server.conf:4: property auto.offset.rest is read as auto.offset.reset \
             (a typo of the old documentation)"
        ]
    );
}

#[test]
fn auto_commit_properties_are_dropped_with_a_warning() {
    let loaded =
        server_with("property enable.auto.commit true\nproperty enable.auto.offset.store true\n");
    assert!(loaded.config.properties.is_empty());
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/server.conf:4: property enable.auto.commit is ignored: mkc commits \
             offsets itself, only after delivery",
            "/etc/mkc/server.conf:5: property enable.auto.offset.store is ignored: mkc \
             commits offsets itself, only after delivery",
        ]
    );
}

#[test]
fn offset_store_keys_are_kept_out_of_properties() {
    let loaded = server_with(
        "property offset.store.path offsets\nproperty offset.store.method FILE\n\
         property offset.store.sync.interval.ms 100\nproperty queued.min.messages 10\n",
    );
    let config = &loaded.config;
    assert_eq!(
        config.properties,
        vec![("queued.min.messages".to_string(), "10".to_string())]
    );
    assert_eq!(
        config.offset_store,
        OffsetStore::File {
            dir: PathBuf::from("/etc/mkc/offsets")
        }
    );
    assert_eq!(config.offset_sync_interval, Duration::from_millis(100));
    assert!(loaded.warnings.is_empty());

    // File store without a path: server.conf's directory.
    let loaded = server_with("property offset.store.method file\n");
    assert_eq!(
        loaded.config.offset_store,
        OffsetStore::File {
            dir: PathBuf::from(DIR)
        }
    );

    // A path with the broker store means nothing: warned.
    let loaded =
        server_with("property offset.store.method broker\nproperty offset.store.path offsets\n");
    assert_eq!(loaded.config.offset_store, OffsetStore::Broker);
    assert!(loaded.config.properties.is_empty());
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/server.conf:5: property offset.store.path is ignored: \
             offset.store.method is not file"
        ]
    );

    let errors = rejected(
        &format!(
            "{MINIMAL}property offset.store.method zk\n\
             property offset.store.sync.interval.ms 0\n"
        ),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: property: offset.store.method \"zk\" is not broker or \
             file",
            "/etc/mkc/server.conf:5: property: offset.store.sync.interval.ms \"0\" is not a \
             positive integer",
        ]
    );
}

#[test]
fn properties_and_kafka_debug_librdkafka_refuses_are_errors_with_their_line() {
    let errors = rejected(
        &format!(
            "{MINIMAL}property fetch.max.bytess 1048576\n\
             property fetch.max.bytes lots\n\
             property session.timeout.ms 0\n\
             kafka-debug consumer,nonsense\n\
             property queued.min.messages 10\n\
             property client.rack eu-1\n"
        ),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    for (error, (line, start)) in errors.iter().zip([
        (
            4,
            "property fetch.max.bytess: No such configuration property",
        ),
        (5, "property fetch.max.bytes: Invalid value"),
        (
            6,
            "property session.timeout.ms: Configuration property \"session.timeout.ms\" value 0",
        ),
        (7, "kafka-debug: Invalid value \"nonsense\""),
    ]) {
        let prefix = format!("/etc/mkc/server.conf:{line}: {start}");
        assert!(
            error.starts_with(&prefix),
            "{error:?} does not start with {prefix:?}"
        );
    }
    let loaded = server_with("kafka-debug consumer,cgrp\nproperty client.rack eu-1\n");
    assert_eq!(loaded.config.kafka_debug.as_deref(), Some("consumer,cgrp"));
}

#[test]
fn brokers_comma_lists_and_repeats() {
    let loaded = server_with("brokers a:1, b:2,,c:3\nbrokers a:1\nbrokers [::1]:9092\n");
    assert_eq!(
        loaded.config.brokers,
        owned(&["127.0.0.1:9092", "a:1", "b:2", "c:3", "[::1]:9092"])
    );
    let errors = rejected(
        &format!("{MINIMAL}brokers h,h:0,h:x\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: brokers: \"h\" is not host:port",
            "/etc/mkc/server.conf:4: brokers: \"h:0\" is not host:port",
            "/etc/mkc/server.conf:4: brokers: \"h:x\" is not host:port",
        ]
    );
}

#[test]
fn topic_worker_count() {
    let loaded = server_with("topic siren 3\ntopic audit 1\n");
    let workers: Vec<(&str, u32)> = loaded
        .config
        .topics
        .iter()
        .map(|t| (t.name.as_str(), t.workers))
        .collect();
    assert_eq!(workers, vec![("orders", 1), ("siren", 3), ("audit", 1)]);
    let errors = rejected(
        &format!("{MINIMAL}topic a 0\ntopic b 5000\ntopic \"c d\"\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: topic: worker count \"0\" is not a positive integer",
            "/etc/mkc/server.conf:5: topic: worker count 5000 is too large (at most 1024)",
            "/etc/mkc/server.conf:6: topic: \"c d\" is not a valid Kafka topic name \
             (letters, digits, '.', '_', '-'; at most 249)",
        ]
    );
}

#[test]
fn duplicate_topic_is_an_error() {
    let errors = rejected(
        &format!("{MINIMAL}topic orders 2\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:4: topic: \"orders\" is already configured at line 2"]
    );
}

#[test]
fn filters_several_per_line_deduplicated() {
    let loaded = server_with("filters 1 2\nfilters 2 -3 18446744073709551615\n");
    assert_eq!(
        loaded.config.filters,
        vec![
            CommandId(1),
            CommandId(2),
            CommandId(-3),
            CommandId(i128::from(u64::MAX))
        ]
    );
    let errors = rejected(
        &format!("{MINIMAL}filters 1 abc\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: filters: \"abc\" is not a command id (an integer in the \
             64-bit range)"
        ]
    );
}

#[test]
fn pid_path_and_pid_file_combination() {
    let pid = |extra: &str| server_with(extra).config.pid_file;
    assert_eq!(pid(""), PathBuf::from("/etc/mkc/mkc.pid"));
    assert_eq!(
        pid("pid-path run/\n"),
        PathBuf::from("/etc/mkc/run/mkc.pid")
    );
    assert_eq!(
        pid("pid-path /var/run\n"),
        PathBuf::from("/var/run/mkc.pid")
    );
    assert_eq!(pid("pid-file a.pid\n"), PathBuf::from("/etc/mkc/a.pid"));
    assert_eq!(
        pid("pid-file a.pid\npid-path /run/mkc\n"),
        PathBuf::from("/run/mkc/a.pid")
    );
    assert_eq!(
        pid("pid-path run\npid-file sub/a.pid\n"),
        PathBuf::from("/etc/mkc/run/sub/a.pid")
    );
    let loaded = server_with("pid-path /run\npid-file /tmp/x.pid\n");
    assert_eq!(loaded.config.pid_file, PathBuf::from("/tmp/x.pid"));
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/server.conf:4: pid-path is ignored: pid-file is an absolute path"]
    );
}

#[test]
fn relative_paths_are_resolved_against_the_server_conf_directory() {
    // conf-path comes after the module line and still applies to it.
    let server = "brokers h:1\ntopic t\nmodule m.conf\nmodule /abs/n.conf\nconf-path ./conf\n\
                  log-file logs/mkc.log\nproperty offset.store.method file\n\
                  property offset.store.path ../offsets\n";
    let loaded = accepted(
        server,
        &[
            ("conf/m.conf", MODULE_M),
            ("/abs/n.conf", "name n\nuri https://h/\nfilters 2\n"),
        ],
    );
    let config = loaded.config;
    assert_eq!(config.conf_path, PathBuf::from("/etc/mkc/conf"));
    assert_eq!(
        config.modules[0].file,
        PathBuf::from("/etc/mkc/conf/m.conf")
    );
    assert_eq!(config.modules[1].file, PathBuf::from("/abs/n.conf"));
    assert_eq!(
        config.log_file,
        Some(PathBuf::from("/etc/mkc/logs/mkc.log"))
    );
    assert_eq!(
        config.offset_store,
        OffsetStore::File {
            dir: PathBuf::from("/etc/mkc/../offsets")
        }
    );
    // conf-path itself may be absolute.
    let loaded = accepted(
        "brokers h:1\ntopic t\nconf-path /srv/mods\nmodule m.conf\n",
        &[("/srv/mods/m.conf", MODULE_M)],
    );
    assert_eq!(
        loaded.config.modules[0].file,
        PathBuf::from("/srv/mods/m.conf")
    );
}

#[test]
fn mysql_settings() {
    let loaded = server_with("mysql host h\nmysql user_name u\nmysql db_name d\n");
    assert_eq!(
        loaded.config.mysql,
        Some(MysqlConfig {
            host: "h".to_string(),
            port: 3306,
            user: "u".to_string(),
            password: String::new(),
            database: "d".to_string(),
        })
    );
    let errors = rejected(
        &format!("{MINIMAL}mysql port 99999\nmysql host h\nmysql colour x\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: mysql: port 99999 is too large (at most 65535)",
            "/etc/mkc/server.conf:6: mysql: unknown setting \"colour\" (host, port, \
             user_name, password, db_name)",
            "/etc/mkc/server.conf:5: mysql: user_name is not set (add a `mysql user_name \
             VALUE` line)",
            "/etc/mkc/server.conf:5: mysql: db_name is not set (add a `mysql db_name VALUE` \
             line)",
        ]
    );
}

#[test]
fn dispatch_log_defaults_to_sqlite_next_to_the_pid_file() {
    let loaded = server_with("");
    assert_eq!(
        loaded.config.dispatch_log,
        DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/mkc-dispatch-log.db"))
    );
    let loaded = server_with("pid-path /run/mkc\n");
    assert_eq!(
        loaded.config.dispatch_log,
        DispatchLogTarget::Sqlite(PathBuf::from("/run/mkc/mkc-dispatch-log.db"))
    );
    assert!(!loaded.config.dispatch_log_success);
    assert_eq!(loaded.config.dispatch_log_queue, 10_000);
}

#[test]
fn dispatch_log_uses_the_mysql_keys() {
    let loaded = server_with("mysql host h\nmysql user_name u\nmysql db_name d\n");
    let DispatchLogTarget::Mysql(m) = &loaded.config.dispatch_log else {
        panic!("{:?}", loaded.config.dispatch_log);
    };
    assert_eq!(
        (m.host.as_str(), m.port, m.database.as_str()),
        ("h", 3306, "d")
    );
}

#[test]
fn dispatch_log_paths_and_urls() {
    for (value, expected) in [
        (
            "log/d.db",
            DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/log/d.db")),
        ),
        (
            "/var/lib/mkc/d.db",
            DispatchLogTarget::Sqlite(PathBuf::from("/var/lib/mkc/d.db")),
        ),
        (
            "sqlite://d.db",
            DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/d.db")),
        ),
        (
            "mysql://mkc:pw@db:3307/queue",
            DispatchLogTarget::MysqlUrl("mysql://mkc:pw@db:3307/queue".to_string()),
        ),
        (
            "mariadb://root@127.0.0.1/test",
            DispatchLogTarget::MysqlUrl("mariadb://root@127.0.0.1/test".to_string()),
        ),
    ] {
        let loaded = server_with(&format!("dispatch-log {value}\n"));
        assert_eq!(loaded.config.dispatch_log, expected, "{value}");
        assert!(loaded.warnings.is_empty(), "{value}: {:?}", loaded.warnings);
    }
}

#[test]
fn dispatch_log_overrides_the_mysql_keys_with_a_warning() {
    let loaded =
        server_with("mysql host h\nmysql user_name u\nmysql db_name d\ndispatch-log x.db\n");
    assert_eq!(
        loaded.config.dispatch_log,
        DispatchLogTarget::Sqlite(PathBuf::from("/etc/mkc/x.db"))
    );
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/server.conf:4: the mysql lines are not used for the dispatch log: \
             dispatch-log is set"
        ]
    );
}

#[test]
fn dispatch_log_rejects_what_is_neither_a_path_nor_a_database_url() {
    let errors = rejected(
        &format!(
            "{MINIMAL}dispatch-log ftp://h/x\ndispatch-log mysql://root@h\ndispatch-log \"\"\n"
        ),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: dispatch-log: \"ftp://h/x\" is not a mysql://, \
             mariadb:// or sqlite:// URL nor a path",
            "/etc/mkc/server.conf:5: dispatch-log: the URL names no database \
             (mysql://USER:PASSWORD@HOST:PORT/DATABASE)",
            "/etc/mkc/server.conf:6: dispatch-log: empty path",
        ]
    );
}

#[test]
fn dispatch_log_target_display_hides_the_password() {
    let url = DispatchLogTarget::MysqlUrl("mysql://mkc:secret@db:3307/q".to_string());
    assert_eq!(url.to_string(), "mysql mysql://mkc:***@db:3307/q");
    let keys = DispatchLogTarget::Mysql(MysqlConfig {
        host: "db".to_string(),
        port: 3306,
        user: "mkc".to_string(),
        password: "secret".to_string(),
        database: "q".to_string(),
    });
    assert_eq!(keys.to_string(), "mysql mkc@db:3306/q");
}

#[test]
fn dispatch_log_success_is_a_switch() {
    assert!(
        server_with("dispatch-log-success on\n")
            .config
            .dispatch_log_success
    );
    assert!(
        !server_with("dispatch-log-success off\n")
            .config
            .dispatch_log_success
    );
    let errors = rejected(
        &format!("{MINIMAL}dispatch-log-success sometimes\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:4: dispatch-log-success: \"sometimes\" is not on or off"]
    );
}

#[test]
fn dispatch_log_queue_is_a_positive_count() {
    assert_eq!(
        server_with("dispatch-log-queue 50000\n")
            .config
            .dispatch_log_queue,
        50_000
    );
    let errors = rejected(
        &format!("{MINIMAL}dispatch-log-queue 0\ndispatch-log-queue 99999999999\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: dispatch-log-queue: \"0\" is not a positive integer \
             (records)",
            "/etc/mkc/server.conf:5: dispatch-log-queue: 99999999999 is too large (at most \
             10000000 (records))",
        ]
    );
}

#[test]
fn dead_letter_topics_of_server_and_module() {
    let loaded = accepted(
        &format!("{MINIMAL}dead-letter-topic mkc-invalid\n"),
        &[("m.conf", &format!("{MODULE_M}dead_letter_topic m.dead\n"))],
    );
    assert_eq!(
        loaded.config.dead_letter_topic.as_deref(),
        Some("mkc-invalid")
    );
    assert_eq!(
        loaded.config.modules[0].dead_letter_topic.as_deref(),
        Some("m.dead")
    );
    assert_eq!(server_with("").config.dead_letter_topic, None);
    assert_eq!(module_with("").config.modules[0].dead_letter_topic, None);
    let errors = rejected(
        &format!("{MINIMAL}dead-letter-topic \"bad name\"\n"),
        &[("m.conf", &format!("{MODULE_M}dead_letter_topic a/b\n"))],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: dead-letter-topic: \"bad name\" is not a valid Kafka \
             topic name (letters, digits, '.', '_', '-'; at most 249)",
            "/etc/mkc/m.conf:4: dead_letter_topic: \"a/b\" is not a valid Kafka topic name \
             (letters, digits, '.', '_', '-'; at most 249)",
        ]
    );
}

#[test]
fn a_consumed_topic_cannot_be_a_dead_letter_topic() {
    let errors = rejected(
        &format!("{MINIMAL}dead-letter-topic orders\n"),
        &[("m.conf", &format!("{MODULE_M}dead_letter_topic orders\n"))],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: dead-letter-topic: orders is a consumed topic (letters \
             would loop)",
            "/etc/mkc/m.conf: dead_letter_topic: orders is a consumed topic (letters would \
             loop)",
        ]
    );
}

#[test]
fn repeated_single_valued_key_warns() {
    let loaded = server_with("groupid a\ngroupid b\n");
    assert_eq!(loaded.config.group_id, "b");
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/server.conf:5: groupid is set again; this line replaces line 4"]
    );
}

// ---- module.conf ----

#[test]
fn every_module_key_is_read_into_its_field() {
    let module = "name billing\nuri https://pay.example:8443/hook?x=1\nmethod PUT\n\
                  filters 5\nfilters 6 5\ndelay 250\nretrynum 0\nretry_delay 20\n\
                  rcv_timeout 7\nsnd_timeout 2\n";
    let loaded = accepted(MINIMAL, &[("m.conf", module)]);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        loaded.config.modules,
        vec![ModuleConfig {
            name: "billing".to_string(),
            file: PathBuf::from("/etc/mkc/m.conf"),
            uri: "https://pay.example:8443/hook?x=1".to_string(),
            method: HttpMethod::Put,
            filters: vec![CommandId(5), CommandId(6)],
            delay: Duration::from_millis(250),
            retrynum: 0,
            retry_delay: Duration::from_millis(20),
            rcv_timeout: Duration::from_secs(7),
            snd_timeout: Duration::from_secs(2),
            mode: DeliveryMode::Ordered,
            concurrency: 64,
            order_key: None,
            dead_letter_topic: None,
            script: None,
            contract: DeliveryContract::default(),
        }]
    );
}

#[test]
fn module_defaults() {
    let loaded = module_with("");
    let module = &loaded.config.modules[0];
    assert_eq!(module.method, HttpMethod::Post);
    assert_eq!(module.delay, Duration::ZERO);
    assert_eq!(module.retrynum, 3);
    assert_eq!(module.retry_delay, Duration::from_millis(1000));
    assert_eq!(module.rcv_timeout, Duration::from_secs(30));
    assert_eq!(module.snd_timeout, Duration::from_secs(5));
}

#[test]
fn method_must_be_post_or_put() {
    let errors = rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}method get\n"))]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf:4: method: \"get\" is not post or put"]
    );
}

#[test]
fn retry_num_is_an_alias_of_retry_delay_with_a_warning() {
    let loaded = module_with("retry_num 3000\n");
    assert_eq!(
        loaded.config.modules[0].retry_delay,
        Duration::from_millis(3000)
    );
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/m.conf:4: retry_num is read as retry_delay"]
    );
}

#[test]
fn delivery_mode_defaults_to_ordered() {
    let m = &module_with("").config.modules[0];
    assert_eq!(m.mode, DeliveryMode::Ordered);
    assert_eq!(m.concurrency, 64);
    assert_eq!(m.order_key, None);
}

#[test]
fn delivery_modes_concurrency_and_order_key() {
    let loaded = module_with("mode Keyed\nconcurrency 8\norder_key data.orderId\n");
    let m = &loaded.config.modules[0];
    assert_eq!(m.mode, DeliveryMode::Keyed);
    assert_eq!(m.concurrency, 8);
    assert_eq!(
        m.order_key,
        Some(vec!["data".to_string(), "orderId".to_string()])
    );
    assert!(warnings(&loaded).is_empty());
    let m = &module_with("mode unordered\n").config.modules[0];
    assert_eq!(m.mode, DeliveryMode::Unordered);
}

#[test]
fn bad_mode_concurrency_and_order_key_are_errors() {
    let errors = rejected(
        MINIMAL,
        &[(
            "m.conf",
            &format!("{MODULE_M}mode fast\nconcurrency 0\norder_key data..x\n"),
        )],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].starts_with("/etc/mkc/m.conf:4: mode: \"fast\""));
    assert!(errors[1].starts_with("/etc/mkc/m.conf:5: concurrency"));
    assert!(errors[2].starts_with("/etc/mkc/m.conf:6: order_key"));
}

#[test]
fn concurrency_and_order_key_outside_their_mode_warn() {
    let loaded = module_with("concurrency 4\norder_key k\n");
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/m.conf:4: concurrency is ignored in ordered mode (one message at a time per partition)",
            "/etc/mkc/m.conf:5: order_key is used only with mode keyed",
        ]
    );
}

#[test]
fn inflight_bounds() {
    let c = server_with("").config;
    assert_eq!(c.max_inflight_messages, 10_000);
    assert_eq!(c.max_inflight_bytes, 64 * 1024 * 1024);
    let c = server_with("max-inflight-messages 50\nmax-inflight-bytes 1000\n").config;
    assert_eq!(c.max_inflight_messages, 50);
    assert_eq!(c.max_inflight_bytes, 1000);
}

#[test]
fn module_filter_outside_the_global_list_warns() {
    let loaded = accepted(
        &format!("{MINIMAL}filters 1\n"),
        &[("m.conf", &format!("{MODULE_M}filters 99999999\n"))],
    );
    assert_eq!(
        loaded.config.modules[0].filters,
        vec![CommandId(1), CommandId(99999999)]
    );
    assert_eq!(
        warnings(&loaded),
        vec![
            "/etc/mkc/m.conf:4: module m: filter 99999999 is not in the global filters of \
             server.conf; it will never be dispatched"
        ]
    );
    // Without global filters every module filter counts.
    let loaded = module_with("filters 99999999\n");
    assert!(loaded.warnings.is_empty());
}

#[test]
fn module_without_filters_warns() {
    let loaded = accepted(MINIMAL, &[("m.conf", "name m\nuri http://h/\n")]);
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/server.conf:3: module m: no filters; it will never receive a message"]
    );
}

#[test]
fn duplicate_module_name_names_both_places() {
    let errors = rejected(
        &format!("{MINIMAL}module n.conf\n"),
        &[
            ("m.conf", MODULE_M),
            ("n.conf", "uri http://h/\n\nname m\nfilters 1\n"),
        ],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/n.conf:3: name: module name \"m\" is already used at /etc/mkc/m.conf:1"]
    );
}

#[test]
fn same_module_file_twice_is_an_error() {
    let errors = rejected(
        &format!("{MINIMAL}module ./m.conf\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(
        errors,
        vec!["/etc/mkc/server.conf:4: module: /etc/mkc/m.conf is already listed at line 3"]
    );
}

#[test]
fn bad_uri_is_an_error() {
    let module = |uri: &str| format!("name m\nfilters 1\nuri {uri}\n");
    let errors = rejected(MINIMAL, &[("m.conf", &module("ftp://h/x"))]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf:3: uri: \"ftp://h/x\" is not an http or https URL"]
    );
    let errors = rejected(MINIMAL, &[("m.conf", &module("not-a-url"))]);
    assert_eq!(
        errors[0],
        "/etc/mkc/m.conf:3: uri: \"not-a-url\" is not a URL: relative URL without a base"
    );
    let errors = rejected(MINIMAL, &[("m.conf", &module("http://h:99999/"))]);
    assert_eq!(
        errors[0],
        "/etc/mkc/m.conf:3: uri: \"http://h:99999/\" is not a URL: invalid port number"
    );
    let errors = rejected(MINIMAL, &[("m.conf", "name m\nfilters 1\n")]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf: module has no uri (add a `uri URL` line)"]
    );
}

#[test]
fn missing_name_is_an_error() {
    let errors = rejected(MINIMAL, &[("m.conf", "uri http://h/\nfilters 1\n")]);
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf: module has no name (add a `name NAME` line)"]
    );
}

#[test]
fn missing_module_file_is_an_error_at_the_module_line() {
    let errors = rejected(
        "brokers h:1\ntopic t\nconf-path conf\nmodule gone.conf\n",
        &[],
    );
    assert_eq!(
        errors,
        vec![
            "/etc/mkc/server.conf:4: module: cannot read /etc/mkc/conf/gone.conf: entity not found"
        ]
    );
}

// ---- files on disk ----

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn compat_fixture_is_accepted_with_its_meaning() {
    let dir = std::fs::canonicalize(manifest_dir().join("tests/fixtures/compat")).unwrap();
    let loaded = match load(&dir.join("server.conf")) {
        Ok(loaded) => loaded,
        Err(errors) => panic!("rejected: {:#?}", render(&errors)),
    };
    let shown = |file: &str, line: usize, message: &str| {
        format!("{}:{line}: {message}", dir.join(file).display())
    };
    assert_eq!(
        warnings(&loaded),
        vec![
            shown(
                "server.conf",
                14,
                "property auto.offset.rest is read as auto.offset.reset (a typo of the old \
                 documentation)"
            ),
            shown(
                "conf/test-module.conf",
                12,
                "retry_num is read as retry_delay"
            ),
            shown(
                "conf/moduleC.conf",
                4,
                "module moduleC: filter 99999999 is not in the global filters of \
                 server.conf; it will never be dispatched"
            ),
        ]
    );
    let config = loaded.config;
    assert_eq!(config.path, dir.join("server.conf"));
    assert!(config.daemonize);
    assert_eq!(config.brokers, owned(&["127.0.0.1:9094"]));
    assert_eq!(config.group_id, "rdkafka_default");
    assert_eq!(
        config.properties,
        vec![("auto.offset.reset".to_string(), "smallest".to_string())]
    );
    assert_eq!(
        config.offset_store,
        OffsetStore::File {
            dir: dir.join("offset")
        }
    );
    assert_eq!(config.offset_sync_interval, Duration::from_millis(100));
    assert_eq!(config.conf_path, dir.join("conf"));
    assert_eq!(config.poll_timeout, Duration::from_millis(1000));
    assert_eq!(config.log_level, LogLevel::Debug);
    assert_eq!(config.log_file, Some(dir.join("logs/mkc.log")));
    assert_eq!(config.pid_file, dir.join("run/mkc.pid"));
    let topics: Vec<(&str, u32)> = config
        .topics
        .iter()
        .map(|t| (t.name.as_str(), t.workers))
        .collect();
    assert_eq!(topics, vec![("test", 3), ("siren", 2)]);
    assert_eq!(
        config.filters,
        [10303023, 10209392, 10102939, 10103030, 11000001]
            .map(CommandId)
            .to_vec()
    );
    let names: Vec<&str> = config.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["test", "moduleA", "moduleB", "moduleC"]);

    let test = &config.modules[0];
    assert_eq!(test.file, dir.join("conf/test-module.conf"));
    assert_eq!(test.uri, "http://127.0.0.1:8080/commit/commit");
    assert_eq!(test.delay, Duration::from_millis(3000));
    assert_eq!(test.retrynum, 0);
    assert_eq!(test.retry_delay, Duration::from_millis(3000));
    assert_eq!(test.method, HttpMethod::Post);
    assert_eq!(
        test.filters,
        [10303023, 10209392, 10102939].map(CommandId).to_vec()
    );

    let a = &config.modules[1];
    let url = Url::parse(&a.uri).unwrap();
    assert_eq!(url.port(), Some(8080));
    assert_eq!(url.path(), "/a/commit");
    assert_eq!(url.query(), Some("src=mkc"));
    assert_eq!(a.retrynum, 3);
    assert_eq!(a.retry_delay, Duration::from_millis(1000));
    assert_eq!(a.rcv_timeout, Duration::from_secs(1));
    assert_eq!(a.snd_timeout, Duration::from_secs(3));
    assert_eq!(a.filters, [10103030, 10303023].map(CommandId).to_vec());

    let b = &config.modules[2];
    assert_eq!(b.retrynum, 5);
    assert_eq!(b.retry_delay, Duration::from_millis(200));
    assert_eq!(b.filters, vec![CommandId(11000001)]);

    let c = &config.modules[3];
    assert_eq!(c.uri, "http://127.0.0.1:8081/c");
    assert_eq!(c.filters, [10209392, 99999999].map(CommandId).to_vec());

    assert_eq!(
        config.mysql,
        Some(MysqlConfig {
            host: "127.0.0.1".to_string(),
            port: 3306,
            user: "root".to_string(),
            password: "root".to_string(),
            database: "testdb".to_string(),
        })
    );
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(config.max_message_bytes, 4_194_304);
}

#[test]
fn load_makes_a_relative_path_absolute() {
    // Tests run in the package directory.
    let relative = Path::new("tests/fixtures/compat/server.conf");
    let expected = std::fs::canonicalize(manifest_dir().join(relative)).unwrap();
    if std::env::current_dir().ok() != std::fs::canonicalize(manifest_dir()).ok() {
        return;
    }
    let loaded = load(relative).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
    assert_eq!(loaded.config.path, expected);
    assert!(loaded.config.conf_path.is_absolute());
}

#[test]
fn load_reports_a_missing_server_conf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.conf");
    let errors = render(&load(&path).unwrap_err());
    let canonical = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("server.conf");
    assert_eq!(
        errors,
        vec![format!(
            "cannot read {}: No such file or directory (os error 2)",
            canonical.display()
        )]
    );
    let errors = render(&load(&dir.path().join("no/such/server.conf")).unwrap_err());
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("cannot read "), "{errors:?}");
}

#[test]
fn load_reads_files_with_crlf_and_legacy_comments() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("server.conf"),
        b"\xEF\xBB\xBF# \xC5\xE4\xD6\xC3\r\nbrokers h:1\r\ntopic t\r\nmodule m.conf\r\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("m.conf"),
        b"name m\r\n#\xB5\xD8\xD6\xB7\r\nuri http://h/\r\nfilters 1\r\n",
    )
    .unwrap();
    let loaded =
        load(&dir.path().join("server.conf")).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
    assert_eq!(loaded.config.modules[0].uri, "http://h/");
    assert!(loaded.warnings.is_empty());
}

#[test]
fn example_configuration_is_valid() {
    let path = manifest_dir().join("conf/server.conf");
    let loaded = load(&path).unwrap_or_else(|e| panic!("{:#?}", render(&e)));
    assert!(
        loaded.warnings.is_empty(),
        "{:#?}",
        render(&loaded.warnings)
    );
    let config = loaded.config;
    assert!(config.daemonize);
    assert_eq!(config.brokers, owned(&["127.0.0.1:9092"]));
    assert_eq!(config.topics.len(), 1);
    assert_eq!(config.modules.len(), 1);
    assert!(config.modules[0].uri.starts_with("http://127.0.0.1:8080/"));
    let dir = std::fs::canonicalize(manifest_dir().join("conf")).unwrap();
    assert_eq!(config.log_file, Some(dir.join("../logs/mkc.log")));
    assert_eq!(config.pid_file, dir.join("../run/mkc.pid"));
}

#[test]
fn admin_keys() {
    let config = server_with("").config;
    assert_eq!(config.admin_listen, Some("127.0.0.1:8120".parse().unwrap()));
    assert_eq!(config.admin_token, None);
    assert_eq!(config.stuck_threshold, Duration::from_secs(300));

    let loaded = server_with("admin-listen 127.0.0.1:0\nadmin-token s3cret\nstuck-threshold 5\n");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        loaded.config.admin_listen,
        Some("127.0.0.1:0".parse().unwrap())
    );
    assert_eq!(loaded.config.admin_token.as_deref(), Some("s3cret"));
    assert_eq!(loaded.config.stuck_threshold, Duration::from_secs(5));

    assert_eq!(server_with("admin-listen OFF\n").config.admin_listen, None);

    let open = server_with("admin-listen 0.0.0.0:9000\n");
    assert_eq!(
        warnings(&open),
        vec![
            "/etc/mkc/server.conf:4: admin-listen 0.0.0.0:9000 is not a loopback address: \
             metrics and the status page are readable from the network (read-only: no \
             admin-token is set)"
        ]
    );
    assert!(warnings(&server_with("admin-listen [::]:9000\nadmin-token t\n")).is_empty());

    let errors = rejected(
        &format!("{MINIMAL}admin-listen localhost:80\nadmin-token \"a b\"\nstuck-threshold 0\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].contains(":4: admin-listen: \"localhost:80\" is not IP:PORT or off"));
    assert!(errors[1].contains(":5: admin-token: must be non-empty printable ASCII"));
    assert!(errors[2].contains(":6:"), "{}", errors[2]);
}

#[test]
fn redis_sources_with_commands_and_no_kafka() {
    let loaded = accepted(
        "redis 127.0.0.1:6379/2\n\
         redis-list jobs 2\n\
         # the list's non-envelopes\n\
         command 77\n\
         redis-subscribe __keyevent@2__:expired\n\
         command 18446744073709551615\n\
         redis-subscribe \"news.*\"\n\
         redis-notify-keyspace-events Ex\n\
         module m.conf\n",
        &[("m.conf", MODULE_M)],
    );
    let c = &loaded.config;
    assert!(c.brokers.is_empty() && c.topics.is_empty());
    let redis = c.redis.as_ref().unwrap();
    assert_eq!(
        (redis.url.as_str(), redis.db),
        ("redis://127.0.0.1:6379/2", 2)
    );
    assert_eq!(
        c.redis_lists,
        [RedisListConfig {
            key: "jobs".into(),
            workers: 2,
            command: CommandId::parse("77"),
        }]
    );
    assert_eq!(c.redis_subscriptions.len(), 2);
    assert!(!c.redis_subscriptions[0].pattern);
    assert_eq!(
        c.redis_subscriptions[0].command,
        CommandId::parse("18446744073709551615")
    );
    assert!(c.redis_subscriptions[1].pattern);
    assert_eq!(c.redis_subscriptions[1].command, None);
    assert_eq!(c.redis_notify_keyspace_events.as_deref(), Some("Ex"));
}

#[test]
fn command_follows_a_topic_line_too() {
    let loaded = accepted(
        "brokers 127.0.0.1:9092\ntopic raw\ncommand 5\ntopic orders\nmodule m.conf\n",
        &[("m.conf", MODULE_M)],
    );
    let commands: Vec<_> = loaded.config.topics.iter().map(|t| t.command).collect();
    assert_eq!(commands, [CommandId::parse("5"), None]);
}

#[test]
fn redis_mistakes_name_their_line() {
    let errors = rejected(
        "redis-list jobs\n\
         command 1\n\
         command 2\n\
         redis ftp://x:1\n\
         redis-list jobs\n\
         module m.conf\n\
         command x\n\
         redis-notify-keyspace-events Q\n",
        &[("m.conf", MODULE_M)],
    );
    let text = errors.join("\n");
    assert!(text.contains(":3: command: must follow a topic"), "{text}");
    assert!(
        text.contains(":4: redis: \"ftp://x:1\": only redis://"),
        "{text}"
    );
    assert!(
        text.contains(":5: redis-list: \"jobs\" is already configured at line 1"),
        "{text}"
    );
    assert!(
        text.contains(":7: command: \"x\" is not a command id"),
        "{text}"
    );
    assert!(
        text.contains(":8: redis-notify-keyspace-events: \"Q\""),
        "{text}"
    );
    assert!(text.contains("need the Redis server"), "{text}");
    assert!(
        !text.contains("no brokers"),
        "a Redis-only configuration needs no brokers: {text}"
    );
}

#[test]
fn redis_password_is_not_displayed() {
    let server = redis_server("redis://:s3cret@10.0.0.1:6380/1").unwrap();
    assert_eq!(server.db, 1);
    assert!(!server.to_string().contains("s3cret"), "{server}");
}

// ─── scripts (issue 13) ──────────────────────────────────────────────────

const HANDLE: &str = "function handle(msg) return true end\n";
const ROUTE: &str = "function route(msg) return nil end\n";

#[test]
fn scripts_are_read_relative_to_their_base_and_loaded() {
    let server = format!(
        "{MINIMAL}conf-path modules\nroute scripts/route.lua\nscript-timeout 250\nscript-memory 2097152\n"
    );
    let loaded = accepted(
        &server,
        &[
            ("modules/m.conf", &format!("{MODULE_M}script lua/m.lua\n")),
            ("modules/lua/m.lua", HANDLE),
            ("scripts/route.lua", ROUTE),
        ],
    );
    let c = &loaded.config;
    let route = c.route.as_ref().expect("route");
    assert_eq!(route.path, Path::new("/etc/mkc/scripts/route.lua"));
    assert_eq!(&route.source[..], ROUTE.as_bytes());
    let script = c.modules[0].script.as_ref().expect("script");
    assert_eq!(script.path, Path::new("/etc/mkc/modules/lua/m.lua"));
    assert_eq!(script.entry, crate::script::Entry::Handle);
    assert_eq!(c.script_limits.timeout, Duration::from_millis(250));
    assert_eq!(c.script_limits.memory, 2_097_152);
    // Defaults.
    let c = server_with("").config;
    assert_eq!(c.route, None);
    assert_eq!(c.modules[0].script, None);
    assert_eq!(c.script_limits, crate::script::Limits::default());
}

#[test]
fn a_script_that_does_not_load_is_an_error_with_its_file_and_line() {
    let errors = rejected(
        MINIMAL,
        &[
            ("m.conf", &format!("{MODULE_M}script m.lua\n")),
            ("m.lua", "function handle(msg)\n  return = 1\nend\n"),
        ],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("/etc/mkc/m.lua:2: unexpected symbol"),
        "{errors:#?}"
    );
    let errors = rejected(
        &format!("{MINIMAL}route r.lua\n"),
        &[("m.conf", MODULE_M), ("r.lua", HANDLE)],
    );
    assert_eq!(
        errors,
        ["/etc/mkc/server.conf:4: route: /etc/mkc/r.lua: r.lua defines no function route(msg)"]
    );
    let errors = rejected(
        MINIMAL,
        &[("m.conf", &format!("{MODULE_M}script gone.lua\n"))],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("/etc/mkc/m.conf:4: script: cannot read /etc/mkc/gone.lua"),
        "{errors:#?}"
    );
    // Top-level code runs at load, within the budget.
    let errors = rejected(
        &format!("{MINIMAL}script-timeout 20\n"),
        &[
            ("m.conf", &format!("{MODULE_M}script m.lua\n")),
            ("m.lua", "while true do end\n"),
        ],
    );
    assert!(errors[0].contains("time budget"), "{errors:#?}");
}

#[test]
fn script_limits_are_checked() {
    for (line, says) in [
        (
            "script-timeout 0",
            "script-timeout: \"0\" is not a positive integer",
        ),
        ("script-timeout 60001", "script-timeout"),
        (
            "script-memory 1000",
            "script-memory: 1000 is less than 1048576 bytes",
        ),
        ("script-memory lots", "is not a positive integer"),
        ("route", "route FILE"),
    ] {
        let errors = rejected(&format!("{MINIMAL}{line}\n"), &[("m.conf", MODULE_M)]);
        assert!(
            errors.iter().any(|e| e.contains(says)),
            "{line}: {errors:#?}"
        );
    }
}

// ---- module.conf: the delivery contract (issue 14) ----

/// The errors of the minimal configuration with `extra` module lines.
fn module_errors(extra: &str) -> Vec<String> {
    rejected(MINIMAL, &[("m.conf", &format!("{MODULE_M}{extra}"))])
}

#[test]
fn delivery_contract_defaults_keep_todays_behaviour() {
    let loaded = module_with("");
    let contract = &loaded.config.modules[0].contract;
    assert_eq!(*contract, DeliveryContract::default());
    assert_eq!(contract.backoff, Backoff::Fixed);
    assert_eq!(contract.retry_max_delay, Duration::from_millis(60_000));
    assert_eq!(contract.retry_max_age, None);
    assert!(contract.retry_on.is_empty() && contract.fail_on.is_empty());
    assert!(contract.headers.is_empty());
    // 2xx success, everything else retry.
    for (status, kind) in [
        (200, AnswerKind::Success),
        (204, AnswerKind::Success),
        (299, AnswerKind::Success),
        (301, AnswerKind::Retry),
        (400, AnswerKind::Retry),
        (404, AnswerKind::Retry),
        (429, AnswerKind::Retry),
        (500, AnswerKind::Retry),
    ] {
        assert_eq!(contract.answer(status), kind, "{status}");
    }
}

#[test]
fn every_delivery_contract_key_is_read() {
    let loaded = module_with(
        "retry_backoff EXPONENTIAL\nretry_max_delay 5000\nretry_max_age 120\n\
         retry_on 429\nfail_on 4xx\nfail_on 500 501\n\
         header X-Tenant acme\nheader X-Note \"two words\"\nheader X-Tenant second\n",
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let contract = &loaded.config.modules[0].contract;
    assert_eq!(contract.backoff, Backoff::Exponential);
    assert_eq!(contract.retry_max_delay, Duration::from_millis(5000));
    assert_eq!(contract.retry_max_age, Some(Duration::from_secs(120)));
    assert_eq!(contract.retry_on, vec![StatusPattern::Code(429)]);
    assert_eq!(
        contract.fail_on,
        vec![
            StatusPattern::Class(4),
            StatusPattern::Code(500),
            StatusPattern::Code(501)
        ]
    );
    let headers: Vec<(&str, &str, bool)> = contract
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_str(), h.from_env))
        .collect();
    assert_eq!(
        headers,
        vec![
            ("X-Tenant", "acme", false),
            ("X-Note", "two words", false),
            ("X-Tenant", "second", false),
        ]
    );
}

#[test]
fn status_rules_precedence_code_before_class_before_default() {
    let loaded = module_with("fail_on 4xx 503\nretry_on 429 5xx\nfail_on 204\n");
    let contract = &loaded.config.modules[0].contract;
    for (status, kind) in [
        (200, AnswerKind::Success),
        // A listed code beats the default success.
        (204, AnswerKind::Fail),
        (400, AnswerKind::Fail),
        (404, AnswerKind::Fail),
        // A code beats a class.
        (429, AnswerKind::Retry),
        (503, AnswerKind::Fail),
        (500, AnswerKind::Retry),
        (302, AnswerKind::Retry),
    ] {
        assert_eq!(contract.answer(status), kind, "{status}");
    }
}

#[test]
fn delivery_contract_errors_name_file_and_line() {
    assert_eq!(
        module_errors("retry_backoff linear\n"),
        vec!["/etc/mkc/m.conf:4: retry_backoff: \"linear\" is not fixed or exponential"]
    );
    assert_eq!(
        module_errors("retry_max_delay 0\n"),
        vec!["/etc/mkc/m.conf:4: retry_max_delay: \"0\" is not a positive integer (milliseconds)"]
    );
    assert_eq!(
        module_errors("retry_max_age soon\n"),
        vec!["/etc/mkc/m.conf:4: retry_max_age: \"soon\" is not a positive integer (seconds)"]
    );
    assert_eq!(
        module_errors("fail_on 4xx 600 abc 6xx 40\n"),
        vec![
            "/etc/mkc/m.conf:4: fail_on: \"600\" is not an HTTP status (100 to 599) or class (1xx to 5xx)",
            "/etc/mkc/m.conf:4: fail_on: \"abc\" is not an HTTP status (100 to 599) or class (1xx to 5xx)",
            "/etc/mkc/m.conf:4: fail_on: \"6xx\" is not an HTTP status (100 to 599) or class (1xx to 5xx)",
            "/etc/mkc/m.conf:4: fail_on: \"40\" is not an HTTP status (100 to 599) or class (1xx to 5xx)",
        ]
    );
    assert_eq!(
        module_errors("retry_on\n"),
        vec!["/etc/mkc/m.conf:4: retry_on: expected at least 1 argument (`retry_on CODE|CLASS...`), found 0"]
    );
    assert_eq!(
        module_errors("fail_on 404 4xx\nretry_on 4XX\n"),
        vec!["/etc/mkc/m.conf:5: retry_on: 4xx is already in fail_on at /etc/mkc/m.conf:4"]
    );
    assert_eq!(
        module_errors("header X-Only\n"),
        vec!["/etc/mkc/m.conf:4: header: expected 2 arguments (`header NAME VALUE`), found 1"]
    );
    assert_eq!(
        module_errors("header \"Bad Name\" v\nheader Host example.org\nheader Content-Length 3\n"),
        vec![
            "/etc/mkc/m.conf:4: header: \"Bad Name\" is not a valid HTTP header name",
            "/etc/mkc/m.conf:5: header: Host is set by mkc and cannot be configured",
            "/etc/mkc/m.conf:6: header: Content-Length is set by mkc and cannot be configured",
        ]
    );
}

#[test]
fn a_repeated_backoff_key_warns() {
    let loaded = module_with("retry_backoff fixed\nretry_backoff exponential\n");
    assert_eq!(
        loaded.config.modules[0].contract.backoff,
        Backoff::Exponential
    );
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/m.conf:5: retry_backoff is set again; this line replaces line 4"]
    );
}

#[test]
fn header_values_take_environment_variables() {
    // PATH is set in every test environment; its value is not shown here.
    let path = std::env::var("PATH").expect("PATH is set");
    let loaded = module_with("header X-Path \"p=${PATH};\"\nheader X-Literal \"$${PATH} $5 $\"\n");
    let headers = &loaded.config.modules[0].contract.headers;
    assert_eq!(headers[0].value, format!("p={path};"));
    assert!(headers[0].from_env);
    assert_eq!(headers[1].value, "${PATH} $5 $");
    assert!(!headers[1].from_env, "$${{ is no reference");
}

#[test]
fn a_missing_environment_variable_is_an_error_with_file_and_line() {
    assert_eq!(
        module_errors("header Authorization \"Bearer ${MKC_TEST_SURELY_UNSET_VARIABLE}\"\n"),
        vec!["/etc/mkc/m.conf:4: header Authorization: environment variable MKC_TEST_SURELY_UNSET_VARIABLE is not set"]
    );
    assert_eq!(
        module_errors("header X-A \"${UNCLOSED\"\nheader X-B ${}\nheader X-C ${A-B}\n"),
        vec![
            "/etc/mkc/m.conf:4: header X-A: unterminated ${ (write $${ for a literal ${)",
            "/etc/mkc/m.conf:5: header X-B: \"${}\" is not an environment variable reference (letters, digits and _; write $${ for a literal ${)",
            "/etc/mkc/m.conf:6: header X-C: \"${A-B}\" is not an environment variable reference (letters, digits and _; write $${ for a literal ${)",
        ]
    );
}

#[test]
fn env_expansion_rules() {
    let env = |var: &str| match var {
        "TOKEN" => Some("s3cret".to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    let expand = |text: &str| module::expand_env(text, env);
    assert_eq!(expand("plain"), Ok(("plain".to_string(), false)));
    assert_eq!(
        expand("Bearer ${TOKEN}"),
        Ok(("Bearer s3cret".to_string(), true))
    );
    assert_eq!(
        expand("${TOKEN}${EMPTY}-${TOKEN}"),
        Ok(("s3cret-s3cret".to_string(), true))
    );
    assert_eq!(expand("$${TOKEN}"), Ok(("${TOKEN}".to_string(), false)));
    // Leftmost first: `$` then `$${`.
    assert_eq!(expand("$$${TOKEN}"), Ok(("$${TOKEN}".to_string(), false)));
    assert_eq!(expand("a$b$"), Ok(("a$b$".to_string(), false)));
    assert_eq!(
        expand("${NOPE}"),
        Err("environment variable NOPE is not set".to_string())
    );
}

#[test]
fn a_header_value_with_control_characters_is_refused_without_showing_it() {
    let errors = module_errors("header X-A \"a\u{1}b\"\n");
    assert_eq!(
        errors,
        vec!["/etc/mkc/m.conf:4: header X-A: the value is not a valid HTTP header value (control characters)"]
    );
}

#[test]
fn dash_t_masks_env_and_credential_header_values_but_shows_the_others() {
    let loaded = module_with(
        "header X-Path ${PATH}\nheader X-Api-Key literal-k3y\nheader Authorization \"Basic abc\"\n\
         header X-Tenant \"acme corp\"\nretry_backoff exponential\nfail_on 4xx 500\n",
    );
    let out = effective(&loaded.config);
    let path = std::env::var("PATH").unwrap();
    for secret in [path.as_str(), "literal-k3y", "Basic abc"] {
        assert!(!out.contains(secret), "{secret} shown:\n{out}");
    }
    for shown in [
        "header X-Path ***",
        "header X-Api-Key ***",
        "header Authorization ***",
        "header X-Tenant \"acme corp\"",
        "retry_backoff exponential",
        "fail_on 4xx 500",
        "retry_max_delay 60000",
        "# retry_max_age",
        "# retry_on",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(shown)),
            "no line {shown:?}:\n{out}"
        );
    }
}

// ---- module.conf: batches (issue 14) ----

#[test]
fn batch_defaults_keep_one_message_per_request() {
    let loaded = module_with("");
    let batch = loaded.config.modules[0].contract.batch;
    assert_eq!(batch, Batching::default());
    assert_eq!(batch.size, 1);
    assert!(!batch.on());
    assert_eq!(batch.bytes, 1024 * 1024);
    assert_eq!(batch.linger, Duration::ZERO);
    assert_eq!(batch.format, BatchFormat::Json);
}

#[test]
fn every_batch_key_is_read() {
    let loaded = module_with("batch 100\nbatch_bytes 65536\nbatch_linger 5\nbatch_format NDJSON\n");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let batch = loaded.config.modules[0].contract.batch;
    assert!(batch.on());
    assert_eq!(batch.size, 100);
    assert_eq!(batch.bytes, 65536);
    assert_eq!(batch.linger, Duration::from_millis(5));
    assert_eq!(batch.format, BatchFormat::Ndjson);
    let out = effective(&loaded.config);
    for shown in [
        "batch 100",
        "batch_bytes 65536",
        "batch_linger 5",
        "batch_format ndjson",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(shown)),
            "no line {shown:?}:\n{out}"
        );
    }
}

#[test]
fn batch_errors_name_file_and_line() {
    assert_eq!(
        module_errors("batch 0\n"),
        vec!["/etc/mkc/m.conf:4: batch: \"0\" is not a positive integer (messages)"]
    );
    assert_eq!(
        module_errors("batch 10001\n"),
        vec!["/etc/mkc/m.conf:4: batch: 10001 is too large (at most 10000 (messages))"]
    );
    assert_eq!(
        module_errors("batch 2\nbatch_format xml\nbatch_linger -1\nbatch_bytes 0\n"),
        vec![
            "/etc/mkc/m.conf:5: batch_format: \"xml\" is not json or ndjson",
            "/etc/mkc/m.conf:6: batch_linger: \"-1\" is not a non-negative integer (milliseconds)",
            "/etc/mkc/m.conf:7: batch_bytes: \"0\" is not a positive integer (bytes)",
        ]
    );
}

#[test]
fn batch_details_without_a_batch_warn() {
    let loaded = module_with("batch_linger 10\nbatch_format ndjson\n");
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/m.conf:4: batch_bytes, batch_linger and batch_format are used only with batch 2 or more"]
    );
    assert!(warnings(&module_with("batch 2\nbatch_linger 10\n")).is_empty());
}

// ---- module.conf: signature, forwarded headers, mutual TLS (issue 14) ----

#[test]
fn request_keys_default_to_unsigned_trace_headers_and_default_tls() {
    let contract = &module_with("").config.modules[0].contract;
    assert_eq!(contract.sign, None);
    let names: Vec<String> = contract
        .forward_headers
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["traceparent", "tracestate"]);
    assert!(!contract.tls.is_set());
}

#[test]
fn sign_secret_is_read_and_never_shown() {
    let loaded = module_with("sign_secret \"s3cret value\"\n");
    let sign = loaded.config.modules[0].contract.sign.as_ref().unwrap();
    assert_eq!(&*sign.secret, b"s3cret value");
    assert_eq!(sign.env, None);
    assert!(!format!("{sign:?}").contains("s3cret"));
    let out = effective(&loaded.config);
    assert!(!out.contains("s3cret"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("sign_secret ***")),
        "{out}"
    );
}

#[test]
fn sign_secret_env_reads_the_variable_when_the_configuration_is_read() {
    // PATH is set in every test environment.
    let path = std::env::var("PATH").expect("PATH is set");
    let loaded = module_with("sign_secret_env PATH\n");
    let sign = loaded.config.modules[0].contract.sign.as_ref().unwrap();
    assert_eq!(&*sign.secret, path.as_bytes());
    assert_eq!(sign.env.as_deref(), Some("PATH"));
    let out = effective(&loaded.config);
    assert!(!out.contains(&path), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("sign_secret_env PATH ")),
        "{out}"
    );
}

#[test]
fn signing_errors_name_file_and_line() {
    assert_eq!(
        module_errors("sign_secret_env MKC_TEST_SURELY_UNSET_SIGNING_SECRET\n"),
        vec!["/etc/mkc/m.conf:4: sign_secret_env: environment variable MKC_TEST_SURELY_UNSET_SIGNING_SECRET is not set"]
    );
    assert_eq!(
        module_errors("sign_secret a\nsign_secret_env PATH\nsign_secret \"\"\nsign_secret_env A-B\n"),
        vec![
            "/etc/mkc/m.conf:5: sign_secret_env: the signing secret is already set at line 4 (one of sign_secret, sign_secret_env)",
            "/etc/mkc/m.conf:6: sign_secret: the signing secret is already set at line 4 (one of sign_secret, sign_secret_env)",
            "/etc/mkc/m.conf:7: sign_secret_env: the signing secret is already set at line 4 (one of sign_secret, sign_secret_env)",
        ]
    );
    assert_eq!(
        module_errors("sign_secret \"\"\nsign_secret_env A-B\nsign_secret a b\n"),
        vec![
            "/etc/mkc/m.conf:4: sign_secret: the secret is empty",
            "/etc/mkc/m.conf:5: sign_secret_env: \"A-B\" is not an environment variable name (letters, digits and _)",
            "/etc/mkc/m.conf:6: sign_secret: expected 1 argument (`sign_secret SECRET`), found 2",
        ]
    );
}

#[test]
fn forward_headers_replace_the_default_list() {
    let loaded =
        module_with("forward_headers X-Tenant x-b3-*\nforward_headers traceparent X-TENANT\n");
    let forward = &loaded.config.modules[0].contract.forward_headers;
    let names: Vec<String> = forward.0.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["x-tenant", "x-b3-*", "traceparent"]);
    assert!(forward.matches("X-B3-TraceId") && forward.matches("x-tenant"));
    assert!(!forward.matches("tracestate") && !forward.matches("x-b3"));
    let out = effective(&loaded.config);
    assert!(
        out.lines()
            .any(|l| l.starts_with("forward_headers x-tenant x-b3-* traceparent ")),
        "{out}"
    );

    let none = module_with("forward_headers NONE\n");
    assert!(none.config.modules[0].contract.forward_headers.is_empty());
    assert!(effective(&none.config)
        .lines()
        .any(|l| l.starts_with("forward_headers none ")));
    // A bare * forwards every header but mkc's own.
    let all = module_with("forward_headers *\n");
    let all = &all.config.modules[0].contract.forward_headers;
    assert!(all.matches("anything") && all.matches("traceparent"));
    for own in ["X-Mkc-Offset", "content-length", "Host", "Upgrade", "te"] {
        assert!(!all.matches(own), "{own}");
    }
}

#[test]
fn forward_headers_errors_name_file_and_line() {
    assert_eq!(
        module_errors(
            "forward_headers none x-a\nforward_headers \"bad name\" x-*y\n\
             forward_headers X-Mkc-Offset Content-Length\nforward_headers\n"
        ),
        vec![
            "/etc/mkc/m.conf:4: forward_headers: none cannot be listed with header names",
            "/etc/mkc/m.conf:5: forward_headers: \"bad name\" is not a header name or a prefix ending in * (like x-b3-*)",
            "/etc/mkc/m.conf:5: forward_headers: \"x-*y\" is not a header name or a prefix ending in * (like x-b3-*)",
            "/etc/mkc/m.conf:6: forward_headers: X-Mkc-Offset cannot be forwarded (set by mkc, or a connection header)",
            "/etc/mkc/m.conf:6: forward_headers: Content-Length cannot be forwarded (set by mkc, or a connection header)",
            "/etc/mkc/m.conf:7: forward_headers: expected at least 1 argument (`forward_headers NAME|PREFIX*...|none`), found 0",
        ]
    );
    assert_eq!(
        module_errors("forward_headers none\nforward_headers x-a\n"),
        vec!["/etc/mkc/m.conf:4: forward_headers: none and header names are both given; write either none or the names"]
    );
}

/// A CA and a client certificate it signs, as PEM: (CA, certificate, key).
fn test_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

const MODULE_HTTPS: &str = "name m\nuri https://127.0.0.1:8443/m\nfilters 1\n";

#[test]
fn tls_files_are_read_when_the_configuration_is_read() {
    let (ca, cert, key) = test_pki();
    let module =
        format!("{MODULE_HTTPS}tls_cert tls/client.pem\ntls_key tls/client.key\ntls_ca ca.pem\n");
    let loaded = accepted(
        MINIMAL,
        &[
            ("m.conf", &module),
            ("tls/client.pem", &cert),
            ("tls/client.key", &key),
            ("ca.pem", &ca),
        ],
    );
    assert!(loaded.warnings.is_empty(), "{:?}", warnings(&loaded));
    let tls = &loaded.config.modules[0].contract.tls;
    let path = |f: &Option<PemFile>| f.as_ref().unwrap().path.display().to_string();
    assert_eq!(path(&tls.cert), "/etc/mkc/tls/client.pem");
    assert_eq!(path(&tls.key), "/etc/mkc/tls/client.key");
    assert_eq!(path(&tls.ca), "/etc/mkc/ca.pem");
    assert!(tls.client_config().is_ok());
    // The key's bytes are never printed.
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
    let out = effective(&loaded.config);
    assert!(
        out.lines()
            .any(|l| l.starts_with("tls_key /etc/mkc/tls/client.key ")),
        "{out}"
    );
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    // Only the CA: Mozilla's roots replaced, no client certificate.
    let only_ca = accepted(
        MINIMAL,
        &[
            ("m.conf", &format!("{MODULE_HTTPS}tls_ca ca.pem\n")),
            ("ca.pem", &ca),
        ],
    );
    assert!(only_ca.config.modules[0]
        .contract
        .tls
        .client_config()
        .is_ok());
    // With an http uri the keys are accepted, with a warning.
    let http = accepted(
        MINIMAL,
        &[
            ("m.conf", &format!("{MODULE_M}tls_ca ca.pem\n")),
            ("ca.pem", &ca),
        ],
    );
    assert_eq!(
        warnings(&http),
        vec!["/etc/mkc/m.conf:4: tls_ca is used only with an https uri"]
    );
}

#[test]
fn tls_file_problems_name_the_line_and_the_pem_problem() {
    let (_, cert, key) = test_pki();
    let (_, other_cert, _) = test_pki();
    let errors = |lines: &str, files: &[(&str, &str)]| {
        let module = format!("{MODULE_HTTPS}{lines}");
        let mut all = vec![("m.conf", module.as_str())];
        all.extend_from_slice(files);
        rejected(MINIMAL, &all)
    };
    assert_eq!(
        errors("tls_cert c.pem\n", &[("c.pem", &cert)]),
        vec!["/etc/mkc/m.conf:4: tls_cert: tls_key is missing (both or neither)"]
    );
    assert_eq!(
        errors("tls_key k.pem\n", &[("k.pem", &key)]),
        vec!["/etc/mkc/m.conf:4: tls_key: tls_cert is missing (both or neither)"]
    );
    assert_eq!(
        errors("tls_ca missing.pem\n", &[]),
        vec!["/etc/mkc/m.conf:4: tls_ca: cannot read /etc/mkc/missing.pem: entity not found"]
    );
    let truncated = &cert[..cert.len() / 2];
    let bad_base64 = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
    let got = errors(
        "tls_cert key.pem\ntls_key cert.pem\ntls_ca half.pem\n",
        &[
            ("key.pem", &key),
            ("cert.pem", &cert),
            ("half.pem", truncated),
        ],
    );
    assert_eq!(
        got,
        vec![
            "/etc/mkc/m.conf:4: tls_cert: /etc/mkc/key.pem: no certificate in it (expected a -----BEGIN CERTIFICATE----- section)",
            "/etc/mkc/m.conf:5: tls_key: /etc/mkc/cert.pem: no private key in it (expected a -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY section; encrypted keys are not supported)",
            "/etc/mkc/m.conf:6: tls_ca: /etc/mkc/half.pem: not valid PEM: no \"-----END CERTIFICATE-----\" line closes a section",
        ]
    );
    let got = errors("tls_ca b.pem\n", &[("b.pem", bad_base64)]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("/etc/mkc/m.conf:4: tls_ca: /etc/mkc/b.pem: not valid PEM: bad base64"),
        "{got:?}"
    );
    // A key of another certificate.
    let got = errors(
        "tls_cert c.pem\ntls_key k.pem\n",
        &[("c.pem", &other_cert), ("k.pem", &key)],
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with(
            "/etc/mkc/m.conf:5: tls_key: /etc/mkc/k.pem does not go with tls_cert /etc/mkc/c.pem: "
        ),
        "{got:?}"
    );
}

// ---- module.conf: rate limit and circuit breaker (issue 14) ----

#[test]
fn rate_limit_and_breaker_are_off_by_default() {
    let loaded = module_with("");
    let contract = &loaded.config.modules[0].contract;
    assert_eq!(contract.rate_limit, None);
    assert_eq!(contract.breaker_failures, None);
    assert_eq!(contract.breaker_cooldown, Duration::from_secs(30));
}

#[test]
fn rate_limit_reads_per_second_and_per_minute() {
    for (text, count, per_s) in [
        ("50/s", 50, 1),
        ("50", 50, 1),
        ("600/m", 600, 60),
        ("600/M", 600, 60),
        ("1/m", 1, 60),
        ("1000000/S", 1_000_000, 1),
    ] {
        let loaded = module_with(&format!("rate_limit {text}\n"));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            loaded.config.modules[0].contract.rate_limit,
            Some(RateLimit {
                count,
                per: Duration::from_secs(per_s)
            }),
            "{text}"
        );
    }
}

#[test]
fn rate_limit_pace_and_burst() {
    let limit = |text| RateLimit::parse(text, MAX_RATE_LIMIT).unwrap();
    assert_eq!(limit("50/s").interval(), Duration::from_millis(20));
    assert_eq!(limit("50/s").burst(), 5);
    assert_eq!(limit("1000/s").burst(), 100);
    assert_eq!(limit("5/s").burst(), 1);
    assert_eq!(limit("600/m").interval(), Duration::from_millis(100));
    assert_eq!(limit("600/m").burst(), 1);
    assert_eq!(limit("6000/m").burst(), 10);
    assert_eq!(limit("1/m").interval(), Duration::from_secs(60));
    assert_eq!(limit("1/m").burst(), 1);
    assert_eq!(limit("7/m").to_string(), "7/m");
    assert_eq!(limit("7").to_string(), "7/s");
}

#[test]
fn breaker_keys_are_read() {
    let loaded = module_with("breaker_failures 5\nbreaker_cooldown 10\n");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let contract = &loaded.config.modules[0].contract;
    assert_eq!(contract.breaker_failures, Some(5));
    assert_eq!(contract.breaker_cooldown, Duration::from_secs(10));
}

#[test]
fn rate_limit_and_breaker_errors_name_file_and_line() {
    let rate = |text: &str| {
        format!(
            "/etc/mkc/m.conf:4: rate_limit: \"{text}\" is not N, N/s or N/m with N from 1 to \
             1000000 (requests per second or minute)"
        )
    };
    for text in [
        "0", "0/s", "5/h", "fast", "-1/s", "/s", "5/", "1000001", "2.5/s",
    ] {
        assert_eq!(
            module_errors(&format!("rate_limit {text}\n")),
            vec![rate(text)]
        );
    }
    assert_eq!(
        module_errors("rate_limit 5 /s\n"),
        vec!["/etc/mkc/m.conf:4: rate_limit: expected 1 argument (`rate_limit N[/s|/m]`), found 2"]
    );
    assert_eq!(
        module_errors("breaker_failures 0\n"),
        vec!["/etc/mkc/m.conf:4: breaker_failures: \"0\" is not a positive integer (failed attempts)"]
    );
    assert_eq!(
        module_errors("breaker_cooldown 0\n"),
        vec!["/etc/mkc/m.conf:4: breaker_cooldown: \"0\" is not a positive integer (seconds)"]
    );
}

#[test]
fn a_breaker_cooldown_without_failures_warns() {
    let loaded = module_with("breaker_cooldown 5\n");
    assert_eq!(
        warnings(&loaded),
        vec!["/etc/mkc/m.conf:4: breaker_cooldown is ignored without breaker_failures (the breaker is off)"]
    );
}

#[test]
fn dash_t_shows_rate_limit_and_breaker() {
    let out = effective(&module_with("rate_limit 600/m\nbreaker_failures 5\n").config);
    for shown in [
        "rate_limit 600/m",
        "breaker_failures 5",
        "breaker_cooldown 30",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(shown)),
            "no line {shown:?}:\n{out}"
        );
    }
    let out = effective(&module_with("").config);
    for shown in ["# rate_limit", "# breaker_failures", "breaker_cooldown 30"] {
        assert!(
            out.lines().any(|l| l.starts_with(shown)),
            "no line {shown:?}:\n{out}"
        );
    }
}

#[test]
fn user_key() {
    assert_eq!(server_with("").config.user, None);

    // GROUP defaults to the user's primary group; root exists everywhere.
    let root = server_with("user root\n").config.user.unwrap();
    assert_eq!((root.uid, root.gid), (0, 0));
    assert_eq!(root.user, "root");
    assert!(root.groups.contains(&0), "{:?}", root.groups);

    // With GROUP, only that group.
    let named = server_with("user root root\n").config.user.unwrap();
    assert_eq!((named.gid, named.groups.clone()), (0, vec![0]));

    let errors = rejected(
        &format!("{MINIMAL}user no-such-user-mkc\nuser root no-such-group-mkc\nuser\nuser a b c\n"),
        &[("m.conf", MODULE_M)],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(
        errors[0].contains("server.conf:4: user: unknown user \"no-such-user-mkc\""),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("server.conf:5: user: unknown group \"no-such-group-mkc\""),
        "{}",
        errors[1]
    );
    assert!(errors[2].contains(":6:"), "{}", errors[2]);
    assert!(errors[3].contains(":7:"), "{}", errors[3]);
}
