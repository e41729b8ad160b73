//! Any bytes: the decoder and value parsers return Ok or Err, never panic.
//! Run with `cargo +nightly fuzz run pgoutput_decode` from the repo root;
//! seed it with `tests/corpus/pgoutput/*.bin`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfanout::source::pgoutput::Decoder;
use pgfanout::source::values::Value;

const OIDS: &[u32] = &[16, 17, 20, 21, 23, 25, 114, 650, 700, 701, 869, 1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950, 3802, 1007, 1009, 1185, 1231, 3807];

fuzz_target!(|data: &[u8]| {
    for v in 1..=4 {
        let _ = Decoder::new(v).decode(data, 0);
        // Same bytes as the first message inside a streamed block.
        let mut d = Decoder::new(v);
        if d.decode(b"S\0\0\0\x01\x01", 0).is_ok() {
            let _ = d.decode(data, 0);
        }
    }
    if let Some((&pick, rest)) = data.split_first() {
        let oid = OIDS[usize::from(pick) % OIDS.len()];
        let _ = Value::from_text(oid, rest).map(|v| v.to_json());
        let _ = Value::from_binary(oid, rest).map(|v| v.to_json());
    }
});
