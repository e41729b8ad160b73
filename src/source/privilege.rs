//! Running as a least-privilege role. [`grants_sql`] is what an
//! administrator runs once (`pgfanout init --print-sql` prints it) so that
//! the role of `source.url`, neither superuser nor owner of the tables, can
//! run `init --no-source-schema`, `run`, `snapshot` and `backfill`.
//! [`explain`] turns PostgreSQL's refusals for want of a privilege (SQLSTATE
//! 42501: "permission denied for …", "must be owner of …", the REPLICATION
//! attribute) into a [`MissingPrivilege`] that names what is missing and the
//! statement that grants it.
//!
//! What the role needs, and why each:
//! - `LOGIN` and `REPLICATION`: the replication connection and the slot
//!   (created by pgfanout itself, with an exported snapshot).
//! - `USAGE` on the tables' schemas and `SELECT` on the tables: `snapshot`
//!   and `backfill` read them, and the content journal is seeded from
//!   `content`. Decoding the slot needs no privilege on the tables.
//! - The schema `pgfanout_state`, owned by the role: pgfanout creates its
//!   state tables there (content journal, snapshot progress, webhook
//!   progress). Owning one schema is less than `CREATE` on the database,
//!   which would let the role create any schema.
//! - Nothing on the publication: the administrator creates it (which needs
//!   ownership of the tables) with every table of `source.tables` and
//!   `publish_via_partition_root`, and sets `REPLICA IDENTITY FULL` (which
//!   needs ownership too) on the tables and every partition.

use std::error::Error;
use std::str::FromStr;

use super::scan::quote_literal as literal;
use super::slot::quote_ident;
use crate::config::SourceConfig;

/// The schema in the source database where pgfanout keeps its state.
pub const STATE_SCHEMA: &str = "pgfanout_state";

/// The tables pgfanout creates in [`STATE_SCHEMA`] (sql/postgres/*.sql).
const STATE_TABLES: [&str; 5] =
    ["content_journals", "content_versions", "snapshots", "snapshot_chunks", "http_progress"];

/// A statement PostgreSQL refused because the role lacks a privilege.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context} -- role {role} lacks {privilege}; an administrator grants it with: {grant} (`pgfanout init --print-sql` prints everything the role needs)")]
pub struct MissingPrivilege {
    /// What failed, with PostgreSQL's own message.
    pub context: String,
    pub role: String,
    /// What is missing, in words (`SELECT on "public"."content"`).
    pub privilege: String,
    /// The statement(s) that grant it, to run as an administrator.
    pub grant: String,
}

/// The role and database `source.url` connects as (libpq's defaults when
/// the URL leaves them out, as `session::replication_config` takes them).
pub fn target(cfg: &SourceConfig) -> (String, String) {
    let pg = tokio_postgres::Config::from_str(cfg.url.expose()).ok();
    let role = pg.as_ref().and_then(|c| c.get_user()).unwrap_or("postgres").to_string();
    let database = pg.as_ref().and_then(|c| c.get_dbname()).unwrap_or(&role).to_string();
    (role, database)
}

/// A table of `source.tables` as `(schema, name)`; an unqualified name is
/// taken to be in `public` (the default search_path's first writable schema).
fn split_table(t: &str) -> (&str, &str) {
    t.split_once('.').unwrap_or(("public", t))
}

fn qualified(t: &str) -> String {
    let (schema, name) = split_table(t);
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// PostgreSQL's refusal in `err`'s chain, when it is one for want of a
/// privilege (SQLSTATE 42501), as its message; None otherwise.
fn refusal(err: &(dyn Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(db) = e.downcast_ref::<tokio_postgres::error::DbError>() {
            return (*db.code() == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                .then(|| db.message().to_string());
        }
        // The replication connection's errors carry the server's message
        // and its code as text: "<message> (SQLSTATE 42501)".
        if let Some(pgwire_replication::PgWireError::Server(text)) = e.downcast_ref::<pgwire_replication::PgWireError>()
        {
            return text.strip_suffix(" (SQLSTATE 42501)").map(str::to_string);
        }
        cur = e.source();
    }
    None
}

/// What the refusal `message` says is missing, and the statement that
/// grants it to `role`. `tables` (source.tables) qualify a table name the
/// message gives alone.
pub fn needed(message: &str, role: &str, tables: &[String]) -> (String, String) {
    let who = quote_ident(role);
    let object = |prefix: &str| message.strip_prefix(prefix).map(|s| s.trim().trim_matches('"').to_string());
    let lower = message.to_ascii_lowercase();
    if lower.contains("wal sender") || lower.contains("walsender") || lower.contains("replication slot") {
        return (
            "the REPLICATION attribute (for the replication slot and its connection)".into(),
            format!("ALTER ROLE {who} WITH REPLICATION; (Amazon RDS and Aurora: GRANT rds_replication TO {who};)"),
        );
    }
    if let Some(t) = object("permission denied for table ") {
        if STATE_TABLES.contains(&t.as_str()) {
            return (
                format!("ownership of {STATE_SCHEMA}.{t}, one of pgfanout's state tables"),
                format!("ALTER TABLE {STATE_SCHEMA}.{} OWNER TO {who};", quote_ident(&t)),
            );
        }
        let q = tables.iter().find(|c| split_table(c).1 == t).map(|c| qualified(c)).unwrap_or_else(|| quote_ident(&t));
        return (format!("SELECT on {q}"), format!("GRANT SELECT ON TABLE {q} TO {who};"));
    }
    if let Some(s) = object("permission denied for schema ") {
        if s == STATE_SCHEMA {
            return (
                format!("CREATE and USAGE on schema {STATE_SCHEMA}, where pgfanout keeps its state"),
                format!("ALTER SCHEMA {STATE_SCHEMA} OWNER TO {who};"),
            );
        }
        let q = quote_ident(&s);
        return (format!("USAGE on schema {q}"), format!("GRANT USAGE ON SCHEMA {q} TO {who};"));
    }
    // pgfanout creates nothing at the database's level but its state schema
    // (the publication, which needs more, is refused in `slot` with the
    // statement that creates it).
    if let Some(d) = object("permission denied for database ") {
        return (
            format!(
                "schema {STATE_SCHEMA} (pgfanout keeps its state there; creating it needs CREATE on database {})",
                quote_ident(&d)
            ),
            format!("CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA} AUTHORIZATION {who};"),
        );
    }
    if let Some(rest) = object("must be owner of ") {
        if let Some((kind, name)) = rest.split_once(' ') {
            let name = name.trim_matches('"');
            let q = if kind == "table" {
                tables.iter().find(|c| split_table(c).1 == name).map(|c| qualified(c))
            } else {
                None
            }
            .unwrap_or_else(|| quote_ident(name));
            return (
                format!("ownership of {kind} {q} (only its owner may do this)"),
                format!("ALTER {} {q} OWNER TO {who}; or run the statement as its owner", kind.to_ascii_uppercase()),
            );
        }
    }
    ("the privilege PostgreSQL's message names".into(), "the matching GRANT".into())
}

/// `err` explained as a [`MissingPrivilege`] when PostgreSQL refused it for
/// want of a privilege; `err` as it is otherwise (and when it already names
/// what is missing).
pub fn explain<E>(err: E, cfg: &SourceConfig) -> E
where
    E: Error + From<MissingPrivilege> + 'static,
{
    let mut cur: Option<&(dyn Error + 'static)> = Some(&err);
    while let Some(e) = cur {
        if e.is::<MissingPrivilege>() {
            return err;
        }
        cur = e.source();
    }
    let Some(message) = refusal(&err) else { return err };
    let (role, _) = target(cfg);
    let (privilege, grant) = needed(&message, &role, &cfg.tables);
    // tokio-postgres shows a server error as "db error" alone.
    let text = err.to_string();
    let context = if text.contains(&message) { text } else { format!("{text}: {message}") };
    E::from(MissingPrivilege { context, role, privilege, grant })
}

/// What an administrator runs once, connected to the source database as a
/// superuser (or a managed service's administrator), so that the role of
/// `source.url` can run pgfanout. Idempotent: run it again after adding a
/// table to `source.tables`.
pub fn grants_sql(cfg: &SourceConfig) -> String {
    let (role, database) = target(cfg);
    let who = quote_ident(&role);
    let publication = quote_ident(&cfg.publication);
    let tables: Vec<String> = cfg.tables.iter().map(|t| qualified(t)).collect();
    let table_list = tables.join(", ");
    let regclasses = cfg.tables.iter().map(|t| literal(&qualified(t))).collect::<Vec<_>>().join(", ");
    let mut schemas: Vec<String> = cfg.tables.iter().map(|t| quote_ident(split_table(t).0)).collect();
    schemas.sort();
    schemas.dedup();
    let mut add_tables = String::new();
    for (t, q) in cfg.tables.iter().zip(&tables) {
        add_tables.push_str(&format!(
            "    IF NOT (SELECT puballtables FROM pg_publication WHERE pubname = {pubname}) AND NOT EXISTS (
         SELECT FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
          WHERE p.pubname = {pubname} AND r.prrelid = {regclass}::regclass) THEN
      ALTER PUBLICATION {publication} ADD TABLE {q};
    END IF;
",
            pubname = literal(&cfg.publication),
            regclass = literal(&qualified(t)),
        ));
    }
    format!(
        "-- pgfanout: what an administrator runs once so that role {who} can run
-- `pgfanout init --no-source-schema`, `run`, `snapshot` and `backfill` in
-- database {db} as neither superuser nor owner of the tables. Run it
-- connected to that database as a superuser, or on a managed service as its
-- administrator (RDS and Aurora: rds_superuser; Cloud SQL:
-- cloudsqlsuperuser; Azure: azure_pg_admin). Safe to run again, e.g. after
-- adding a table to source.tables. Printed by `pgfanout init --print-sql`.

-- 1. The role: LOGIN, and REPLICATION for the replication slot (pgfanout
--    creates it) and its connection. Set its password yourself (\\password
--    in psql). Amazon RDS and Aurora refuse the REPLICATION attribute: there,
--    create the role without it and GRANT rds_replication TO {who};
DO $pgfanout$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role_lit}) THEN
    CREATE ROLE {who} LOGIN REPLICATION;
  ELSE
    ALTER ROLE {who} LOGIN REPLICATION;
  END IF;
END
$pgfanout$;
GRANT CONNECT ON DATABASE {db} TO {who};

-- 2. Reading the published tables: `snapshot` and `backfill` COPY them and
--    the content journal is seeded from content. The slot itself needs no
--    privilege on them.
GRANT USAGE ON SCHEMA {schemas} TO {who};
GRANT SELECT ON TABLE {table_list} TO {who};

-- 3. REPLICA IDENTITY FULL: updates and deletes carry the whole old row,
--    which the enriched sinks need to retract it. PostgreSQL does not pass
--    it down to partitions, so every partition gets it too; a partition
--    created later starts with DEFAULT: run this again (or ALTER it) then.
DO $pgfanout$
DECLARE
  t regclass;
BEGIN
  FOR t IN
    SELECT r FROM unnest(ARRAY[{regclasses}]::regclass[]) AS r
    UNION
    SELECT p.relid FROM unnest(ARRAY[{regclasses}]::regclass[]) AS r, pg_partition_tree(r) AS p
  LOOP
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', t);
  END LOOP;
END
$pgfanout$;

-- 4. The publication (creating it and adding tables need ownership of the
--    tables). publish_via_partition_root: a partitioned table's changes
--    arrive under its own name, whatever partition holds the row.
DO $pgfanout$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = {pubname}) THEN
    CREATE PUBLICATION {publication} FOR TABLE {table_list} WITH (publish_via_partition_root = true);
  ELSE
    ALTER PUBLICATION {publication} SET (publish_via_partition_root = true);
{add_tables}  END IF;
END
$pgfanout$;

-- 5. Where pgfanout keeps its state (content journal, snapshot progress,
--    webhook progress): a schema the role owns, so it needs no CREATE on the
--    database. pgfanout creates its tables there; tables a run as another
--    role created there before are handed over.
CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA} AUTHORIZATION {who};
ALTER SCHEMA {STATE_SCHEMA} OWNER TO {who};
DO $pgfanout$
DECLARE
  t regclass;
BEGIN
  FOR t IN
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = {state_lit} AND c.relkind IN ('r', 'p')
  LOOP
    EXECUTE format('ALTER TABLE %s OWNER TO %I', t, {role_lit});
  END LOOP;
END
$pgfanout$;
",
        db = quote_ident(&database),
        role_lit = literal(&role),
        pubname = literal(&cfg.publication),
        schemas = schemas.join(", "),
        state_lit = literal(STATE_SCHEMA),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> SourceConfig {
        let mut c: SourceConfig = serde_json::from_value(serde_json::json!({ "url": url })).expect("source config");
        c.publication = "pgfanout".into();
        c.tables = vec!["public.content".into(), "engagement_events".into()];
        c
    }

    const TABLES: [&str; 2] = ["public.content", "sales.engagement_events"];

    fn tables() -> Vec<String> {
        TABLES.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn target_is_the_urls_user_and_database() {
        assert_eq!(target(&cfg("postgres://cdc:pw@db.example:5432/app")), ("cdc".into(), "app".into()));
        assert_eq!(target(&cfg("host=db user=cdc")), ("cdc".into(), "cdc".into()));
    }

    #[test]
    fn each_refusal_names_what_grants_it() {
        // PostgreSQL 16+ wording, then 15's.
        for m in [
            "permission denied to start WAL sender",
            "permission denied to use replication slots",
            "must be superuser or replication role to start walsender",
            "must be superuser or replication role to use replication slots",
        ] {
            let (what, grant) = needed(m, "cdc", &tables());
            assert!(what.contains("REPLICATION"), "{m}: {what}");
            assert!(grant.starts_with("ALTER ROLE \"cdc\" WITH REPLICATION;"), "{m}: {grant}");
        }
        assert_eq!(
            needed("permission denied for table engagement_events", "cdc", &tables()),
            (
                "SELECT on \"sales\".\"engagement_events\"".into(),
                "GRANT SELECT ON TABLE \"sales\".\"engagement_events\" TO \"cdc\";".into()
            )
        );
        assert_eq!(
            needed("permission denied for table content_versions", "cdc", &tables()).1,
            "ALTER TABLE pgfanout_state.\"content_versions\" OWNER TO \"cdc\";"
        );
        assert_eq!(
            needed("permission denied for schema pgfanout_state", "cdc", &tables()).1,
            "ALTER SCHEMA pgfanout_state OWNER TO \"cdc\";"
        );
        assert_eq!(
            needed("permission denied for schema sales", "cdc", &tables()).1,
            "GRANT USAGE ON SCHEMA \"sales\" TO \"cdc\";"
        );
        assert_eq!(
            needed("permission denied for database app", "cdc", &tables()).1,
            "CREATE SCHEMA IF NOT EXISTS pgfanout_state AUTHORIZATION \"cdc\";"
        );
        let (what, grant) = needed("must be owner of table content", "cdc", &tables());
        assert!(what.contains("\"public\".\"content\""), "{what}");
        assert!(grant.starts_with("ALTER TABLE \"public\".\"content\" OWNER TO \"cdc\";"), "{grant}");
        // Anything else still points somewhere useful.
        assert_eq!(needed("permission denied for function f", "cdc", &tables()).1, "the matching GRANT");
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("replication connection failed: {0}")]
        Wire(#[from] pgwire_replication::PgWireError),
        #[error(transparent)]
        Privilege(#[from] MissingPrivilege),
    }

    #[test]
    fn explain_reads_the_replication_connections_refusal() {
        let c = cfg("postgres://cdc@localhost/app");
        let refused =
            pgwire_replication::PgWireError::Server("permission denied to start WAL sender (SQLSTATE 42501)".into());
        let Outer::Privilege(p) = explain(Outer::from(refused), &c) else { panic!("not explained") };
        assert_eq!(p.role, "cdc");
        assert!(p.context.contains("permission denied to start WAL sender"), "{}", p.context);
        assert!(p.to_string().contains("ALTER ROLE \"cdc\" WITH REPLICATION"), "{p}");
        // Another server error is left as it is.
        let other =
            pgwire_replication::PgWireError::Server("replication slot \"s\" does not exist (SQLSTATE 42704)".into());
        assert!(matches!(explain(Outer::from(other), &c), Outer::Wire(_)));
    }

    #[test]
    fn grants_cover_role_tables_partitions_publication_and_state() {
        let sql = grants_sql(&cfg("postgres://cdc:secret@db/app"));
        assert!(!sql.contains("secret"), "no password in the script");
        for want in [
            "CREATE ROLE \"cdc\" LOGIN REPLICATION;",
            "GRANT CONNECT ON DATABASE \"app\" TO \"cdc\";",
            "GRANT USAGE ON SCHEMA \"public\" TO \"cdc\";",
            "GRANT SELECT ON TABLE \"public\".\"content\", \"public\".\"engagement_events\" TO \"cdc\";",
            "pg_partition_tree(r)",
            "REPLICA IDENTITY FULL",
            "CREATE PUBLICATION \"pgfanout\" FOR TABLE \"public\".\"content\", \"public\".\"engagement_events\" WITH (publish_via_partition_root = true);",
            "ALTER PUBLICATION \"pgfanout\" ADD TABLE \"public\".\"engagement_events\";",
            "CREATE SCHEMA IF NOT EXISTS pgfanout_state AUTHORIZATION \"cdc\";",
        ] {
            assert!(sql.contains(want), "missing {want:?} in:\n{sql}");
        }
    }
}
