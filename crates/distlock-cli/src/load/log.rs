//! `--log FILE`: one JSON line per request, written as requests end.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use super::report::Record;

/// The request log. Workers write through a mutex into a buffer; the
/// first write error stops the log and is reported at the end.
pub(crate) struct RequestLog {
    state: Mutex<LogState>,
}

struct LogState {
    out: Option<BufWriter<File>>,
    error: Option<std::io::Error>,
}

impl RequestLog {
    /// Creates (or truncates) the file.
    pub(crate) fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        Ok(RequestLog {
            state: Mutex::new(LogState {
                out: Some(BufWriter::new(file)),
                error: None,
            }),
        })
    }

    /// Appends `record`'s line.
    pub(crate) fn write(&self, record: &Record, key: &str) {
        let mut line = record.to_json(key).to_string();
        line.push('\n');
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let LogState { out, error } = &mut *state;
        if let Some(writer) = out {
            if let Err(err) = writer.write_all(line.as_bytes()) {
                *error = Some(err);
                *out = None;
            }
        }
    }

    /// Flushes the file; the first error met, if any.
    pub(crate) fn finish(&self) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut writer) = state.out.take() {
            if let Err(err) = writer.flush() {
                state.error.get_or_insert(err);
            }
        }
        state.error.as_ref().map(ToString::to_string)
    }
}
