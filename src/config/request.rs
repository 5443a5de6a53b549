//! module.conf's keys for what a request carries besides the payload and
//! mkc's own headers (README: Delivery contract): an HMAC signature
//! (`sign_secret`, `sign_secret_env`), Kafka headers forwarded to the
//! endpoint (`forward_headers`), and a client certificate and CA for
//! mutual TLS (`tls_cert`, `tls_key`, `tls_ca`).
//!
//! Everything is read and checked when the configuration is read (`-t`,
//! start, `-s reload`): a missing variable, an unreadable file or a PEM
//! problem is an error naming the module file's line.

use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;

/// A module's signing secret (`sign_secret` or `sign_secret_env`). Never
/// printed: not by `Debug`, not by `mkc -T`.
#[derive(Clone, PartialEq, Eq)]
pub struct SignSecret {
    /// The secret's bytes.
    pub secret: Arc<[u8]>,
    /// `Some(VAR)`: read from the environment variable VAR
    /// (`sign_secret_env`); `None`: written in the file (`sign_secret`).
    pub env: Option<String>,
}

impl fmt::Debug for SignSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignSecret")
            .field("secret", &"***")
            .field("env", &self.env)
            .finish()
    }
}

/// One entry of `forward_headers`: a header name, or a prefix (`x-b3-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    /// A whole name, lowercase.
    Name(String),
    /// A prefix, lowercase, without its `*` (empty: every header).
    Prefix(String),
}

impl HeaderPattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            HeaderPattern::Name(n) => n.eq_ignore_ascii_case(name),
            HeaderPattern::Prefix(p) => name
                .as_bytes()
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes())),
        }
    }
}

impl fmt::Display for HeaderPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderPattern::Name(n) => f.write_str(n),
            HeaderPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// The Kafka message headers a module forwards as HTTP headers
/// (`forward_headers`; default: W3C Trace Context's `traceparent` and
/// `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardHeaders(pub Vec<HeaderPattern>);

impl Default for ForwardHeaders {
    fn default() -> ForwardHeaders {
        ForwardHeaders(vec![
            HeaderPattern::Name("traceparent".to_string()),
            HeaderPattern::Name("tracestate".to_string()),
        ])
    }
}

impl ForwardHeaders {
    /// `forward_headers none`.
    pub fn none() -> ForwardHeaders {
        ForwardHeaders(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a Kafka header called `name` is forwarded (names compare
    /// ASCII case-insensitively, as HTTP's do). Headers mkc sets itself
    /// and connection headers are never forwarded, whatever the list says
    /// ([`never_forwarded`]).
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name)) && !never_forwarded(name)
    }

    /// The patterns of all of `lists`, each once: what a worker keeps of
    /// a message's headers for the modules it may go to.
    pub fn union<'a>(lists: impl IntoIterator<Item = &'a ForwardHeaders>) -> ForwardHeaders {
        let mut all: Vec<HeaderPattern> = Vec::new();
        for pattern in lists.into_iter().flat_map(|l| &l.0) {
            if !all.contains(pattern) {
                all.push(pattern.clone());
            }
        }
        ForwardHeaders(all)
    }
}

/// Connection-level headers besides [`RESERVED_HEADERS`]: meaningless
/// end to end, and refused by HTTP/2.
const CONNECTION_HEADERS: &[&str] = &["keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

/// Headers a message never brings: those only mkc sets, framing (`Host`,
/// `Content-Length`, ...) and its own `X-Mkc-*` (which tell where the
/// message came from), and connection headers (`Upgrade`, `TE`, ...).
pub fn never_forwarded(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .chain(CONNECTION_HEADERS)
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
        || name
            .as_bytes()
            .get(..6)
            .is_some_and(|head| head.eq_ignore_ascii_case(b"x-mkc-"))
}

/// A PEM file of `tls_cert`, `tls_key` or `tls_ca`, as read when the
/// configuration was read (a reload reads it again).
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    /// Where it was read (resolved against `conf-path`).
    pub path: PathBuf,
    /// Its bytes.
    pub pem: Arc<[u8]>,
}

impl fmt::Debug for PemFile {
    /// The path only: a key file's bytes are a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PemFile({})", self.path.display())
    }
}

/// A module's TLS settings for an https uri: a client certificate for
/// mutual TLS, and the CAs that its server's certificate must chain to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleTls {
    /// `tls_cert FILE`: the client certificate, then its intermediates.
    pub cert: Option<PemFile>,
    /// `tls_key FILE`: the client certificate's private key.
    pub key: Option<PemFile>,
    /// `tls_ca FILE`: the CAs trusted for the server, instead of Mozilla's
    /// roots (webpki-roots).
    pub ca: Option<PemFile>,
}

impl ModuleTls {
    /// Whether any key is set (else the endpoint uses mkc's default TLS).
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The rustls configuration these settings make: the roots (`tls_ca`,
    /// or Mozilla's) and the client certificate, if any. `Err` says what
    /// is wrong, naming the key and its file.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.ca {
            Some(ca) => ca_roots(ca)?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert).map_err(|e| file_problem("tls_cert", cert, &e))?;
                let secret = private_key(key).map_err(|e| file_problem("tls_key", key, &e))?;
                builder.with_client_auth_cert(chain, secret).map_err(|e| {
                    format!(
                        "tls_key: {} does not go with tls_cert {}: {e}",
                        key.path.display(),
                        cert.path.display()
                    )
                })
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(_), None) => Err("tls_cert is set without tls_key".to_string()),
            (None, Some(_)) => Err("tls_key is set without tls_cert".to_string()),
        }
    }
}

fn file_problem(key: &str, file: &PemFile, problem: &str) -> String {
    format!("{key}: {}: {problem}", file.path.display())
}

/// The certificates of a PEM file, in order; at least one.
fn certificates(file: &PemFile) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&file.pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(&e))?;
    if certs.is_empty() {
        return Err("no certificate in it (expected a -----BEGIN CERTIFICATE----- section)".into());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn private_key(file: &PemFile) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(&file.pem).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            "no private key in it (expected a -----BEGIN PRIVATE KEY-----, \
             RSA PRIVATE KEY or EC PRIVATE KEY section; encrypted keys are not supported)"
                .to_string()
        }
        e => pem_problem(&e),
    })
}

/// The `tls_ca` file as a root store: every certificate must be a usable
/// trust anchor.
fn ca_roots(ca: &PemFile) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certificates(ca)
        .map_err(|e| file_problem("tls_ca", ca, &e))?
        .into_iter()
        .enumerate()
    {
        roots.add(cert).map_err(|e| {
            file_problem(
                "tls_ca",
                ca,
                &format!("certificate {} is not a usable CA certificate: {e}", i + 1),
            )
        })?;
    }
    Ok(roots)
}

/// A PEM syntax problem in words (pki-types' own text prints bytes).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no \"-----END {}-----\" line closes a section",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "not valid PEM: bad section start \"{}\"",
            String::from_utf8_lossy(line).trim()
        ),
        pem::Error::Base64Decode(e) => format!("not valid PEM: bad base64 in a section ({e})"),
        pem::Error::NoItemsFound => "no PEM section found".to_string(),
        e => format!("not valid PEM: {e}"),
    }
}

/// What the request keys of one module file collect while it is read.
#[derive(Default)]
pub(super) struct RequestKeys {
    /// Where `sign_secret` / `sign_secret_env` was set.
    sign_at: Option<Location>,
    /// Where `forward_headers` lines were, and whether one said `none`.
    forward_at: Vec<(Location, bool)>,
    forward: Vec<HeaderPattern>,
    /// Where each `tls_*` key was set (valid or not).
    tls_at: Vec<(&'static str, Location)>,
}

impl RequestKeys {
    /// Reads directive `d` (key `sign_secret`, `sign_secret_env`,
    /// `forward_headers`, `tls_cert`, `tls_key` or `tls_ca`) into
    /// `contract`. `files` reads the TLS files (`None`: not read, as
    /// for `-T`'s defaults).
    pub(super) fn read(
        &mut self,
        d: &Directive,
        contract: &mut DeliveryContract,
        files: Option<&ScriptLoader>,
        report: &mut Report,
    ) {
        match d.key.as_str() {
            "sign_secret" | "sign_secret_env" => self.sign(d, contract, report),
            "forward_headers" => self.forward(d, report),
            _ => self.tls(d, contract, files, report),
        }
    }

    fn sign(&mut self, d: &Directive, contract: &mut DeliveryContract, report: &mut Report) {
        let env = d.key == "sign_secret_env";
        let usage = if env {
            "sign_secret_env VARIABLE"
        } else {
            "sign_secret SECRET"
        };
        let Some(value) = report.single(d, usage) else {
            return;
        };
        if let Some(at) = &self.sign_at {
            report.error(
                &d.location,
                format!(
                    "{}: the signing secret is already set at line {} \
                     (one of sign_secret, sign_secret_env)",
                    d.key, at.line
                ),
            );
            return;
        }
        let secret = if env {
            let valid = value.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                report.error(
                    &d.location,
                    format!(
                        "sign_secret_env: \"{value}\" is not an environment variable name \
                         (letters, digits and _)"
                    ),
                );
                return;
            }
            match std::env::var_os(value) {
                Some(v) if !v.is_empty() => v.into_encoded_bytes(),
                Some(_) => {
                    report.error(
                        &d.location,
                        format!("sign_secret_env: environment variable {value} is empty"),
                    );
                    return;
                }
                None => {
                    report.error(
                        &d.location,
                        format!("sign_secret_env: environment variable {value} is not set"),
                    );
                    return;
                }
            }
        } else {
            if value.is_empty() {
                report.error(&d.location, "sign_secret: the secret is empty");
                return;
            }
            value.as_bytes().to_vec()
        };
        self.sign_at = Some(d.location.clone());
        contract.sign = Some(SignSecret {
            secret: secret.into(),
            env: env.then(|| value.to_string()),
        });
    }

    fn forward(&mut self, d: &Directive, report: &mut Report) {
        let Some(args) = report.args(d, 1, usize::MAX, "forward_headers NAME|PREFIX*...|none")
        else {
            return;
        };
        if args.iter().any(|a| a.eq_ignore_ascii_case("none")) {
            if args.len() > 1 {
                report.error(
                    &d.location,
                    "forward_headers: none cannot be listed with header names",
                );
                return;
            }
            self.forward_at.push((d.location.clone(), true));
            return;
        }
        for text in args {
            let lower = text.to_ascii_lowercase();
            let (pattern, name) = match lower.strip_suffix('*') {
                Some(prefix) => (HeaderPattern::Prefix(prefix.to_string()), prefix),
                None => (HeaderPattern::Name(lower.clone()), lower.as_str()),
            };
            let valid = match &pattern {
                HeaderPattern::Prefix(p) if p.is_empty() => true,
                _ => !name.contains('*') && http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
            };
            if !valid {
                report.error(
                    &d.location,
                    format!(
                        "forward_headers: \"{text}\" is not a header name or a prefix \
                         ending in * (like x-b3-*)"
                    ),
                );
                continue;
            }
            if matches!(pattern, HeaderPattern::Name(_)) && never_forwarded(name) {
                report.error(
                    &d.location,
                    format!(
                        "forward_headers: {text} cannot be forwarded \
                         (set by mkc, or a connection header)"
                    ),
                );
                continue;
            }
            if !self.forward.contains(&pattern) {
                self.forward.push(pattern);
            }
        }
        self.forward_at.push((d.location.clone(), false));
    }

    fn tls(
        &mut self,
        d: &Directive,
        contract: &mut DeliveryContract,
        files: Option<&ScriptLoader>,
        report: &mut Report,
    ) {
        let (key, slot): (&'static str, &mut Option<PemFile>) = match d.key.as_str() {
            "tls_cert" => ("tls_cert", &mut contract.tls.cert),
            "tls_key" => ("tls_key", &mut contract.tls.key),
            _ => ("tls_ca", &mut contract.tls.ca),
        };
        let Some(value) = report.single(d, &format!("{key} FILE")) else {
            return;
        };
        if let Some((_, at)) = self.tls_at.iter().find(|(k, _)| *k == key) {
            report.error(
                &d.location,
                format!("{key}: already set at line {}", at.line),
            );
            return;
        }
        self.tls_at.push((key, d.location.clone()));
        let Some(files) = files else {
            return;
        };
        let path = resolve(files.base, value);
        let bytes = match (files.read)(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                report.error(
                    &d.location,
                    format!("{key}: cannot read {}: {err}", path.display()),
                );
                return;
            }
        };
        let file = PemFile {
            path,
            pem: bytes.into(),
        };
        let checked = match key {
            "tls_key" => private_key(&file).map(drop),
            "tls_ca" => ca_roots(&file).map(drop),
            _ => certificates(&file).map(drop),
        };
        if let Err(problem) = checked {
            // ca_roots names its key and file itself.
            let problem = match problem.starts_with("tls_ca:") {
                true => problem,
                false => file_problem(key, &file, &problem),
            };
            report.error(&d.location, problem);
            return;
        }
        *slot = Some(file);
    }

    /// After the last line: the `forward_headers` list (replacing the
    /// default), and the TLS keys checked together. `https`: whether the
    /// module's uri is https.
    pub(super) fn finish(self, contract: &mut DeliveryContract, https: bool, report: &mut Report) {
        if let Some((at, _)) = self.forward_at.first() {
            let said_none = self.forward_at.iter().any(|(_, none)| *none);
            if said_none && !self.forward.is_empty() {
                report.error(
                    at,
                    "forward_headers: none and header names are both given; \
                     write either none or the names",
                );
            }
            contract.forward_headers = ForwardHeaders(self.forward);
        }
        let at = |key: &str| {
            self.tls_at
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, at)| at.clone())
        };
        match (at("tls_cert"), at("tls_key")) {
            (Some(cert), None) => {
                report.error(&cert, "tls_cert: tls_key is missing (both or neither)")
            }
            (None, Some(key)) => {
                report.error(&key, "tls_key: tls_cert is missing (both or neither)")
            }
            // Each file on its own is fine: do they go together?
            (Some(_), Some(key)) if contract.tls.cert.is_some() && contract.tls.key.is_some() => {
                if let Err(problem) = contract.tls.client_config() {
                    report.error(&key, problem);
                }
            }
            _ => {}
        }
        if !https {
            if let Some((key, at)) = self.tls_at.first() {
                report.warn(at, format!("{key} is used only with an https uri"));
            }
        }
    }
}
