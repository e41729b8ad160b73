//! Enriched values against PostgreSQL's own arithmetic: `engagement_percent`
//! must be exactly what `round(duration_ms / 1000.0 / length_seconds * 100, 2)`
//! gives on the server (ties included), and timestamps the server's
//! milliseconds, floored, on every decoding path.

mod support;

use rand::Rng;
use support::pg_versions;

fn pg_url(v: &str) -> String {
    std::env::var(format!("PGFANOUT_PG{v}_URL")).expect("run through scripts/test")
}

/// PostgreSQL's text of a numeric with two decimals (`-1.01`, `0.00`,
/// `214748364.80`) as an integer of hundredths.
fn hundredths_of_text(s: &str) -> i64 {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or_else(|| panic!("{s}: no two decimals"));
    assert_eq!(frac.len(), 2, "{s}: round(.., 2) keeps two decimals");
    let n: i64 = format!("{int}{frac}").parse().unwrap_or_else(|e| panic!("{s}: {e}"));
    if neg {
        -n
    } else {
        n
    }
}

/// (duration_ms, length_seconds) pairs: uniform random ones, small and
/// huge, exact ties of every sign, the i32 extremes, NULLs and zero lengths.
fn pairs() -> Vec<(Option<i32>, Option<i32>)> {
    let mut rng = rand::thread_rng();
    let mut out = Vec::new();
    for _ in 0..20_000 {
        out.push((Some(rng.gen::<i32>()), Some(rng.gen::<i32>())));
    }
    for _ in 0..20_000 {
        out.push((Some(rng.gen_range(-10_000_000..10_000_000)), Some(rng.gen_range(-5_000..5_000))));
    }
    for _ in 0..20_000 {
        // A tie: d / l = o / 20 with o odd, so 10 * d / l ends in .5.
        let o = 2 * rng.gen_range(-10_000..10_000) + 1;
        let t = rng.gen_range(-50_000..50_000);
        out.push((Some(o * t), Some(20 * t)));
    }
    for _ in 0..5_000 {
        // Near-ties: one millisecond either side of a tie.
        let o = 2 * rng.gen_range(-10_000..10_000) + 1;
        let t = rng.gen_range(1..50_000);
        out.push((Some(o * t + rng.gen_range(-1..=1)), Some(20 * t)));
    }
    let edges = [i32::MIN, i32::MIN + 1, -1_000_001, -1005, -1, 0, 1, 1005, 1_000_001, i32::MAX - 1, i32::MAX];
    for d in edges {
        for l in edges {
            out.push((Some(d), Some(l)));
        }
    }
    out.extend([(None, Some(100)), (Some(1005), None), (None, None), (Some(1005), Some(0))]);
    out
}

async fn percent_matches_postgres(v: &str) {
    let pg = pgfanout::source::slot::connect(&pg_url(v)).await.expect("connect");
    let pairs = pairs();
    let d: Vec<Option<i32>> = pairs.iter().map(|p| p.0).collect();
    let l: Vec<Option<i32>> = pairs.iter().map(|p| p.1).collect();
    let rows = pg
        .query(
            "SELECT round(d / 1000.0 / nullif(l, 0) * 100, 2)::text
               FROM unnest($1::int4[], $2::int4[]) WITH ORDINALITY AS t(d, l, i) ORDER BY i",
            &[&d, &l],
        )
        .await
        .expect("PostgreSQL's round");
    assert_eq!(rows.len(), pairs.len());
    let mut ties = 0;
    for ((d, l), row) in pairs.iter().zip(&rows) {
        let pg_text: Option<String> = row.get(0);
        let ours = pgfanout::enrich::engagement_percent(*d, *l);
        match pg_text {
            None => assert_eq!(ours, None, "PG {v}: d={d:?} l={l:?}: PostgreSQL says NULL"),
            Some(text) => {
                let n = hundredths_of_text(&text);
                let ours = ours.unwrap_or_else(|| panic!("PG {v}: d={d:?} l={l:?}: PostgreSQL says {text}, we None"));
                // Equal to the double nearest PostgreSQL's decimal, bit for bit.
                assert_eq!(ours, n as f64 / 100.0, "PG {v}: d={d:?} l={l:?}: PostgreSQL says {text}");
                assert_eq!(ours, text.parse::<f64>().unwrap(), "PG {v}: d={d:?} l={l:?}: {text}");
                if let (Some(d), Some(l)) = (d, l) {
                    ties += usize::from(
                        (i64::from(*d) * 20) % i64::from(*l) == 0 && (i64::from(*d) * 10) % i64::from(*l) != 0,
                    );
                }
            }
        }
    }
    assert!(ties >= 20_000, "PG {v}: only {ties} exact ties compared");
}

/// Random instants from 1600 to 2300 (µs), and the ones a millisecond
/// boundary makes interesting on either side of 1970.
fn instants_us() -> Vec<i64> {
    let mut rng = rand::thread_rng();
    let mut out: Vec<i64> =
        (0..20_000).map(|_| rng.gen_range(-11_676_096_000_000_000..10_413_792_000_000_000)).collect();
    for base in [0i64, -86_400_000_000, 1_795_867_200_000_000, -2_208_988_800_000_000] {
        for d in [-1001, -1000, -999, -501, -500, -499, -1, 0, 1, 499, 500, 501, 999, 1000, 1001] {
            out.push(base + d);
        }
    }
    out
}

/// Every timestamp path (text as the stream sends it, binary as the stream
/// and the COPY path send it; timestamptz and timestamp) gives PostgreSQL's
/// `floor(extract(epoch FROM ts) * 1000)`.
async fn timestamps_match_postgres(v: &str) {
    use pgfanout::source::values::{oid, Value};
    let pg = pgfanout::source::slot::connect(&pg_url(v)).await.expect("connect");
    // A zone with offsets of whole minutes now and of seconds (local mean
    // time) before 1900: the text form is not UTC.
    pg.batch_execute("SET TimeZone = 'Asia/Kolkata'").await.unwrap();
    let us = instants_us();
    let rows = pg
        .query(
            "SELECT floor(extract(epoch FROM ts) * 1000)::int8, ts::text, timestamptz_send(ts),
                    (ts AT TIME ZONE 'UTC')::text, timestamp_send(ts AT TIME ZONE 'UTC')
               FROM unnest($1::int8[]) WITH ORDINALITY AS u(us, i),
                    LATERAL (SELECT 'epoch'::timestamptz + us * interval '1 microsecond' AS ts) t
              ORDER BY i",
            &[&us],
        )
        .await
        .expect("PostgreSQL's timestamps");
    assert_eq!(rows.len(), us.len());
    for (u, r) in us.iter().zip(&rows) {
        let want: i64 = r.get(0);
        let text = |i: usize, type_oid| Value::from_text(type_oid, r.get::<_, &str>(i).as_bytes()).unwrap();
        let bin = |i: usize, type_oid| Value::from_binary(type_oid, r.get::<_, &[u8]>(i)).unwrap();
        let got = [
            text(1, oid::TIMESTAMPTZ).as_timestamp_millis(),
            bin(2, oid::TIMESTAMPTZ).as_timestamp_millis(),
            text(3, oid::TIMESTAMP).as_timestamp_millis(),
            bin(4, oid::TIMESTAMP).as_timestamp_millis(),
        ];
        assert_eq!(got, [Some(want); 4], "PG {v}: {u} µs ({})", r.get::<_, &str>(1));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timestamps_floor_to_milliseconds_like_postgres() {
    for v in pg_versions() {
        timestamps_match_postgres(&v).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn engagement_percent_equals_postgres_round() {
    for v in pg_versions() {
        percent_matches_postgres(&v).await;
    }
}
