//! Behaviour of [`batchable`], [`BatchShape::merged_sql`] and [`array_cast_type`] on real SQL.
//!
//! The merged statements were also run by hand against Postgres 15 (see the module report):
//! same column names as the original plus `pgsurge_ord` last, one row set per array position,
//! duplicates answered per position, missing keys and NULL elements matching nothing.

use super::*;

fn shape(sql: &str) -> BatchShape {
    batchable(sql).unwrap_or_else(|| panic!("expected {sql:?} to be batchable"))
}

/// The merged statement must be one statement that Postgres' parser accepts.
fn assert_parses(sql: &str) {
    let parsed = pg_query::parse(sql, 0).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(parsed.protobuf.stmts.len(), 1, "{sql}");
}

const JOIN: &str = "JOIN unnest($1::int8[]) WITH ORDINALITY pgsurge_k(pgsurge_key, pgsurge_ord)";

#[test]
fn column_equals_parameter_is_batchable() {
    let s = shape("SELECT a FROM t WHERE id = $1");
    assert_eq!((s.table.as_str(), s.key_column.as_str(), s.literal.as_deref()), ("t", "id", None));
    let merged = s.merged_sql("int8");
    assert_eq!(
        merged,
        format!("SELECT a, pgsurge_k.pgsurge_ord FROM t {JOIN} ON t.id = pgsurge_k.pgsurge_key ORDER BY pgsurge_k.pgsurge_ord")
    );
    assert_parses(&merged);
}

#[test]
fn aliased_table_and_qualified_columns() {
    let merged = shape("SELECT u.name FROM users u WHERE u.id = $1").merged_sql("int8");
    assert_eq!(
        merged,
        format!("SELECT u.name, pgsurge_k.pgsurge_ord FROM users u {JOIN} ON u.id = pgsurge_k.pgsurge_key ORDER BY pgsurge_k.pgsurge_ord")
    );
    assert!(batchable("SELECT users.name FROM users WHERE users.id = $1").is_some());
    assert!(batchable("SELECT name FROM app.users WHERE app.users.id = $1").is_some());
}

#[test]
fn parameter_on_the_left_is_batchable() {
    let s = shape("SELECT name FROM users WHERE $1 = id");
    assert_eq!(s.key_column, "id");
    assert!(s.merged_sql("int4").contains("ON users.id = pgsurge_k.pgsurge_key"));
}

#[test]
fn star_expands_to_the_table_only() {
    let merged = shape("SELECT *, name FROM app.users WHERE id = $1").merged_sql("int8");
    assert!(merged.starts_with("SELECT app.users.*, name, pgsurge_k.pgsurge_ord FROM app.users "), "{merged}");
    let merged = shape("SELECT * FROM users AS u WHERE id = $1").merged_sql("int8");
    assert!(merged.starts_with("SELECT u.*, pgsurge_k.pgsurge_ord"), "{merged}");
    assert_parses(&merged);
}

#[test]
fn target_expressions_and_aliases_are_kept_verbatim() {
    let sql = r#"SELECT lower(name), name || '!', id AS "Key", length(name) AS n FROM "Users" WHERE id = $1"#;
    let merged = shape(sql).merged_sql("int8");
    let expected = r#"SELECT lower(name), name || '!', id AS "Key", length(name) AS n, pgsurge_k.pgsurge_ord FROM "Users" "#;
    assert!(merged.starts_with(expected), "{merged}");
    assert!(merged.contains(r#"ON "Users".id = pgsurge_k.pgsurge_key"#), "{merged}");
    assert_parses(&merged);
}

#[test]
fn the_merged_text_depends_only_on_the_array_type() {
    let s = shape("SELECT a FROM t WHERE id = $1");
    assert_eq!(s.merged_sql("uuid"), s.merged_sql("uuid"));
    assert!(s.merged_sql("uuid").contains("unnest($1::uuid[])"));
    assert!(s.merged_sql("timestamptz").contains("unnest($1::timestamptz[])"));
    // A strange name is quoted, never spliced in raw.
    assert!(s.merged_sql("x[]); DROP TABLE t; --").contains(r#"$1::"x[]); DROP TABLE t; --"[]"#));
}

#[test]
fn the_ordinal_is_the_last_column_and_orders_the_rows() {
    let merged = shape("SELECT a, b FROM t WHERE k = $1").merged_sql("text");
    assert!(merged.contains("SELECT a, b, pgsurge_k.pgsurge_ord FROM"), "{merged}");
    assert!(merged.ends_with("ORDER BY pgsurge_k.pgsurge_ord"), "{merged}");
}

#[test]
fn integer_and_plain_string_literals_are_batchable_as_text_parameters() {
    let s = shape("SELECT name FROM users WHERE id = 42");
    assert_eq!(s.literal.as_deref(), Some("42"));
    assert_eq!(s.literal_type, Some("int4"));
    assert_eq!(s.param_sql, "SELECT name FROM users WHERE id = $1");
    assert_parses(&s.merged_sql("int4"));
    assert_eq!(shape("SELECT name FROM users WHERE id = -7").literal.as_deref(), Some("-7"));
    let s = shape("SELECT name FROM users WHERE code = 'it''s'");
    assert_eq!((s.literal.as_deref(), s.literal_type), (Some("it's"), None));
    assert_eq!(s.param_sql, "SELECT name FROM users WHERE code = $1");
    assert_eq!(shape("SELECT name FROM users WHERE $1 = code").param_sql, "SELECT name FROM users WHERE $1 = code");
}

#[test]
fn typed_null_escaped_and_float_literals_are_not_batchable() {
    for sql in [
        "SELECT name FROM users WHERE id = NULL",
        "SELECT name FROM users WHERE id = 42::int8",
        "SELECT name FROM users WHERE d = date '2024-01-01'",
        "SELECT name FROM users WHERE code = E'a\\nb'",
        "SELECT name FROM users WHERE code = 'a\\b'",
        "SELECT name FROM users WHERE code = $$abc$$",
        "SELECT name FROM users WHERE x = 1.5",
        "SELECT name FROM users WHERE x = true",
    ] {
        assert_eq!(batchable(sql), None, "{sql}");
    }
}

#[test]
fn anything_beyond_the_exact_shape_is_not_batchable() {
    for sql in [
        "SELECT a FROM t JOIN u ON t.id = u.t_id WHERE t.id = $1",
        "SELECT a FROM t, u WHERE t.id = $1",
        "SELECT a FROM t WHERE id = $1 ORDER BY a",
        "SELECT a FROM t WHERE id = $1 LIMIT 1",
        "SELECT a FROM t WHERE id = $1 OFFSET 1",
        "SELECT a FROM t WHERE id = $1 AND b = 2",
        "SELECT a FROM t WHERE id = $1 OR b = 2",
        "SELECT a FROM t WHERE id IN ($1)",
        "SELECT a FROM t WHERE id = ANY($1)",
        "SELECT a FROM t WHERE id = $1 FOR UPDATE",
        "SELECT random() FROM t WHERE id = $1",
        "SELECT now(), a FROM t WHERE id = $1",
        "SELECT current_user, a FROM t WHERE id = $1",
        "SELECT (SELECT max(b) FROM u) FROM t WHERE id = $1",
        "SELECT a FROM t WHERE id = (SELECT $1)",
        "SELECT a FROM (SELECT * FROM t) s WHERE id = $1",
        "SELECT DISTINCT a FROM t WHERE id = $1",
        "SELECT DISTINCT ON (a) a FROM t WHERE id = $1",
        "SELECT count(*) FROM t WHERE id = $1",
        "SELECT sum(a) FROM t WHERE id = $1",
        "SELECT a, row_number() OVER () FROM t WHERE id = $1",
        "SELECT unnest(tags) FROM t WHERE id = $1",
        "SELECT a FROM t WHERE id = $1 GROUP BY a",
        "SELECT a FROM t WHERE id = $1 HAVING true",
        "SELECT a FROM t WHERE id = $1 UNION SELECT a FROM t WHERE id = $1",
        "WITH c AS (SELECT * FROM t) SELECT a FROM c WHERE id = $1",
        "SELECT a FROM t WHERE id = $2",
        "SELECT $1, a FROM t WHERE id = $1",
        "SELECT a FROM t WHERE id = $1 AND $1 IS NOT NULL",
        "SELECT a FROM t WHERE id <> $1",
        "SELECT a FROM t WHERE lower(code) = $1",
        "SELECT a FROM t WHERE t.id = t.other",
        "SELECT a FROM t x WHERE t.id = $1",
        "SELECT a FROM t WHERE other.id = $1",
        "SELECT a FROM generate_series(1, 3) t WHERE t = $1",
        "SELECT a FROM t TABLESAMPLE SYSTEM (1) WHERE id = $1",
        "SELECT a FROM t",
        "SELECT a INTO x FROM t WHERE id = $1",
        "SELECT my_func(a) FROM t WHERE id = $1",
        "SELECT concat(a, b) FROM t WHERE id = $1",
        "SELECT pgsurge_k.pgsurge_ord FROM t WHERE id = $1",
        "SELECT a FROM t WHERE id = $1; SELECT 1",
        "VALUES (1)",
        "UPDATE t SET a = 1 WHERE id = $1",
    ] {
        assert_eq!(batchable(sql), None, "{sql}");
    }
}

#[test]
fn parameter_type_oids_map_to_array_cast_names() {
    let expected = [
        (20, "int8"),
        (21, "int2"),
        (23, "int4"),
        (25, "text"),
        (1043, "varchar"),
        (1042, "bpchar"),
        (2950, "uuid"),
        (1700, "numeric"),
        (16, "bool"),
        (1082, "date"),
        (1114, "timestamp"),
        (1184, "timestamptz"),
        (700, "float4"),
        (701, "float8"),
        (26, "oid"),
        (17, "bytea"),
    ];
    for (oid, name) in expected {
        assert_eq!(array_cast_type(oid), Some(name), "{oid}");
        let merged = shape("SELECT a FROM t WHERE k = $1").merged_sql(name);
        assert_parses(&merged);
    }
    assert_eq!(array_cast_type(114), None); // json has no `=` operator
    assert_eq!(array_cast_type(0), None);
}
