//! Where a configuration problem is ([`Location`]), what it is
//! ([`Diagnostic`]), and the [`Report`] that collects them while a
//! configuration is validated.

use super::*;

/// A place in a configuration file, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// One problem found in a configuration, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// `None` for problems that belong to no single line (for example
    /// "no topic configured"); then the message names the file.
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Errors and warnings collected while validating.
#[derive(Default)]
pub(super) struct Report {
    pub(super) errors: Vec<Diagnostic>,
    pub(super) warnings: Vec<Diagnostic>,
}

impl Report {
    pub(super) fn error(&mut self, at: &Location, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            location: Some(at.clone()),
            message: message.into(),
        });
    }

    pub(super) fn warn(&mut self, at: &Location, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            location: Some(at.clone()),
            message: message.into(),
        });
    }

    /// A problem of a whole file; `message` names the file.
    pub(super) fn error_unplaced(&mut self, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            location: None,
            message: message.into(),
        });
    }

    /// The arguments of `d` if their count is within `min..=max`;
    /// otherwise an error showing `usage`.
    pub(super) fn args<'d>(
        &mut self,
        d: &'d Directive,
        min: usize,
        max: usize,
        usage: &str,
    ) -> Option<&'d [String]> {
        let found = d.args.len();
        if (min..=max).contains(&found) {
            return Some(&d.args);
        }
        let expected = match (min, max) {
            (1, 1) => "1 argument".to_string(),
            _ if min == max => format!("{min} arguments"),
            _ if max == usize::MAX => format!("at least {min} argument{}", plural(min)),
            _ => format!("{min} to {max} arguments"),
        };
        self.error(
            &d.location,
            format!("{}: expected {expected} (`{usage}`), found {found}", d.key),
        );
        None
    }

    /// The one argument of `d`.
    pub(super) fn single<'d>(&mut self, d: &'d Directive, usage: &str) -> Option<&'d str> {
        self.args(d, 1, 1, usage).map(|args| args[0].as_str())
    }

    /// An unsigned integer in `min..=max` (`min` is 0 or 1). `what` names
    /// the value inside the line (may be empty), `unit` is shown after it.
    pub(super) fn uint(
        &mut self,
        d: &Directive,
        what: &str,
        text: &str,
        min: u64,
        max: u64,
        unit: &str,
    ) -> Option<u64> {
        let prefix = if what.is_empty() {
            format!("{}: ", d.key)
        } else {
            format!("{}: {what} ", d.key)
        };
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        match text.parse::<u64>() {
            Ok(value) if digits && (min..=max).contains(&value) => Some(value),
            // Digits only, so the parse can fail only by overflow.
            Ok(value) if digits && value > max => self.too_large(d, &prefix, text, max, &unit),
            Err(_) if digits => self.too_large(d, &prefix, text, max, &unit),
            _ => {
                let kind = if min > 0 { "positive" } else { "non-negative" };
                self.error(
                    &d.location,
                    format!("{prefix}\"{text}\" is not a {kind} integer{unit}"),
                );
                None
            }
        }
    }

    pub(super) fn too_large(
        &mut self,
        d: &Directive,
        prefix: &str,
        text: &str,
        max: u64,
        unit: &str,
    ) -> Option<u64> {
        self.error(
            &d.location,
            format!("{prefix}{text} is too large (at most {max}{unit})"),
        );
        None
    }

    /// A non-empty path argument, resolved against `base`.
    pub(super) fn path(&mut self, d: &Directive, text: &str, base: &Path) -> Option<PathBuf> {
        if text.is_empty() {
            self.error(&d.location, format!("{}: empty path", d.key));
            return None;
        }
        Some(resolve(base, text))
    }

    /// A list of command ids, one or several per line.
    pub(super) fn command_ids(&mut self, d: &Directive, into: &mut Vec<(CommandId, Location)>) {
        let Some(args) = self.args(d, 1, usize::MAX, "filters ID...") else {
            return;
        };
        for text in args {
            match CommandId::parse(text) {
                Some(id) if into.iter().all(|(known, _)| *known != id) => {
                    into.push((id, d.location.clone()));
                }
                Some(_) => {}
                None => self.error(
                    &d.location,
                    format!(
                        "{}: \"{text}\" is not a command id (an integer in the 64-bit range)",
                        d.key
                    ),
                ),
            }
        }
    }
}

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
