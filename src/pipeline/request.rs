//! What a request carries besides the payload and mkc's own headers
//! (README: Delivery contract): the HMAC signature of its body, the Kafka
//! headers a module forwards, and the TLS client of a module with a client
//! certificate or its own CA. [`crate::pipeline::dispatch`] calls these
//! where it builds the endpoint and each request.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use sha2::Sha256;

use crate::config::{ForwardHeaders, ModuleConfig};

/// `X-Mkc-Timestamp`: the Unix time (seconds) the signature was made.
pub static X_MKC_TIMESTAMP: HeaderName = HeaderName::from_static("x-mkc-timestamp");
/// `X-Mkc-Signature: v1=<hex>`.
pub static X_MKC_SIGNATURE: HeaderName = HeaderName::from_static("x-mkc-signature");

/// A module's signing secret, keyed once: each request's signature starts
/// from a copy of this state (the secret's two padded blocks are hashed
/// already).
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    pub fn new(secret: &[u8]) -> SigningKey {
        // HMAC takes a key of any length: this cannot fail.
        SigningKey(Hmac::new_from_slice(secret).expect("HMAC accepts any key length"))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// `X-Mkc-Signature`'s value for a request sent at `timestamp` (Unix
/// seconds, the `X-Mkc-Timestamp` value) with `body`: `v1=` and the
/// lowercase hex HMAC-SHA256, under the module's secret, of the bytes
/// `<timestamp>.<body>` — the timestamp's decimal digits, a `.`, then the
/// body exactly as sent.
pub fn sign(key: &SigningKey, timestamp: u64, body: &[u8]) -> HeaderValue {
    let mut mac = key.0.clone();
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = Vec::with_capacity(3 + 2 * digest.len());
    text.extend_from_slice(b"v1=");
    for byte in digest {
        text.push(HEX[usize::from(byte >> 4)]);
        text.push(HEX[usize::from(byte & 15)]);
    }
    HeaderValue::from_bytes(&text).expect("v1= and hex digits are a valid header value")
}

/// Adds `X-Mkc-Timestamp` (now) and `X-Mkc-Signature` over `body` to
/// `headers`, replacing any of the same name.
pub fn add_signature(headers: &mut HeaderMap, key: &SigningKey, body: &[u8]) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    headers.insert(X_MKC_TIMESTAMP.clone(), HeaderValue::from(now));
    headers.insert(X_MKC_SIGNATURE.clone(), sign(key, now, body));
}

/// Appends the message's headers that `keep` names to `headers`.
/// `message` holds only valid HTTP headers (see [`kafka_headers`]).
pub fn forward(
    headers: &mut HeaderMap,
    message: &[(HeaderName, HeaderValue)],
    keep: &ForwardHeaders,
) {
    for (name, value) in message {
        if keep.matches(name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// The headers of a Kafka message that `keep` names, as HTTP headers, in
/// their order (a name given twice is kept twice). A header whose name or
/// value is not valid in HTTP, or that has no value, is left out (logged
/// at debug). Allocates nothing when no header is kept.
pub fn kafka_headers(
    message: &impl rdkafka::message::Headers,
    keep: &ForwardHeaders,
    offset: i64,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut kept = Vec::new();
    for header in message.iter() {
        if !keep.matches(header.key) {
            continue;
        }
        let name = HeaderName::from_bytes(header.key.as_bytes());
        let value = header.value.map(HeaderValue::from_bytes);
        match (name, value) {
            (Ok(name), Some(Ok(value))) => kept.push((name, value)),
            (Err(_), _) => tracing::debug!(offset, header = %header.key.escape_debug(),
                "Kafka header not forwarded: not a valid HTTP header name"),
            (_, None) => tracing::debug!(offset, header = %header.key,
                "Kafka header not forwarded: it has no value"),
            (_, Some(Err(_))) => tracing::debug!(offset, header = %header.key,
                "Kafka header not forwarded: its value is not a valid HTTP header value"),
        }
    }
    kept
}

/// The TLS-capable connector of `module` over `http`: mkc's default
/// (Mozilla's roots, no client certificate) unless the module sets
/// `tls_cert`/`tls_key` or `tls_ca`.
pub fn connector(
    module: &ModuleConfig,
    http: HttpConnector,
) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    let tls = &module.contract.tls;
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match tls.is_set() {
        false => builder.with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?,
        true => builder.with_tls_config(
            tls.client_config()
                .map_err(|e| anyhow::anyhow!("module {}: {e}", module.name))?,
        ),
    };
    Ok(builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        let value = sign(&SigningKey::new(b"s3cret"), 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            value.to_str().unwrap(),
            "v1=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
        // The key state is reused: a second signature starts afresh.
        let key = SigningKey::new(b"s3cret");
        assert_eq!(sign(&key, 1, b"x"), sign(&key, 1, b"x"));
        assert_ne!(sign(&key, 1, b"x"), sign(&key, 2, b"x"));
    }
}
