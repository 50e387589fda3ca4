//! What a statement does to the *session* (as opposed to tables): settings it changes, and features that tie
//! a client to one server connection (LISTEN, temp tables, WITH HOLD cursors, session advisory locks, SQL-level
//! PREPARE, LOAD). Transaction pooling needs both; most statements have neither, and a cheap look at the first
//! keyword answers that without parsing.

use pg_query::protobuf::{self, node::Node as NodeEnum, VariableSetKind};

/// Why a client must keep its server connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pin {
    Listen(String),
    TempObject,
    HoldCursor,
    AdvisoryLock,
    SqlPrepare(String),
    Load,
    /// `set_config(..., false)` and other session changes pgsurge cannot replay.
    OpaqueSetting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A session-level SET: `name` (lowercase) and the statement text to replay on another server.
    Set {
        name: String,
        sql: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
    Pin(Pin),
    Unlisten(Option<String>),
    Deallocate(Option<String>),
    AdvisoryUnlockAll,
    CloseAllCursors,
    DiscardAll,
    DiscardTemp,
    /// Not from SQL: pgsurge could not re-apply this setting on a server connection.
    Unapplied {
        name: String,
    },
}

/// `set_config` takes the value as text, parsed exactly as a startup parameter would be (lists included).
pub fn set_config_sql(name: &str, value: &str) -> String {
    format!("SELECT pg_catalog.set_config('{}', '{}', false)", name.replace('\'', "''"), value.replace('\'', "''"))
}

const KEYWORDS: &[&str] = &["set", "reset", "discard", "listen", "unlisten", "prepare", "deallocate", "create", "declare", "load", "close"];

/// The first keyword of `sql` after whitespace and comments, lowercased (at most 10 bytes looked at).
fn first_keyword(sql: &str) -> String {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map(|x| x.1).unwrap_or("");
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map(|x| x.1).unwrap_or("");
        } else {
            break;
        }
    }
    s.bytes().take(10).take_while(|b| b.is_ascii_alphabetic()).map(|b| b.to_ascii_lowercase() as char).collect()
}

/// Whether the first keyword of `sql` is one of `KEYWORDS`, without allocating (the hot path: every query).
fn keyword_may_have_effects(sql: &[u8]) -> bool {
    let head = sql.trim_ascii_start();
    if head.starts_with(b"--") || head.starts_with(b"/*") {
        return KEYWORDS.contains(&first_keyword(&String::from_utf8_lossy(sql)).as_str());
    }
    let mut buf = [0u8; 10];
    let mut n = 0;
    for &b in head.iter().take(10) {
        if !b.is_ascii_alphabetic() {
            break;
        }
        buf[n] = b.to_ascii_lowercase();
        n += 1;
    }
    KEYWORDS.iter().any(|k| k.as_bytes() == &buf[..n])
}

/// Whether `hay` contains the lower-case ASCII `needle`, ignoring case (a plain loop: no allocation).
fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    let Some(last) = hay.len().checked_sub(needle.len()) else { return false };
    let first = needle[0];
    for i in 0..=last {
        if hay[i] | 0x20 == first && hay[i + 1..i + needle.len()].eq_ignore_ascii_case(&needle[1..]) {
            return true;
        }
    }
    false
}

/// The session effects of `sql`; empty for ordinary statements (decided on the bytes, without parsing or even
/// UTF-8 validation, when possible: this runs for every simple Query).
pub fn effects(sql: impl AsRef<[u8]>) -> Vec<Effect> {
    let sql = sql.as_ref();
    // Both are function calls: no parenthesis, no call (the common point query has none).
    let functions = sql.contains(&b'(') && (contains_ci(sql, b"advisory") || contains_ci(sql, b"set_config"));
    if !functions && !keyword_may_have_effects(sql) {
        return vec![];
    }
    let sql = String::from_utf8_lossy(sql);
    let sql = sql.as_ref();
    let Ok(parsed) = pg_query::parse(sql, 0) else { return vec![] };
    let mut out = vec![];
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { continue };
        let start = raw.stmt_location.max(0) as usize;
        let end = if raw.stmt_len > 0 { start + raw.stmt_len as usize } else { sql.len() };
        let text = sql.get(start..end).unwrap_or(sql).trim();
        statement_effects(node, text, &mut out);
    }
    if functions {
        for (node, ..) in parsed.protobuf.nodes() {
            if let pg_query::NodeRef::FuncCall(f) = node {
                function_effects(f, &mut out);
            }
        }
    }
    out
}

fn const_str(n: &protobuf::Node) -> Option<&str> {
    match n.node.as_ref()? {
        NodeEnum::AConst(protobuf::AConst { val: Some(protobuf::a_const::Val::Sval(s)), .. }) => Some(&s.sval),
        _ => None,
    }
}

fn const_bool(n: &protobuf::Node) -> Option<bool> {
    match n.node.as_ref()? {
        NodeEnum::AConst(protobuf::AConst { val: Some(protobuf::a_const::Val::Boolval(b)), .. }) => Some(b.boolval),
        NodeEnum::TypeCast(c) => c.arg.as_deref().and_then(const_bool),
        _ => None,
    }
}

/// Session effects of a function call: session advisory locks pin; `set_config(name, value, false)` is a SET.
fn function_effects(f: &protobuf::FuncCall, out: &mut Vec<Effect>) {
    let name = f.funcname.last().and_then(const_name).unwrap_or_default().to_ascii_lowercase();
    match name.as_str() {
        "pg_advisory_lock" | "pg_advisory_lock_shared" | "pg_try_advisory_lock" | "pg_try_advisory_lock_shared" => {
            out.push(Effect::Pin(Pin::AdvisoryLock))
        }
        "pg_advisory_unlock_all" => out.push(Effect::AdvisoryUnlockAll),
        "set_config" => {
            let args = &f.args;
            let local = args.get(2).and_then(const_bool);
            let setting = args.first().and_then(const_str).map(str::to_ascii_lowercase);
            match (setting, args.get(1).and_then(const_str), local) {
                (_, _, Some(true)) => {} // lasts only for the transaction
                (Some(n), Some(v), Some(false)) => out.push(Effect::Set { sql: set_config_sql(&n, v), name: n }),
                // A value pgsurge cannot see (a parameter): the setting holds on this connection only; other
                // server connections keep the client's previous value, and this one is reset before reuse.
                (Some(n), None, Some(false)) => out.push(Effect::Unapplied { name: n }),
                _ => out.push(Effect::Pin(Pin::OpaqueSetting)),
            }
        }
        _ => {}
    }
}

fn const_name(n: &protobuf::Node) -> Option<&str> {
    match n.node.as_ref()? {
        NodeEnum::String(s) => Some(&s.sval),
        _ => None,
    }
}

fn temp(rel: &Option<protobuf::RangeVar>) -> bool {
    rel.as_ref().is_some_and(|r| r.relpersistence == "t" || r.schemaname == "pg_temp")
}

fn statement_effects(node: &NodeEnum, text: &str, out: &mut Vec<Effect>) {
    match node {
        NodeEnum::VariableSetStmt(v) => {
            let name = v.name.to_ascii_lowercase();
            if v.is_local || name.starts_with("transaction") {
                return; // SET LOCAL and SET TRANSACTION end with the transaction
            }
            match VariableSetKind::try_from(v.kind) {
                Ok(VariableSetKind::VarSetValue | VariableSetKind::VarSetCurrent | VariableSetKind::VarSetMulti) => {
                    out.push(Effect::Set { name, sql: text.to_string() })
                }
                Ok(VariableSetKind::VarSetDefault | VariableSetKind::VarReset) => out.push(Effect::Reset { name }),
                Ok(VariableSetKind::VarResetAll) => out.push(Effect::ResetAll),
                _ => {}
            }
        }
        NodeEnum::ListenStmt(l) => out.push(Effect::Pin(Pin::Listen(l.conditionname.clone()))),
        NodeEnum::UnlistenStmt(u) => out.push(Effect::Unlisten((!u.conditionname.is_empty()).then(|| u.conditionname.clone()))),
        NodeEnum::CreateStmt(c) if temp(&c.relation) => out.push(Effect::Pin(Pin::TempObject)),
        NodeEnum::CreateTableAsStmt(c) if temp(&c.into.as_ref().and_then(|i| i.rel.clone())) => out.push(Effect::Pin(Pin::TempObject)),
        NodeEnum::ViewStmt(v) if temp(&v.view) => out.push(Effect::Pin(Pin::TempObject)),
        NodeEnum::CreateSeqStmt(s) if temp(&s.sequence) => out.push(Effect::Pin(Pin::TempObject)),
        NodeEnum::DeclareCursorStmt(d) if d.options & 0x0020 != 0 => out.push(Effect::Pin(Pin::HoldCursor)),
        NodeEnum::ClosePortalStmt(c) if c.portalname.is_empty() => out.push(Effect::CloseAllCursors),
        NodeEnum::PrepareStmt(p) => out.push(Effect::Pin(Pin::SqlPrepare(p.name.clone()))),
        NodeEnum::DeallocateStmt(d) => out.push(Effect::Deallocate((!d.name.is_empty()).then(|| d.name.clone()))),
        NodeEnum::LoadStmt(_) => out.push(Effect::Pin(Pin::Load)),
        NodeEnum::DiscardStmt(d) => match protobuf::DiscardMode::try_from(d.target) {
            Ok(protobuf::DiscardMode::DiscardAll) => out.push(Effect::DiscardAll),
            Ok(protobuf::DiscardMode::DiscardTemp) => out.push(Effect::DiscardTemp),
            _ => {}
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_statements_have_no_effects_and_are_not_parsed() {
        assert!(effects("SELECT * FROM t WHERE id = $1").is_empty());
        assert!(effects("INSERT INTO settings VALUES (1)").is_empty());
        assert_eq!(first_keyword("  /* c */ -- x\n  SeT a = 1"), "set");
    }

    #[test]
    fn session_sets_are_replayable_and_local_ones_ignored() {
        assert_eq!(
            effects("SET search_path TO a, b"),
            vec![Effect::Set { name: "search_path".into(), sql: "SET search_path TO a, b".into() }]
        );
        assert_eq!(
            effects("SET TIME ZONE 'UTC'; SET LOCAL work_mem = '1MB'; RESET statement_timeout"),
            vec![
                Effect::Set { name: "timezone".into(), sql: "SET TIME ZONE 'UTC'".into() },
                Effect::Reset { name: "statement_timeout".into() }
            ]
        );
        assert_eq!(effects("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), vec![]);
        assert_eq!(effects("RESET ALL"), vec![Effect::ResetAll]);
        assert_eq!(effects("SET work_mem TO DEFAULT"), vec![Effect::Reset { name: "work_mem".into() }]);
    }

    #[test]
    fn features_that_need_one_session_pin() {
        assert_eq!(effects("LISTEN chan"), vec![Effect::Pin(Pin::Listen("chan".into()))]);
        assert_eq!(effects("UNLISTEN *"), vec![Effect::Unlisten(None)]);
        assert_eq!(effects("CREATE TEMP TABLE x(a int)"), vec![Effect::Pin(Pin::TempObject)]);
        assert_eq!(effects("CREATE TABLE x(a int)"), vec![]);
        assert_eq!(effects("DECLARE c CURSOR WITH HOLD FOR SELECT 1"), vec![Effect::Pin(Pin::HoldCursor)]);
        assert_eq!(effects("DECLARE c CURSOR FOR SELECT 1"), vec![]);
        assert_eq!(effects("SELECT pg_advisory_lock(1)"), vec![Effect::Pin(Pin::AdvisoryLock)]);
        assert_eq!(effects("SELECT pg_advisory_xact_lock(1)"), vec![]);
        assert_eq!(effects("PREPARE p AS SELECT 1"), vec![Effect::Pin(Pin::SqlPrepare("p".into()))]);
        assert_eq!(effects("DEALLOCATE ALL"), vec![Effect::Deallocate(None)]);
        assert_eq!(effects("DISCARD ALL"), vec![Effect::DiscardAll]);
    }

    #[test]
    fn set_config_is_a_set_unless_local_or_opaque() {
        // asyncpg's type introspection: SELECT current_setting('jit'), set_config('jit', 'off', false)
        assert_eq!(
            effects("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new"),
            vec![Effect::Set { name: "jit".into(), sql: "SELECT pg_catalog.set_config('jit', 'off', false)".into() }]
        );
        assert_eq!(effects("SELECT set_config('jit', $1, false)"), vec![Effect::Unapplied { name: "jit".into() }]);
        assert_eq!(effects("SELECT set_config('jit', 'off', true)"), vec![]);
        assert_eq!(effects("SELECT set_config($1, $2, $3)"), vec![Effect::Pin(Pin::OpaqueSetting)]);
    }
}
