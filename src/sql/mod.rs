//! Statement analysis with Postgres' own parser (pg_query): class, tables, cacheability, batching.
//!
//! Everything here is a pure function of the SQL text: no I/O, no globals, no server lookups.
//! Callers should memoise [`analyze`] per statement text (prepared statements are parsed once)
//! because a parse costs tens of microseconds.
//!
//! Public API:
//! - [`analyze`] → [`Analysis`]: what a statement is ([`StatementClass`]), which tables it reads
//!   and writes (for the cache's per-table generations and flushes), the functions it calls,
//!   whether the read cache may answer it ([`Cacheability`]) and the `pgsurge:` comment
//!   [`Hints`].
//! - [`batchable`] → [`BatchShape`]: recognises the N+1 shape
//!   `SELECT <row expressions> FROM <table> WHERE <column> = $1` and builds the merged
//!   `unnest($1::T[]) WITH ORDINALITY` statement; [`array_cast_type`] names `T` from a type OID.
//! - [`fingerprint_group`]: a fingerprint to *group* statements in N+1 reports. Never use it as
//!   a cache key: it equates `id = $1` with `id = ANY($1)` and `SELECT a, b` with `SELECT b, a`.
//! - [`volatility()`]: the immutable-function allowlist the cache rules use.
//! - [`normalize::shape`]: a statement's identity for the slow lane's run-time estimates, by a lexical pass
//!   (constants to `?`), not a parse.

mod analyze;
mod batch;
mod classify;
mod hints;
mod merge;
pub mod normalize;
pub mod pins;
pub mod session;
mod tree;
pub mod volatility;

#[cfg(test)]
mod tests_analyze;
#[cfg(test)]
mod tests_batch;

use std::time::Duration;

pub use analyze::analyze;
pub use batch::{array_cast_type, batchable, BatchShape};
pub use volatility::{volatility, FuncKind, Volatility};

/// The result of [`analyze`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    /// What the statement does; [`StatementClass::Multiple`] for more than one statement.
    pub class: StatementClass,
    /// The class of each statement in the string, in order (one entry unless `Multiple`).
    pub statements: Vec<StatementClass>,
    /// Relations read, as written (`name` or `schema.name`; unquoted identifiers lowercased).
    /// Errs on the side of listing too much: CTE names referenced in FROM appear here as well,
    /// which costs at most an extra generation check.
    pub tables_read: Vec<String>,
    /// Relations whose contents or definition the statement may change: DML targets (also
    /// inside CTEs), COPY FROM, MERGE, TRUNCATE, SELECT INTO and DDL/GRANT targets.
    pub tables_written: Vec<String>,
    /// Every function called, dotted name as written (`lower`, `pg_catalog.now`, `s.f`).
    pub functions: Vec<String>,
    /// A `FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE` clause anywhere.
    pub locking: bool,
    /// `SELECT ... INTO new_table` (creates a table: a write).
    pub select_into: bool,
    /// `TABLESAMPLE` anywhere.
    pub tablesample: bool,
    /// Reads a `pg_catalog.*`, `information_schema.*`, `pg_toast.*` or unqualified `pg_*` relation.
    pub reads_catalog: bool,
    /// Whether the read cache may answer it, judged from the text alone.
    pub cacheable: Cacheability,
    /// `/* pgsurge:... */` directives found in comments.
    pub hints: Hints,
    /// A point read (`SELECT … FROM t WHERE col = $1 | literal`, the batcher's shape): the one row it depends on.
    pub point_read: Option<pins::Pinned>,
    /// A single INSERT/UPDATE/DELETE whose target rows the text pins by one column's values (else the whole
    /// table of `tables_written`).
    pub write_pins: Option<pins::Pinned>,
    /// A `COPY … FROM STDIN`: the client sends data after it, so nothing may follow it until the copy ends.
    pub copy_in: bool,
}

/// What kind of statement this is, as far as pooling, caching and invalidation care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementClass {
    /// A read-only SELECT, VALUES or TABLE (no data-modifying CTE, no INTO).
    Select,
    /// INSERT/UPDATE/DELETE/MERGE, COPY FROM, SELECT with a data-modifying CTE, SELECT INTO,
    /// EXPLAIN ANALYZE of any of these.
    Write,
    /// `COPY ... TO` (reads; the client receives CopyOut data).
    CopyTo,
    /// CREATE/ALTER/DROP/TRUNCATE/COMMENT/REFRESH MATERIALIZED VIEW/...: flush the targets.
    Ddl,
    /// GRANT/REVOKE, role DDL, ALTER DEFAULT PRIVILEGES, policies, ownership: flush broadly.
    Privilege,
    /// SET ROLE, SET SESSION AUTHORIZATION, RESET ROLE, DISCARD ALL: the effective role changes.
    RoleChange,
    /// Transaction control.
    Transaction(TxKind),
    /// SET/RESET of a setting (not the role).
    Set,
    /// SHOW.
    Show,
    /// Anything else (EXPLAIN, VACUUM, CALL, DO, LISTEN, PREPARE, EXECUTE, LOCK ...). CALL, DO and
    /// EXECUTE may write tables we cannot name: do not treat `Other` as read-only.
    Other,
    /// More than one statement in the string (see [`Analysis::statements`]).
    Multiple,
    /// An empty string or only comments (Postgres answers EmptyQueryResponse).
    Empty,
    /// pg_query could not parse it, or could not decode the tree: pg_query (prost) refuses trees
    /// nested deeper than 100 messages, which a valid `a + b + ... ` chain of ~50 terms reaches.
    /// Treat as unknown: never cache it, and if the server runs it successfully, assume it wrote
    /// tables we cannot name.
    ParseError,
}

/// Transaction control statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxKind {
    /// BEGIN or START TRANSACTION.
    Begin,
    /// COMMIT or END (also COMMIT AND CHAIN, which stays in a transaction).
    Commit,
    /// ROLLBACK or ABORT.
    Rollback,
    /// SAVEPOINT name.
    Savepoint,
    /// RELEASE [SAVEPOINT] name.
    Release,
    /// ROLLBACK TO [SAVEPOINT] name.
    RollbackTo,
    /// PREPARE TRANSACTION 'gid' (ends the transaction on this connection).
    Prepare,
    /// COMMIT PREPARED 'gid'.
    CommitPrepared,
    /// ROLLBACK PREPARED 'gid'.
    RollbackPrepared,
}

/// Whether the read cache may answer a statement, from its text alone. The session-level rules
/// (autocommit, RLS, errors, notices, entry size) are the caller's to check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheability {
    /// Nothing in the text forbids caching.
    Yes,
    /// Not cacheable; the reason is one of the [`reason`] constants. Reasons are reported in a
    /// fixed priority: hard reasons first, then [`reason::UNKNOWN_FUNCTION`], then
    /// [`reason::TEMP_TABLE`] and [`reason::CATALOG`] last, so an opt-in rule for catalogs only
    /// sees `CATALOG` when nothing else stands in the way.
    No(&'static str),
}

/// Why a statement is not cacheable.
pub mod reason {
    /// pg_query rejected the text.
    pub const PARSE_ERROR: &str = "does not parse";
    /// Empty or comment-only string.
    pub const EMPTY: &str = "empty statement";
    /// More than one statement in the string.
    pub const MULTIPLE: &str = "more than one statement";
    /// Not a SELECT/VALUES/TABLE.
    pub const NOT_SELECT: &str = "not a SELECT";
    /// `WITH x AS (INSERT/UPDATE/DELETE/MERGE ...)`.
    pub const DATA_MODIFYING_CTE: &str = "data-modifying CTE";
    /// `SELECT ... INTO t`.
    pub const SELECT_INTO: &str = "SELECT INTO";
    /// `FOR UPDATE/SHARE`.
    pub const LOCKING: &str = "locking clause";
    /// `TABLESAMPLE`.
    pub const TABLESAMPLE: &str = "TABLESAMPLE";
    /// `CURRENT_USER`, `CURRENT_TIMESTAMP`, `LOCALTIME` and friends.
    pub const SQL_VALUE_FUNCTION: &str = "session or time value function";
    /// A `'now'`/`'today'`/`'tomorrow'`/`'yesterday'` literal.
    pub const TIME_LITERAL: &str = "time-relative literal";
    /// A known stable or volatile function (`now()`, `random()`, `nextval()`, `to_char` ...).
    pub const NON_IMMUTABLE_FUNCTION: &str = "calls a non-immutable function";
    /// A function not on the allowlist: a rule may look it up in `pg_proc` and opt in.
    pub const UNKNOWN_FUNCTION: &str = "calls a function not known to be immutable";
    /// `/* pgsurge:nocache */`.
    pub const NOCACHE_HINT: &str = "pgsurge:nocache hint";
    /// Reads a `pg_temp.*` relation (unqualified temp tables need a server lookup).
    pub const TEMP_TABLE: &str = "reads a temporary table";
    /// Reads a system catalog: a rule may opt in (ORM catalog lookups).
    pub const CATALOG: &str = "reads a system catalog";
}

/// Directives from `/* pgsurge:... */` or `-- pgsurge:...` comments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `pgsurge:nocache`: never answer from the cache. Wins over `cache`.
    pub nocache: bool,
    /// `pgsurge:cache`: the author asks for caching (a rule decides whether that opts in).
    pub cache: bool,
    /// `pgsurge:cache ttl=5s`: the entry's time to live (`ms`, `s`, `m`, `h`; humantime syntax).
    pub ttl: Option<Duration>,
}

/// A pg_query fingerprint for *grouping* statements in N+1 detection reports only.
///
/// Uses `RANGEVAR_PG17_COMPAT | FULL_RELNAME` so that schemas and full relation names count and
/// aliases do not. Returns `None` if the text does not parse. Never a cache key (see module doc).
pub fn fingerprint_group(sql: &str) -> Option<u64> {
    let options = pg_query::FingerprintOptions::RANGEVAR_PG17_COMPAT | pg_query::FingerprintOptions::FULL_RELNAME;
    pg_query::fingerprint(sql, 0, options).ok().map(|f| f.value)
}
