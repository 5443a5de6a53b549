//! Stage 1: the lines of a configuration file -> [`Directive`]s (what
//! the user wrote, with its line number).

use super::*;

/// One `key value...` line as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Where the line is.
    pub location: Location,
    /// The first token, lowercased.
    pub key: String,
    /// The remaining tokens, quotes removed and escapes applied.
    pub args: Vec<String>,
}

/// Reads a configuration file into directives: one per line that is not
/// blank or a comment. Every bad line is reported (unterminated quote,
/// value not UTF-8, ...), each with `path:line`; `path` is used only for
/// those messages.
pub fn parse_reader(path: &Path, reader: impl Read) -> Result<Vec<Directive>, Vec<Diagnostic>> {
    let (directives, errors) = lex(path, reader);
    if errors.is_empty() {
        Ok(directives)
    } else {
        Err(errors)
    }
}

/// [`parse_reader`] without giving up: the directives of the good lines
/// and the errors of the bad ones, so that [`load`] can go on validating.
pub(super) fn lex(path: &Path, mut reader: impl Read) -> (Vec<Directive>, Vec<Diagnostic>) {
    let mut bytes = Vec::new();
    if let Err(err) = reader.read_to_end(&mut bytes) {
        let message = format!("cannot read {}: {err}", path.display());
        return (
            Vec::new(),
            vec![Diagnostic {
                location: None,
                message,
            }],
        );
    }
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut directives = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let location = Location {
            path: path.to_path_buf(),
            line: index + 1,
        };
        match split_line(line) {
            Ok(tokens) => {
                let mut tokens = tokens.into_iter();
                let Some(key) = tokens.next() else { continue };
                if key.is_empty() {
                    errors.push(Diagnostic {
                        location: Some(location),
                        message: "empty key".to_string(),
                    });
                    continue;
                }
                directives.push(Directive {
                    location,
                    key: key.to_lowercase(),
                    args: tokens.collect(),
                });
            }
            Err(message) => errors.push(Diagnostic {
                location: Some(location),
                message,
            }),
        }
    }
    (directives, errors)
}

pub(super) fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\x0b' | b'\x0c')
}

/// Splits one line (without its line end) into tokens. The bytes of a
/// comment are never decoded, so they may be in any encoding.
pub(super) fn split_line(line: &[u8]) -> Result<Vec<String>, String> {
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        let Some(&first) = line.get(i) else { break };
        if first == b'#' {
            break;
        }
        let mut token = Vec::new();
        if first == b'"' {
            i += 1;
            loop {
                match line.get(i) {
                    None => return Err("unterminated quoted string".to_string()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if matches!(line.get(i + 1), Some(b'"' | b'\\')) => {
                        token.push(line[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        token.push(b);
                        i += 1;
                    }
                }
            }
            if line.get(i).is_some_and(|&b| !is_blank(b)) {
                return Err(
                    "a closing quote must be followed by a space or the end of the line"
                        .to_string(),
                );
            }
        } else {
            while let Some(&b) = line.get(i).filter(|&&b| !is_blank(b)) {
                token.push(b);
                i += 1;
            }
        }
        tokens.push(token);
    }
    tokens
        .into_iter()
        .map(|token| {
            String::from_utf8(token).map_err(|_| {
                "the line is not valid UTF-8 (only comments may hold other bytes)".to_string()
            })
        })
        .collect()
}
