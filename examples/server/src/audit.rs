//! The coalescing layer's audit events as JSON objects: one per line in a file, or one per
//! log line (target `audit`) in the server's log.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tower_refresh_coalesce::AuditEvent;

/// Where audit lines go.
pub struct AuditLog {
    /// `None`: the server's log.
    file: Option<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Events in the server's log: `audit` fields holding the JSON object, target `audit`.
    pub fn log() -> Self {
        Self { file: None }
    }

    /// Lines appended to the file at `path`.
    pub fn file(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Some(Mutex::new(Box::new(file))),
        })
    }

    /// Writes `event` as one line.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let line = to_json(event).to_string();
        let Some(file) = &self.file else {
            tracing::info!(target: "audit", audit = %line, "{}", event.kind());
            return;
        };
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = writeln!(file, "{line}").and_then(|()| file.flush()) {
            tracing::warn!(%error, "writing the audit log failed");
        }
    }
}

/// One event as a JSON object: `ts_ms`, `event` (the kind), `subject` when known, and the
/// fields of its kind. A token never appears: the events carry none.
pub fn to_json(event: &AuditEvent<'_>) -> Value {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut object = json!({ "ts_ms": ts_ms, "audit": event.kind() });
    if let Some(subject) = event.subject() {
        object["subject"] = json!(subject);
    }
    match *event {
        AuditEvent::ReuseSuspected { flight, .. } => object["flight"] = json!(flight),
        AuditEvent::Invalidated { scope, entries, .. } => {
            object["scope"] = json!(scope.as_str());
            object["entries"] = json!(entries);
        }
        AuditEvent::Refused {
            outcome, reason, ..
        } => {
            object["outcome"] = json!(outcome.as_str());
            object["reason"] = json!(reason);
        }
        _ => {}
    }
    object
}
