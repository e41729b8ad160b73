//! The file sink: every enriched engagement event as one JSON line, the
//! shape Redis stream entries and HTTP batches carry (`sinks::EventJson`:
//! id, version, op, commit_ts, event, previous), appended to a file or
//! written to standard output (`path = "-"`). For debugging and for piping
//! into other tools (`jq`, `vector`, a shell loop).
//!
//! A batch is written whole and flushed (`sync_data` for a file) before
//! `write` returns, so what the slot moves past is on disk. Delivery is at
//! least once: after a crash the replayed events are appended again with
//! the same `id` and `version`, by which a reader de-duplicates. Content
//! changes are not written (they reach consumers enriched into events).

use std::io::Write;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Probe, SinkError};
use crate::config::FileConfig;
use crate::enrich::Enriched;

/// Where the lines go.
enum Target {
    Stdout,
    File(Mutex<Option<tokio::fs::File>>),
}

pub struct FileSink {
    path: String,
    target: Target,
}

/// A batch's lines: each event's JSON and a newline.
pub fn lines(batch: &Enriched) -> Vec<u8> {
    let events = super::events_json(batch);
    let mut out = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum());
    for e in events {
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    out
}

impl FileSink {
    pub fn new(cfg: &FileConfig) -> Self {
        let target = if cfg.path == "-" { Target::Stdout } else { Target::File(Mutex::new(None)) };
        FileSink { path: cfg.path.clone(), target }
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
        move |source| SinkError::File { path: self.path.clone(), source }
    }

    async fn open(&self) -> Result<tokio::fs::File, SinkError> {
        tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await.map_err(self.err())
    }
}

#[async_trait::async_trait]
impl super::Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    /// Opens the file (creating it) so that a path that cannot be written
    /// fails the run at start.
    async fn connect(&self) -> Result<(), SinkError> {
        if let Target::File(file) = &self.target {
            let mut file = file.lock().await;
            if file.is_none() {
                *file = Some(self.open().await?);
            }
        }
        Ok(())
    }

    async fn probe(&self) -> Result<Probe, String> {
        let detail = match &self.target {
            Target::Stdout => "standard output".to_string(),
            Target::File(_) => {
                let meta = tokio::fs::metadata(&self.path).await;
                match meta {
                    Ok(m) => format!("{} ({} bytes)", self.path, m.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!("{} (not yet written)", self.path),
                    Err(e) => return Err(format!("{}: {e}", self.path)),
                }
            }
        };
        Ok(Probe { position: None, detail: Some(detail) })
    }

    /// A failed write is an error, not retried here: the pipeline stops
    /// without acknowledging the batch and the next start replays it (a
    /// full disk wants a person, not a retry loop).
    async fn write(&self, batch: &Enriched) -> Result<(), SinkError> {
        if batch.engagements.is_empty() {
            return Ok(());
        }
        let bytes = lines(batch);
        match &self.target {
            Target::Stdout => {
                // Blocking, but short: a pipe that is not read blocks the
                // lane, which is the backpressure a pipe should give.
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes).and_then(|()| out.flush()).map_err(self.err())
            }
            Target::File(file) => {
                let mut file = file.lock().await;
                if file.is_none() {
                    *file = Some(self.open().await?);
                }
                let f = file.as_mut().expect("opened above");
                f.write_all(&bytes).await.map_err(self.err())?;
                f.sync_data().await.map_err(self.err())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{EngagementChange, EngagementRow};
    use crate::sinks::Sink;
    use crate::source::{Op, Position};

    fn change(event_id: i64, ordinal: u32) -> EngagementChange {
        EngagementChange {
            op: Op::Create,
            current: Some(EngagementRow { event_id, event_type: Some("play".into()), ..EngagementRow::default() }),
            previous: None,
            position: Position { commit_lsn: 0x16B3748, ordinal },
            commit_ts: 1_700_000_000_000,
            replay_digest: None,
        }
    }

    #[tokio::test]
    async fn appends_one_json_line_per_event_and_keeps_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let sink = FileSink::new(&FileConfig { path: path.to_string_lossy().into_owned() });
        sink.connect().await.unwrap();
        let batch = Enriched { engagements: vec![change(7, 0), change(8, 1)], ..Enriched::default() };
        sink.write(&batch).await.unwrap();
        sink.write(&Enriched::default()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier");
        let first: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(first["id"], "0/16B3748/0");
        assert_eq!(first["version"], Position { commit_lsn: 0x16B3748, ordinal: 0 }.sortable_hex());
        assert_eq!(first["op"], "c");
        assert_eq!(first["event"]["event_id"], 7);
        let second: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(second["event"]["event_id"], 8);
        assert!(sink.probe().await.unwrap().detail.unwrap().contains("bytes"));
    }

    #[tokio::test]
    async fn a_path_that_cannot_be_written_fails_at_connect_naming_it() {
        let sink = FileSink::new(&FileConfig { path: "/nonexistent-dir/x/events.jsonl".into() });
        let e = sink.connect().await.unwrap_err().to_string();
        assert!(e.contains("/nonexistent-dir/x/events.jsonl"), "{e}");
    }
}
