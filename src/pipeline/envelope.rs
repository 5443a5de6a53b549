//! The envelope of a message: `{"commitId": ..., "commandId": ..., ...}`.
//!
//! This is the one JSON parse a message gets. Only `commandId` and
//! `commitId` are kept; the rest is validated and skipped, never
//! re-serialized (the body an endpoint receives is the Kafka payload, byte
//! for byte). Anything that is not a usable envelope is [`Invalid`], with a
//! reason fit for a log line.

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::CommandId;

/// What routing needs from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub command_id: CommandId,
    /// `commitId` as text (number or string), carried to the endpoint and
    /// the logs; `None` when absent or not a scalar.
    pub commit_id: Option<String>,
}

/// Why a payload is not a message mkc can route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("payload of {size} bytes is larger than max-message-bytes {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("empty payload")]
    Empty,
    #[error("payload contains a NUL byte at {0}")]
    NulByte(usize),
    #[error("payload is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("no commandId")]
    NoCommandId,
    #[error("commandId is not an integer or a string of digits in the 64-bit range: {0}")]
    BadCommandId(String),
}

/// A JSON scalar as it may appear in `commandId` / `commitId`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Unsigned(u64),
    Signed(i64),
    Text(String),
    Other(IgnoredAny),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "commandId", default)]
    command_id: Option<Scalar>,
    #[serde(rename = "commitId", default)]
    commit_id: Option<Scalar>,
}

/// Parses and validates `payload`; payloads above `max_bytes` are invalid.
pub fn parse(payload: &[u8], max_bytes: usize) -> Result<Envelope, Invalid> {
    if payload.len() > max_bytes {
        return Err(Invalid::TooLarge {
            size: payload.len(),
            limit: max_bytes,
        });
    }
    if let Some(at) = payload.iter().position(|&b| b == 0) {
        return Err(Invalid::NulByte(at));
    }
    let text = std::str::from_utf8(payload).map_err(|e| Invalid::NotUtf8(e.valid_up_to()))?;
    // serde would read a JSON array into a struct too: demand an object.
    match text.trim_start().as_bytes().first() {
        None => return Err(Invalid::Empty),
        Some(b'{') => {}
        Some(_) => {
            return Err(match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => Invalid::NotObject,
                Err(e) => Invalid::NotJson(e.to_string()),
            })
        }
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let command_id = match raw.command_id {
        None => return Err(Invalid::NoCommandId),
        Some(Scalar::Unsigned(n)) => CommandId(i128::from(n)),
        Some(Scalar::Signed(n)) => CommandId(i128::from(n)),
        Some(Scalar::Text(s)) => match s.strip_prefix('-') {
            // A digit string: no sign, no spaces, no decimals.
            None => CommandId::parse(&s).ok_or(Invalid::BadCommandId(format!("{s:?}")))?,
            Some(_) => return Err(Invalid::BadCommandId(format!("{s:?}"))),
        },
        Some(Scalar::Other(_)) => {
            return Err(Invalid::BadCommandId("not a number".to_string()));
        }
    };
    let commit_id = match raw.commit_id {
        Some(Scalar::Unsigned(n)) => Some(n.to_string()),
        Some(Scalar::Signed(n)) => Some(n.to_string()),
        Some(Scalar::Text(s)) => Some(s),
        Some(Scalar::Other(_)) | None => None,
    };
    Ok(Envelope {
        command_id,
        commit_id,
    })
}

/// The value at a dotted `path` (e.g. `["data", "orderId"]`) of a JSON
/// object payload, as its JSON text (strings without their quotes), for
/// keyed ordering. `None` when the payload has no such field. Only the
/// objects on the path are looked at; nothing is built for the rest.
pub fn field<'a>(payload: &'a [u8], path: &[String]) -> Option<std::borrow::Cow<'a, str>> {
    use serde_json::value::RawValue;
    use std::borrow::Cow;
    let mut raw: &'a RawValue = serde_json::from_slice(payload).ok()?;
    for segment in path {
        let object: std::collections::HashMap<Cow<'a, str>, &'a RawValue> =
            serde_json::from_str(raw.get()).ok()?;
        raw = object.get(segment.as_str())?;
    }
    let text = raw.get();
    if text.starts_with('"') {
        // A string key: compare by its value, escapes resolved.
        serde_json::from_str::<Cow<'a, str>>(text).ok()
    } else {
        Some(Cow::Borrowed(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn id(payload: &str) -> Result<i128, Invalid> {
        parse(payload.as_bytes(), MAX).map(|e| e.command_id.0)
    }

    #[test]
    fn integer_and_digit_string_ids() {
        assert_eq!(id(r#"{"commandId": 1000042}"#), Ok(1000042));
        assert_eq!(id(r#"{"commandId": "1000042"}"#), Ok(1000042));
        assert_eq!(
            id(r#"{"commandId": 18446744073709551615}"#),
            Ok(u64::MAX as i128)
        );
        assert_eq!(
            id(r#"{"commandId": "18446744073709551615"}"#),
            Ok(u64::MAX as i128)
        );
        assert_eq!(
            id(r#"{"commandId": -9223372036854775808}"#),
            Ok(i64::MIN as i128)
        );
    }

    #[test]
    fn commit_id_is_carried_as_text() {
        let e = parse(
            br#"{"commitId": 12, "commandId": 1, "data": {"x": [1,2]}}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(e.commit_id.as_deref(), Some("12"));
        let e = parse(br#"{"commitId": "abc", "commandId": 1}"#, MAX).unwrap();
        assert_eq!(e.commit_id.as_deref(), Some("abc"));
        let e = parse(br#"{"commandId": 1}"#, MAX).unwrap();
        assert_eq!(e.commit_id, None);
    }

    #[test]
    fn invalid_kinds() {
        assert!(matches!(id("not json"), Err(Invalid::NotJson(_))));
        assert_eq!(id("[1,2]"), Err(Invalid::NotObject));
        assert_eq!(id("42"), Err(Invalid::NotObject));
        assert_eq!(id(""), Err(Invalid::Empty));
        assert_eq!(id("   "), Err(Invalid::Empty));
        assert_eq!(id(r#"{"data": 1}"#), Err(Invalid::NoCommandId));
        assert!(matches!(
            id(r#"{"commandId": "12a"}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": "-5"}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": ""}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": 1.5}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert_eq!(id(r#"{"commandId": null}"#), Err(Invalid::NoCommandId));
        assert!(matches!(
            id(r#"{"commandId": {"a":1}}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": 18446744073709551616}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": "18446744073709551616"}"#),
            Err(Invalid::BadCommandId(_))
        ));
        assert!(matches!(
            id(r#"{"commandId": 1} trailing"#),
            Err(Invalid::NotJson(_))
        ));
        assert!(matches!(id(r#"{"commandId": 1"#), Err(Invalid::NotJson(_))));
    }

    #[test]
    fn bytes_level_rejections() {
        assert_eq!(
            parse(b"{\"commandId\": 1, \"x\": \"a\0b\"}", MAX),
            Err(Invalid::NulByte(24))
        );
        assert_eq!(
            parse(b"{\"commandId\": 1, \"x\": \"\xff\"}", MAX),
            Err(Invalid::NotUtf8(23))
        );
        let big = format!(r#"{{"commandId": 1, "x": "{}"}}"#, "a".repeat(100));
        assert!(matches!(
            parse(big.as_bytes(), 50),
            Err(Invalid::TooLarge { limit: 50, .. })
        ));
    }

    #[test]
    fn fields_by_dotted_path() {
        let p = br#"{"commandId": 1, "data": {"orderId": "A-7", "n": 42, "deep": {"k": [1, 2]}}}"#;
        let path = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(field(p, &path("data.orderId")).as_deref(), Some("A-7"));
        assert_eq!(field(p, &path("data.n")).as_deref(), Some("42"));
        assert_eq!(field(p, &path("data.deep.k")).as_deref(), Some("[1, 2]"));
        assert_eq!(field(p, &path("commandId")).as_deref(), Some("1"));
        assert_eq!(field(p, &path("data.missing")), None);
        assert_eq!(field(p, &path("data.n.x")), None);
        assert_eq!(field(b"not json", &path("a")), None);
    }

    #[test]
    fn escaped_strings_and_nesting_are_fine() {
        let e = parse(
            br#"{"data": {"deep": [[[{"q": "\"\\\u0000"}]]]}, "commandId": "7"}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(e.command_id, CommandId(7));
    }
}
