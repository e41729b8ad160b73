//! The pgoutput wire format: bytes in, typed messages out, no I/O. Interim
//! decoder covering protocol 1's row messages; the complete one (all
//! versions, streaming, two-phase) replaces it.

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub rel_id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<Cell>);

#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    Key(Tuple),
    Full(Tuple),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Relation(Relation),
    Insert { xid: Option<u32>, rel_id: u32, new: Tuple },
    Update { xid: Option<u32>, rel_id: u32, old: Option<OldTuple>, new: Tuple },
    Delete { xid: Option<u32>, rel_id: u32, old: OldTuple },
    Truncate { xid: Option<u32>, options: u8, rel_ids: Vec<u32> },
    Other { tag: u8 },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("pgoutput {kind} message at LSN {lsn:#x}, offset {offset}: {reason}")]
pub struct DecodeError {
    pub kind: char,
    pub offset: usize,
    pub lsn: u64,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    #[allow(dead_code)]
    proto_version: u32,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: char,
    lsn: u64,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { kind: self.kind, offset: self.pos, lsn: self.lsn, reason: reason.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| self.err("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|b| *b == 0).ok_or_else(|| self.err("unterminated string"))?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| self.err("invalid UTF-8 in name"))?.to_string();
        self.pos += nul + 1;
        Ok(s)
    }
    fn tuple(&mut self, data: &Bytes) -> Result<Tuple, DecodeError> {
        let n = self.u16()? as usize;
        let mut cells = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        for _ in 0..n {
            let cell = match self.u8()? {
                b'n' => Cell::Null,
                b'u' => Cell::UnchangedToast,
                k @ (b't' | b'b') => {
                    let len = self.u32()? as usize;
                    let start = self.pos;
                    self.take(len)?;
                    let bytes = data.slice(start..start + len);
                    if k == b't' {
                        Cell::Text(bytes)
                    } else {
                        Cell::Binary(bytes)
                    }
                }
                other => return Err(self.err(format!("unknown tuple data kind {:?}", other as char))),
            };
            cells.push(cell);
        }
        Ok(Tuple(cells))
    }
}

impl Decoder {
    pub fn new(proto_version: u32) -> Self {
        Decoder { proto_version }
    }

    pub fn decode(&mut self, data: &[u8], lsn: u64) -> Result<Message, DecodeError> {
        self.decode_bytes(&Bytes::copy_from_slice(data), lsn)
    }

    pub fn decode_bytes(&mut self, data: &Bytes, lsn: u64) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: data, pos: 0, kind: '?', lsn };
        let tag = r.u8()?;
        r.kind = tag as char;
        Ok(match tag {
            b'R' => {
                let rel_id = r.u32()?;
                let namespace = r.cstr()?;
                let name = r.cstr()?;
                let replica_identity = r.u8()?;
                let n = r.u16()? as usize;
                let mut columns = Vec::with_capacity(n.min(data.len()));
                for _ in 0..n {
                    let flags = r.u8()?;
                    let name = r.cstr()?;
                    let type_oid = r.u32()?;
                    let type_modifier = r.u32()? as i32;
                    columns.push(Column { key: flags & 1 == 1, name, type_oid, type_modifier });
                }
                Message::Relation(Relation { rel_id, namespace, name, replica_identity, columns })
            }
            b'I' => {
                let rel_id = r.u32()?;
                match r.u8()? {
                    b'N' => Message::Insert { xid: None, rel_id, new: r.tuple(data)? },
                    k => return Err(r.err(format!("expected N, got {:?}", k as char))),
                }
            }
            b'U' => {
                let rel_id = r.u32()?;
                let mut old = None;
                let mut k = r.u8()?;
                if k == b'K' || k == b'O' {
                    let t = r.tuple(data)?;
                    old = Some(if k == b'K' { OldTuple::Key(t) } else { OldTuple::Full(t) });
                    k = r.u8()?;
                }
                if k != b'N' {
                    return Err(r.err(format!("expected N, got {:?}", k as char)));
                }
                Message::Update { xid: None, rel_id, old, new: r.tuple(data)? }
            }
            b'D' => {
                let rel_id = r.u32()?;
                let k = r.u8()?;
                let t = r.tuple(data)?;
                let old = match k {
                    b'K' => OldTuple::Key(t),
                    b'O' => OldTuple::Full(t),
                    _ => return Err(r.err(format!("expected K or O, got {:?}", k as char))),
                };
                Message::Delete { xid: None, rel_id, old }
            }
            b'T' => {
                let n = r.u32()? as usize;
                let options = r.u8()?;
                let mut rel_ids = Vec::with_capacity(n.min(data.len()));
                for _ in 0..n {
                    rel_ids.push(r.u32()?);
                }
                Message::Truncate { xid: None, options, rel_ids }
            }
            b'B' | b'C' | b'O' | b'Y' | b'M' => Message::Other { tag },
            other => return Err(r.err(format!("unknown message tag {:?}", other as char))),
        })
    }
}
