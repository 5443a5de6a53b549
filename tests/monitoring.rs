//! The dashboard and the alerting rules in `monitoring/`, checked against
//! the real thing: every metric an expression of the Grafana dashboard or
//! of the Prometheus rules names is one that a running mkc (Kafka topic,
//! Redis list, module, dead-letter topic, dispatch log) exports on its
//! `/metrics`, and `rate()`/`increase()` are only taken of counters;
//! `promtool check rules` and `promtool test rules` pass; the dashboard
//! passes its JSON schema (`python3`'s `jsonschema`), which rejects a
//! dashboard bound to one Grafana's datasource.
//!
//! promtool comes with Debian's `prometheus` package and the schema check
//! with `python3-jsonschema` (`scripts/setup.sh test` installs both): a
//! missing tool fails the test, saying which package to install.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::metrics::{scrape, series_names, Kind};
use common::redis as r;
use common::*;
use serde_json::Value;

fn monitoring(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("monitoring")
        .join(path)
}

const DASHBOARD: &str = "grafana/mkc.json";
const SCHEMA: &str = "grafana/dashboard.schema.json";
const RULES: &str = "prometheus/mkc-alerts.yml";
const RULE_TESTS: &str = "prometheus/mkc-alerts.test.yml";

/// Series an expression may name that Prometheus makes itself, not mkc:
/// `up` of the scrape job (MkcDown, when nothing can be scraped at all).
const PROMETHEUS_OWN: &[&str] = &["up"];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ─── PromQL: the metric names of an expression ───────────────────────────

/// Words of PromQL that are not metric names: aggregations (also without
/// parentheses right after them: `sum by (x) (...)`), binary operators
/// and modifiers, and the float literals; and [`LABEL_LISTS`].
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The words after which a parenthesised list holds label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Functions that assume a counter.
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase", "resets"];

/// A metric named by an expression.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Named {
    name: String,
    /// Inside `rate()`, `irate()`, `increase()` or `resets()`.
    as_counter: bool,
}

/// The end (exclusive) of the quoted string that starts at `start`.
fn skip_string(s: &[u8], start: usize) -> Result<usize, String> {
    let quote = s[start];
    let mut i = start + 1;
    while i < s.len() {
        match s[i] {
            b'\\' if quote != b'`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unterminated string at byte {start}"))
}

/// The end (exclusive) of the bracketed part that starts at `start` with
/// `open`, strings inside included.
fn skip_group(s: &[u8], start: usize, open: u8, close: u8) -> Result<usize, String> {
    let mut depth = 0;
    let mut i = start;
    while i < s.len() {
        match s[i] {
            b'"' | b'\'' | b'`' => {
                i = skip_string(s, i)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!("unclosed '{}' at byte {start}", open as char))
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The metric names `expr` selects: every identifier that is not a
/// function (followed by `(`), a keyword, a label (inside `{}` or a
/// `by (...)` list), a string, a number or duration, a range (`[5m]`) or
/// a Grafana variable (`$job`, `${x}`).
fn metric_names(expr: &str) -> Result<Vec<Named>, String> {
    let s = expr.as_bytes();
    let mut out = Vec::new();
    // The function of each open parenthesis ("" for plain grouping).
    let mut calls: Vec<String> = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(s, i)?,
            b'{' => i = skip_group(s, i, b'{', b'}')?,
            b'[' => i = skip_group(s, i, b'[', b']')?,
            b'#' => {
                while i < s.len() && s[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' => {
                calls.push(String::new());
                i += 1;
            }
            b')' => {
                calls
                    .pop()
                    .ok_or_else(|| format!("unbalanced ')' at byte {i}"))?;
                i += 1;
            }
            b'$' => {
                i += 1;
                if s.get(i) == Some(&b'{') {
                    i = skip_group(s, i, b'{', b'}')?;
                } else {
                    while i < s.len() && is_ident(s[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == b'.' => {
                // 0.99, 1e3, 5m, 1h30m, 0x1f.
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut next = i;
                while next < s.len() && s[next].is_ascii_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) && s.get(next) == Some(&b'(') {
                    i = skip_group(s, next, b'(', b')')?;
                } else if s.get(next) == Some(&b'(') {
                    // A function (or an aggregation written `sum(...)`).
                    calls.push(word.to_string());
                    i = next + 1;
                } else if !KEYWORDS.contains(&lower.as_str())
                    && !LABEL_LISTS.contains(&lower.as_str())
                {
                    out.push(Named {
                        name: word.to_string(),
                        as_counter: calls
                            .iter()
                            .any(|f| COUNTER_FUNCTIONS.contains(&f.as_str())),
                    });
                }
            }
            _ => i += 1,
        }
    }
    if !calls.is_empty() {
        return Err("unclosed '('".to_string());
    }
    Ok(out)
}

/// The PromQL inside a Grafana variable query: `label_values(SELECTOR,
/// label)` and `query_result(EXPR)`; other queries are PromQL as they are.
fn variable_promql(query: &str) -> String {
    let q = query.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        // The last argument is a label name; with one argument there is
        // no selector.
        return inner
            .rsplit_once(',')
            .map_or(String::new(), |(sel, _)| sel.to_string());
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return inner.to_string();
    }
    q.to_string()
}

// ─── the files: where their expressions are ─────────────────────────────

/// Every PromQL expression of the dashboard, with where it is:
/// panels' (and rows' panels') targets and the variables' queries.
fn dashboard_expressions(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let at = format!("panel {title:?} target {}", t["refId"]);
                    out.push((at, expr.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let query = match &v["query"] {
            Value::String(q) => Some(q.as_str()),
            q => q["query"].as_str(),
        };
        if let (Some("query"), Some(q)) = (v["type"].as_str(), query) {
            out.push((format!("variable ${}", v["name"]), variable_promql(q)));
        }
    }
    out
}

/// The values of `key:` in a YAML file written as the rule files are:
/// `key: value` on one line (quotes removed), or `key: |` / `key: >`
/// followed by the lines indented deeper. Returns (line number, value).
fn yaml_values(text: &str, key: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let Some(rest) = item.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let rest = rest.trim();
        let value = if rest.starts_with('|') || rest.starts_with('>') {
            lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join("\n")
        } else if rest.len() >= 2
            && ((rest.starts_with('\'') && rest.ends_with('\''))
                || (rest.starts_with('"') && rest.ends_with('"')))
        {
            rest[1..rest.len() - 1].to_string()
        } else {
            rest.to_string()
        };
        out.push((n + 1, value));
    }
    out
}

/// Every expression of both files, with where it is.
fn all_expressions() -> Vec<(String, String)> {
    let dash_path = monitoring(DASHBOARD);
    let dash: Value = serde_json::from_str(&read(&dash_path))
        .unwrap_or_else(|e| panic!("{}: {e}", dash_path.display()));
    let mut out: Vec<(String, String)> = dashboard_expressions(&dash)
        .into_iter()
        .map(|(at, e)| (format!("{DASHBOARD}: {at}"), e))
        .collect();
    for (file, key) in [
        (RULES, "expr"),
        (RULE_TESTS, "expr"),
        (RULE_TESTS, "series"),
    ] {
        for (line, e) in yaml_values(&read(&monitoring(file)), key) {
            out.push((format!("{file}:{line}"), e));
        }
    }
    out
}

// ─── tests ───────────────────────────────────────────────────────────────

#[test]
fn metric_names_are_told_from_functions_labels_and_keywords() {
    let names = |e: &str| {
        metric_names(e)
            .unwrap_or_else(|err| panic!("{e}: {err}"))
            .into_iter()
            .map(|n| (n.name, n.as_counter))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (module, le) (rate(a_bucket{job=~"$job", x="}by(y)"}[$__rate_interval])))"#
        ),
        [("a_bucket".to_string(), true)]
    );
    assert_eq!(
        names("sum(increase(b_total[10m])) by (topic) / on(topic) group_left(module) c offset 5m > bool 0 and deriv(d[10m]) * 60 > 0"),
        [
            ("b_total".to_string(), true),
            ("c".to_string(), false),
            ("d".to_string(), false)
        ]
    );
    assert_eq!(
        names("up{job=\"mkc\"} == 0 unless mkc_up"),
        [("up".to_string(), false), ("mkc_up".to_string(), false)]
    );
    assert_eq!(
        names(&variable_promql(
            r#"label_values(mkc_up{job=~"$job"}, instance)"#
        )),
        [("mkc_up".to_string(), false)]
    );
    assert!(metric_names("rate(x[5m]").is_err());
    assert!(metric_names("x{a=\"b}").is_err());
}

#[test]
fn yaml_expressions_are_read_in_both_styles() {
    let text = "groups:\n  - rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - alert: B\n        expr: |\n          sum(x)\n            / sum(y)\n        labels: {}\n      - series: 'z{a=\"b\"}'\n";
    assert_eq!(
        yaml_values(text, "expr"),
        [
            (4, "up == 0".to_string()),
            (7, "sum(x)\n/ sum(y)".to_string())
        ]
    );
    assert_eq!(
        yaml_values(text, "series"),
        [(11, "z{a=\"b\"}".to_string())]
    );
}

/// Every metric named in the dashboard and the rules is one a running mkc
/// exports, with samples: mkc here consumes a Kafka topic and a Redis
/// list, delivers to a module, writes a dispatch log and has a dead-letter
/// topic, so that every family has a series.
#[test]
fn dashboard_and_alerts_name_only_metrics_mkc_exports() {
    let topic = unique_name("mon");
    let dead = unique_name("mon-dead");
    create_topic(&topic, 2);
    create_topic(&dead, 1);
    let key = unique_name("mon-list");
    let sink = Sink::start();
    let mkc = Mkc::start(
        &MkcConfig::new(&topic, &unique_name("g"))
            .module(Module::new("m", sink.url("/m")).filter(7))
            .line(&format!("dead-letter-topic {dead}"))
            .line("dispatch-log-success on")
            .line(&format!("redis {}", r::url()))
            .line(&format!("redis-list {key}")),
    );
    let base = mkc.admin_url(Duration::from_secs(30));
    produce(
        &topic,
        vec![
            Record::new(0, envelope(1, "7", "{}")),
            Record::new(1, "not json"),
        ],
    );
    let mut conn = r::connect(&r::url());
    r::lpush(&mut conn, &key, &[envelope(2, "7", "{}").into_bytes()]);
    sink.wait_for(2, Duration::from_secs(60));

    let expressions = all_expressions();
    let mut named: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
    for (at, expr) in &expressions {
        let names = metric_names(expr).unwrap_or_else(|e| panic!("{at}: {e} in `{expr}`"));
        for n in names {
            let entry = named.entry(n.name).or_default();
            entry.0 |= n.as_counter;
            entry.1.push(at.clone());
        }
    }
    // The dashboard and the rules cover what operators watch.
    for family in [
        "mkc_messages_delivered_total",
        "mkc_delivery_attempts_failed_total",
        "mkc_messages_exhausted_total",
        "mkc_partition_lag",
        "mkc_partition_oldest_unfinished_age_seconds",
        "mkc_partition_in_flight",
        "mkc_module_in_flight",
        "mkc_dispatch_log_queue_depth",
        "mkc_worker_restarts_total",
        "mkc_source_connected",
        "mkc_ready",
    ] {
        assert!(
            named.contains_key(family),
            "nothing in monitoring/ uses {family}"
        );
    }

    // The worker reports every 500 ms: wait until the last families (the
    // Redis worker's, the counters) have samples.
    let mut exported = BTreeMap::new();
    let mut missing: Vec<String> = Vec::new();
    let all_there = wait_until(Duration::from_secs(30), || {
        exported = series_names(&scrape(&base));
        missing = named
            .keys()
            .filter(|n| !PROMETHEUS_OWN.contains(&n.as_str()) && !exported.contains_key(*n))
            .cloned()
            .collect();
        missing.is_empty()
    });
    mkc.check(all_there, || {
        let detail: Vec<String> = missing
            .iter()
            .map(|n| format!("  {n} (in {})", named[n].1.join(", ")))
            .collect();
        format!(
            "metrics named in monitoring/ that mkc does not export:\n{}\nmkc exports: {:?}",
            detail.join("\n"),
            exported.keys().collect::<Vec<_>>()
        )
    });
    let gauges_as_counters: Vec<String> = named
        .iter()
        .filter(|(n, (as_counter, _))| {
            *as_counter && exported.get(*n).is_some_and(|k: &Kind| !k.is_cumulative())
        })
        .map(|(n, (_, at))| format!("  {n} (in {})", at.join(", ")))
        .collect();
    assert!(
        gauges_as_counters.is_empty(),
        "rate()/increase() of gauges:\n{}",
        gauges_as_counters.join("\n")
    );
    // And every series mkc exports is on the dashboard or in a rule.
    let unwatched: Vec<&String> = exported
        .keys()
        .filter(|n| !named.contains_key(*n))
        .collect();
    assert!(
        unwatched.is_empty(),
        "exported by mkc but on no panel and in no rule: {unwatched:?}"
    );
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's `prometheus` package \
                 (scripts/setup.sh test does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let (ok, text) = promtool(&["check", "rules", "mkc-alerts.yml"]);
    assert!(ok, "promtool check rules mkc-alerts.yml:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "mkc-alerts.test.yml"]);
    assert!(ok, "promtool test rules mkc-alerts.test.yml:\n{text}");
    // Each alert has its severity, summary and description.
    let rules = read(&monitoring(RULES));
    let alerts = yaml_values(&rules, "alert");
    assert!(alerts.len() >= 6, "{alerts:?}");
    for key in ["severity", "summary", "description"] {
        assert_eq!(
            yaml_values(&rules, key).len(),
            alerts.len(),
            "every alert of {RULES} has a {key}"
        );
    }
}

/// Validates `dashboard` with the schema through python3's jsonschema;
/// returns the errors, one per line.
fn schema_errors(dashboard: &Value) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("dashboard.json");
    std::fs::write(&file, dashboard.to_string()).expect("writing the dashboard copy");
    let script = "import json, sys\n\
        try:\n    import jsonschema\n\
        except ImportError:\n    sys.exit('python3 has no jsonschema module: install python3-jsonschema (scripts/setup.sh test does)')\n\
        schema = json.load(open(sys.argv[1]))\n\
        v = jsonschema.validators.validator_for(schema)\n\
        v.check_schema(schema)\n\
        for e in v(schema).iter_errors(json.load(open(sys.argv[2]))):\n    print('/'.join(map(str, e.absolute_path)) + ': ' + e.message)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(monitoring(SCHEMA))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    assert!(
        out.status.success(),
        "the schema check did not run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboard_passes_its_schema_and_lays_out_on_the_grid() {
    let path = monitoring(DASHBOARD);
    let dash: Value =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let errors = schema_errors(&dash);
    assert!(
        errors.is_empty(),
        "{DASHBOARD} against {SCHEMA}:\n{}",
        errors.join("\n")
    );

    // Exported from a Grafana without "share externally", a dashboard
    // names that Grafana's datasource: the schema refuses it.
    let mut bound = dash.clone();
    bound["panels"][1]["targets"][0]["datasource"]["uid"] = Value::from("P1809F7CD0C75ACF3");
    let errors = schema_errors(&bound);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("panels/1/targets/0/datasource/uid")),
        "the schema let a concrete datasource through: {errors:?}"
    );

    // What a schema cannot say: ids are unique and panels fit in the
    // 24 columns without overlapping.
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_i64()), "panel id {} twice", p["id"]);
        let g = |k: &str| p["gridPos"][k].as_i64().unwrap_or(-1);
        assert!(
            g("x") + g("w") <= 24,
            "panel {title:?} is wider than the grid"
        );
        for x in g("x")..g("x") + g("w") {
            for y in g("y")..g("y") + g("h") {
                assert!(
                    cells.insert((x, y)),
                    "panel {title:?} overlaps another at ({x}, {y})"
                );
            }
        }
    }
}
