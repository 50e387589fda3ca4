//! `pgsurge install-triggers`: statement-level triggers that announce every write to every table of a database on
//! the invalidation channel, so instances with `[cache] notify` also hear of writes that bypass pgsurge (other
//! services, cron jobs, psql, triggers and cascades). Idempotent; `--drop` removes everything it installed. Tables
//! created later are covered by re-running it, or (as a superuser) by the event trigger it also installs.

use std::time::Duration;

use crate::app::App;
use crate::backend::{Checkout, ReleaseState};
use crate::config::{Config, Settings};
use crate::error::{Error, Result};

/// The schema holding pgsurge's trigger functions (dropped with `--drop`).
const SCHEMA: &str = "pgsurge";
/// The name of the trigger on each table.
pub const TRIGGER: &str = "pgsurge_invalidate";
const EVENT_TRIGGER: &str = "pgsurge_new_tables";

/// Flags of `pgsurge install-triggers`.
#[derive(Debug, Clone, clap::Args)]
pub struct TriggerArgs {
    /// The database to install into: postgres://USER:PASS@HOST:PORT/DB (its user must own the tables).
    #[arg(long, env = "PGSURGE_UPSTREAM")]
    pub upstream: String,
    /// The channel the instances listen on (`[cache] notify_channel`).
    #[arg(long, default_value = "pgsurge_invalidate")]
    pub channel: String,
    /// Remove the triggers, the event trigger and their functions instead.
    #[arg(long)]
    pub drop: bool,
}

/// What was done, for the command's output.
#[derive(Debug, Default)]
pub struct Report {
    pub tables: usize,
    /// (table, why) of tables that could not get a trigger (not their owner, …).
    pub skipped: Vec<(String, String)>,
    pub event_trigger: bool,
}

/// Installs (or with `drop`, removes) the triggers.
pub async fn run(args: &TriggerArgs) -> Result<Report> {
    let channel = &args.channel;
    if channel.is_empty() || !channel.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err(Error::Config(format!("--channel {channel:?}: lower-case letters, digits and _ only")));
    }
    let config = Config::build(Settings { upstream: Some(args.upstream.clone()), ..Default::default() })
        .map_err(|e| Error::Config(e.to_string()))?;
    let app = App::new(config);
    let cfg = app.config.load_full();
    let (db, user) = match (cfg.databases.values().next(), cfg.users.values().next()) {
        (Some(d), Some(u)) => (d.clone(), u.clone()),
        _ => return Err(Error::Config("--upstream names no database".into())),
    };
    let pool = app.pool(&db, &user)?;
    let mut co = pool.checkout(Duration::from_secs(10)).await?;
    let report = if args.drop { remove(&mut co).await } else { install(&mut co, channel).await };
    co.state = ReleaseState::Broken; // closed, not pooled: the command ends here
    report
}

async fn install(co: &mut Checkout, channel: &str) -> Result<Report> {
    let conn = co.conn();
    let function = format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA}; \
         CREATE OR REPLACE FUNCTION {SCHEMA}.notify_write() RETURNS trigger LANGUAGE plpgsql AS $pgsurge$ \
         BEGIN \
           PERFORM pg_catalog.pg_notify(TG_ARGV[0], pg_catalog.json_build_object('void', \
             pg_catalog.json_build_array(pg_catalog.json_build_object('table', TG_TABLE_NAME)))::text); \
           RETURN NULL; \
         END $pgsurge$"
    );
    conn.run_own_query(&function).await?;
    let tables = conn
        .simple_rows(&format!(
            "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema', '{SCHEMA}') AND n.nspname !~ '^pg_(toast|temp)' ORDER BY 1"
        ))
        .await?;
    let mut report = Report::default();
    for table in tables.into_iter().filter_map(|r| r.into_iter().next().flatten()) {
        let sql = format!(
            "DROP TRIGGER IF EXISTS {TRIGGER} ON {table}; CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE \
             ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_write('{channel}')"
        );
        match conn.run_own_query(&sql).await {
            Ok(_) => report.tables += 1,
            Err(e) => report.skipped.push((table, e.to_string())),
        }
    }
    if superuser(co).await? {
        let conn = co.conn();
        let event = format!(
            "CREATE OR REPLACE FUNCTION {SCHEMA}.on_create_table() RETURNS event_trigger LANGUAGE plpgsql AS $pgsurge$ \
             DECLARE r record; \
             BEGIN \
               FOR r IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP \
                 EXECUTE pg_catalog.format('CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s \
                   FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_write(%L)', r.object_identity, '{channel}'); \
               END LOOP; \
             END $pgsurge$; \
             DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER}; \
             CREATE EVENT TRIGGER {EVENT_TRIGGER} ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') \
             EXECUTE FUNCTION {SCHEMA}.on_create_table()"
        );
        conn.run_own_query(&event).await?;
        report.event_trigger = true;
    }
    Ok(report)
}

async fn remove(co: &mut Checkout) -> Result<Report> {
    let mut report = Report::default();
    if superuser(co).await? {
        co.conn().run_own_query(&format!("DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGER}")).await?;
        report.event_trigger = true;
    }
    let conn = co.conn();
    let n =
        conn.simple_rows(&format!("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgname = '{TRIGGER}' AND NOT tgisinternal")).await?;
    report.tables = n.first().and_then(|r| r.first().cloned().flatten()).and_then(|c| c.parse().ok()).unwrap_or(0);
    // The triggers depend on the function: the schema's CASCADE takes them along.
    conn.run_own_query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).await?;
    Ok(report)
}

async fn superuser(co: &mut Checkout) -> Result<bool> {
    let rows = co.conn().simple_rows("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user").await?;
    Ok(rows.first().and_then(|r| r.first().cloned().flatten()).as_deref() == Some("t"))
}
