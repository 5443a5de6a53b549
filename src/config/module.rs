//! module.conf's keys: each module file named by server.conf read into
//! a [`ModuleConfig`], and what involves several modules checked.

use super::*;

/// Reads the module files named by `module` lines, in order, and checks
/// what involves several modules or the global filters.
pub(super) fn load_modules(
    lines: &[(String, Location)],
    conf_path: &Path,
    global: &[(CommandId, Location)],
    read_module: &impl Fn(&Path) -> io::Result<Vec<u8>>,
    limits: crate::script::Limits,
    report: &mut Report,
) -> Vec<ModuleConfig> {
    let scripts = ScriptLoader {
        base: conf_path,
        read: read_module,
        limits,
    };
    let mut modules: Vec<(ModuleConfig, Location)> = Vec::new();
    let mut files: Vec<(PathBuf, &Location)> = Vec::new();
    for (name, at) in lines {
        let file = resolve(conf_path, name);
        if let Some((_, first)) = files.iter().find(|(known, _)| *known == file) {
            report.error(
                at,
                format!(
                    "module: {} is already listed at line {}",
                    file.display(),
                    first.line
                ),
            );
            continue;
        }
        files.push((file.clone(), at));
        let bytes = match read_module(&file) {
            Ok(bytes) => bytes,
            Err(err) => {
                report.error(at, format!("module: cannot read {}: {err}", file.display()));
                continue;
            }
        };
        let (directives, errors) = lex(&file, bytes.as_slice());
        report.errors.extend(errors);
        let Some((module, name_at)) =
            read_module_file(file, &directives, global, Some(&scripts), report)
        else {
            continue;
        };
        if let Some((_, first)) = modules.iter().find(|(m, _)| m.name == module.name) {
            report.error(
                &name_at,
                format!(
                    "name: module name \"{}\" is already used at {first}",
                    module.name
                ),
            );
            continue;
        }
        if module.filters.is_empty() {
            report.warn(
                at,
                format!(
                    "module {}: no filters; it will never receive a message",
                    module.name
                ),
            );
        }
        modules.push((module, name_at));
    }
    for (id, at) in global {
        if !modules.is_empty() && modules.iter().all(|(m, _)| !m.filters.contains(id)) {
            report.warn(
                at,
                format!(
                    "filters: no module lists {id}; its messages are acknowledged \
                     without dispatch"
                ),
            );
        }
    }
    modules.into_iter().map(|(module, _)| module).collect()
}

/// Validates one module file. Returns the module and where its name was
/// set, or `None` when `name` or `uri` is missing.
pub(super) fn read_module_file(
    file: PathBuf,
    directives: &[Directive],
    global: &[(CommandId, Location)],
    scripts: Option<&ScriptLoader>,
    report: &mut Report,
) -> Option<(ModuleConfig, Location)> {
    let mut seen = Seen::default();
    // Whether a `name` / `uri` line exists, valid or not: an invalid one
    // is already reported and must not also read as "missing".
    let (mut name_given, mut uri_given) = (false, false);
    let mut name: Option<(String, Location)> = None;
    let mut uri: Option<String> = None;
    let mut method = HttpMethod::Post;
    let mut filters: Vec<(CommandId, Location)> = Vec::new();
    let mut delay = ms(0);
    let mut retrynum = DEFAULT_RETRYNUM;
    let mut retry_delay = ms(DEFAULT_RETRY_DELAY_MS);
    let mut rcv_timeout = secs(DEFAULT_RCV_TIMEOUT_S);
    let mut snd_timeout = secs(DEFAULT_SND_TIMEOUT_S);
    let mut mode = DeliveryMode::Ordered;
    let mut concurrency: Option<(u64, Location)> = None;
    let mut order_key: Option<(Vec<String>, Location)> = None;
    let mut dead_letter: Option<String> = None;
    let mut script = None;
    let mut contract = DeliveryContract::default();
    // Where each status pattern was listed, to refuse one in both lists.
    let mut listed: Vec<(StatusPattern, &str, Location)> = Vec::new();
    // The first `batch_bytes`, `batch_linger` or `batch_format` line, to
    // warn when there is no batch for it to shape.
    let mut batch_detail: Option<Location> = None;
    let mut request = RequestKeys::default();
    // Where `breaker_cooldown` was set, to warn when the breaker is off.
    let mut breaker_cooldown_at: Option<Location> = None;

    for d in directives {
        let key = d.key.as_str();
        match key {
            "name" => {
                name_given = true;
                let Some(value) = report.single(d, "name NAME") else {
                    continue;
                };
                if value.is_empty() || value.chars().any(char::is_control) {
                    report.error(
                        &d.location,
                        "name: a module name must be non-empty, without control characters",
                    );
                    continue;
                }
                seen.note(key, d, report);
                name = Some((value.to_string(), d.location.clone()));
            }
            "uri" => {
                uri_given = true;
                let Some(value) = report.single(d, "uri http[s]://HOST[:PORT]/PATH") else {
                    continue;
                };
                match Url::parse(value) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                        seen.note(key, d, report);
                        uri = Some(value.to_string());
                    }
                    Ok(_) => report.error(
                        &d.location,
                        format!("uri: \"{value}\" is not an http or https URL"),
                    ),
                    Err(err) => {
                        report.error(&d.location, format!("uri: \"{value}\" is not a URL: {err}"))
                    }
                }
            }
            "method" => {
                let Some(value) = report.single(d, "method post|put") else {
                    continue;
                };
                match value.to_ascii_lowercase().as_str() {
                    "post" => method = HttpMethod::Post,
                    "put" => method = HttpMethod::Put,
                    _ => {
                        report.error(
                            &d.location,
                            format!("method: \"{value}\" is not post or put"),
                        );
                        continue;
                    }
                }
                seen.note(key, d, report);
            }
            "filters" => report.command_ids(d, &mut filters),
            "delay" => {
                if let Some(value) = report.single(d, "delay MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_MS, "(milliseconds)") {
                        seen.note(key, d, report);
                        delay = ms(n);
                    }
                }
            }
            "retrynum" => {
                if let Some(value) = report.single(d, "retrynum N") {
                    let max = u64::from(u32::MAX);
                    if let Some(n) = report.uint(d, "", value, 0, max, "") {
                        seen.note(key, d, report);
                        retrynum = u32::try_from(n).unwrap_or(u32::MAX);
                    }
                }
            }
            "retry_delay" | "retry_num" => {
                if key == "retry_num" {
                    report.warn(&d.location, "retry_num is read as retry_delay");
                }
                if let Some(value) = report.single(d, "retry_delay MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 0, MAX_MS, "(milliseconds)") {
                        seen.note("retry_delay", d, report);
                        retry_delay = ms(n);
                    }
                }
            }
            "rcv_timeout" | "snd_timeout" => {
                let usage = format!("{key} SECONDS");
                if let Some(value) = report.single(d, &usage) {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        seen.note(key, d, report);
                        if key == "rcv_timeout" {
                            rcv_timeout = secs(n);
                        } else {
                            snd_timeout = secs(n);
                        }
                    }
                }
            }
            "mode" => {
                let Some(value) = report.single(d, "mode ordered|keyed|unordered") else {
                    continue;
                };
                mode = match value.to_ascii_lowercase().as_str() {
                    "ordered" => DeliveryMode::Ordered,
                    "keyed" => DeliveryMode::Keyed,
                    "unordered" => DeliveryMode::Unordered,
                    _ => {
                        report.error(
                            &d.location,
                            format!("mode: \"{value}\" is not ordered, keyed or unordered"),
                        );
                        continue;
                    }
                };
                seen.note(key, d, report);
            }
            "concurrency" => {
                if let Some(value) = report.single(d, "concurrency N") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_CONCURRENCY, "") {
                        seen.note(key, d, report);
                        concurrency = Some((n, d.location.clone()));
                    }
                }
            }
            "order_key" => {
                if let Some(value) = report.single(d, "order_key FIELD[.FIELD...]") {
                    let path: Vec<String> = value.split('.').map(str::to_string).collect();
                    if path.iter().any(String::is_empty) {
                        report.error(
                            &d.location,
                            format!("order_key: \"{value}\" is not a dotted field path like data.orderId"),
                        );
                        continue;
                    }
                    seen.note(key, d, report);
                    order_key = Some((path, d.location.clone()));
                }
            }
            "dead_letter_topic" => {
                if let Some(value) = report.single(d, "dead_letter_topic NAME") {
                    if let Some(name) = dead_letter_topic(d, value, report) {
                        seen.note(key, d, report);
                        dead_letter = Some(name);
                    }
                }
            }
            "script" => {
                if let (Some(value), Some(scripts)) = (report.single(d, "script FILE"), scripts) {
                    if let Some(loaded) =
                        scripts.load(d, value, crate::script::Entry::Handle, report)
                    {
                        seen.note(key, d, report);
                        script = Some(loaded);
                    }
                }
            }
            "retry_backoff" => {
                let Some(value) = report.single(d, "retry_backoff fixed|exponential") else {
                    continue;
                };
                contract.backoff = match value.to_ascii_lowercase().as_str() {
                    "fixed" => Backoff::Fixed,
                    "exponential" => Backoff::Exponential,
                    _ => {
                        report.error(
                            &d.location,
                            format!("retry_backoff: \"{value}\" is not fixed or exponential"),
                        );
                        continue;
                    }
                };
                seen.note(key, d, report);
            }
            "retry_max_delay" => {
                if let Some(value) = report.single(d, "retry_max_delay MILLISECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_MS, "(milliseconds)") {
                        seen.note(key, d, report);
                        contract.retry_max_delay = ms(n);
                    }
                }
            }
            "retry_max_age" => {
                if let Some(value) = report.single(d, "retry_max_age SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        seen.note(key, d, report);
                        contract.retry_max_age = Some(secs(n));
                    }
                }
            }
            "retry_on" | "fail_on" => {
                let usage = format!("{key} CODE|CLASS...");
                let Some(args) = report.args(d, 1, usize::MAX, &usage) else {
                    continue;
                };
                for text in args {
                    let Some(pattern) = StatusPattern::parse(text) else {
                        report.error(
                            &d.location,
                            format!(
                                "{key}: \"{text}\" is not an HTTP status (100 to 599) \
                                 or class (1xx to 5xx)"
                            ),
                        );
                        continue;
                    };
                    if let Some((_, other, at)) = listed
                        .iter()
                        .find(|(p, other, _)| *p == pattern && *other != key)
                    {
                        report.error(
                            &d.location,
                            format!("{key}: {pattern} is already in {other} at {at}"),
                        );
                        continue;
                    }
                    let list = match key {
                        "retry_on" => &mut contract.retry_on,
                        _ => &mut contract.fail_on,
                    };
                    if !list.contains(&pattern) {
                        list.push(pattern);
                        let name = if key == "retry_on" {
                            "retry_on"
                        } else {
                            "fail_on"
                        };
                        listed.push((pattern, name, d.location.clone()));
                    }
                }
            }
            "header" => {
                let Some(args) = report.args(d, 2, 2, "header NAME VALUE") else {
                    continue;
                };
                if let Some(header) = module_header(d, &args[0], &args[1], report) {
                    contract.headers.push(header);
                }
            }
            "batch" => {
                if let Some(value) = report.single(d, "batch N") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_BATCH, "(messages)") {
                        seen.note(key, d, report);
                        contract.batch.size = n as u32;
                    }
                }
            }
            "batch_bytes" => {
                if let Some(value) = report.single(d, "batch_bytes BYTES") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_BATCH_BYTES, "(bytes)") {
                        seen.note(key, d, report);
                        contract.batch.bytes = n as usize;
                        batch_detail.get_or_insert(d.location.clone());
                    }
                }
            }
            "batch_linger" => {
                if let Some(value) = report.single(d, "batch_linger MILLISECONDS") {
                    let max = MAX_BATCH_LINGER_MS;
                    if let Some(n) = report.uint(d, "", value, 0, max, "(milliseconds)") {
                        seen.note(key, d, report);
                        contract.batch.linger = ms(n);
                        batch_detail.get_or_insert(d.location.clone());
                    }
                }
            }
            "batch_format" => {
                let Some(value) = report.single(d, "batch_format json|ndjson") else {
                    continue;
                };
                contract.batch.format = match value.to_ascii_lowercase().as_str() {
                    "json" => BatchFormat::Json,
                    "ndjson" => BatchFormat::Ndjson,
                    _ => {
                        report.error(
                            &d.location,
                            format!("batch_format: \"{value}\" is not json or ndjson"),
                        );
                        continue;
                    }
                };
                seen.note(key, d, report);
                batch_detail.get_or_insert(d.location.clone());
            }
            "sign_secret" | "sign_secret_env" | "forward_headers" | "tls_cert" | "tls_key"
            | "tls_ca" => request.read(d, &mut contract, scripts, report),
            "rate_limit" => {
                let Some(value) = report.single(d, "rate_limit N[/s|/m]") else {
                    continue;
                };
                match RateLimit::parse(value, MAX_RATE_LIMIT) {
                    Some(limit) => {
                        seen.note(key, d, report);
                        contract.rate_limit = Some(limit);
                    }
                    None => report.error(
                        &d.location,
                        format!(
                            "rate_limit: \"{value}\" is not N, N/s or N/m with N from 1 to \
                             {MAX_RATE_LIMIT} (requests per second or minute)"
                        ),
                    ),
                }
            }
            "breaker_failures" => {
                if let Some(value) = report.single(d, "breaker_failures N") {
                    let max = MAX_BREAKER_FAILURES;
                    if let Some(n) = report.uint(d, "", value, 1, max, "(failed attempts)") {
                        seen.note(key, d, report);
                        contract.breaker_failures = u32::try_from(n).ok();
                    }
                }
            }
            "breaker_cooldown" => {
                if let Some(value) = report.single(d, "breaker_cooldown SECONDS") {
                    if let Some(n) = report.uint(d, "", value, 1, MAX_SECS, "(seconds)") {
                        seen.note(key, d, report);
                        contract.breaker_cooldown = secs(n);
                        breaker_cooldown_at = Some(d.location.clone());
                    }
                }
            }
            _ => report.error(&d.location, format!("unknown key \"{key}\"")),
        }
    }
    if let (Some(at), false) = (&batch_detail, contract.batch.on()) {
        report.warn(
            at,
            "batch_bytes, batch_linger and batch_format are used only with batch 2 or more",
        );
    }
    if let (Some(at), None) = (&breaker_cooldown_at, contract.breaker_failures) {
        report.warn(
            at,
            "breaker_cooldown is ignored without breaker_failures (the breaker is off)",
        );
    }
    if let (Some((_, at)), DeliveryMode::Ordered) = (&concurrency, mode) {
        report.warn(
            at,
            "concurrency is ignored in ordered mode (one message at a time per partition)",
        );
    }
    if let (Some((_, at)), false) = (&order_key, mode == DeliveryMode::Keyed) {
        report.warn(at, "order_key is used only with mode keyed");
    }

    let shown = file.display();
    if !name_given {
        report.error_unplaced(format!(
            "{shown}: module has no name (add a `name NAME` line)"
        ));
    }
    if !uri_given {
        report.error_unplaced(format!("{shown}: module has no uri (add a `uri URL` line)"));
    }
    let https = uri
        .as_deref()
        .is_some_and(|u| u.to_ascii_lowercase().starts_with("https:"));
    request.finish(&mut contract, https, report);
    let (name, name_at) = name?;
    let uri = uri?;
    if !global.is_empty() {
        for (id, at) in &filters {
            if global.iter().all(|(known, _)| known != id) {
                report.warn(
                    at,
                    format!(
                        "module {name}: filter {id} is not in the global filters of \
                         server.conf; it will never be dispatched"
                    ),
                );
            }
        }
    }
    let module = ModuleConfig {
        name,
        file,
        uri,
        method,
        filters: filters.into_iter().map(|(id, _)| id).collect(),
        delay,
        retrynum,
        retry_delay,
        rcv_timeout,
        snd_timeout,
        mode,
        concurrency: concurrency.map_or(DEFAULT_CONCURRENCY as u32, |(n, _)| n as u32),
        order_key: order_key.map(|(path, _)| path),
        dead_letter_topic: dead_letter,
        script,
        contract,
    };
    Some((module, name_at))
}

/// Headers mkc sets itself from the request (framing and routing): a
/// `header` line cannot replace them.
pub(super) const RESERVED_HEADERS: &[&str] =
    &["host", "content-length", "transfer-encoding", "connection"];

/// A `header NAME VALUE` line checked: a valid, not reserved name, and a
/// value that, with `${VAR}` replaced, is a valid header value.
fn module_header(
    d: &Directive,
    name: &str,
    value: &str,
    report: &mut Report,
) -> Option<ModuleHeader> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        report.error(
            &d.location,
            format!("header: \"{name}\" is not a valid HTTP header name"),
        );
        return None;
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        report.error(
            &d.location,
            format!("header: {name} is set by mkc and cannot be configured"),
        );
        return None;
    }
    let (expanded, from_env) = match expand_env(value, |var| std::env::var(var).ok()) {
        Ok(expanded) => expanded,
        Err(problem) => {
            report.error(&d.location, format!("header {name}: {problem}"));
            return None;
        }
    };
    if http::HeaderValue::from_str(&expanded).is_err() {
        // The value may be a secret: not shown.
        report.error(
            &d.location,
            format!(
                "header {name}: the value is not a valid HTTP header value (control characters)"
            ),
        );
        return None;
    }
    Some(ModuleHeader {
        name: name.to_string(),
        value: expanded,
        from_env,
    })
}

/// Replaces each `${NAME}` in `text` by the variable `NAME` from `lookup`
/// (the environment); `$${` writes a literal `${`, and any other `$` is
/// itself. Returns the text and whether a variable was used, or what is
/// wrong: an unterminated or empty reference, or a variable that is not
/// set (named, so the operator knows what to export).
pub(super) fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(text.len());
    let mut used = false;
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err("unterminated ${ (write $${ for a literal ${)".to_string());
            };
            let var = &after[..end];
            let valid = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "\"${{{var}}}\" is not an environment variable reference \
                     (letters, digits and _; write $${{ for a literal ${{)"
                ));
            }
            match lookup(var) {
                Some(value) => out.push_str(&value),
                None => return Err(format!("environment variable {var} is not set")),
            }
            used = true;
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok((out, used))
}
