//! Decoder for PostgreSQL's `pgoutput` logical replication messages,
//! protocol versions 1–4.
//!
//! Pure wire-format code: bytes in, typed [`Message`]s out, no I/O. The only
//! state is whether we are inside a streamed block (`Stream Start` ..
//! `Stream Stop`), because inside one the data messages carry an extra
//! leading xid. The decoder never panics; malformed input is a
//! [`DecodeError`] naming the message, the byte offset and the LSN.
//!
//! Column values are left as raw [`Cell`]s (text or binary, as the server sent
//! them); `values::Value` turns them into typed values once the column's type
//! is known from the matching [`Relation`].

use bytes::Bytes;
use std::fmt;

/// `Truncate` option bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// `Truncate` option bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Converts a protocol timestamp (µs since 2000-01-01) to µs since the Unix
/// epoch, saturating instead of overflowing.
pub fn pg_ts_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(super::PG_EPOCH_OFFSET_US)
}

/// A decoded pgoutput message. Timestamps are µs since 2000-01-01 (see
/// [`pg_ts_to_unix_micros`]); LSNs are plain `u64`.
///
/// `xid: Option<u32>` on data messages is `Some` only for messages received
/// inside a streamed block (protocol 2+), where they may belong to a
/// transaction that is later aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`
    Begin { final_lsn: u64, commit_ts: i64, xid: u32 },
    /// `C`
    Commit { flags: u8, commit_lsn: u64, end_lsn: u64, commit_ts: i64 },
    /// `O`
    Origin { commit_lsn: u64, name: String },
    /// `R`: sent before the first change of a table in a session, and again
    /// whenever its schema changes; callers cache it by `rel_id`.
    Relation(Relation),
    /// `Y`
    Type { xid: Option<u32>, oid: u32, namespace: String, name: String },
    /// `I`
    Insert { xid: Option<u32>, rel_id: u32, new: Tuple },
    /// `U`: `old` is present only when the replica identity columns changed
    /// (`Key`) or the table is `REPLICA IDENTITY FULL` (`Full`).
    Update { xid: Option<u32>, rel_id: u32, old: Option<OldTuple>, new: Tuple },
    /// `D`
    Delete { xid: Option<u32>, rel_id: u32, old: OldTuple },
    /// `T`: `options` holds [`TRUNCATE_CASCADE`] / [`TRUNCATE_RESTART_IDENTITY`].
    Truncate { xid: Option<u32>, options: u8, rel_ids: Vec<u32> },
    /// `M`: from `pg_logical_emit_message`.
    LogicalMessage { xid: Option<u32>, transactional: bool, lsn: u64, prefix: String, content: Bytes },
    /// `S` (protocol 2+)
    StreamStart { xid: u32, first_segment: bool },
    /// `E` (protocol 2+)
    StreamStop,
    /// `c` (protocol 2+)
    StreamCommit { xid: u32, flags: u8, commit_lsn: u64, end_lsn: u64, commit_ts: i64 },
    /// `A` (protocol 2+). `abort_lsn`/`abort_ts` exist only with protocol 4
    /// and `streaming = parallel`; they are `None` otherwise.
    StreamAbort { xid: u32, sub_xid: u32, abort_lsn: Option<u64>, abort_ts: Option<i64> },
    /// `b` (protocol 3+, two-phase)
    BeginPrepare { prepare_lsn: u64, end_lsn: u64, prepare_ts: i64, xid: u32, gid: String },
    /// `P` (protocol 3+, two-phase)
    Prepare { flags: u8, prepare_lsn: u64, end_lsn: u64, prepare_ts: i64, xid: u32, gid: String },
    /// `K` (protocol 3+, two-phase)
    CommitPrepared { flags: u8, commit_lsn: u64, end_lsn: u64, commit_ts: i64, xid: u32, gid: String },
    /// `r` (protocol 3+, two-phase)
    RollbackPrepared {
        flags: u8,
        prepare_end_lsn: u64,
        rollback_end_lsn: u64,
        prepare_ts: i64,
        rollback_ts: i64,
        xid: u32,
        gid: String,
    },
    /// `p` (protocol 3+, two-phase with streaming)
    StreamPrepare { flags: u8, prepare_lsn: u64, end_lsn: u64, prepare_ts: i64, xid: u32, gid: String },
}

/// A table's shape as announced by a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set only when the message arrived inside a streamed block; not part
    /// of the relation's identity (the schema applies regardless).
    pub xid: Option<u32>,
    pub rel_id: u32,
    pub namespace: String,
    pub name: String,
    /// `b'd'` default (primary key), `b'n'` nothing, `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (flags bit 1).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Cell>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// `n`
    Null,
    /// `u`: a TOASTed value the UPDATE did not touch; the server does not
    /// resend it, so the consumer must keep the previous value.
    UnchangedToast,
    /// `t`: the type's text output format.
    Text(Bytes),
    /// `b`: the type's binary send format (only with `binary = true`).
    Binary(Bytes),
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns are set; others are Null.
    Key(Tuple),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// A tuple whose column count does not match its relation's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("relation {rel_id} has {expected} columns but the tuple has {actual}; the relation cache is stale or the stream is corrupt")]
pub struct ColumnCountMismatch {
    pub rel_id: u32,
    pub expected: usize,
    pub actual: usize,
}

impl Relation {
    /// Checks that `tuple` has one cell per column of this relation.
    pub fn check_tuple(&self, tuple: &Tuple) -> Result<(), ColumnCountMismatch> {
        if tuple.0.len() == self.columns.len() {
            Ok(())
        } else {
            Err(ColumnCountMismatch { rel_id: self.rel_id, expected: self.columns.len(), actual: tuple.0.len() })
        }
    }
}

/// Human name of a pgoutput message tag, or `None` for unknown tags.
pub fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

impl Message {
    /// The wire tag letter of this message.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin { .. } => b'B',
            Message::Commit { .. } => b'C',
            Message::Origin { .. } => b'O',
            Message::Relation(_) => b'R',
            Message::Type { .. } => b'Y',
            Message::Insert { .. } => b'I',
            Message::Update { .. } => b'U',
            Message::Delete { .. } => b'D',
            Message::Truncate { .. } => b'T',
            Message::LogicalMessage { .. } => b'M',
            Message::StreamStart { .. } => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit { .. } => b'c',
            Message::StreamAbort { .. } => b'A',
            Message::BeginPrepare { .. } => b'b',
            Message::Prepare { .. } => b'P',
            Message::CommitPrepared { .. } => b'K',
            Message::RollbackPrepared { .. } => b'r',
            Message::StreamPrepare { .. } => b'p',
        }
    }

    /// Human name of this message kind ("Insert", "Stream Commit", ...).
    pub fn kind_name(&self) -> &'static str {
        tag_name(self.tag()).unwrap_or("Unknown")
    }

    /// The streamed-transaction xid of a data message received inside a
    /// streamed block (`None` outside streaming and for control messages).
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Relation(r) => r.xid,
            Message::Type { xid, .. }
            | Message::Insert { xid, .. }
            | Message::Update { xid, .. }
            | Message::Delete { xid, .. }
            | Message::Truncate { xid, .. }
            | Message::LogicalMessage { xid, .. } => *xid,
            _ => None,
        }
    }

    /// Writes this message in pgoutput wire format. A data message's xid is
    /// written iff it is `Some` (i.e. as inside a streamed block); Stream
    /// Abort's lsn/ts iff both are `Some`. Inverse of [`Decoder::decode`];
    /// meant for tests and tools that need realistic input.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        fn x(out: &mut Vec<u8>, xid: &Option<u32>) {
            if let Some(x) = xid {
                out.extend_from_slice(&x.to_be_bytes());
            }
        }
        out.push(self.tag());
        match self {
            Message::Begin { final_lsn, commit_ts, xid } => {
                out.extend_from_slice(&final_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            Message::Commit { flags, commit_lsn, end_lsn, commit_ts } => {
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
            }
            Message::Origin { commit_lsn, name } => {
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                s(out, name);
            }
            Message::Relation(r) => {
                x(out, &r.xid);
                out.extend_from_slice(&r.rel_id.to_be_bytes());
                s(out, &r.namespace);
                s(out, &r.name);
                out.push(r.replica_identity);
                out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    out.push(u8::from(c.key));
                    s(out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type { xid, oid, namespace, name } => {
                x(out, xid);
                out.extend_from_slice(&oid.to_be_bytes());
                s(out, namespace);
                s(out, name);
            }
            Message::Insert { xid, rel_id, new } => {
                x(out, xid);
                out.extend_from_slice(&rel_id.to_be_bytes());
                out.push(b'N');
                encode_tuple(out, new);
            }
            Message::Update { xid, rel_id, old, new } => {
                x(out, xid);
                out.extend_from_slice(&rel_id.to_be_bytes());
                if let Some(old) = old {
                    encode_old(out, old);
                }
                out.push(b'N');
                encode_tuple(out, new);
            }
            Message::Delete { xid, rel_id, old } => {
                x(out, xid);
                out.extend_from_slice(&rel_id.to_be_bytes());
                encode_old(out, old);
            }
            Message::Truncate { xid, options, rel_ids } => {
                x(out, xid);
                out.extend_from_slice(&(rel_ids.len() as u32).to_be_bytes());
                out.push(*options);
                for r in rel_ids {
                    out.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::LogicalMessage { xid, transactional, lsn, prefix, content } => {
                x(out, xid);
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.to_be_bytes());
                s(out, prefix);
                out.extend_from_slice(&(content.len() as u32).to_be_bytes());
                out.extend_from_slice(content);
            }
            Message::StreamStart { xid, first_segment } => {
                out.extend_from_slice(&xid.to_be_bytes());
                out.push(u8::from(*first_segment));
            }
            Message::StreamStop => {}
            Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_ts } => {
                out.extend_from_slice(&xid.to_be_bytes());
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
            }
            Message::StreamAbort { xid, sub_xid, abort_lsn, abort_ts } => {
                out.extend_from_slice(&xid.to_be_bytes());
                out.extend_from_slice(&sub_xid.to_be_bytes());
                if let (Some(l), Some(t)) = (abort_lsn, abort_ts) {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&t.to_be_bytes());
                }
            }
            Message::BeginPrepare { prepare_lsn, end_lsn, prepare_ts, xid, gid } => {
                out.extend_from_slice(&prepare_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&prepare_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
                s(out, gid);
            }
            Message::Prepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid }
            | Message::StreamPrepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid } => {
                out.push(*flags);
                out.extend_from_slice(&prepare_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&prepare_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
                s(out, gid);
            }
            Message::CommitPrepared { flags, commit_lsn, end_lsn, commit_ts, xid, gid } => {
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
                s(out, gid);
            }
            Message::RollbackPrepared {
                flags,
                prepare_end_lsn,
                rollback_end_lsn,
                prepare_ts,
                rollback_ts,
                xid,
                gid,
            } => {
                out.push(*flags);
                out.extend_from_slice(&prepare_end_lsn.to_be_bytes());
                out.extend_from_slice(&rollback_end_lsn.to_be_bytes());
                out.extend_from_slice(&prepare_ts.to_be_bytes());
                out.extend_from_slice(&rollback_ts.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
                s(out, gid);
            }
        }
    }
}

fn encode_old(out: &mut Vec<u8>, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            out.push(b'K');
            encode_tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.push(b'O');
            encode_tuple(out, t);
        }
    }
}

fn encode_tuple(out: &mut Vec<u8>, t: &Tuple) {
    out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
    for c in &t.0 {
        match c {
            Cell::Null => out.push(b'n'),
            Cell::UnchangedToast => out.push(b'u'),
            Cell::Text(b) | Cell::Binary(b) => {
                out.push(if matches!(c, Cell::Text(_)) { b't' } else { b'b' });
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// What was wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag 0x{0:02x}")]
    UnknownTag(u8),
    #[error("truncated: {field} needs {needed} bytes, {available} left")]
    Truncated { field: &'static str, needed: usize, available: usize },
    #[error("unterminated string in {field}")]
    UnterminatedString { field: &'static str },
    #[error("invalid UTF-8 in {field}")]
    InvalidUtf8 { field: &'static str },
    #[error("negative {field}: {value}")]
    NegativeLength { field: &'static str, value: i64 },
    #[error("unknown tuple cell kind 0x{0:02x} (expected n, u, t or b)")]
    UnknownTupleKind(u8),
    #[error("unexpected tuple marker 0x{found:02x} (expected {expected})")]
    UnexpectedTupleMarker { found: u8, expected: &'static str },
    #[error("{0} unexpected trailing bytes (protocol version mismatch?)")]
    TrailingBytes(usize),
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The message's tag byte (`None` for an empty message).
    pub tag: Option<u8>,
    /// Byte offset within the message where decoding failed.
    pub offset: usize,
    /// The LSN the caller passed with the message.
    pub lsn: u64,
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    /// Human name of the message kind, e.g. "Insert", or "Unknown".
    pub fn message_kind(&self) -> &'static str {
        match self.tag {
            None => "Empty",
            Some(t) => tag_name(t).unwrap_or("Unknown"),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.tag {
            Some(t) if t.is_ascii_graphic() => format!("'{}'", t as char),
            Some(t) => format!("0x{t:02x}"),
            None => "-".to_string(),
        };
        write!(
            f,
            "cannot decode pgoutput {} message ({tag}) at LSN {:X}/{:X}, byte {}: {}",
            self.message_kind(),
            self.lsn >> 32,
            self.lsn & 0xffff_ffff,
            self.offset,
            self.kind
        )
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Stateful pgoutput decoder for one replication session.
#[derive(Debug, Clone)]
pub struct Decoder {
    proto_version: u32,
    in_stream: bool,
}

type Fail = (usize, DecodeErrorKind);

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Fail> {
        let buf: &'a [u8] = self.buf.as_ref();
        let end = self.pos.checked_add(n);
        match end.and_then(|e| buf.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err((self.pos, DecodeErrorKind::Truncated { field, needed: n, available: self.remaining() })),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Fail> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Fail> {
        Ok(self.array::<1>(field)?[0])
    }
    fn i16(&mut self, field: &'static str) -> Result<i16, Fail> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, Fail> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    fn i32(&mut self, field: &'static str) -> Result<i32, Fail> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, Fail> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    fn i64(&mut self, field: &'static str) -> Result<i64, Fail> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    /// A count field (Int16/Int32) that must not be negative.
    fn count16(&mut self, field: &'static str) -> Result<usize, Fail> {
        let at = self.pos;
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| (at, DecodeErrorKind::NegativeLength { field, value: n.into() }))
    }
    fn count32(&mut self, field: &'static str) -> Result<usize, Fail> {
        let at = self.pos;
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| (at, DecodeErrorKind::NegativeLength { field, value: n.into() }))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, field: &'static str) -> Result<String, Fail> {
        let at = self.pos;
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        let nul = rest.iter().position(|&b| b == 0).ok_or((at, DecodeErrorKind::UnterminatedString { field }))?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| (at, DecodeErrorKind::InvalidUtf8 { field }))?.to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// `n` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, Fail> {
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.buf.slice(start..start + n))
    }

    fn tuple(&mut self) -> Result<Tuple, Fail> {
        let n = self.count16("tuple column count")?;
        // Every cell takes at least one byte: never allocate beyond the input.
        let mut cells = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let at = self.pos;
            let cell = match self.u8("tuple cell kind")? {
                b'n' => Cell::Null,
                b'u' => Cell::UnchangedToast,
                b't' => {
                    let len = self.count32("text cell length")?;
                    Cell::Text(self.bytes(len, "text cell value")?)
                }
                b'b' => {
                    let len = self.count32("binary cell length")?;
                    Cell::Binary(self.bytes(len, "binary cell value")?)
                }
                k => return Err((at, DecodeErrorKind::UnknownTupleKind(k))),
            };
            cells.push(cell);
        }
        Ok(Tuple(cells))
    }

    fn expect_new(&mut self) -> Result<Tuple, Fail> {
        let at = self.pos;
        match self.u8("tuple marker")? {
            b'N' => self.tuple(),
            found => Err((at, DecodeErrorKind::UnexpectedTupleMarker { found, expected: "'N'" })),
        }
    }
}

impl Decoder {
    /// A decoder for the `proto_version` negotiated with the server (1–4).
    pub fn new(proto_version: u32) -> Self {
        Decoder { proto_version, in_stream: false }
    }

    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    /// Whether we are between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message, copying column values out of `data`.
    pub fn decode(&mut self, data: &[u8], lsn: u64) -> Result<Message, DecodeError> {
        self.decode_bytes(&Bytes::copy_from_slice(data), lsn)
    }

    /// Decodes one message; column values and logical message content are
    /// zero-copy slices of `data`.
    ///
    /// The stream state changes only on a successfully decoded Stream Start /
    /// Stream Stop, so a rejected message leaves the decoder as it was.
    pub fn decode_bytes(&mut self, data: &Bytes, lsn: u64) -> Result<Message, DecodeError> {
        let Some(&tag) = data.first() else {
            return Err(DecodeError { tag: None, offset: 0, lsn, kind: DecodeErrorKind::Empty });
        };
        let mut r = Reader { buf: data, pos: 1 };
        let result = self.decode_body(tag, &mut r).and_then(|m| {
            if r.remaining() == 0 {
                Ok(m)
            } else {
                Err((r.pos, DecodeErrorKind::TrailingBytes(r.remaining())))
            }
        });
        match result {
            Ok(m) => {
                match m {
                    Message::StreamStart { .. } => self.in_stream = true,
                    Message::StreamStop => self.in_stream = false,
                    _ => {}
                }
                Ok(m)
            }
            Err((offset, kind)) => Err(DecodeError { tag: Some(tag), offset, lsn, kind }),
        }
    }

    /// Decodes one data message as it reads inside a streamed block (with
    /// its xid), whatever this decoder's state: for a streamed transaction's
    /// messages held until its commit and read back then.
    pub fn decode_streamed(&self, data: &Bytes, lsn: u64) -> Result<Message, DecodeError> {
        Decoder { proto_version: self.proto_version, in_stream: true }.decode_bytes(data, lsn)
    }

    fn decode_body(&self, tag: u8, r: &mut Reader<'_>) -> Result<Message, Fail> {
        // Inside a streamed block, data messages lead with the xid of the
        // (sub)transaction they belong to.
        let in_stream = self.in_stream;
        let stream_xid = |r: &mut Reader<'_>| -> Result<Option<u32>, Fail> {
            if in_stream {
                r.u32("streamed xid").map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(match tag {
            b'B' => Message::Begin {
                final_lsn: r.u64("final LSN")?,
                commit_ts: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            },
            b'C' => Message::Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_ts: r.i64("commit timestamp")?,
            },
            b'O' => Message::Origin { commit_lsn: r.u64("commit LSN")?, name: r.cstr("origin name")? },
            b'R' => {
                let xid = stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let namespace = r.cstr("namespace")?;
                let name = r.cstr("relation name")?;
                let replica_identity = r.u8("replica identity")?;
                let n = r.count16("column count")?;
                // A column is at least 10 bytes (flags, NUL, oid, typmod).
                let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
                for _ in 0..n {
                    let flags = r.u8("column flags")?;
                    columns.push(Column {
                        key: flags & 1 != 0,
                        name: r.cstr("column name")?,
                        type_oid: r.u32("column type oid")?,
                        type_modifier: r.i32("column type modifier")?,
                    });
                }
                Message::Relation(Relation { xid, rel_id, namespace, name, replica_identity, columns })
            }
            b'Y' => Message::Type {
                xid: stream_xid(r)?,
                oid: r.u32("type oid")?,
                namespace: r.cstr("namespace")?,
                name: r.cstr("type name")?,
            },
            b'I' => {
                let xid = stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                Message::Insert { xid, rel_id, new: r.expect_new()? }
            }
            b'U' => {
                let xid = stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let at = r.pos;
                let old = match r.u8("tuple marker")? {
                    b'K' => Some(OldTuple::Key(r.tuple()?)),
                    b'O' => Some(OldTuple::Full(r.tuple()?)),
                    b'N' => None,
                    found => {
                        return Err((at, DecodeErrorKind::UnexpectedTupleMarker { found, expected: "'K', 'O' or 'N'" }))
                    }
                };
                let new = if old.is_some() { r.expect_new()? } else { r.tuple()? };
                Message::Update { xid, rel_id, old, new }
            }
            b'D' => {
                let xid = stream_xid(r)?;
                let rel_id = r.u32("relation id")?;
                let at = r.pos;
                let old = match r.u8("tuple marker")? {
                    b'K' => OldTuple::Key(r.tuple()?),
                    b'O' => OldTuple::Full(r.tuple()?),
                    found => {
                        return Err((at, DecodeErrorKind::UnexpectedTupleMarker { found, expected: "'K' or 'O'" }))
                    }
                };
                Message::Delete { xid, rel_id, old }
            }
            b'T' => {
                let xid = stream_xid(r)?;
                let n = r.count32("relation count")?;
                let options = r.u8("options")?;
                let mut rel_ids = Vec::with_capacity(n.min(r.remaining() / 4));
                for _ in 0..n {
                    rel_ids.push(r.u32("relation id")?);
                }
                Message::Truncate { xid, options, rel_ids }
            }
            b'M' => {
                let xid = stream_xid(r)?;
                let flags = r.u8("flags")?;
                let lsn = r.u64("message LSN")?;
                let prefix = r.cstr("prefix")?;
                let len = r.count32("content length")?;
                let content = r.bytes(len, "content")?;
                Message::LogicalMessage { xid, transactional: flags & 1 != 0, lsn, prefix, content }
            }
            b'S' => Message::StreamStart { xid: r.u32("xid")?, first_segment: r.u8("first segment")? == 1 },
            b'E' => Message::StreamStop,
            b'c' => Message::StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_ts: r.i64("commit timestamp")?,
            },
            b'A' => {
                let xid = r.u32("xid")?;
                let sub_xid = r.u32("subtransaction xid")?;
                // Protocol 4 adds the abort LSN and timestamp, but only when
                // the subscriber asked for `streaming = parallel`, which the
                // decoder cannot see: take them when they are there.
                let (abort_lsn, abort_ts) = if self.proto_version >= 4 && r.remaining() > 0 {
                    (Some(r.u64("abort LSN")?), Some(r.i64("abort timestamp")?))
                } else {
                    (None, None)
                };
                Message::StreamAbort { xid, sub_xid, abort_lsn, abort_ts }
            }
            b'b' => Message::BeginPrepare {
                prepare_lsn: r.u64("prepare LSN")?,
                end_lsn: r.u64("end LSN")?,
                prepare_ts: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
            b'P' | b'p' => {
                let flags = r.u8("flags")?;
                let prepare_lsn = r.u64("prepare LSN")?;
                let end_lsn = r.u64("end LSN")?;
                let prepare_ts = r.i64("prepare timestamp")?;
                let xid = r.u32("xid")?;
                let gid = r.cstr("gid")?;
                if tag == b'P' {
                    Message::Prepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid }
                } else {
                    Message::StreamPrepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid }
                }
            }
            b'K' => Message::CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_ts: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
            b'r' => Message::RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: r.u64("prepare end LSN")?,
                rollback_end_lsn: r.u64("rollback end LSN")?,
                prepare_ts: r.i64("prepare timestamp")?,
                rollback_ts: r.i64("rollback timestamp")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            },
            other => return Err((0, DecodeErrorKind::UnknownTag(other))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hand-builds message bytes field by field, the way the server writes them.
    #[derive(Default)]
    struct B(Vec<u8>);
    impl B {
        fn tag(t: u8) -> Self {
            B(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let b = self.u8(b't').i32(v.len() as i32);
            B([b.0, v.as_bytes().to_vec()].concat())
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
    }

    fn dec(proto: u32, b: &B) -> Result<Message, DecodeError> {
        Decoder::new(proto).decode(&b.0, 0x16_0000_0028)
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn streaming(xid: u32) -> Decoder {
        let mut d = Decoder::new(2);
        let m = d.decode(&B::tag(b'S').u32(xid).u8(1).0, 0).unwrap();
        assert_eq!(m, Message::StreamStart { xid, first_segment: true });
        assert!(d.in_stream());
        d
    }

    #[test]
    fn begin_commit_origin() {
        assert_eq!(
            dec(1, &B::tag(b'B').u64(0x1_0000_0010).i64(123_456).u32(735)).unwrap(),
            Message::Begin { final_lsn: 0x1_0000_0010, commit_ts: 123_456, xid: 735 }
        );
        assert_eq!(
            dec(1, &B::tag(b'C').u8(0).u64(10).u64(20).i64(-5)).unwrap(),
            Message::Commit { flags: 0, commit_lsn: 10, end_lsn: 20, commit_ts: -5 }
        );
        assert_eq!(
            dec(1, &B::tag(b'O').u64(7).s("origin_a")).unwrap(),
            Message::Origin { commit_lsn: 7, name: "origin_a".into() }
        );
    }

    #[test]
    fn relation_and_type() {
        let b = B::tag(b'R')
            .u32(16385)
            .s("public")
            .s("engagement_events")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .s("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .s("device")
            .u32(1043)
            .i32(68);
        let Message::Relation(r) = dec(1, &b).unwrap() else { panic!() };
        assert_eq!(r.rel_id, 16385);
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("public", "engagement_events"));
        assert_eq!(r.replica_identity, b'd');
        assert_eq!(
            r.columns,
            vec![
                Column { key: true, name: "id".into(), type_oid: 20, type_modifier: -1 },
                Column { key: false, name: "device".into(), type_oid: 1043, type_modifier: 68 },
            ]
        );
        assert_eq!(r.xid, None);
        assert!(r.check_tuple(&Tuple(vec![Cell::Null, Cell::Null])).is_ok());
        let e = r.check_tuple(&Tuple(vec![Cell::Null])).unwrap_err();
        assert_eq!((e.expected, e.actual), (2, 1));

        assert_eq!(
            dec(1, &B::tag(b'Y').u32(16400).s("public").s("mood")).unwrap(),
            Message::Type { xid: None, oid: 16400, namespace: "public".into(), name: "mood".into() }
        );
    }

    #[test]
    fn insert_all_cell_kinds() {
        let b = B::tag(b'I').u32(5).u8(b'N').i16(4).u8(b'n').u8(b'u').text("héllo").u8(b'b').i32(2).raw(&[0xde, 0xad]);
        assert_eq!(
            dec(1, &b).unwrap(),
            Message::Insert {
                xid: None,
                rel_id: 5,
                new: Tuple(vec![
                    Cell::Null,
                    Cell::UnchangedToast,
                    text("héllo"),
                    Cell::Binary(Bytes::from_static(&[0xde, 0xad]))
                ])
            }
        );
    }

    #[test]
    fn update_variants() {
        let plain = B::tag(b'U').u32(5).u8(b'N').i16(1).text("1");
        assert_eq!(
            dec(1, &plain).unwrap(),
            Message::Update { xid: None, rel_id: 5, old: None, new: Tuple(vec![text("1")]) }
        );
        let key = B::tag(b'U').u32(5).u8(b'K').i16(1).text("0").u8(b'N').i16(1).text("1");
        assert_eq!(
            dec(1, &key).unwrap(),
            Message::Update {
                xid: None,
                rel_id: 5,
                old: Some(OldTuple::Key(Tuple(vec![text("0")]))),
                new: Tuple(vec![text("1")])
            }
        );
        let full = B::tag(b'U').u32(5).u8(b'O').i16(1).u8(b'n').u8(b'N').i16(1).u8(b'u');
        assert_eq!(
            dec(1, &full).unwrap(),
            Message::Update {
                xid: None,
                rel_id: 5,
                old: Some(OldTuple::Full(Tuple(vec![Cell::Null]))),
                new: Tuple(vec![Cell::UnchangedToast])
            }
        );
        // An old tuple must be followed by 'N'.
        let bad = B::tag(b'U').u32(5).u8(b'K').i16(0).u8(b'X').i16(0);
        let e = dec(1, &bad).unwrap_err();
        assert_eq!(e.offset, 8);
        assert!(matches!(e.kind, DecodeErrorKind::UnexpectedTupleMarker { found: b'X', .. }));
    }

    #[test]
    fn delete_key_and_full() {
        assert_eq!(
            dec(1, &B::tag(b'D').u32(9).u8(b'K').i16(1).text("42")).unwrap(),
            Message::Delete { xid: None, rel_id: 9, old: OldTuple::Key(Tuple(vec![text("42")])) }
        );
        assert_eq!(
            dec(1, &B::tag(b'D').u32(9).u8(b'O').i16(0)).unwrap(),
            Message::Delete { xid: None, rel_id: 9, old: OldTuple::Full(Tuple(vec![])) }
        );
        let e = dec(1, &B::tag(b'D').u32(9).u8(b'N').i16(0)).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::UnexpectedTupleMarker { found: b'N', .. }));
    }

    #[test]
    fn truncate_and_logical_message() {
        assert_eq!(
            dec(1, &B::tag(b'T').u32(2).u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY).u32(1).u32(2)).unwrap(),
            Message::Truncate { xid: None, options: 3, rel_ids: vec![1, 2] }
        );
        assert_eq!(
            dec(1, &B::tag(b'M').u8(1).u64(99).s("pgfanout").i32(3).raw(b"abc")).unwrap(),
            Message::LogicalMessage {
                xid: None,
                transactional: true,
                lsn: 99,
                prefix: "pgfanout".into(),
                content: Bytes::from_static(b"abc")
            }
        );
    }

    #[test]
    fn streamed_block_carries_xid() {
        let mut d = streaming(700);
        let ins = B::tag(b'I').u32(700).u32(5).u8(b'N').i16(1).text("x");
        assert_eq!(
            d.decode(&ins.0, 0).unwrap(),
            Message::Insert { xid: Some(700), rel_id: 5, new: Tuple(vec![text("x")]) }
        );
        let rel = B::tag(b'R').u32(701).u32(5).s("public").s("t").u8(b'f').i16(0);
        let Message::Relation(r) = d.decode(&rel.0, 0).unwrap() else { panic!() };
        assert_eq!((r.xid, r.rel_id, r.replica_identity), (Some(701), 5, b'f'));
        let m = d.decode(&B::tag(b'Y').u32(700).u32(1).s("n").s("t").0, 0).unwrap();
        assert_eq!(m.stream_xid(), Some(700));
        let m = d.decode(&B::tag(b'U').u32(700).u32(5).u8(b'N').i16(0).0, 0).unwrap();
        assert_eq!(m.stream_xid(), Some(700));
        let m = d.decode(&B::tag(b'D').u32(700).u32(5).u8(b'K').i16(0).0, 0).unwrap();
        assert_eq!(m.stream_xid(), Some(700));
        let m = d.decode(&B::tag(b'T').u32(700).u32(1).u8(0).u32(5).0, 0).unwrap();
        assert_eq!(m, Message::Truncate { xid: Some(700), options: 0, rel_ids: vec![5] });
        let m = d.decode(&B::tag(b'M').u32(700).u8(1).u64(1).s("p").i32(0).0, 0).unwrap();
        assert_eq!(m.stream_xid(), Some(700));

        assert_eq!(d.decode(b"E", 0).unwrap(), Message::StreamStop);
        assert!(!d.in_stream());
        // Outside the block the same insert bytes are misread: the xid is gone.
        assert_eq!(
            d.decode(&B::tag(b'I').u32(5).u8(b'N').i16(0).0, 0).unwrap(),
            Message::Insert { xid: None, rel_id: 5, new: Tuple(vec![]) }
        );
        assert_eq!(
            d.decode(&B::tag(b'c').u32(700).u8(0).u64(1).u64(2).i64(3).0, 0).unwrap(),
            Message::StreamCommit { xid: 700, flags: 0, commit_lsn: 1, end_lsn: 2, commit_ts: 3 }
        );
    }

    #[test]
    fn stream_start_later_segment() {
        assert_eq!(dec(2, &B::tag(b'S').u32(9).u8(0)).unwrap(), Message::StreamStart { xid: 9, first_segment: false });
    }

    #[test]
    fn stream_abort_v2_and_v4() {
        let short = B::tag(b'A').u32(700).u32(701);
        let want_short = Message::StreamAbort { xid: 700, sub_xid: 701, abort_lsn: None, abort_ts: None };
        assert_eq!(dec(2, &short).unwrap(), want_short);
        // Protocol 4 without `streaming = parallel`: no abort info is sent.
        assert_eq!(dec(4, &short).unwrap(), want_short);
        let long = B::tag(b'A').u32(700).u32(700).u64(0x30_0000_0000).i64(777);
        assert_eq!(
            dec(4, &long).unwrap(),
            Message::StreamAbort { xid: 700, sub_xid: 700, abort_lsn: Some(0x30_0000_0000), abort_ts: Some(777) }
        );
        // Before protocol 4 those bytes cannot be there.
        assert!(matches!(dec(3, &long).unwrap_err().kind, DecodeErrorKind::TrailingBytes(16)));
        // Half an abort-info block is a truncation.
        let half = B::tag(b'A').u32(1).u32(1).u64(5);
        assert!(matches!(dec(4, &half).unwrap_err().kind, DecodeErrorKind::Truncated { .. }));
    }

    #[test]
    fn two_phase_messages() {
        assert_eq!(
            dec(3, &B::tag(b'b').u64(1).u64(2).i64(3).u32(4).s("gid-1")).unwrap(),
            Message::BeginPrepare { prepare_lsn: 1, end_lsn: 2, prepare_ts: 3, xid: 4, gid: "gid-1".into() }
        );
        assert_eq!(
            dec(3, &B::tag(b'P').u8(0).u64(1).u64(2).i64(3).u32(4).s("g")).unwrap(),
            Message::Prepare { flags: 0, prepare_lsn: 1, end_lsn: 2, prepare_ts: 3, xid: 4, gid: "g".into() }
        );
        assert_eq!(
            dec(3, &B::tag(b'K').u8(0).u64(1).u64(2).i64(3).u32(4).s("g")).unwrap(),
            Message::CommitPrepared { flags: 0, commit_lsn: 1, end_lsn: 2, commit_ts: 3, xid: 4, gid: "g".into() }
        );
        assert_eq!(
            dec(3, &B::tag(b'r').u8(0).u64(1).u64(2).i64(3).i64(4).u32(5).s("g")).unwrap(),
            Message::RollbackPrepared {
                flags: 0,
                prepare_end_lsn: 1,
                rollback_end_lsn: 2,
                prepare_ts: 3,
                rollback_ts: 4,
                xid: 5,
                gid: "g".into()
            }
        );
        assert_eq!(
            dec(3, &B::tag(b'p').u8(0).u64(1).u64(2).i64(3).u32(4).s("g")).unwrap(),
            Message::StreamPrepare { flags: 0, prepare_lsn: 1, end_lsn: 2, prepare_ts: 3, xid: 4, gid: "g".into() }
        );
    }

    #[test]
    fn errors_name_kind_offset_and_lsn() {
        let e = Decoder::new(1).decode(b"", 5).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Empty);

        let e = Decoder::new(1).decode(b"Z123", 0x1_0000_00AB).unwrap_err();
        assert_eq!((e.tag, e.offset, e.kind.clone()), (Some(b'Z'), 0, DecodeErrorKind::UnknownTag(b'Z')));
        assert_eq!(e.message_kind(), "Unknown");
        assert!(e.to_string().contains("1/AB"), "{e}");

        let e = dec(1, &B::tag(b'B').u64(1).i64(2)).unwrap_err();
        assert_eq!(e.message_kind(), "Begin");
        assert_eq!(e.offset, 17);
        assert_eq!(e.kind, DecodeErrorKind::Truncated { field: "xid", needed: 4, available: 0 });
        assert!(e.to_string().contains("Begin message ('B')"), "{e}");

        let e = dec(1, &B::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x')).unwrap_err();
        assert_eq!((e.offset, e.kind), (8, DecodeErrorKind::UnknownTupleKind(b'x')));

        let e = dec(1, &B::tag(b'O').u64(1).raw(&[0xff, 0xfe, 0])).unwrap_err();
        assert_eq!((e.offset, e.kind), (9, DecodeErrorKind::InvalidUtf8 { field: "origin name" }));

        let e = dec(1, &B::tag(b'O').u64(1).raw(b"abc")).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::UnterminatedString { field: "origin name" });

        let e = dec(1, &B::tag(b'I').u32(1).u8(b'N').i16(-1)).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::NegativeLength { value: -1, .. }));

        let e = dec(1, &B::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX)).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::Truncated { field: "text cell value", .. }));

        let e = dec(1, &B::tag(b'E').u8(0)).unwrap_err();
        assert_eq!((e.offset, e.kind), (1, DecodeErrorKind::TrailingBytes(1)));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // Claims 2^31-1 relations / 32767 columns with almost no bytes behind them.
        assert!(dec(1, &B::tag(b'T').i32(i32::MAX).u8(0)).is_err());
        assert!(dec(1, &B::tag(b'R').u32(1).s("a").s("b").u8(b'd').i16(i16::MAX)).is_err());
        assert!(dec(1, &B::tag(b'I').u32(1).u8(b'N').i16(i16::MAX)).is_err());
    }

    #[test]
    fn failed_stream_start_keeps_state() {
        let mut d = Decoder::new(2);
        assert!(d.decode(b"S\0\0", 0).is_err());
        assert!(!d.in_stream());
    }

    #[test]
    fn decode_bytes_is_zero_copy() {
        let b = Bytes::from(B::tag(b'I').u32(1).u8(b'N').i16(1).text("abcdef").0);
        let Message::Insert { new, .. } = Decoder::new(1).decode_bytes(&b, 0).unwrap() else { panic!() };
        let Cell::Text(t) = &new.0[0] else { panic!() };
        assert_eq!(t.as_ptr(), b[13..].as_ptr());
    }

    // ---- property tests ----

    fn arb_str() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_ éü\u{1F600}]{0,12}"
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        let cell = prop_oneof![
            Just(Cell::Null),
            Just(Cell::UnchangedToast),
            arb_bytes().prop_map(Cell::Text),
            arb_bytes().prop_map(Cell::Binary),
        ];
        proptest::collection::vec(cell, 0..8).prop_map(Tuple)
    }

    fn arb_old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![arb_tuple().prop_map(OldTuple::Key), arb_tuple().prop_map(OldTuple::Full)]
    }

    fn arb_column() -> impl Strategy<Value = Column> {
        (any::<bool>(), arb_str(), any::<u32>(), any::<i32>()).prop_map(|(key, name, type_oid, type_modifier)| Column {
            key,
            name,
            type_oid,
            type_modifier,
        })
    }

    /// Data messages, with xid `Some` iff `streamed`.
    fn arb_data(streamed: bool) -> impl Strategy<Value = Message> {
        let xid = if streamed { any::<u32>().prop_map(Some).boxed() } else { Just(None).boxed() };
        prop_oneof![
            (
                xid.clone(),
                any::<u32>(),
                arb_str(),
                arb_str(),
                prop_oneof![Just(b'd'), Just(b'n'), Just(b'f'), Just(b'i')],
                proptest::collection::vec(arb_column(), 0..6)
            )
                .prop_map(|(xid, rel_id, namespace, name, replica_identity, columns)| Message::Relation(
                    Relation { xid, rel_id, namespace, name, replica_identity, columns }
                )),
            (xid.clone(), any::<u32>(), arb_str(), arb_str()).prop_map(|(xid, oid, namespace, name)| Message::Type {
                xid,
                oid,
                namespace,
                name
            }),
            (xid.clone(), any::<u32>(), arb_tuple()).prop_map(|(xid, rel_id, new)| Message::Insert {
                xid,
                rel_id,
                new
            }),
            (xid.clone(), any::<u32>(), proptest::option::of(arb_old()), arb_tuple())
                .prop_map(|(xid, rel_id, old, new)| Message::Update { xid, rel_id, old, new }),
            (xid.clone(), any::<u32>(), arb_old()).prop_map(|(xid, rel_id, old)| Message::Delete { xid, rel_id, old }),
            (xid.clone(), 0u8..4, proptest::collection::vec(any::<u32>(), 0..5))
                .prop_map(|(xid, options, rel_ids)| Message::Truncate { xid, options, rel_ids }),
            (xid, any::<bool>(), any::<u64>(), arb_str(), arb_bytes()).prop_map(
                |(xid, transactional, lsn, prefix, content)| Message::LogicalMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content
                }
            ),
        ]
    }

    fn arb_control(proto: u32) -> impl Strategy<Value = Message> {
        let abort_info =
            if proto >= 4 { proptest::option::of((any::<u64>(), any::<i64>())).boxed() } else { Just(None).boxed() };
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>())
                .prop_map(|(final_lsn, commit_ts, xid)| { Message::Begin { final_lsn, commit_ts, xid } }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts)| Message::Commit { flags, commit_lsn, end_lsn, commit_ts }
            ),
            (any::<u64>(), arb_str()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (any::<u32>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, commit_ts)| {
                    Message::StreamCommit { xid, flags, commit_lsn, end_lsn, commit_ts }
                }
            ),
            (any::<u32>(), any::<u32>(), abort_info).prop_map(|(xid, sub_xid, info)| {
                Message::StreamAbort { xid, sub_xid, abort_lsn: info.map(|i| i.0), abort_ts: info.map(|i| i.1) }
            }),
            (any::<u64>(), any::<u64>(), any::<i64>(), any::<u32>(), arb_str()).prop_map(
                |(prepare_lsn, end_lsn, prepare_ts, xid, gid)| {
                    Message::BeginPrepare { prepare_lsn, end_lsn, prepare_ts, xid, gid }
                }
            ),
            (any::<bool>(), any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>(), any::<u32>(), arb_str()).prop_map(
                |(streamed, flags, prepare_lsn, end_lsn, prepare_ts, xid, gid)| if streamed {
                    Message::StreamPrepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid }
                } else {
                    Message::Prepare { flags, prepare_lsn, end_lsn, prepare_ts, xid, gid }
                }
            ),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>(), any::<u32>(), arb_str()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_ts, xid, gid)| {
                    Message::CommitPrepared { flags, commit_lsn, end_lsn, commit_ts, xid, gid }
                }
            ),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>(), any::<i64>(), any::<u32>(), arb_str()).prop_map(
                |(flags, prepare_end_lsn, rollback_end_lsn, prepare_ts, rollback_ts, xid, gid)| {
                    Message::RollbackPrepared {
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_ts,
                        rollback_ts,
                        xid,
                        gid,
                    }
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(proto in 1u32..=4, start_streaming in any::<bool>(),
                                       data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut d = Decoder::new(proto);
            if start_streaming {
                d.decode(b"S\0\0\0\x01\x01", 0).unwrap();
            }
            let _ = d.decode(&data, 0);
        }

        #[test]
        fn mutated_valid_messages_never_panic(msg in arb_data(false), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            let i = pos.index(buf.len());
            buf[i] = byte;
            let _ = Decoder::new(1).decode(&buf, 0);
            buf.truncate(i);
            prop_assert!(Decoder::new(1).decode(&buf, 0).is_err());
        }

        #[test]
        fn round_trip_data(msg in arb_data(false), proto in 1u32..=4) {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            prop_assert_eq!(Decoder::new(proto).decode(&buf, 0).unwrap(), msg);
        }

        #[test]
        fn round_trip_streamed_data(msg in arb_data(true), proto in 2u32..=4) {
            let mut d = Decoder::new(proto);
            d.decode(b"S\0\0\0\x07\x01", 0).unwrap();
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            prop_assert_eq!(d.decode(&buf, 0).unwrap(), msg);
            prop_assert!(d.in_stream());
        }

        #[test]
        fn round_trip_control((proto, msg) in (1u32..=4).prop_flat_map(|p| (Just(p), arb_control(p)))) {
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            prop_assert_eq!(Decoder::new(proto).decode(&buf, 0).unwrap(), msg);
        }
    }
}
