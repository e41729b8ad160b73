//! The publication and the replication slot: created when missing, checked
//! for the states that would otherwise lose data silently (dropped,
//! invalidated, held by another process).

use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::privilege::{self, MissingPrivilege};
use super::tls::{self, Attempt, Evidence, Link, Negotiation, TlsError, TlsPolicy};
use crate::config::conninfo::{self, ConninfoError, Endpoint, TlsKeys};
use crate::config::SourceConfig;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot connect to PostgreSQL: {}", with_cause(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("invalid PostgreSQL connection string: {0}")]
    Url(#[source] ConninfoError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "found no primary among the hosts of source.url, and pgfanout needs one (it reads its slot and writes its state there): {tried}"
    )]
    NoPrimary { tried: String },
    #[error("PostgreSQL query failed ({what}): {source}")]
    Query { what: &'static str, source: tokio_postgres::Error },
    #[error("wal_level is {0}; logical replication needs wal_level=logical (set it in postgresql.conf and restart)")]
    WalLevel(String),
    #[error("replication slot {slot} was invalidated ({reason}); the WAL it needed is gone: drop it and take a new snapshot (`pgfanout snapshot`)")]
    Invalidated { slot: String, reason: String },
    #[error("replication slot {slot} uses plugin {plugin}, not pgoutput; drop it or configure another slot name")]
    WrongPlugin { slot: String, plugin: String },
    #[error("table {0} named in source.tables does not exist")]
    NoSuchTable(String),
    #[error(transparent)]
    Privilege(#[from] MissingPrivilege),
    #[error("publication {publication} publishes the partitions of {tables} under their own names (publish_via_partition_root is off), which pgfanout would not recognise: run `ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)` (`pgfanout init` does it when its role owns the publication)")]
    PartitionsNotViaRoot { publication: String, tables: String },
}

/// Opens an ordinary (non-replication) connection to the primary among the
/// string's hosts ([`connect_primary`]) and drives it in the background.
pub async fn connect(url: &str) -> Result<Client, SlotError> {
    connect_primary(url).await.map(|(client, _)| client)
}

/// Opens an ordinary connection to the first server of `url` that answers
/// and is not in recovery, trying a multi-host string's hosts in order
/// (libpq's `host=h1,h2`, `postgres://h1:p1,h2:p2/db`), and says which
/// server that is, so that the replication connection goes to the same
/// one. pgfanout reads its slot and writes its state on the primary, so a
/// standby is skipped whatever `target_session_attrs` says (`read-write`
/// also skips a primary whose sessions are read-only, as libpq does);
/// after a promotion the next connection finds the new primary. Each
/// server gets the string's TLS settings (source/tls.rs), verify-full
/// checking that server's own name.
pub async fn connect_primary(url: &str) -> Result<(Client, Endpoint), SlotError> {
    let split = conninfo::split(url).map_err(SlotError::Url)?;
    let pg = split.pg_config().map_err(SlotError::Url)?;
    let endpoints = conninfo::endpoints(&pg).map_err(SlotError::Url)?;
    let read_write = pg.get_target_session_attrs() == TargetSessionAttrs::ReadWrite;
    // Asked here rather than by tokio-postgres (which would refuse a
    // standby as "database does not allow writes"), to say which it was.
    let mut any = pg.clone();
    any.target_session_attrs(TargetSessionAttrs::Any);
    let (keys, any) = (&split.tls, &any);
    first_primary(&endpoints, |server| async move {
        let client = connect_to(keys, any, &server).await?;
        let row = client
            .query_one("SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'", &[])
            .await
            .map_err(query_err("ask whether the server is a standby"))?;
        Ok(match (row.get(0), row.get(1)) {
            (true, _) => Probe::Standby,
            (false, true) if read_write => Probe::ReadOnly,
            _ => Probe::Primary(client),
        })
    })
    .await
}

/// The server of `url` a replication connection of its own should go to:
/// the one server a single-host string names (its connection then fails
/// with its own error, TLS included), else the primary among the hosts,
/// found as [`connect_primary`] finds it.
pub async fn primary(url: &str) -> Result<Endpoint, SlotError> {
    let split = conninfo::split(url).map_err(SlotError::Url)?;
    let servers = conninfo::endpoints(&split.pg_config().map_err(SlotError::Url)?).map_err(SlotError::Url)?;
    match <[Endpoint; 1]>::try_from(servers) {
        Ok([one]) => Ok(one),
        Err(_) => connect_primary(url).await.map(|(_, server)| server),
    }
}

/// What a server turned out to be once connected.
enum Probe<C> {
    Primary(C),
    /// In recovery: a standby, or a server not yet through its promotion.
    Standby,
    /// A primary whose sessions are read-only (`default_transaction_read_only`),
    /// passed over under `target_session_attrs=read-write`.
    ReadOnly,
}

/// The first of `servers` that `probe` finds a primary. A string naming
/// one server keeps that server's own error (a refused login, a failed
/// TLS handshake); with several, the error names each server and why it
/// was passed over.
async fn first_primary<C, F, Fut>(servers: &[Endpoint], mut probe: F) -> Result<(C, Endpoint), SlotError>
where
    F: FnMut(Endpoint) -> Fut,
    Fut: std::future::Future<Output = Result<Probe<C>, SlotError>>,
{
    let mut passed_over = Vec::new();
    for server in servers {
        match probe(server.clone()).await {
            Ok(Probe::Primary(client)) => {
                if !passed_over.is_empty() {
                    tracing::info!(server = %server, passed_over = %passed_over.join("; "), "connected to the primary, passing over the hosts before it");
                }
                return Ok((client, server.clone()));
            }
            Ok(Probe::Standby) => {
                tracing::info!(server = %server, "skipping a standby (in recovery): pgfanout needs the primary");
                passed_over.push(format!("{server}: a standby (in recovery)"));
            }
            Ok(Probe::ReadOnly) => {
                tracing::info!(server = %server, "skipping a server whose sessions are read-only (target_session_attrs=read-write)");
                passed_over.push(format!("{server}: read-only sessions (transaction_read_only is on)"));
            }
            Err(e) if servers.len() == 1 => return Err(e),
            // Said once a primary is found (or in the error): a host that
            // is down after a failover would otherwise log at every connection.
            Err(e) => passed_over.push(format!("{server}: {e}")),
        }
    }
    Err(SlotError::NoPrimary { tried: passed_over.join("; ") })
}

/// A connection to `server` alone, with TLS as `keys` say.
async fn connect_to(keys: &TlsKeys, pg: &tokio_postgres::Config, server: &Endpoint) -> Result<Client, SlotError> {
    let mut one = server.config(pg);
    let policy =
        TlsPolicy::resolve(keys, server.is_tcp()).map_err(|source| TlsError::Config { link: Link::Sql, source })?;
    one.ssl_mode(match policy.negotiation() {
        Negotiation::Plain => SslMode::Disable,
        Negotiation::Prefer => SslMode::Prefer,
        Negotiation::Require => SslMode::Require,
    });
    let probe = server.is_tcp().then(|| (server.dial(), server.port));
    let (attempt, tls_config) = Attempt::new(Link::Sql, policy, server.to_string(), server.name(), probe)?;
    let (client, conn) = match one.connect(MakeRustlsConnect::new(tls_config)).await {
        Ok(connected) => connected,
        Err(e) => return Err(explain(e, &attempt).await),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// tokio-postgres's error with what caused it ("db error" alone does not
/// say that the server refused the login, nor "error connecting to server"
/// why): a log line shows the top error only.
fn with_cause(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A failed connect as a TLS error when TLS is what failed, else as it came.
async fn explain(e: tokio_postgres::Error, attempt: &Attempt) -> SlotError {
    let login_refused = e
        .as_db_error()
        .filter(|db| db.code() == &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
        .map(|db| db.message().to_string());
    let evidence = Evidence {
        rustls: tls::find_rustls_error(&e),
        // Neither the server's answer nor an I/O failure (the server not
        // there, the connection reset): TLS negotiation itself failed.
        negotiation_failed: e.as_db_error().is_none()
            && std::error::Error::source(&e).map_or(true, |s| !s.is::<std::io::Error>()),
        login_refused,
    };
    match attempt.explain(evidence).await {
        Some(tls) => SlotError::Tls(tls),
        None => SlotError::Connect(e),
    }
}

/// Runs `body` (not started yet: futures are lazy) between `begin` and
/// COMMIT, rolling back when it fails.
pub async fn transaction<T>(
    client: &Client,
    begin: &str,
    body: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    client.batch_execute(begin).await?;
    match body.await {
        Ok(v) => {
            client.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// The slot as PostgreSQL reports it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush_lsn: Option<u64>,
    pub active_pid: Option<i32>,
}

/// Maps a failed query to a `SlotError` naming what it was for.
pub fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SlotError {
    move |source| SlotError::Query { what, source }
}

/// Maps a failed publication statement: refused for want of a privilege,
/// to the error that gives an administrator the statement itself (the role
/// pgfanout runs as usually owns neither the tables nor the publication).
fn publication_err(
    what: &'static str,
    cfg: &SourceConfig,
    statement: &str,
) -> impl FnOnce(tokio_postgres::Error) -> SlotError {
    let (role, _) = privilege::target(cfg);
    let statement = format!("{statement};");
    move |source| {
        if source.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            return SlotError::Query { what, source };
        }
        SlotError::Privilege(MissingPrivilege {
            context: format!("cannot {what}: {source}"),
            role,
            privilege:
                "ownership of the published tables and of the publication (and CREATE on the database to create it)"
                    .into(),
            grant: statement,
        })
    }
}

/// Checks `wal_level` and creates the publication when it is missing (the
/// snapshot creates its slot itself, with an exported snapshot). When it
/// exists but its tables are not `source.tables`, warns naming the tables:
/// changes of a table missing from it never reach pgfanout (`pgfanout init`
/// adds them, see [`add_missing_publication_tables`]). A partitioned table
/// must be published via its root (its changes would otherwise arrive as
/// its partitions'): a new publication is created so, an existing one
/// without it is refused, and partitions whose replica identity is not
/// their table's are warned about.
pub async fn ensure_publication(client: &Client, cfg: &SourceConfig) -> Result<(), SlotError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(query_err("SHOW wal_level"))?.get(0);
    if wal_level != "logical" {
        return Err(SlotError::WalLevel(wal_level));
    }
    let partitioned = partitioned_tables(client, cfg).await?;
    match publication_diff(client, cfg).await? {
        None => {
            let tables: Vec<String> = resolve_tables(client, cfg).await?.iter().map(|t| t.quoted()).collect();
            // A partitioned table's changes then arrive as its own (with
            // its OID and name), whatever partition holds the row; without
            // it they would arrive as each partition's.
            let via_root = if partitioned.is_empty() { "" } else { " WITH (publish_via_partition_root = true)" };
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}{via_root}",
                quote_ident(&cfg.publication),
                tables.join(", ")
            );
            client.batch_execute(&sql).await.map_err(publication_err("create the publication", cfg, &sql))?;
            tracing::info!(publication = %cfg.publication, tables = ?cfg.tables, via_partition_root = !partitioned.is_empty(), "created publication");
        }
        Some(diff) if !diff.via_root && !partitioned.is_empty() => {
            return Err(SlotError::PartitionsNotViaRoot {
                publication: cfg.publication.clone(),
                tables: names(&partitioned),
            });
        }
        Some(diff) if !diff.missing.is_empty() || !diff.extra.is_empty() => {
            tracing::warn!(
                publication = %cfg.publication,
                missing = %names(&diff.missing),
                extra = %names(&diff.extra),
                "the publication and source.tables disagree: changes of the missing tables are not streamed (`pgfanout init` adds them), those of the extra ones are"
            );
        }
        Some(_) => {}
    }
    warn_partition_identity(client, cfg, &partitioned).await
}

/// Warns naming the partitions whose replica identity differs from their
/// published root's: PostgreSQL does not pass `REPLICA IDENTITY` down, and a
/// partition created later starts with DEFAULT, so its updates and deletes
/// carry only the key of the old row (the enriched sinks cannot retract
/// what it counted).
async fn warn_partition_identity(
    client: &Client,
    cfg: &SourceConfig,
    partitioned: &[PgTable],
) -> Result<(), SlotError> {
    if partitioned.is_empty() {
        return Ok(());
    }
    let roots: Vec<String> = partitioned.iter().map(|t| t.quoted()).collect();
    let rows = client
        .query(
            "SELECT p.relid::regclass::text FROM unnest($1::text[]) AS t, pg_partition_tree(t::regclass) AS p
               JOIN pg_class c ON c.oid = p.relid
              WHERE p.level > 0 AND c.relreplident <> (SELECT relreplident FROM pg_class WHERE oid = t::regclass)",
            &[&roots],
        )
        .await
        .map_err(query_err("read the partitions' replica identity"))?;
    if !rows.is_empty() {
        let fix: Vec<String> =
            rows.iter().map(|r| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", r.get::<_, String>(0))).collect();
        tracing::warn!(publication = %cfg.publication, fix = %fix.join(" "), "partitions of a published table have another replica identity than the table: their updates and deletes do not carry the whole old row, so the enriched sinks cannot retract what the old row counted; give them the table's");
    }
    Ok(())
}

/// For `pgfanout init`: adds the tables of `source.tables` that an existing
/// publication lacks (ALTER PUBLICATION … ADD TABLE), logs what it changed,
/// and returns the tables added. Changes committed from then on are
/// streamed; rows the tables already held are not (a backfill or
/// `pgfanout snapshot` loads them). Tables the publication has beyond
/// `source.tables` are left alone (other consumers may read them) and
/// reported. A missing publication is left to [`ensure_publication`]. An
/// existing one that publishes a partitioned table's partitions under their
/// own names is switched to `publish_via_partition_root` first.
pub async fn add_missing_publication_tables(client: &Client, cfg: &SourceConfig) -> Result<Vec<String>, SlotError> {
    let Some(mut diff) = publication_diff(client, cfg).await? else { return Ok(Vec::new()) };
    let partitioned = partitioned_tables(client, cfg).await?;
    if !diff.via_root && !partitioned.is_empty() {
        let sql =
            format!("ALTER PUBLICATION {} SET (publish_via_partition_root = true)", quote_ident(&cfg.publication));
        client.batch_execute(&sql).await.map_err(publication_err("publish partitions via their root", cfg, &sql))?;
        tracing::info!(publication = %cfg.publication, tables = %names(&partitioned), "the publication now publishes partitioned tables via their root: their changes arrive under the table's name");
        // The publication's table list is the roots' from now on.
        diff = publication_diff(client, cfg).await?.unwrap_or(diff);
    }
    if !diff.extra.is_empty() {
        tracing::warn!(publication = %cfg.publication, extra = %names(&diff.extra), "the publication has tables that source.tables does not name; left as they are");
    }
    if diff.missing.is_empty() {
        return Ok(Vec::new());
    }
    let tables: Vec<String> = diff.missing.iter().map(|t| t.quoted()).collect();
    let sql = format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(&cfg.publication), tables.join(", "));
    client.batch_execute(&sql).await.map_err(publication_err("add tables to the publication", cfg, &sql))?;
    let added: Vec<String> = diff.missing.iter().map(|t| t.to_string()).collect();
    tracing::info!(publication = %cfg.publication, added = %added.join(", "), "added tables to the publication: their changes are streamed from now on, rows they already hold are not (backfill or snapshot them)");
    Ok(added)
}

/// A table as PostgreSQL names it (schema and name, unquoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PgTable {
    schema: String,
    name: String,
}

impl PgTable {
    fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for PgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

fn names(tables: &[PgTable]) -> String {
    tables.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

/// `source.tables` resolved the way PostgreSQL resolves them (search_path,
/// quoting), so they compare with the publication's.
async fn resolve_tables(client: &Client, cfg: &SourceConfig) -> Result<Vec<PgTable>, SlotError> {
    let mut out = Vec::new();
    for t in &cfg.tables {
        let row = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass($1)",
                &[t],
            )
            .await
            .map_err(query_err("look up table"))?
            .ok_or_else(|| SlotError::NoSuchTable(t.clone()))?;
        out.push(PgTable { schema: row.get(0), name: row.get(1) });
    }
    Ok(out)
}

/// The tables of `source.tables` that are partitioned.
async fn partitioned_tables(client: &Client, cfg: &SourceConfig) -> Result<Vec<PgTable>, SlotError> {
    Ok(client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM unnest($1::text[]) AS t
               JOIN pg_class c ON c.oid = to_regclass(t) JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'p' ORDER BY 1, 2",
            &[&cfg.tables],
        )
        .await
        .map_err(query_err("look up partitioned tables"))?
        .iter()
        .map(|r| PgTable { schema: r.get(0), name: r.get(1) })
        .collect())
}

/// How the publication's tables differ from `source.tables`; None when
/// there is no such publication.
struct PublicationDiff {
    missing: Vec<PgTable>,
    extra: Vec<PgTable>,
    /// `publish_via_partition_root`: a partitioned table is listed (and its
    /// changes sent) as itself, not as its partitions.
    via_root: bool,
}

async fn publication_diff(client: &Client, cfg: &SourceConfig) -> Result<Option<PublicationDiff>, SlotError> {
    let Some(row) = client
        .query_opt("SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1", &[&cfg.publication])
        .await
        .map_err(query_err("look up publication"))?
    else {
        return Ok(None);
    };
    let all_tables: bool = row.get(0);
    let via_root: bool = row.get(1);
    let published: Vec<PgTable> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(query_err("list publication tables"))?
        .iter()
        .map(|r| PgTable { schema: r.get(0), name: r.get(1) })
        .collect();
    let wanted = resolve_tables(client, cfg).await?;
    let mut missing: Vec<PgTable> = wanted.iter().filter(|t| !published.contains(t)).cloned().collect();
    // FOR ALL TABLES: every table is in it, the others are not "extra".
    let mut extra: Vec<PgTable> =
        if all_tables { Vec::new() } else { published.into_iter().filter(|t| !wanted.contains(t)).collect() };
    missing.sort();
    missing.dedup();
    extra.sort();
    Ok(Some(PublicationDiff { missing, extra, via_root }))
}

/// The slot, when it exists, refusing one that can no longer be trusted.
/// Creating it is `enrich::journal::prepare`'s job: a new slot is created
/// with an exported snapshot, in which the content journal is seeded.
pub async fn check(client: &Client, cfg: &SourceConfig) -> Result<Option<SlotState>, SlotError> {
    let slot = client
        .query_opt("SELECT plugin, confirmed_flush_lsn::text, active_pid, wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&cfg.slot])
        .await
        .map_err(query_err("look up slot"))?;
    let Some(row) = slot else { return Ok(None) };
    let plugin: String = row.get(0);
    if plugin != "pgoutput" {
        return Err(SlotError::WrongPlugin { slot: cfg.slot.clone(), plugin });
    }
    let wal_status: Option<String> = row.get(3);
    if wal_status.as_deref() == Some("lost") {
        return Err(SlotError::Invalidated { slot: cfg.slot.clone(), reason: "wal_status = lost".into() });
    }
    Ok(Some(SlotState { confirmed_flush_lsn: parse_lsn(row.get(1)), active_pid: row.get(2) }))
}

/// Reads the slot's state (None when the slot does not exist).
pub async fn state(client: &Client, slot: &str) -> Result<Option<SlotState>, SlotError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("read slot"))?;
    Ok(row.map(|r| SlotState { confirmed_flush_lsn: parse_lsn(r.get(0)), active_pid: r.get(1) }))
}

fn parse_lsn(s: Option<String>) -> Option<u64> {
    s.and_then(|s| super::Lsn::parse(&s).ok()).map(|l| l.0)
}

/// Quotes an SQL identifier (doubling embedded quotes).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(conninfo: &str) -> Vec<Endpoint> {
        conninfo::endpoints(&conninfo::split(conninfo).unwrap().pg_config().unwrap()).unwrap()
    }

    /// Probes that find each server as `roles` says: `p` primary, `s`
    /// standby, `r` read-only, `x` unreachable; returns the chosen server
    /// and how many were probed.
    async fn choose(conninfo: &str, roles: &str) -> (Result<Endpoint, SlotError>, usize) {
        let servers = servers(conninfo);
        let mut probed = 0;
        let chosen = first_primary(&servers, |server| {
            let role = roles.as_bytes()[servers.iter().position(|s| *s == server).unwrap()];
            probed += 1;
            async move {
                match role {
                    b'p' => Ok(Probe::Primary(())),
                    b's' => Ok(Probe::Standby),
                    b'r' => Ok(Probe::ReadOnly),
                    _ => Err(SlotError::Url(ConninfoError::NoHost)),
                }
            }
        })
        .await;
        (chosen.map(|(_, server)| server), probed)
    }

    #[tokio::test]
    async fn the_first_primary_is_chosen_and_standbys_are_passed_over() {
        let url = "postgresql://u@h1:5433,h2:5434,h3:5435/db?target_session_attrs=read-write";
        let (chosen, probed) = choose(url, "ppp").await;
        assert_eq!((chosen.unwrap().to_string(), probed), ("h1:5433".into(), 1), "the first one, nothing more asked");
        let (chosen, probed) = choose(url, "sxp").await;
        assert_eq!((chosen.unwrap().to_string(), probed), ("h3:5435".into(), 3));
        let (chosen, _) = choose(url, "rsp").await;
        assert_eq!(chosen.unwrap().to_string(), "h3:5435");
        // After a promotion: the old primary gone, the promoted standby next.
        let (chosen, _) = choose("host=h1,h2 port=5433,5434", "xp").await;
        assert_eq!(chosen.unwrap().to_string(), "h2:5434");
    }

    #[tokio::test]
    async fn without_a_primary_the_error_names_every_host_tried() {
        let (chosen, _) = choose("host=h1,h2,h3 port=5433,5434,5435", "xsr").await;
        let e = chosen.unwrap_err().to_string();
        assert!(e.contains("h3:5435: read-only sessions (transaction_read_only is on)"), "{e}");
        assert!(e.starts_with("found no primary among the hosts of source.url"), "{e}");
        assert!(
            e.contains("h1:5433: invalid PostgreSQL connection string: the connection string names no host"),
            "{e}"
        );
        assert!(e.contains("h2:5434: a standby (in recovery)"), "{e}");
        // One host: its own error, as it came.
        let (chosen, _) = choose("host=h1", "x").await;
        assert!(matches!(chosen, Err(SlotError::Url(ConninfoError::NoHost))));
        let (chosen, _) = choose("host=h1", "s").await;
        assert!(chosen.unwrap_err().to_string().ends_with("h1:5432: a standby (in recovery)"));
    }
}
