//! The slot pgfanout creates is a failover slot on PostgreSQL 17+ (a
//! standby with `sync_replication_slots = on` keeps it), unless
//! `source.failover = false`; older servers get an ordinary slot.

mod support;

use support::{pg_versions, Sink, TestEnv};

async fn slot_failover(t: &TestEnv, slot: &str) -> Option<bool> {
    let server: i32 = t.pg.query_one("SELECT current_setting('server_version_num')::int", &[]).await.unwrap().get(0);
    if server < 170_000 {
        return None;
    }
    let row = t.pg.query_one("SELECT failover FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.unwrap();
    Some(row.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slot_is_a_failover_slot_where_the_server_has_them() {
    for v in pg_versions() {
        // `init` (through `TestEnv`) creates the slot with the default.
        let t = TestEnv::builder(&v).sinks(&[Sink::ClickHouse]).build().await;
        let exists: bool =
            t.pg.query_one("SELECT count(*) = 1 FROM pg_replication_slots WHERE slot_name = $1", &[&t.cfg.source.slot])
                .await
                .unwrap()
                .get(0);
        assert!(exists, "PG {v}: init created the slot");
        let server: i32 =
            t.pg.query_one("SELECT current_setting('server_version_num')::int", &[]).await.unwrap().get(0);
        assert_eq!(slot_failover(&t, &t.cfg.source.slot).await, (server >= 170_000).then_some(true), "PG {v}");

        // Asked not to: an ordinary slot.
        let off =
            TestEnv::builder(&v).sinks(&[Sink::ClickHouse]).with(|c| c.source.failover = Some(false)).build().await;
        assert_eq!(slot_failover(&off, &off.cfg.source.slot).await, (server >= 170_000).then_some(false), "PG {v}");
    }
}
