//! The script keys (`script FILE` in module.conf, `route FILE` in
//! server.conf): each file read and loaded once, as a worker will, so that
//! a script that does not load is a configuration error with its
//! `file.lua:LINE`.

use super::*;

use crate::script::{check, Entry, Limits, Script};

/// Reads and checks script files named by the configuration.
pub(super) struct ScriptLoader<'a> {
    /// What relative names are resolved against.
    pub(super) base: &'a Path,
    /// Reads a file (the module reader: tests pass text).
    pub(super) read: &'a dyn Fn(&Path) -> io::Result<Vec<u8>>,
    pub(super) limits: Limits,
}

impl ScriptLoader<'_> {
    /// The script `value` of directive `d`, read and loaded; `None` (and
    /// an error in `report`) when it cannot be read or does not load.
    pub(super) fn load(
        &self,
        d: &Directive,
        value: &str,
        entry: Entry,
        report: &mut Report,
    ) -> Option<Arc<Script>> {
        let path = resolve(self.base, value);
        let key = &d.key;
        let source = match (self.read)(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                report.error(
                    &d.location,
                    format!("{key}: cannot read {}: {err}", path.display()),
                );
                return None;
            }
        };
        let script = Script {
            path,
            source: Arc::from(source),
            entry,
        };
        match check(&script, self.limits) {
            Ok(()) => Some(Arc::new(script)),
            Err(err) => {
                match err.line {
                    Some(line) => report.error(
                        &Location {
                            path: script.path.clone(),
                            line,
                        },
                        err.message,
                    ),
                    None => report.error(
                        &d.location,
                        format!("{key}: {}: {}", script.path.display(), err.message),
                    ),
                }
                None
            }
        }
    }
}
