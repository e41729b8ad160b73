//! Transactions the server streams before they commit (pgoutput protocol
//! 2+, `streaming`): their messages are held here, per top-level xid, until
//! the Stream Commit that lets them through or the Stream Abort that drops
//! them, so nothing uncommitted ever reaches the pipeline.
//!
//! Messages are kept raw (the bytes pgoutput sent, with their LSN), in
//! memory up to a budget shared by all open transactions; past it the
//! largest transaction's messages move to an anonymous file (unlinked at
//! creation, so a crash leaves nothing behind). A million-row transaction
//! therefore costs disk, not memory, as it does on the server with
//! protocol 1, but on pgfanout's machine instead of the database's.
//!
//! A subtransaction's abort (ROLLBACK TO SAVEPOINT) drops everything from
//! its first message on: subtransactions nest, so what follows it in the
//! stream belongs to it or to its children, which the abort takes too. This
//! is how PostgreSQL's own subscriber applies a streamed abort.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use metrics::{counter, gauge};

use crate::observe::metrics::{STREAMED_TRANSACTIONS, STREAM_BUFFER_BYTES, STREAM_SPILLED_BYTES};

/// A failure to hold or read back a streamed transaction.
#[derive(Debug, thiserror::Error)]
#[error("holding streamed transaction {xid} in {dir}: {source}")]
pub struct SpillError {
    pub xid: u32,
    pub dir: String,
    #[source]
    pub source: io::Error,
}

impl SpillError {
    /// The error maker for I/O on transaction `xid`'s records in `dir`.
    fn on(xid: u32, dir: &Path) -> impl Fn(io::Error) -> SpillError + Copy + '_ {
        move |source| SpillError { xid, dir: dir.display().to_string(), source }
    }
}

/// Record header: the message's LSN (u64) and its length (u32), little endian.
const HEADER: usize = 12;

/// The open streamed transactions of one replication session.
pub struct InProgress {
    txs: HashMap<u32, Held>,
    /// Bytes held in memory across all transactions.
    in_memory: usize,
    budget: usize,
    dir: PathBuf,
}

#[derive(Default)]
struct Held {
    /// The records after those in `file`.
    memory: Vec<u8>,
    file: Option<File>,
    file_len: u64,
    /// Each (sub)transaction with the offset of its first record, in stream
    /// order (so offsets grow), and where each sits in that list.
    first_seen: Vec<(u32, u64)>,
    index: HashMap<u32, usize>,
}

impl Held {
    fn len(&self) -> u64 {
        self.file_len + self.memory.len() as u64
    }
}

impl InProgress {
    /// `budget`: bytes of messages held in memory before the largest
    /// transaction spills to a file in `dir`.
    pub fn new(budget: usize, dir: PathBuf) -> Self {
        InProgress { txs: HashMap::new(), in_memory: 0, budget, dir }
    }

    /// Number of transactions open.
    pub fn open(&self) -> usize {
        self.txs.len()
    }

    /// Bytes held in memory.
    pub fn in_memory(&self) -> usize {
        self.in_memory
    }

    /// Holds one message of the streamed block of transaction `top`. A data
    /// message inside a block leads with the xid of the (sub)transaction
    /// that made it, right after its tag.
    pub fn push(&mut self, top: u32, lsn: u64, message: &[u8]) -> Result<(), SpillError> {
        let held = self.txs.entry(top).or_default();
        let sub = message.get(1..5).map_or(top, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
        if !held.index.contains_key(&sub) {
            held.index.insert(sub, held.first_seen.len());
            held.first_seen.push((sub, held.len()));
        }
        held.memory.extend_from_slice(&lsn.to_le_bytes());
        held.memory.extend_from_slice(&(message.len() as u32).to_le_bytes());
        held.memory.extend_from_slice(message);
        self.in_memory += HEADER + message.len();
        while self.in_memory > self.budget {
            let Some((&xid, _)) =
                self.txs.iter().filter(|(_, h)| !h.memory.is_empty()).max_by_key(|(_, h)| h.memory.len())
            else {
                break;
            };
            self.spill(xid)?;
        }
        Ok(())
    }

    /// Moves transaction `xid`'s in-memory records to the end of its file.
    fn spill(&mut self, xid: u32) -> Result<(), SpillError> {
        let dir = &self.dir;
        let fail = SpillError::on(xid, dir);
        let held = self.txs.get_mut(&xid).expect("spilling an open transaction");
        if held.file.is_none() {
            tracing::info!(xid, dir = %dir.display(), held_bytes = held.memory.len(), "streamed transaction outgrew source.stream_buffer_mb; spilling it to a file until it ends");
            held.file = Some(tempfile::tempfile_in(dir).map_err(fail)?);
        }
        let file = held.file.as_mut().expect("created above");
        // A subtransaction's abort may have cut the file short.
        file.seek(SeekFrom::Start(held.file_len)).map_err(fail)?;
        file.write_all(&held.memory).map_err(fail)?;
        held.file_len += held.memory.len() as u64;
        counter!(STREAM_SPILLED_BYTES).increment(held.memory.len() as u64);
        self.in_memory -= held.memory.len();
        held.memory = Vec::new();
        gauge!(STREAM_BUFFER_BYTES).set(self.in_memory as f64);
        Ok(())
    }

    /// Drops what (sub)transaction `sub` of transaction `top` wrote, and
    /// everything after its first message; all of `top` when `sub == top`.
    pub fn abort(&mut self, top: u32, sub: u32) -> Result<(), SpillError> {
        if sub == top {
            counter!(STREAMED_TRANSACTIONS, "outcome" => "aborted").increment(1);
            if let Some(held) = self.txs.remove(&top) {
                self.in_memory -= held.memory.len();
                gauge!(STREAM_BUFFER_BYTES).set(self.in_memory as f64);
            }
            return Ok(());
        }
        let dir = &self.dir;
        let Some(held) = self.txs.get_mut(&top) else { return Ok(()) };
        // A subtransaction that wrote nothing was never seen.
        let Some(&at) = held.index.get(&sub) else { return Ok(()) };
        let cut = held.first_seen[at].1;
        for (gone, _) in held.first_seen.drain(at..) {
            held.index.remove(&gone);
        }
        if cut >= held.file_len {
            let keep = (cut - held.file_len) as usize;
            self.in_memory -= held.memory.len() - keep;
            held.memory.truncate(keep);
        } else {
            self.in_memory -= held.memory.len();
            held.memory = Vec::new();
            let file = held.file.as_mut().expect("records before file_len are in the file");
            file.set_len(cut).map_err(SpillError::on(top, dir))?;
            held.file_len = cut;
        }
        Ok(())
    }

    /// Ends transaction `top` and returns its messages in stream order (none
    /// when it streamed nothing that was kept).
    pub fn commit(&mut self, top: u32) -> Result<Replay, SpillError> {
        counter!(STREAMED_TRANSACTIONS, "outcome" => "committed").increment(1);
        let Some(held) = self.txs.remove(&top) else {
            return Ok(Replay::default());
        };
        self.in_memory -= held.memory.len();
        gauge!(STREAM_BUFFER_BYTES).set(self.in_memory as f64);
        let file = match held.file {
            Some(mut f) => {
                f.seek(SeekFrom::Start(0)).map_err(SpillError::on(top, &self.dir))?;
                Some(BufReader::with_capacity(256 * 1024, f).take(held.file_len))
            }
            None => None,
        };
        Ok(Replay { xid: top, dir: self.dir.clone(), file, memory: Bytes::from(held.memory), pos: 0 })
    }
}

/// The messages of a committed streamed transaction, read back one at a
/// time (a spilled transaction is never loaded whole).
#[derive(Default)]
pub struct Replay {
    xid: u32,
    dir: PathBuf,
    file: Option<io::Take<BufReader<File>>>,
    memory: Bytes,
    pos: usize,
}

impl Replay {
    /// The next message and its LSN.
    pub fn next_message(&mut self) -> Result<Option<(u64, Bytes)>, SpillError> {
        if let Some(file) = &mut self.file {
            let mut header = [0u8; HEADER];
            match file.read_exact(&mut header) {
                Ok(()) => {
                    let (lsn, len) = parse_header(&header);
                    let mut message = vec![0u8; len];
                    file.read_exact(&mut message).map_err(|source| self.fail(source))?;
                    return Ok(Some((lsn, Bytes::from(message))));
                }
                // The file ends where its records do (it is read through
                // `take(file_len)`): on to the records in memory.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.file = None,
                Err(e) => return Err(self.fail(e)),
            }
        }
        if self.pos >= self.memory.len() {
            return Ok(None);
        }
        let header: [u8; HEADER] = self.memory[self.pos..self.pos + HEADER].try_into().expect("records are whole");
        let (lsn, len) = parse_header(&header);
        let start = self.pos + HEADER;
        self.pos = start + len;
        Ok(Some((lsn, self.memory.slice(start..start + len))))
    }

    fn fail(&self, source: io::Error) -> SpillError {
        SpillError::on(self.xid, &self.dir)(source)
    }
}

fn parse_header(h: &[u8; HEADER]) -> (u64, usize) {
    let lsn = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(h[8..].try_into().expect("4 bytes")) as usize;
    (lsn, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A data message of (sub)transaction `sub`: tag, xid, a payload naming it.
    fn msg(sub: u32, n: u32) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend_from_slice(&sub.to_be_bytes());
        m.extend_from_slice(format!("row {n}").as_bytes());
        m
    }

    fn drain(mut r: Replay) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((lsn, m)) = r.next_message().unwrap() {
            out.push((lsn, m.to_vec()));
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push { top: u32, sub: u32 },
        Abort { top: u32, sub: u32 },
        Commit { top: u32 },
    }

    fn step() -> impl Strategy<Value = Step> {
        // Two top-level transactions (1, 2), each with subtransactions
        // top*10 .. top*10+3.
        let top = 1u32..=2;
        prop_oneof![
            6 => (top.clone(), 0u32..4).prop_map(|(top, s)| Step::Push { top, sub: if s == 0 { top } else { top * 10 + s } }),
            1 => (top.clone(), 0u32..4).prop_map(|(top, s)| Step::Abort { top, sub: if s == 0 { top } else { top * 10 + s } }),
            1 => top.prop_map(|top| Step::Commit { top }),
        ]
    }

    proptest! {
        /// Against a model (a list per transaction, cut at a subtransaction's
        /// first message on its abort), for budgets that keep everything in
        /// memory, spill now and then, or spill every message.
        #[test]
        fn commits_return_what_a_model_keeps(steps in prop::collection::vec(step(), 0..200), budget in prop_oneof![Just(0usize), Just(64), Just(1 << 20)]) {
            let dir = std::env::temp_dir();
            let mut held = InProgress::new(budget, dir);
            let mut model: HashMap<u32, Vec<(u32, u64, Vec<u8>)>> = HashMap::new();
            let mut lsn = 0u64;
            for s in steps {
                match s {
                    Step::Push { top, sub } => {
                        lsn += 1;
                        let m = msg(sub, lsn as u32);
                        held.push(top, lsn, &m).unwrap();
                        model.entry(top).or_default().push((sub, lsn, m));
                    }
                    Step::Abort { top, sub } => {
                        held.abort(top, sub).unwrap();
                        if sub == top {
                            model.remove(&top);
                        } else if let Some(list) = model.get_mut(&top) {
                            if let Some(at) = list.iter().position(|(s, _, _)| *s == sub) {
                                list.truncate(at);
                            }
                        }
                    }
                    Step::Commit { top } => {
                        let want: Vec<_> = model.remove(&top).unwrap_or_default().into_iter().map(|(_, l, m)| (l, m)).collect();
                        prop_assert_eq!(drain(held.commit(top).unwrap()), want);
                    }
                }
                prop_assert!(held.in_memory() <= budget.max(HEADER + 9));
            }
        }
    }

    #[test]
    fn a_spilled_transaction_reads_back_from_its_file_then_memory() {
        let mut held = InProgress::new(1000, std::env::temp_dir());
        for n in 0..500 {
            held.push(7, n, &msg(7, n as u32)).unwrap();
        }
        assert!(held.in_memory() <= 1000);
        let got = drain(held.commit(7).unwrap());
        assert_eq!(got.len(), 500);
        assert_eq!(got[499], (499, msg(7, 499)));
        assert_eq!(held.open(), 0);
        assert_eq!(held.in_memory(), 0);
    }

    #[test]
    fn an_unwritable_spill_directory_names_the_transaction_and_directory() {
        let mut held = InProgress::new(0, PathBuf::from("/nonexistent/pgfanout"));
        let e = held.push(42, 1, &msg(42, 1)).unwrap_err();
        assert_eq!(e.xid, 42);
        assert!(e.to_string().contains("/nonexistent/pgfanout"), "{e}");
    }
}
