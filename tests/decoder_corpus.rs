//! Golden tests: real pgoutput messages captured from PostgreSQL 15
//! (tests/corpus/capture/) must decode, and their values must match what
//! SELECT returned for the same rows.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bytes::Bytes;
use pgfanout::source::pgoutput::{Cell, Decoder, Message, OldTuple, Relation, Tuple};
use pgfanout::source::values::{oid, Value};
use serde_json::Value as Json;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/pgoutput")
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(corpus_dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn hi/lo");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

struct Decoded {
    set: String,
    binary: bool,
    file: String,
    msg: Message,
}

/// Decodes every set in order, as a session would.
fn decode_all() -> Vec<Decoded> {
    let m = manifest();
    let mut out = Vec::new();
    for set in m["sets"].as_array().unwrap() {
        let name = set["name"].as_str().unwrap().to_string();
        let proto = set["proto"].as_u64().unwrap() as u32;
        let binary = set["options"]["binary"].as_str() == Some("true");
        let mut dec = Decoder::new(proto);
        let mut copying = Decoder::new(proto);
        for entry in set["files"].as_array().unwrap() {
            let (file, lsn) = entry.as_str().unwrap().split_once(' ').unwrap();
            let data = Bytes::from(std::fs::read(corpus_dir().join(file)).unwrap());
            let msg = dec.decode_bytes(&data, parse_lsn(lsn)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(copying.decode(&data, parse_lsn(lsn)).unwrap(), msg, "{file}");
            assert_eq!(msg.tag(), file.split('-').nth(2).unwrap().as_bytes()[0], "{file}");
            out.push(Decoded { set: name.clone(), binary, file: file.to_string(), msg });
        }
        assert!(!dec.in_stream(), "{name}: stream left open");
    }
    out
}

#[test]
fn every_file_decodes_and_is_listed() {
    let decoded = decode_all();
    let on_disk = std::fs::read_dir(corpus_dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "bin"));
    assert_eq!(on_disk.count(), decoded.len());
    assert!(decoded.len() > 500);
}

fn tags(decoded: &[Decoded], set: &str) -> BTreeMap<char, usize> {
    let mut t = BTreeMap::new();
    for d in decoded.iter().filter(|d| d.set == set) {
        *t.entry(d.msg.tag() as char).or_default() += 1;
    }
    t
}

#[test]
fn each_set_has_the_messages_its_workload_produces() {
    let d = decode_all();
    for set in ["text", "binary"] {
        let t = tags(&d, set);
        for tag in ['B', 'C', 'O', 'R', 'Y', 'I', 'U', 'D', 'T', 'M'] {
            assert!(t.contains_key(&tag), "{set} lacks {tag}: {t:?}");
        }
    }
    let t = tags(&d, "stream");
    for tag in ['S', 'E', 'c', 'A', 'I'] {
        assert!(t.contains_key(&tag), "stream lacks {tag}: {t:?}");
    }
    let t = tags(&d, "twophase");
    for tag in ['b', 'P', 'K', 'r', 'p', 'S', 'E'] {
        assert!(t.contains_key(&tag), "twophase lacks {tag}: {t:?}");
    }
}

#[test]
fn streamed_messages_carry_xid_only_inside_blocks() {
    let d = decode_all();
    for set in ["stream", "twophase"] {
        let mut open: Option<u32> = None;
        let mut streamed_rows = 0;
        for x in d.iter().filter(|x| x.set == set) {
            match &x.msg {
                Message::StreamStart { xid, .. } => open = Some(*xid),
                Message::StreamStop => open = None,
                Message::StreamAbort { xid, sub_xid, abort_lsn, abort_ts } => {
                    assert!(open.is_none());
                    assert!(*sub_xid >= *xid, "{}", x.file);
                    assert_eq!((abort_lsn, abort_ts), (&None, &None), "proto 2/3 has no abort info");
                }
                m => {
                    // Top-level xid or one of its subtransactions (which are later xids).
                    match (open, m.stream_xid()) {
                        (Some(top), Some(x)) => {
                            assert!(x >= top);
                            streamed_rows += 1
                        }
                        (None, None) => {}
                        other => panic!("{}: xid {other:?}", x.file),
                    }
                }
            }
        }
        assert!(streamed_rows > 20, "{set}: {streamed_rows}");
    }
}

#[test]
fn control_messages_have_sane_fields() {
    let d = decode_all();
    let mut seen_origin = false;
    let mut prepared = Vec::new();
    for x in &d {
        match &x.msg {
            Message::Begin { final_lsn, commit_ts, .. } => {
                assert!(*final_lsn > 0);
                // committed "now": after 2020-01-01 in PG epoch µs
                assert!(*commit_ts > 631_152_000_000_000, "{}", x.file);
            }
            Message::Commit { flags, commit_lsn, end_lsn, .. } => {
                assert_eq!(*flags, 0);
                assert!(end_lsn > commit_lsn);
            }
            Message::Origin { name, .. } => {
                seen_origin = true;
                assert_eq!(name, "origin_a");
            }
            Message::LogicalMessage { prefix, content, transactional, .. } => {
                assert_eq!(prefix, "pgfanout");
                if !transactional {
                    assert_eq!(&content[..], b"\x00\xff");
                } else {
                    assert!(content == "transactional ✓".as_bytes() || content == "in tx".as_bytes());
                }
            }
            Message::Truncate { options, rel_ids, .. } => {
                assert!(*options == 0 || *options == 3, "{options}");
                assert!(!rel_ids.is_empty());
            }
            Message::BeginPrepare { gid, .. }
            | Message::Prepare { gid, .. }
            | Message::StreamPrepare { gid, .. }
            | Message::CommitPrepared { gid, .. }
            | Message::RollbackPrepared { gid, .. } => prepared.push((x.msg.tag() as char, gid.clone())),
            _ => {}
        }
    }
    assert!(seen_origin);
    for want in [('b', "gid-commit"), ('P', "gid-commit"), ('K', "gid-commit"), ('r', "gid-rollback"), ('p', "gid-big")]
    {
        assert!(prepared.contains(&(want.0, want.1.to_string())), "{want:?} in {prepared:?}");
    }
}

#[test]
fn toast_full_identity_and_key_updates() {
    let d = decode_all();
    let mut rels: HashMap<(String, u32), Relation> = HashMap::new();
    let (mut unchanged, mut full_old, mut key_old) = (0, 0, 0);
    for x in &d {
        match &x.msg {
            Message::Relation(r) => {
                rels.insert((x.set.clone(), r.rel_id), r.clone());
            }
            Message::Update { rel_id, old, new, .. } => {
                let rel = &rels[&(x.set.clone(), *rel_id)];
                rel.check_tuple(new).unwrap();
                if rel.name == "toasty" {
                    assert!(old.is_none());
                    assert_eq!(new.0[1], Cell::UnchangedToast, "{}", x.file);
                    unchanged += 1;
                }
                match old {
                    Some(OldTuple::Full(t)) => {
                        assert_eq!(rel.replica_identity, b'f');
                        rel.check_tuple(t).unwrap();
                        full_old += 1;
                    }
                    Some(OldTuple::Key(t)) => {
                        assert_eq!(rel.name, "content");
                        // only the key column is set
                        assert!(matches!(t.0[0], Cell::Text(_) | Cell::Binary(_)));
                        assert!(t.0[1..].iter().all(|c| *c == Cell::Null));
                        key_old += 1;
                    }
                    None => {}
                }
            }
            Message::Delete { rel_id, old, .. } => {
                rels[&(x.set.clone(), *rel_id)].check_tuple(old.tuple()).unwrap();
            }
            _ => {}
        }
    }
    assert!(unchanged >= 2 && full_old >= 2 && key_old >= 2, "{unchanged} {full_old} {key_old}");
}

/// The caller resolves domains to their base type; here `posint` → int4.
fn resolved_oid(col: &str, type_oid: u32) -> u32 {
    if col == "c_posint" {
        oid::INT4
    } else {
        type_oid
    }
}

fn cell_value(col: &str, type_oid: u32, cell: &Cell) -> Value {
    let t = resolved_oid(col, type_oid);
    match cell {
        Cell::Null => Value::Null,
        Cell::Text(b) => Value::from_text(t, b).unwrap_or_else(|e| panic!("{col}: {e}")),
        Cell::Binary(b) => Value::from_binary(t, b).unwrap_or_else(|e| panic!("{col}: {e}")),
        Cell::UnchangedToast => panic!("{col}: unexpected unchanged toast"),
    }
}

#[test]
fn inserted_values_match_select_output() {
    let m = manifest();
    let d = decode_all();
    let mut rels: HashMap<(String, u32), Relation> = HashMap::new();
    let mut checked = BTreeMap::<(String, String), usize>::new();
    for x in &d {
        let (rel_id, new) = match &x.msg {
            Message::Relation(r) => {
                rels.insert((x.set.clone(), r.rel_id), r.clone());
                continue;
            }
            Message::Insert { rel_id, new, .. } => (*rel_id, new),
            _ => continue,
        };
        let rel = &rels[&(x.set.clone(), rel_id)];
        rel.check_tuple(new).unwrap();
        // Every cell of every table must become a value.
        let values: Vec<Value> =
            rel.columns.iter().zip(&new.0).map(|(c, cell)| cell_value(&c.name, c.type_oid, cell)).collect();
        // alltypes rows are never updated, so the final SELECT is what was inserted.
        let Some(rows) = m["expected"][&rel.name].as_array().filter(|_| rel.name == "alltypes") else { continue };
        let key = values[0].to_json();
        let key = key.as_str().map(str::to_string).unwrap_or_else(|| key.to_string());
        let Some(want) = rows.iter().find(|r| r["id"].as_str() == Some(key.as_str())) else {
            // content row whose id was updated later
            continue;
        };
        if x.binary {
            assert!(new.0.iter().skip(1).all(|c| matches!(c, Cell::Binary(_) | Cell::Null)), "{}", x.file);
        }
        check_row(x, rel, new, &values, want);
        *checked.entry((x.set.clone(), rel.name.clone())).or_default() += 1;
    }
    for set in ["text", "binary"] {
        assert_eq!(checked.get(&(set.to_string(), "alltypes".to_string())), Some(&6), "{checked:?}");
    }
}

fn check_row(x: &Decoded, rel: &Relation, new: &Tuple, values: &[Value], want: &Json) {
    for ((col, cell), value) in rel.columns.iter().zip(&new.0).zip(values) {
        let expected = &want[&col.name];
        let ctx = format!("{} {}.{} ({})", x.file, rel.name, col.name, col.type_oid);
        match (cell, expected.as_str()) {
            (Cell::Null, None) => continue,
            (Cell::Null, Some(s)) => panic!("{ctx}: NULL, expected {s:?}"),
            (_, None) => panic!("{ctx}: expected NULL, got {cell:?}"),
            (Cell::Text(b), Some(s)) => assert_eq!(std::str::from_utf8(b).unwrap(), s, "{ctx}"),
            _ => {}
        }
        let s = expected.as_str().unwrap();
        let t = resolved_oid(&col.name, col.type_oid);
        let from_select = Value::from_text(t, s.as_bytes()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        // JSON form, so NaN compares equal to NaN.
        assert_eq!(value.to_json(), from_select.to_json(), "{ctx} binary={}", x.binary);
        if t == col.type_oid && !matches!(col.name.as_str(), "c_mood") {
            assert!(!matches!(value, Value::Unknown { .. }), "{ctx}: {value:?}");
        }
    }
}

#[test]
fn spot_check_known_values() {
    let d = decode_all();
    let mut rels: HashMap<(String, u32), Relation> = HashMap::new();
    let mut seen = 0;
    for x in &d {
        match &x.msg {
            Message::Relation(r) => {
                rels.insert((x.set.clone(), r.rel_id), r.clone());
            }
            Message::Insert { rel_id, new, .. } => {
                let rel = &rels[&(x.set.clone(), *rel_id)];
                if rel.name != "alltypes" {
                    continue;
                }
                let get = |name: &str| {
                    let i = rel.columns.iter().position(|c| c.name == name).unwrap();
                    cell_value(name, rel.columns[i].type_oid, &new.0[i])
                };
                if get("id") != Value::Int4(1) {
                    continue;
                }
                seen += 1;
                assert_eq!(get("c_timestamptz").to_json(), "2026-11-28T12:00:00.123Z");
                assert_eq!(get("c_timestamptz").as_timestamp_millis(), Some(1_795_867_200_123));
                assert_eq!(get("c_numeric"), Value::Numeric("12345678901234567890.123456789012345678".into()));
                assert_eq!(get("c_interval"), Value::Interval { months: 14, days: 3, micros: 14_706_500_000 });
                assert_eq!(get("c_bytea"), Value::Bytea(vec![0, 0xff, 0x10]));
                assert_eq!(get("c_mood").as_str(), Some("happy"));
                assert_eq!(get("c_posint"), Value::Int4(42));
                assert_eq!(get("c_jsonb").to_json()["text"], "日本語");
                assert_eq!(get("c_timetz"), Value::TimeTz { micros: 14_706_000_000, offset_secs: 19_800 });
                assert_eq!(get("a_int4_2d").to_json(), serde_json::json!([[1, 2, 3], [4, 5, 6]]));
                assert_eq!(
                    get("a_text").to_json(),
                    serde_json::json!(["a b", "c,d", "e\"f", "g\\h", null, "NULL", ""])
                );
            }
            _ => {}
        }
    }
    assert_eq!(seen, 4, "once per capture set");
}
