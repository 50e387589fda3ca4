//! What the read cache may answer, and for how long: correctness.md's rules applied to a statement analysis,
//! then `[[cache.rules]]` and `/* pgsurge:cache ttl=… */` hints.

use std::time::Duration;

use super::config::CacheConfig;
use crate::sql::{reason, Analysis, Cacheability, StatementClass};

/// A statement the cache may answer: its TTL and the tables whose writes void it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub ttl: Duration,
    pub tables: Vec<String>,
    /// A rule opted these tables or this statement in: row-level security tables may be cached (per role).
    pub opted_in: bool,
}

/// Reasons a rule may override: they are about what pgsurge cannot know, not about what it knows is unsafe.
const SOFT: &[&str] = &[reason::CATALOG, reason::UNKNOWN_FUNCTION];

pub fn decide(cfg: &CacheConfig, sql: &[u8], a: &Analysis) -> Option<Decision> {
    if a.hints.nocache || a.class != StatementClass::Select {
        return None;
    }
    let statement_rule = if cfg.rules.iter().any(|r| r.statement.is_some()) {
        let sql = String::from_utf8_lossy(sql);
        let text = sql.trim().trim_end_matches(';').trim();
        cfg.rules.iter().find(|r| r.statement.as_deref().map(|s| s.trim().trim_end_matches(';').trim()) == Some(text))
    } else {
        None
    };
    let table_rules: Vec<_> = cfg.rules.iter().filter(|r| r.table.as_ref().is_some_and(|t| a.tables_read.iter().any(|x| x == t))).collect();
    if statement_rule.is_some_and(|r| r.cache == Some(false)) || table_rules.iter().any(|r| r.cache == Some(false)) {
        return None;
    }
    let opted_in = statement_rule.is_some_and(|r| r.cache == Some(true))
        || (!a.tables_read.is_empty()
            && a.tables_read.iter().all(|t| table_rules.iter().any(|r| r.table.as_deref() == Some(t) && r.cache == Some(true))));
    match a.cacheable {
        Cacheability::Yes => {}
        Cacheability::No(why) if SOFT.contains(&why) && opted_in => {}
        Cacheability::No(_) => return None,
    }
    let ttl = a
        .hints
        .ttl
        .or(statement_rule.and_then(|r| r.ttl.map(|d| d.0)))
        .or(table_rules.iter().filter_map(|r| r.ttl.map(|d| d.0)).min())
        .unwrap_or(cfg.default_ttl);
    if ttl.is_zero() {
        return None;
    }
    Some(Decision { ttl, tables: a.tables_read.clone(), opted_in })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::config::{CacheRule, CacheSettings};
    use crate::config::Dur;

    fn cfg(rules: Vec<CacheRule>) -> CacheConfig {
        CacheConfig::build(
            &CacheSettings { rules, ..Default::default() },
            crate::cache::config::CacheFlags { enabled: Some(true), ..Default::default() },
        )
        .unwrap()
    }

    fn decide_sql(c: &CacheConfig, sql: &str) -> Option<Decision> {
        decide(c, sql.as_bytes(), &crate::sql::analyze(sql))
    }

    #[test]
    fn plain_reads_are_cached_for_the_default_ttl_and_volatile_ones_never() {
        let c = cfg(vec![]);
        assert_eq!(
            decide_sql(&c, "SELECT v FROM kv WHERE id = 7").unwrap(),
            Decision { ttl: Duration::from_secs(1), tables: vec!["kv".into()], opted_in: false }
        );
        for sql in [
            "SELECT random()",
            "SELECT now()",
            "SELECT nextval('s')",
            "SELECT current_user",
            "SELECT * FROM t FOR UPDATE",
            "UPDATE t SET a = 1",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        ] {
            assert_eq!(decide_sql(&c, sql), None, "{sql}");
        }
    }

    #[test]
    fn hints_and_rules_set_ttls_and_opt_in_or_out() {
        let c = cfg(vec![
            CacheRule { table: Some("hot".into()), ttl: Some(Dur(Duration::from_secs(30))), ..Default::default() },
            CacheRule { table: Some("secret".into()), cache: Some(false), ..Default::default() },
            CacheRule { table: Some("pg_type".into()), cache: Some(true), ..Default::default() },
        ]);
        assert_eq!(decide_sql(&c, "SELECT * FROM hot").unwrap().ttl, Duration::from_secs(30));
        assert_eq!(decide_sql(&c, "/* pgsurge:cache ttl=5s */ SELECT * FROM hot").unwrap().ttl, Duration::from_secs(5));
        assert_eq!(decide_sql(&c, "SELECT * FROM secret"), None);
        assert_eq!(decide_sql(&c, "/* pgsurge:nocache */ SELECT * FROM hot"), None);
        assert!(decide_sql(&c, "SELECT oid FROM pg_type WHERE typname = 'int4'").is_some(), "catalogs by opt-in");
        assert_eq!(decide_sql(&cfg(vec![]), "SELECT oid FROM pg_type WHERE typname = 'int4'"), None, "and not without");
    }
}
