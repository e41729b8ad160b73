//! The replication session: streams the slot with pgwire-replication, decodes
//! each message with our pgoutput decoder, and hands changes to the pipeline
//! in commit order (a transaction the server streams while in progress is
//! held in `streamed` until its commit) through a bounded channel (a full
//! channel slows reading; pgwire-replication keeps answering keepalives
//! meanwhile). Acknowledged
//! positions come back through a watch channel and are reported to the
//! server as the slot's flush LSN.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::{mpsc, watch};

use super::pgoutput::{pg_ts_to_unix_micros, DecodeError, Decoder, Message};
use super::relations::{self, RelationError, Relations};
use super::slot::{self, SlotError};
use super::streamed::{InProgress, SpillError};
use super::tls::{self, Attempt, Evidence, Link, Negotiation, TlsError, TlsPolicy};
use super::{Change, Op, Position, Row, SourceEvent, TxInfo};
use crate::config::conninfo::{self, Endpoint};
use crate::config::SourceConfig;
use crate::observe::{ReaderProgress, TableCounters};
use crate::retry::{Alert, Attempts, ErrorClass, Policy};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid source.url: {0}")]
    Url(String),
    #[error("replication connection failed: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Tls(TlsError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Relation(#[from] RelationError),
    #[error("replication slot {slot} is active for PID {pid}: another pgfanout (or client) is reading it; stop it, or terminate that backend with pg_terminate_backend({pid})")]
    SlotBusy { slot: String, pid: String },
    #[error("change outside a transaction at LSN {0}")]
    NoTransaction(String),
    #[error("reading the catalog (primary keys, types, server version) before streaming: {0}")]
    Catalog(#[source] SlotError),
    #[error("the replication reader's thread failed: {0}")]
    Thread(String),
    #[error(transparent)]
    Spill(#[from] SpillError),
}

impl SessionError {
    /// Errors that a new connection may cure.
    pub fn is_transient(&self) -> bool {
        // A walsender terminated by an administrator (57P01) or a server
        // restart is worth reconnecting to, like an I/O error.
        match self {
            SessionError::Replication(e) => e.is_transient() || e.to_string().contains("terminating connection"),
            // No SQLSTATE means the connection itself failed (I/O, closed).
            SessionError::Catalog(SlotError::Connect(e) | SlotError::Query { source: e, .. }) => {
                e.code().is_none() || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
            }
            // A failover under way: the old primary gone, the standby not
            // promoted yet. The next attempt finds the new one.
            SessionError::Catalog(SlotError::NoPrimary { .. }) => true,
            _ => false,
        }
    }
}

/// Builds pgwire-replication's config from `source.url` (libpq URL or
/// key=value form) for `primary`, the server of the URL the SQL side chose
/// ([`slot::connect_primary`]: pgwire-replication connects to one host),
/// over the Unix socket when `socket_dir` is configured, with the TLS the
/// URL's libpq keys ask for (verify-full checking `primary`'s name); the
/// `Attempt` explains the connection's failures ([`replication_error`]).
pub fn replication_config(
    cfg: &SourceConfig,
    primary: &Endpoint,
) -> Result<(ReplicationConfig, Attempt), SessionError> {
    let split = conninfo::split(cfg.url.expose()).map_err(|e| SessionError::Url(e.to_string()))?;
    let pg = split.pg_config().map_err(|e| SessionError::Url(e.to_string()))?;
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(&user).to_string();
    let port = primary.port;
    // `Config::load` refuses socket_dir with several hosts: the socket
    // reaches only the server beside pgfanout, which a promotion moves.
    let (host, over_tcp) = match &cfg.socket_dir {
        Some(dir) => (dir.clone(), false),
        None => (primary.name(), primary.is_tcp()),
    };
    // libpq's hostaddr: connect there, check the certificate against host.
    let dial = if over_tcp { primary.dial() } else { host.clone() };
    let rc = if over_tcp {
        ReplicationConfig::new(dial.clone(), user, password, dbname, cfg.slot.clone(), cfg.publication.clone())
            .with_port(port)
    } else {
        ReplicationConfig::unix(host.clone(), port, user, password, dbname, cfg.slot.clone(), cfg.publication.clone())
    };
    let policy = TlsPolicy::resolve(&split.tls, over_tcp)
        .map_err(|source| SessionError::Tls(TlsError::Config { link: Link::Replication, source }))?;
    let negotiation = policy.negotiation();
    let probe = over_tcp.then(|| (dial.clone(), port));
    let (attempt, tls_config) = Attempt::new(Link::Replication, policy, format!("{host}:{port}"), host.clone(), probe)
        .map_err(SessionError::Tls)?;
    let mut tls = match negotiation {
        Negotiation::Plain => TlsConfig::disabled(),
        Negotiation::Prefer => TlsConfig { mode: pgwire_replication::SslMode::Prefer, ..TlsConfig::disabled() },
        Negotiation::Require => TlsConfig::require(),
    };
    if negotiation != Negotiation::Plain {
        tls = tls.with_rustls_client_config(Arc::new(tls_config)).with_sni_hostname(host);
    }
    let rc = rc
        .with_tls(tls)
        .with_status_interval(Duration::from_millis(cfg.status_interval_ms))
        .with_application_name("pgfanout");
    // libpq's `options` (e.g. `-c logical_decoding_work_mem=256MB`) applies
    // to the walsender too, as it would for pg_recvlogical.
    let rc = match pg.get_options() {
        Some(options) => rc.with_options(options),
        None => rc,
    };
    Ok((rc, attempt))
}

/// A replication connection's failure as a TLS error when TLS is what
/// failed (the certificate, the client certificate, a server without TLS,
/// a plain connection refused), else given back as it came.
pub async fn explain_replication_error(e: PgWireError, tls: &Attempt) -> Result<TlsError, PgWireError> {
    let evidence = match &e {
        PgWireError::Io(io) => Evidence { rustls: tls::find_rustls_error(io.as_ref()), ..Default::default() },
        // pgwire-replication writes the server's SQLSTATE into its text.
        PgWireError::Server(msg) if msg.contains("SQLSTATE 28000") => {
            Evidence { login_refused: Some(msg.clone()), ..Default::default() }
        }
        PgWireError::Tls(_) => Evidence { negotiation_failed: true, ..Default::default() },
        _ => Evidence::default(),
    };
    match tls.explain(evidence).await {
        Some(t) => Ok(t),
        None => Err(e),
    }
}

/// The prefix of the heartbeat messages (see `source.heartbeat_ms`).
pub const HEARTBEAT_PREFIX: &str = "pgfanout-heartbeat";

/// How long a start-up waits for a slot held by a connection that died.
const SLOT_BUSY_PATIENCE: Duration = Duration::from_secs(90);

/// What this process has handed to the pipeline, kept across reconnects: a
/// new connection replays from the acknowledged position, and whatever was
/// handed over already (in flight in the pipeline, or flushed) is skipped
/// instead of reaching the log and the sinks a second time. Positions and
/// commits only grow in the stream, so one high-water mark of each suffices.
#[derive(Default)]
struct Handed {
    change: Position,
    commit_end: u64,
}

/// State of the transaction being read.
struct OpenTx {
    info: TxInfo,
    ordinal: u32,
}

/// Runs [`read`] on a thread of its own with a single-threaded runtime and
/// returns a handle to await its end. pgwire-replication's socket task and
/// our decoding loop then hand each message over within one thread: on a
/// shared multi-threaded runtime every message woke a parked worker (a futex
/// wake and a context switch per message), which cost about as much CPU as
/// decoding, on a machine where the walsender needs a core of its own.
pub fn spawn(
    cfg: SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    acks: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    progress: Arc<ReaderProgress>,
) -> tokio::task::JoinHandle<Result<(), SessionError>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new().name("pgfanout-source".into()).spawn(move || {
        let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(read(cfg, out, acks, shutdown, progress)),
            Err(e) => Err(SessionError::Thread(format!("starting its runtime: {e}"))),
        };
        let _ = done_tx.send(result);
    });
    tokio::spawn(async move {
        started.map_err(|e| SessionError::Thread(e.to_string()))?;
        done_rx.await.unwrap_or_else(|_| Err(SessionError::Thread("it panicked".into())))
    })
}

/// Reads the slot until `shutdown` turns true, reconnecting on transient
/// errors from the slot's confirmed position. Each reconnect replays what
/// was not acknowledged; sinks are idempotent, so that is safe.
pub async fn read(
    cfg: SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    mut acks: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    progress: Arc<ReaderProgress>,
) -> Result<(), SessionError> {
    // Every error the reader retries is transient: nothing it reads can be
    // parked, so what it cannot get past stops it (`Fatal`).
    let policy = Policy {
        what: "replication",
        failed: "replication connection lost; reconnecting",
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
        permanent_attempts: None,
        transient_attempts: None,
        // A session that streamed for a while was healthy: the next
        // reconnect starts from the shortest delay again.
        healthy_after: Some(Duration::from_secs(10)),
        alert: Alert::Errors,
    };
    let mut attempts = Attempts::new(&policy);
    let started = std::time::Instant::now();
    // Dropped (and so aborted) when reading ends, however it ends.
    let mut heartbeat = tokio::task::JoinSet::new();
    if cfg.heartbeat_ms > 0 {
        heartbeat.spawn(emit_heartbeats(cfg.url.expose().to_string(), Duration::from_millis(cfg.heartbeat_ms)));
    }
    // Set when a binary stream met a type it cannot decode: text from then on.
    let mut text_only = false;
    let mut handed = Handed::default();
    loop {
        attempts.begin();
        let streamed = stream_once(&cfg, text_only, &out, &mut acks, &mut shutdown, &progress, &mut handed).await;
        progress.set_connected(false);
        let e = match streamed {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let class = match &e {
            // Replaying from the acknowledged position is safe (sinks are
            // idempotent), so switching the format costs one reconnect.
            SessionError::Relation(RelationError::NotBinary { .. }) if cfg.binary.is_none() => {
                tracing::info!(reason = %e, "reading the slot in text from here on");
                text_only = true;
                continue;
            }
            // After a crash the server may hold the slot for the dead
            // connection until it notices (at most wal_sender_timeout):
            // wait for it, then give up with the clear error.
            SessionError::SlotBusy { .. } if started.elapsed() < SLOT_BUSY_PATIENCE => ErrorClass::Transient,
            e if e.is_transient() && !*shutdown.borrow() => ErrorClass::Transient,
            _ => ErrorClass::Fatal,
        };
        attempts.failed(e, class).await.map_err(|g| g.error)?;
    }
}

async fn stream_once(
    cfg: &SourceConfig,
    text_only: bool,
    out: &mpsc::Sender<SourceEvent>,
    acks: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    progress: &ReaderProgress,
    handed: &mut Handed,
) -> Result<(), SessionError> {
    let acked = *acks.borrow();
    let catalog = Catalog::load(cfg).await?;
    let binary = !text_only && cfg.binary.unwrap_or(catalog.binary_ok);
    let proto = cfg.proto_version_for(catalog.server_version);
    let (rc, tls) = replication_config(cfg, &catalog.primary)?;
    let mut rc = rc.with_ack_lsn(Lsn(acked)).with_binary(binary).with_proto_version(proto);
    if proto >= 2 {
        // "parallel" (protocol 4) is "on" plus the abort's LSN and time.
        rc = rc.with_streaming(if proto >= 4 { "parallel" } else { "on" });
    }
    let mut relations = Relations::new(catalog.primary_keys, catalog.types, binary && cfg.binary.is_none());
    relations.set_not_null(catalog.not_null);
    let mut client = match ReplicationClient::connect(rc).await {
        Ok(client) => client,
        Err(e) => return Err(replication_error(e, &cfg.slot, &tls).await),
    };
    tracing::info!(slot = %cfg.slot, publication = %cfg.publication, server = %catalog.primary, binary, proto_version = proto, "replication started");
    progress.set_connected(true);
    let mut read = TableCounters::new("read");
    let mut decoder = Decoder::new(proto);
    let mut streams =
        InProgress::new(cfg.stream_buffer_mb << 20, cfg.spill_dir.clone().unwrap_or_else(std::env::temp_dir));
    // The top-level xid of the streamed block being read.
    let mut streaming_xid = 0u32;
    let mut open: Option<OpenTx> = None;
    let mut last_idle = 0u64;
    let mut last_reported = acked;
    // Debezium's "last committed LSN" (source.sequence): the previous
    // commit's end, the start position before the first.
    let mut last_commit_end = acked;
    loop {
        let ev = tokio::select! {
            ev = client.recv() => ev,
            r = acks.changed() => {
                if r.is_ok() {
                    let lsn = *acks.borrow_and_update();
                    if lsn > last_reported {
                        client.update_applied_lsn(Lsn(lsn));
                        last_reported = lsn;
                    }
                }
                continue;
            }
            _ = shutdown.changed() => {
                // The last acknowledgement may have come with the stop.
                let lsn = *acks.borrow_and_update();
                if lsn > last_reported {
                    client.update_applied_lsn(Lsn(lsn));
                }
                // pgwire-replication stops without a last status update:
                // give it one status interval to report the final position.
                tokio::time::sleep(Duration::from_millis(cfg.status_interval_ms + 100)).await;
                client.stop();
                return Ok(());
            }
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ok(()),
            // The connection is made in the background: TLS and login
            // failures arrive here, as the first event.
            Err(e) => return Err(replication_error(e, &cfg.slot, &tls).await),
        };
        let event = match ev {
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                progress.saw_server_wal_end(wal_end.0);
                if open.is_some() || wal_end.0 <= last_idle {
                    continue;
                }
                last_idle = wal_end.0;
                SourceEvent::Idle { wal_end: wal_end.0 }
            }
            ReplicationEvent::XLogData { wal_start, wal_end, data, .. } => {
                progress.saw_server_wal_end(wal_end.0);
                // Inside a streamed block everything but its Stream Stop
                // belongs to a transaction that has not committed: held, and
                // decoded only if it commits.
                if decoder.in_stream() && data.first() != Some(&b'E') {
                    streams.push(streaming_xid, wal_start.0, &data)?;
                    continue;
                }
                match decoder.decode_bytes(&data, wal_start.0)? {
                    Message::Begin { final_lsn, commit_ts, xid } => {
                        let info = TxInfo {
                            xid,
                            commit_lsn: final_lsn,
                            commit_ts_us: pg_ts_to_unix_micros(commit_ts),
                            last_commit_lsn: last_commit_end,
                        };
                        open = Some(OpenTx { info, ordinal: 0 });
                        continue;
                    }
                    Message::Commit { end_lsn, .. } => match open.take() {
                        Some(tx) => {
                            last_commit_end = end_lsn;
                            SourceEvent::Commit { end_lsn, tx: tx.info }
                        }
                        None => continue,
                    },
                    // A non-transactional message (our heartbeat, or anyone's)
                    // is decoded in WAL order between transactions: every
                    // commit before its LSN has been sent, so it is a position
                    // to acknowledge once the pipeline is empty, like a
                    // keepalive's. Its content is no change and goes nowhere.
                    Message::LogicalMessage { transactional: false, lsn, .. } => {
                        if open.is_some() || lsn <= last_idle {
                            continue;
                        }
                        last_idle = lsn;
                        SourceEvent::Idle { wal_end: lsn }
                    }
                    Message::StreamStart { xid, .. } => {
                        streaming_xid = xid;
                        continue;
                    }
                    Message::StreamAbort { xid, sub_xid, .. } => {
                        streams.abort(xid, sub_xid)?;
                        continue;
                    }
                    Message::StreamCommit { xid, commit_lsn, end_lsn, commit_ts, .. } => {
                        let info = TxInfo {
                            xid,
                            commit_lsn,
                            commit_ts_us: pg_ts_to_unix_micros(commit_ts),
                            last_commit_lsn: last_commit_end,
                        };
                        last_commit_end = end_lsn;
                        let mut tx = OpenTx { info, ordinal: 0 };
                        let mut held = streams.commit(xid)?;
                        while let Some((lsn, bytes)) = held.next_message()? {
                            let msg = decoder.decode_streamed(&bytes, lsn)?;
                            let to = Output { out, read: &mut read, progress, handed: &mut *handed, source: cfg };
                            if !forward(msg, lsn, &mut relations, Some(&mut tx), to).await? {
                                return Ok(());
                            }
                        }
                        SourceEvent::Commit { end_lsn, tx: tx.info }
                    }
                    msg => {
                        let to = Output { out, read: &mut read, progress, handed: &mut *handed, source: cfg };
                        if !forward(msg, wal_start.0, &mut relations, open.as_mut(), to).await? {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
            ReplicationEvent::StoppedAt { .. } => continue,
        };
        if let SourceEvent::Commit { end_lsn, .. } = event {
            if end_lsn <= handed.commit_end {
                continue;
            }
            handed.commit_end = end_lsn;
        }
        if out.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Where decoded changes go, and what is counted on the way.
struct Output<'a> {
    out: &'a mpsc::Sender<SourceEvent>,
    read: &'a mut TableCounters<super::TableName>,
    progress: &'a ReaderProgress,
    handed: &'a mut Handed,
    source: &'a SourceConfig,
}

/// Sends the changes `msg` carries to the pipeline, but those it was handed
/// before a reconnect; `false` when the pipeline has gone (shutting down).
async fn forward(
    msg: Message,
    lsn: u64,
    relations: &mut Relations,
    tx: Option<&mut OpenTx>,
    to: Output<'_>,
) -> Result<bool, SessionError> {
    if let Message::Relation(rel) = &msg {
        if relations.knows(rel.rel_id) {
            // Sent again after DDL: the key may have changed with the
            // columns. The catalog says what it is now (a later DDL of the
            // same table, not yet streamed, would show here early; it comes
            // with its own Relation message, which reads it again).
            let client = slot::connect(to.source.url.expose()).await.map_err(SessionError::Catalog)?;
            let keys = relations::primary_keys(&client, &to.source.publication)
                .await
                .map_err(|source| SessionError::Catalog(slot::query_err("read primary keys again")(source)))?;
            let not_null = relations::not_null_columns(&client, &to.source.publication)
                .await
                .map_err(|source| SessionError::Catalog(slot::query_err("read NOT NULL columns again")(source)))?;
            relations.set_primary_keys(keys);
            relations.set_not_null(not_null);
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), "relation changed; its columns and key are read again");
        }
    }
    for change in changes(msg, relations, tx, lsn)? {
        if change.position <= to.handed.change {
            continue;
        }
        to.handed.change = change.position;
        to.read.add(&change.table, 1);
        to.progress.buffered_one();
        if to.out.send(SourceEvent::Change(Box::new(change))).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes a heartbeat message every `every` on an ordinary connection,
/// reconnecting after errors, until aborted. The message is WAL in this
/// database, so the slot's walsender decodes it and sends it to us even when
/// no published table changes (`stream_once` turns it into an Idle position).
async fn emit_heartbeats(url: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = false;
    let sql = format!("SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')");
    loop {
        tick.tick().await;
        let result = async {
            if client.as_ref().map_or(true, |c| c.is_closed()) {
                client = Some(slot::connect(&url).await?);
            }
            let c = client.as_ref().expect("connected above");
            c.execute(sql.as_str(), &[]).await.map_err(|source| SlotError::Query { what: "heartbeat", source })
        }
        .await;
        match result {
            Ok(_) if failing => {
                tracing::info!("heartbeat written again");
                failing = false;
            }
            Ok(_) => {}
            // Once per outage: the replication session reports the outage itself.
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot write the heartbeat; retrying every interval");
                failing = true;
                client = None;
            }
            Err(_) => client = None,
        }
    }
}

/// What a session reads from the catalog before streaming, on an ordinary
/// connection once per session (the primary keys again when a Relation
/// message is re-sent after DDL, see `forward`).
struct Catalog {
    primary_keys: relations::PrimaryKeys,
    not_null: relations::NotNull,
    types: relations::Types,
    /// The server has binary transfer (14+) and every published column has
    /// a type pgfanout decodes in binary.
    binary_ok: bool,
    /// `server_version_num`.
    server_version: i32,
    /// The server it was read from: the replication connection goes there.
    primary: Endpoint,
}

impl Catalog {
    async fn load(cfg: &SourceConfig) -> Result<Catalog, SessionError> {
        let (client, primary) = slot::connect_primary(cfg.url.expose()).await.map_err(SessionError::Catalog)?;
        let err = |what| move |source| SessionError::Catalog(slot::query_err(what)(source));
        let primary_keys =
            relations::primary_keys(&client, &cfg.publication).await.map_err(err("read primary keys"))?;
        let not_null =
            relations::not_null_columns(&client, &cfg.publication).await.map_err(err("read NOT NULL columns"))?;
        let types = relations::Types::load(&client).await.map_err(err("read domains and enums"))?;
        let column_types = relations::published_column_types(&client, &cfg.publication)
            .await
            .map_err(err("read the published columns' types"))?;
        let server_version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(err("read the server version"))?
            .get(0);
        let binary_ok = server_version >= 140_000 && column_types.iter().all(|&t| types.decodes_binary(t));
        Ok(Catalog { primary_keys, not_null, types, binary_ok, server_version, primary })
    }
}

/// A failure of the replication connection: the slot held by another
/// session, TLS, or else as it came.
async fn replication_error(e: PgWireError, slot: &str, tls: &Attempt) -> SessionError {
    let text = e.to_string();
    if let Some(rest) = text.split("is active for PID ").nth(1) {
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        return SessionError::SlotBusy { slot: slot.to_string(), pid };
    }
    match explain_replication_error(e, tls).await {
        Ok(t) => SessionError::Tls(t),
        Err(e) => SessionError::Replication(e),
    }
}

/// Turns one decoded message into the row changes it carries.
fn changes(
    msg: Message,
    relations: &mut Relations,
    open: Option<&mut OpenTx>,
    lsn: u64,
) -> Result<Vec<Change>, SessionError> {
    let make = |shape: &relations::TableShape,
                op,
                key: Row,
                before: Option<Row>,
                after: Option<Row>,
                unchanged_toast: Vec<Arc<str>>|
     -> Result<Change, SessionError> {
        let tx = open.as_ref().map(|t| t.info).ok_or_else(|| SessionError::NoTransaction(Lsn(lsn).to_pg_string()))?;
        Ok(Change {
            table: shape.table.clone(),
            op,
            key,
            before,
            after,
            lsn,
            tx,
            position: Position { commit_lsn: tx.commit_lsn, ordinal: 0 },
            columns: Some(shape.meta.clone()),
            unchanged_toast,
        })
    };
    let mut out = match msg {
        Message::Relation(rel) => {
            relations.learn(&rel)?;
            return Ok(Vec::new());
        }
        Message::Insert { rel_id, new, .. } => {
            let shape = relations.shape(rel_id, lsn)?;
            let after = shape.row(&new, None, lsn)?;
            vec![make(shape, Op::Create, shape.key_of(&after), None, Some(after), Vec::new())?]
        }
        Message::Update { rel_id, old, new, .. } => {
            let shape = relations.shape(rel_id, lsn)?;
            let before = old.as_ref().map(|o| shape.old_row(o, lsn)).transpose()?;
            let mut unchanged = Vec::new();
            let after = shape.row_noting_toast(&new, before.as_ref(), lsn, &mut unchanged)?;
            let key = shape.key_of(&after);
            match before.as_ref().map(|b| shape.key_of(b)).filter(|old_key| *old_key != key) {
                // The key changed (an event's event_ts, where a table
                // partitioned by it has it in its key): a delete under the
                // old key and a create under the new one, as Debezium
                // writes it, so a consumer that keeps rows by key (or a
                // topic compacted by key) does not keep the old one.
                Some(old_key) => vec![
                    make(shape, Op::Delete, old_key, before, None, Vec::new())?,
                    make(shape, Op::Create, key, None, Some(after), unchanged)?,
                ],
                None => vec![make(shape, Op::Update, key, before, Some(after), unchanged)?],
            }
        }
        Message::Delete { rel_id, old, .. } => {
            let shape = relations.shape(rel_id, lsn)?;
            let before = shape.old_row(&old, lsn)?;
            vec![make(shape, Op::Delete, shape.key_of(&before), Some(before), None, Vec::new())?]
        }
        Message::Truncate { rel_ids, .. } => {
            let mut v = Vec::new();
            for rel_id in rel_ids {
                let shape = relations.shape(rel_id, lsn)?;
                v.push(make(shape, Op::Truncate, Row::default(), None, None, Vec::new())?);
            }
            v
        }
        _ => Vec::new(),
    };
    if let Some(tx) = open {
        for c in &mut out {
            tx.ordinal += 1;
            c.position.ordinal = tx.ordinal;
        }
    }
    Ok(out)
}

/// Reads the slot through the decoder up to `until` (a commit end LSN),
/// acknowledging as it goes, with no log and no sinks: the source path
/// alone, for benchmarks against `pg_recvlogical`. Returns the changes read.
pub async fn drain(cfg: &SourceConfig, until: u64) -> Result<u64, SessionError> {
    let (tx, mut rx) = mpsc::channel(20_000);
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = spawn(cfg.clone(), tx, ack_rx, stop_rx, Arc::default());
    let mut changes = 0u64;
    while let Some(ev) = rx.recv().await {
        match ev {
            SourceEvent::Change(_) => changes += 1,
            SourceEvent::Commit { end_lsn, .. } | SourceEvent::Idle { wal_end: end_lsn } => {
                let _ = ack_tx.send(end_lsn);
                if end_lsn >= until {
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(rx);
    match reader.await {
        Ok(r) => r.map(|()| changes),
        Err(_) => Ok(changes),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;

    use super::super::pgoutput::{Cell, Column, OldTuple, Relation, Tuple};
    use super::super::values::Value;
    use super::*;

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// engagement_events partitioned by event_ts: its key is (id, event_ts).
    fn relations() -> Relations {
        let keys = HashMap::from([(7, vec!["id".to_string(), "event_ts".to_string()])]);
        let mut r = Relations::new(keys, relations::Types::default(), false);
        let column = |name: &str, type_oid| Column { key: true, name: name.into(), type_oid, type_modifier: -1 };
        r.learn(&Relation {
            xid: None,
            rel_id: 7,
            namespace: "public".into(),
            name: "engagement_events".into(),
            replica_identity: b'f',
            columns: vec![column("id", 20), column("event_ts", 1184), column("duration_ms", 23)],
        })
        .unwrap();
        r
    }

    fn update(old_ts: &str, new_ts: &str) -> Message {
        Message::Update {
            xid: None,
            rel_id: 7,
            old: Some(OldTuple::Full(Tuple(vec![text("1"), text(old_ts), text("10")]))),
            new: Tuple(vec![text("1"), text(new_ts), text("20")]),
        }
    }

    #[test]
    fn the_replication_connection_goes_to_the_server_the_sql_side_chose() {
        let url = "postgresql://cdc:pw@db1.example:5433,db2.example:5434/app?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/nonexistent/ca.pem";
        let cfg: SourceConfig = serde_json::from_value(serde_json::json!({ "url": url })).unwrap();
        let pg = conninfo::split(url).unwrap().pg_config().unwrap();
        let servers = conninfo::endpoints(&pg).unwrap();
        // The CA file is read when the TLS configuration is built: absent
        // here, which names the replication connection and the file.
        let err = replication_config(&cfg, &servers[1]).err().unwrap().to_string();
        assert!(err.starts_with("replication connection: TLS settings: sslrootcert /nonexistent/ca.pem"), "{err}");

        let plain = url.replace("&sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "&sslmode=require");
        let cfg: SourceConfig = serde_json::from_value(serde_json::json!({ "url": plain })).unwrap();
        let (rc, attempt) = replication_config(&cfg, &servers[1]).unwrap();
        assert_eq!(
            (rc.host.as_str(), rc.port, rc.user.as_str(), rc.database.as_str()),
            ("db2.example", 5434, "cdc", "app")
        );
        assert_eq!(
            rc.tls.sni_hostname.as_deref(),
            Some("db2.example"),
            "the certificate is checked against db2's name"
        );
        assert_eq!(attempt.target, "db2.example:5434");

        // hostaddr: dialled there, the certificate checked against the host's name.
        let kv = "host=a.example,b.example hostaddr=10.0.0.1,10.0.0.2 port=1,2 user=cdc dbname=app sslmode=require";
        let cfg: SourceConfig = serde_json::from_value(serde_json::json!({ "url": kv })).unwrap();
        let servers = conninfo::endpoints(&conninfo::split(kv).unwrap().pg_config().unwrap()).unwrap();
        let (rc, _) = replication_config(&cfg, &servers[1]).unwrap();
        assert_eq!((rc.host.as_str(), rc.port, rc.tls.sni_hostname.as_deref()), ("10.0.0.2", 2, Some("b.example")));
    }

    #[test]
    fn an_update_that_changes_the_key_is_a_delete_and_a_create() {
        let mut r = relations();
        let mut tx = OpenTx { info: TxInfo { xid: 1, commit_lsn: 100, ..TxInfo::default() }, ordinal: 0 };
        let moved =
            changes(update("2026-01-31 23:00:00+00", "2026-02-01 01:00:00+00"), &mut r, Some(&mut tx), 90).unwrap();
        let ops: Vec<Op> = moved.iter().map(|c| c.op).collect();
        assert_eq!(ops, [Op::Delete, Op::Create]);
        let ts = |c: &Change| c.key.get("event_ts").cloned();
        assert_ne!(ts(&moved[0]), ts(&moved[1]), "each under its own key");
        assert_eq!(moved[0].before.as_ref().and_then(|b| b.get("duration_ms")).cloned(), Some(Value::Int4(10)));
        assert!(moved[0].after.is_none() && moved[1].before.is_none());
        assert_eq!(moved[1].after.as_ref().and_then(|a| a.get("duration_ms")).cloned(), Some(Value::Int4(20)));
        assert_eq!((moved[0].position.ordinal, moved[1].position.ordinal), (1, 2));

        // The same key: one update, with its old row.
        let same =
            changes(update("2026-02-01 01:00:00+00", "2026-02-01 01:00:00+00"), &mut r, Some(&mut tx), 95).unwrap();
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].op, Op::Update);
        assert!(same[0].before.is_some());
        assert_eq!(same[0].position.ordinal, 3);
    }
}
