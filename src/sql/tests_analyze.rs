//! Behaviour of [`analyze`] and [`fingerprint_group`] on real SQL.

use super::*;
use std::time::Duration;

fn class(sql: &str) -> StatementClass {
    analyze(sql).class
}

fn why_not(sql: &str) -> &'static str {
    match analyze(sql).cacheable {
        Cacheability::No(why) => why,
        Cacheability::Yes => panic!("expected {sql:?} not to be cacheable"),
    }
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn plain_selects_values_and_table_are_cacheable_reads() {
    for sql in [
        "SELECT a, lower(b) FROM t WHERE id = $1",
        "VALUES (1, 'x'), (2, 'y')",
        "TABLE t",
        "SELECT count(*), max(x) FROM t GROUP BY y",
        "SELECT a FROM t UNION SELECT a FROM u",
        "SELECT coalesce(a, 0), greatest(a, b), nullif(a, 1), CASE WHEN a THEN 1 END FROM t",
    ] {
        let a = analyze(sql);
        assert_eq!(a.class, StatementClass::Select, "{sql}");
        assert_eq!(a.cacheable, Cacheability::Yes, "{sql}");
        assert!(a.tables_written.is_empty(), "{sql}");
    }
    assert_eq!(analyze("SELECT a FROM t JOIN s.u ON true").tables_read, v(&["s.u", "t"]));
}

#[test]
fn a_select_with_a_data_modifying_cte_is_a_write() {
    let a = analyze("WITH gone AS (DELETE FROM logs WHERE old RETURNING id) SELECT count(*) FROM gone");
    assert_eq!(a.class, StatementClass::Write);
    assert_eq!(a.tables_written, v(&["logs"]));
    assert_eq!(a.cacheable, Cacheability::No(reason::DATA_MODIFYING_CTE));
    let a = analyze("WITH n AS (INSERT INTO audit VALUES (1) RETURNING *) SELECT * FROM users, n");
    assert_eq!(a.tables_written, v(&["audit"]));
    assert!(a.tables_read.contains(&"users".to_string()));
}

#[test]
fn dml_statements_are_writes_with_their_targets() {
    let a = analyze("UPDATE t SET x = 1 FROM u WHERE t.id = u.id");
    assert_eq!((a.class, a.tables_written, a.tables_read), (StatementClass::Write, v(&["t"]), v(&["u"])));
    assert_eq!(analyze("INSERT INTO s.t SELECT * FROM t").tables_written, v(&["s.t"]));
    assert_eq!(analyze("DELETE FROM t USING u WHERE t.a = u.a").tables_written, v(&["t"]));
    assert_eq!(why_not("DELETE FROM t"), reason::NOT_SELECT);
}

#[test]
fn merge_writes_its_target() {
    let a = analyze(
        "MERGE INTO stock s USING deliveries d ON s.item = d.item \
         WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty WHEN NOT MATCHED THEN INSERT VALUES (d.item, d.qty)",
    );
    assert_eq!(a.class, StatementClass::Write);
    assert_eq!(a.tables_written, v(&["stock"]));
    assert!(a.tables_read.contains(&"deliveries".to_string()));
}

#[test]
fn copy_from_writes_and_copy_to_reads() {
    let a = analyze("COPY t FROM STDIN");
    assert_eq!((a.class, a.tables_written), (StatementClass::Write, v(&["t"])));
    let a = analyze("COPY t (a, b) TO STDOUT");
    assert_eq!((a.class, a.tables_read, a.tables_written), (StatementClass::CopyTo, v(&["t"]), vec![]));
    assert_eq!(analyze("COPY (SELECT * FROM t) TO STDOUT").class, StatementClass::CopyTo);
}

#[test]
fn select_into_is_a_write_to_the_new_table() {
    let a = analyze("SELECT * INTO archive FROM t");
    assert!(a.select_into);
    assert_eq!((a.class, a.tables_written), (StatementClass::Write, v(&["archive"])));
    assert_eq!(a.cacheable, Cacheability::No(reason::SELECT_INTO));
}

#[test]
fn ddl_names_what_it_changes() {
    let a = analyze("TRUNCATE a, s.b");
    assert_eq!((a.class, a.tables_written), (StatementClass::Ddl, v(&["a", "s.b"])));
    assert_eq!(analyze("ALTER TABLE t ADD COLUMN c int").tables_written, v(&["t"]));
    assert_eq!(analyze("DROP TABLE a, s.b").tables_written, v(&["a", "s.b"]));
    assert_eq!(analyze("DROP MATERIALIZED VIEW mv").tables_written, v(&["mv"]));
    assert_eq!(analyze("CREATE INDEX ON t (a)").tables_written, v(&["t"]));
    assert_eq!(analyze("ALTER TABLE t RENAME TO u").tables_written, v(&["t"]));
    assert_eq!(analyze("REFRESH MATERIALIZED VIEW mv").tables_written, v(&["mv"]));
    for sql in ["COMMENT ON TABLE t IS 'x'", "CREATE SEQUENCE s", "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql"] {
        assert_eq!(class(sql), StatementClass::Ddl, "{sql}");
    }
}

#[test]
fn privileges_and_roles() {
    let a = analyze("GRANT SELECT ON t TO app");
    assert_eq!((a.class, a.tables_written), (StatementClass::Privilege, v(&["t"])));
    for sql in [
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM app",
        "ALTER ROLE app SET search_path = x",
        "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO app",
        "CREATE ROLE r",
        "DROP ROLE r",
        "GRANT admin TO app",
    ] {
        assert_eq!(class(sql), StatementClass::Privilege, "{sql}");
    }
    for sql in ["SET ROLE admin", "SET LOCAL ROLE admin", "RESET ROLE", "SET SESSION AUTHORIZATION bob", "DISCARD ALL"] {
        assert_eq!(class(sql), StatementClass::RoleChange, "{sql}");
    }
    assert_eq!(class("SET search_path = a, b"), StatementClass::Set);
    assert_eq!(class("RESET ALL"), StatementClass::Set);
    assert_eq!(class("SHOW TimeZone"), StatementClass::Show);
}

#[test]
fn transaction_control() {
    use TxKind::*;
    for (sql, kind) in [
        ("BEGIN", Begin),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", Begin),
        ("COMMIT", Commit),
        ("END", Commit),
        ("ROLLBACK", Rollback),
        ("ABORT", Rollback),
        ("SAVEPOINT s1", Savepoint),
        ("RELEASE SAVEPOINT s1", Release),
        ("ROLLBACK TO s1", RollbackTo),
        ("PREPARE TRANSACTION 'g'", Prepare),
        ("COMMIT PREPARED 'g'", CommitPrepared),
        ("ROLLBACK PREPARED 'g'", RollbackPrepared),
    ] {
        assert_eq!(class(sql), StatementClass::Transaction(kind), "{sql}");
    }
}

#[test]
fn explain_analyze_of_a_write_is_a_write() {
    assert_eq!(class("EXPLAIN ANALYZE DELETE FROM t"), StatementClass::Write);
    assert_eq!(class("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1"), StatementClass::Write);
    assert_eq!(class("EXPLAIN (ANALYZE false) DELETE FROM t"), StatementClass::Other);
    assert_eq!(class("EXPLAIN DELETE FROM t"), StatementClass::Other);
    assert_eq!(class("EXPLAIN ANALYZE SELECT 1"), StatementClass::Other);
}

#[test]
fn multiple_empty_and_unparsable_strings() {
    let a = analyze("UPDATE a SET x = 1; SELECT * FROM b; COMMIT");
    assert_eq!(a.class, StatementClass::Multiple);
    let tx = StatementClass::Transaction(TxKind::Commit);
    assert_eq!(a.statements, vec![StatementClass::Write, StatementClass::Select, tx]);
    assert_eq!((a.tables_written, a.cacheable), (v(&["a"]), Cacheability::No(reason::MULTIPLE)));
    assert_eq!(class("  -- nothing\n"), StatementClass::Empty);
    let a = analyze("SELEC 1");
    assert_eq!((a.class, a.cacheable), (StatementClass::ParseError, Cacheability::No(reason::PARSE_ERROR)));
}

#[test]
fn locking_clauses_are_not_cacheable() {
    for sql in [
        "SELECT * FROM t WHERE id = 1 FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
        "SELECT * FROM t FOR SHARE",
        "SELECT * FROM t FOR KEY SHARE",
        "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
    ] {
        assert!(analyze(sql).locking, "{sql}");
        assert_eq!(why_not(sql), reason::LOCKING, "{sql}");
    }
}

#[test]
fn volatile_and_stable_functions_are_not_cacheable() {
    for sql in [
        "SELECT now()",
        "SELECT random()",
        "SELECT nextval('s')",
        "SELECT current_setting('timezone')",
        "SELECT clock_timestamp()",
        "SELECT txid_current()",
        "SELECT pg_backend_pid()",
        "SELECT to_char(1, '9')",
        "SELECT concat(a, b) FROM t",
        "SELECT a FROM t WHERE ts > now() - interval '1 day'",
        "SELECT ARRAY[random()]",
        "SELECT pg_catalog.now()",
    ] {
        assert_eq!(why_not(sql), reason::NON_IMMUTABLE_FUNCTION, "{sql}");
    }
    assert!(analyze("SELECT nextval('s')").functions.contains(&"nextval".to_string()));
}

#[test]
fn unknown_functions_are_not_cacheable_but_say_so() {
    assert_eq!(why_not("SELECT my_func(a) FROM t"), reason::UNKNOWN_FUNCTION);
    assert_eq!(why_not("SELECT public.lower(a) FROM t"), reason::UNKNOWN_FUNCTION);
    assert_eq!(why_not("SELECT * FROM my_srf()"), reason::UNKNOWN_FUNCTION);
}

#[test]
fn session_and_time_values_are_not_cacheable() {
    for sql in [
        "SELECT current_user",
        "SELECT session_user",
        "SELECT CURRENT_TIMESTAMP",
        "SELECT * FROM t WHERE d = CURRENT_DATE",
        "SELECT LOCALTIME",
        "SELECT current_schema",
        "SELECT user",
    ] {
        assert_eq!(why_not(sql), reason::SQL_VALUE_FUNCTION, "{sql}");
    }
    for sql in [
        "SELECT 'now'::timestamptz",
        "SELECT * FROM t WHERE d > date 'today'",
        "SELECT 'Tomorrow'::date",
        "SELECT CAST('yesterday' AS date)",
    ] {
        assert_eq!(why_not(sql), reason::TIME_LITERAL, "{sql}");
    }
}

#[test]
fn tablesample_is_not_cacheable() {
    assert!(analyze("SELECT * FROM t TABLESAMPLE BERNOULLI (10)").tablesample);
    assert_eq!(why_not("SELECT * FROM t TABLESAMPLE SYSTEM (1) REPEATABLE (7)"), reason::TABLESAMPLE);
}

#[test]
fn catalog_reads_are_flagged_so_a_rule_can_opt_in() {
    for sql in [
        "SELECT * FROM pg_type",
        "SELECT oid FROM pg_catalog.pg_class WHERE relname = $1",
        "SELECT table_name FROM information_schema.tables",
        "SELECT a FROM t WHERE b IN (SELECT oid FROM pg_namespace)",
    ] {
        assert!(analyze(sql).reads_catalog, "{sql}");
        assert_eq!(why_not(sql), reason::CATALOG, "{sql}");
    }
    // A harder reason wins, so an opt-in for catalogs cannot let a volatile call through.
    assert_eq!(why_not("SELECT now() FROM pg_type"), reason::NON_IMMUTABLE_FUNCTION);
    assert_eq!(why_not("SELECT * FROM pg_temp.scratch"), reason::TEMP_TABLE);
    assert!(!analyze("SELECT * FROM page_views").reads_catalog);
}

#[test]
fn names_are_as_postgres_sees_them() {
    let a = analyze(r#"SELECT * FROM Users JOIN "Orders" o ON true JOIN App.Items ON true"#);
    assert_eq!(a.tables_read, v(&["Orders", "app.items", "users"]));
}

#[test]
fn comment_hints_reach_the_analysis() {
    let a = analyze("/* pgsurge:cache ttl=5s */ SELECT * FROM pg_type");
    assert!(a.hints.cache);
    assert_eq!(a.hints.ttl, Some(Duration::from_secs(5)));
    assert_eq!(why_not("SELECT 1 /* pgsurge:nocache */"), reason::NOCACHE_HINT);
}

#[test]
fn fingerprints_group_statements_that_differ_only_in_constants() {
    let a = fingerprint_group("SELECT * FROM users WHERE id = 1");
    assert!(a.is_some());
    assert_eq!(a, fingerprint_group("select * from users where id = 42"));
    assert_ne!(a, fingerprint_group("SELECT * FROM orders WHERE id = 1"));
    assert_ne!(a, fingerprint_group("SELECT * FROM other.users WHERE id = 1"));
    assert_eq!(fingerprint_group("SELEC"), None);
}
