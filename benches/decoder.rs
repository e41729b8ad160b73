//! pgoutput decoding throughput: the captured corpus (bytes/s) and a
//! synthetic stream of engagement_events Inserts (rows/s), with and without
//! converting cells to typed values; and the log's Debezium envelope of
//! those rows (rows/s), beside serde_json of the bare row.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgfanout::config::{DebeziumConfig, LogConfig};
use pgfanout::log::envelope::Encoder;
use pgfanout::source::pgoutput::{Cell, Decoder, Message, Tuple};
use pgfanout::source::values::Value;
use pgfanout::source::{Change, ColumnMeta, Op, Position, Row, TableColumns, TableName, TxInfo};

fn corpus() -> Vec<(u32, Bytes)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/pgoutput");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/corpus/pgoutput")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let proto = name.split('-').next().unwrap().parse().unwrap();
            (proto, Bytes::from(std::fs::read(&p).unwrap()))
        })
        .collect()
}

/// engagement_events columns: id, content_id, user_id, event_type, event_ts,
/// duration_ms, device, raw_payload.
const COLUMN_OIDS: [u32; 8] = [20, 2950, 2950, 25, 1184, 23, 25, 3802];

fn engagement_insert(i: u64) -> Bytes {
    let text = |s: String| Cell::Text(Bytes::from(s));
    let new = Tuple(vec![
        text(format!("{}", 1_000_000 + i)),
        text("550e8400-e29b-41d4-a716-446655440000".into()),
        text(format!("550e8400-e29b-41d4-a716-{:012}", i % 100_000)),
        text("play".into()),
        text(format!("2026-11-28 12:{:02}:{:02}.{:06}+00", i / 60 % 60, i % 60, i % 1_000_000)),
        if i % 7 == 0 { Cell::Null } else { text(format!("{}", 30_000 + i % 5_000)) },
        text("web-safari".into()),
        text(format!(
            r#"{{"seq": {i}, "source": "load-generator", "session": "s-{:08}", "ab": "variant-b"}}"#,
            i % 1000
        )),
    ]);
    let mut out = Vec::with_capacity(300);
    Message::Insert { xid: None, rel_id: 16_398, new }.encode(&mut out);
    Bytes::from(out)
}

fn bench(c: &mut Criterion) {
    let files = corpus();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    let mut g = c.benchmark_group("corpus");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function(format!("decode_{}_messages", files.len()), |b| {
        b.iter(|| {
            let mut decoders = [Decoder::new(1), Decoder::new(2), Decoder::new(3)];
            for (proto, data) in &files {
                let d = &mut decoders[(*proto as usize - 1).min(2)];
                black_box(d.decode_bytes(data, 0).unwrap());
            }
        })
    });
    g.finish();

    let rows: Vec<Bytes> = (0..10_000).map(engagement_insert).collect();
    let bytes: usize = rows.iter().map(Bytes::len).sum();
    let mut g = c.benchmark_group("engagement_inserts");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("decode_10k_rows_avg_{}B", bytes / rows.len()), |b| {
        let mut d = Decoder::new(1);
        b.iter(|| {
            for r in &rows {
                black_box(d.decode_bytes(r, 0).unwrap());
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("engagement_rows");
    g.throughput(Throughput::Elements(rows.len() as u64));
    g.bench_function("decode_10k_rows", |b| {
        let mut d = Decoder::new(1);
        b.iter(|| {
            for r in &rows {
                black_box(d.decode_bytes(r, 0).unwrap());
            }
        })
    });
    g.bench_function("decode_and_type_10k_rows", |b| {
        let mut d = Decoder::new(1);
        b.iter(|| {
            for r in &rows {
                let Message::Insert { new, .. } = d.decode_bytes(r, 0).unwrap() else { unreachable!() };
                for (cell, oid) in new.0.iter().zip(COLUMN_OIDS) {
                    let v = match cell {
                        Cell::Text(t) => Value::from_text(oid, t).unwrap(),
                        _ => Value::Null,
                    };
                    black_box(v);
                }
            }
        })
    });
    g.finish();

    // The rows as changes, and their envelopes.
    let names = ["id", "content_id", "user_id", "event_type", "event_ts", "duration_ms", "device", "raw_payload"];
    let meta = Arc::new(TableColumns {
        columns: names
            .iter()
            .zip(COLUMN_OIDS)
            .map(|(n, oid)| ColumnMeta {
                name: (*n).into(),
                type_oid: oid,
                type_modifier: -1,
                optional: *n != "id",
                enum_labels: None,
                default: None,
            })
            .collect(),
        key: vec![0],
    });
    let mut d = Decoder::new(1);
    let changes: Vec<Change> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let Message::Insert { new, .. } = d.decode_bytes(r, 0).unwrap() else { unreachable!() };
            let row = Row(new
                .0
                .iter()
                .zip(COLUMN_OIDS)
                .zip(names)
                .map(|((cell, oid), n)| {
                    let v = match cell {
                        Cell::Text(t) => Value::from_text(oid, t).unwrap(),
                        _ => Value::Null,
                    };
                    (n.into(), v)
                })
                .collect());
            Change {
                table: TableName::new("public", "engagement_events"),
                op: Op::Create,
                key: Row(vec![row.0[0].clone()]),
                before: None,
                after: Some(row),
                lsn: 1000 + i as u64,
                tx: TxInfo { xid: 7, commit_lsn: 1 << 32, commit_ts_us: 1_795_867_200_000_000, last_commit_lsn: 999 },
                position: Position { commit_lsn: 1 << 32, ordinal: i as u32 },
                columns: Some(meta.clone()),
                unchanged_toast: Vec::new(),
            }
        })
        .collect();
    let log = |schemas_enable| LogConfig {
        debezium: DebeziumConfig { schemas_enable, ..Default::default() },
        ..LogConfig::new("")
    };
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("serde_json_of_the_row_10k", |b| {
        b.iter(|| {
            for c in &changes {
                black_box(serde_json::to_vec(c.after.as_ref().unwrap()).unwrap());
            }
        })
    });
    for schemas in [false, true] {
        let e = Encoder::new(&log(schemas), "app");
        g.bench_function(format!("debezium_key_and_value_10k_schemas_{schemas}"), |b| {
            b.iter(|| {
                for c in &changes {
                    black_box(e.key(c));
                    black_box(e.envelope(c, 1_795_867_200_000_000, None));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
