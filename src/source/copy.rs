//! PostgreSQL's binary COPY format (`COPY … TO STDOUT (FORMAT binary)`),
//! decoded incrementally from the chunks the server streams. Pure: bytes in,
//! tuples of raw cells out (each cell is a value's binary send format, ready
//! for `Value::from_binary`), no I/O.
//!
//! Format: an 11-byte signature, a flags word, a header extension; then per
//! tuple an i16 field count and per field an i32 length (-1 = NULL) and that
//! many bytes; a field count of -1 ends the data.

use bytes::{Buf, Bytes, BytesMut};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Header flag bit 16: every tuple carries an OID (`WITH OIDS`, gone since 12).
const FLAG_OIDS: u32 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("binary COPY data does not start with the PGCOPY signature")]
    Signature,
    #[error("binary COPY data carries OIDs (unsupported)")]
    Oids,
    #[error("binary COPY tuple has {got} fields, expected {expected}")]
    FieldCount { got: i16, expected: usize },
    #[error("binary COPY field has negative length {0}")]
    FieldLength(i32),
    #[error("binary COPY data ended {0}")]
    Truncated(&'static str),
    #[error("binary COPY data continues after the trailer")]
    TrailingData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Tuples,
    Done,
}

/// Decodes one COPY stream. `push` what arrives, then take tuples with
/// `next_tuple` until it returns `None`; call `finish` at the end of the stream.
#[derive(Debug)]
pub struct CopyDecoder {
    buf: BytesMut,
    state: State,
    fields: usize,
}

/// One tuple: a cell per column, `None` for NULL.
pub type Tuple = Vec<Option<Bytes>>;

impl CopyDecoder {
    /// A decoder for tuples of `fields` columns.
    pub fn new(fields: usize) -> Self {
        CopyDecoder { buf: BytesMut::new(), state: State::Header, fields }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete tuple, or `None` when more data is needed (or the
    /// trailer was read).
    pub fn next_tuple(&mut self) -> Result<Option<Tuple>, CopyError> {
        if self.state == State::Header && !self.header()? {
            return Ok(None);
        }
        if self.state == State::Done {
            if !self.buf.is_empty() {
                return Err(CopyError::TrailingData);
            }
            return Ok(None);
        }
        // Measure the tuple before consuming anything, so a partial tuple
        // waits for the next push untouched.
        let Some(count) = peek_i16(&self.buf, 0) else { return Ok(None) };
        if count == -1 {
            self.buf.advance(2);
            self.state = State::Done;
            if !self.buf.is_empty() {
                return Err(CopyError::TrailingData);
            }
            return Ok(None);
        }
        if count < 0 || count as usize != self.fields {
            return Err(CopyError::FieldCount { got: count, expected: self.fields });
        }
        let mut at = 2usize;
        for _ in 0..count {
            let Some(len) = peek_i32(&self.buf, at) else { return Ok(None) };
            at += 4;
            if len >= 0 {
                at += len as usize;
            } else if len != -1 {
                return Err(CopyError::FieldLength(len));
            }
        }
        if self.buf.len() < at {
            return Ok(None);
        }
        let mut tuple_bytes = self.buf.split_to(at).freeze();
        tuple_bytes.advance(2);
        let mut tuple = Vec::with_capacity(self.fields);
        for _ in 0..count {
            let len = tuple_bytes.get_i32();
            if len < 0 {
                tuple.push(None);
            } else {
                tuple.push(Some(tuple_bytes.split_to(len as usize)));
            }
        }
        Ok(Some(tuple))
    }

    /// Checks that the stream ended where it should: after the trailer.
    pub fn finish(&self) -> Result<(), CopyError> {
        match self.state {
            State::Done if self.buf.is_empty() => Ok(()),
            State::Done => Err(CopyError::TrailingData),
            State::Header => Err(CopyError::Truncated("inside the header")),
            State::Tuples => Err(CopyError::Truncated("before the trailer")),
        }
    }

    /// Consumes the header once it is complete.
    fn header(&mut self) -> Result<bool, CopyError> {
        let fixed = SIGNATURE.len() + 8;
        if self.buf.len() < fixed {
            if !SIGNATURE.starts_with(&self.buf[..self.buf.len().min(SIGNATURE.len())]) {
                return Err(CopyError::Signature);
            }
            return Ok(false);
        }
        if &self.buf[..SIGNATURE.len()] != SIGNATURE {
            return Err(CopyError::Signature);
        }
        let flags = peek_i32(&self.buf, SIGNATURE.len()).unwrap_or_default() as u32;
        if flags & FLAG_OIDS != 0 {
            return Err(CopyError::Oids);
        }
        let ext = peek_i32(&self.buf, SIGNATURE.len() + 4).unwrap_or_default();
        if ext < 0 {
            return Err(CopyError::FieldLength(ext));
        }
        if self.buf.len() < fixed + ext as usize {
            return Ok(false);
        }
        self.buf.advance(fixed + ext as usize);
        self.state = State::Tuples;
        Ok(true)
    }
}

fn peek_i16(b: &[u8], at: usize) -> Option<i16> {
    b.get(at..at + 2).map(|s| i16::from_be_bytes([s[0], s[1]]))
}

fn peek_i32(b: &[u8], at: usize) -> Option<i32> {
    b.get(at..at + 4).map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(tuples: &[Vec<Option<Vec<u8>>>], ext: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&(ext.len() as i32).to_be_bytes());
        out.extend_from_slice(ext);
        for t in tuples {
            out.extend_from_slice(&(t.len() as i16).to_be_bytes());
            for cell in t {
                match cell {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn decode_in_pieces(data: &[u8], fields: usize, piece: usize) -> Result<Vec<Tuple>, CopyError> {
        let mut d = CopyDecoder::new(fields);
        let mut out = Vec::new();
        for chunk in data.chunks(piece.max(1)) {
            d.push(chunk);
            while let Some(t) = d.next_tuple()? {
                out.push(t);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn tuples_nulls_and_header_extension() {
        let data = encode(
            &[vec![Some(vec![0, 0, 0, 7]), None, Some(b"web".to_vec())], vec![None, Some(vec![]), None]],
            b"ext!",
        );
        let t = decode_in_pieces(&data, 3, data.len()).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0][0].as_deref(), Some(&[0u8, 0, 0, 7][..]));
        assert_eq!(t[0][1], None);
        assert_eq!(t[0][2].as_deref(), Some(&b"web"[..]));
        assert_eq!(t[1][1].as_deref(), Some(&b""[..]));
    }

    #[test]
    fn errors() {
        assert_eq!(decode_in_pieces(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0", 1, 3), Err(CopyError::Signature));
        let data = encode(&[vec![None, None]], b"");
        assert_eq!(decode_in_pieces(&data, 3, 100), Err(CopyError::FieldCount { got: 2, expected: 3 }));
        let data = encode(&[vec![Some(vec![1, 2, 3])]], b"");
        assert_eq!(decode_in_pieces(&data[..data.len() - 4], 1, 100), Err(CopyError::Truncated("before the trailer")));
        let mut data = encode(&[], b"");
        data.push(0);
        assert_eq!(decode_in_pieces(&data, 1, 100), Err(CopyError::TrailingData));
        let mut oids = encode(&[], b"");
        oids[SIGNATURE.len() + 1] = 1;
        assert_eq!(decode_in_pieces(&oids, 1, 100), Err(CopyError::Oids));
    }

    proptest! {
        /// However the stream is cut into chunks, the same tuples come out.
        #[test]
        fn any_chunking_gives_the_same_tuples(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)), 3),
                0..20),
            piece in 1usize..64,
        ) {
            let data = encode(&rows, b"");
            let got = decode_in_pieces(&data, 3, piece).unwrap();
            let got: Vec<Vec<Option<Vec<u8>>>> =
                got.into_iter().map(|t| t.into_iter().map(|c| c.map(|b| b.to_vec())).collect()).collect();
            prop_assert_eq!(got, rows);
        }
    }
}
