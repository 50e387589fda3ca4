//! Row-precise invalidation, the text side: which rows a write can change and which row a point read depends
//! on, as (table, column, keys), when the statement pins them exactly; and the strict forms in which key values
//! are compared. Anything not pinned exactly is the whole table.

use pg_query::protobuf::{self, a_const::Val, AExprKind, BoolExprType, OnConflictAction};
use pg_query::{Node, NodeEnum};

/// Where a key value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// The statement's `$n` (0-based here).
    Param(usize),
    /// A literal in the text, as a text parameter would carry it.
    Literal(String),
}

/// Rows of `table` whose `column` equals one of `keys`: all a write can change, or all a read depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The relation name as written (the cache keys it by its bare name).
    pub table: String,
    pub column: String,
    pub keys: Vec<KeyRef>,
}

/// The rows a single INSERT, UPDATE or DELETE can change, if its text pins them by one column:
/// - `UPDATE t SET … WHERE col = k [AND …]` (or `col IN (k, …)`) that does not set `col`, without FROM or WITH;
/// - `DELETE FROM t WHERE col = k [AND …]`, without USING or WITH;
/// - `INSERT INTO t (…, col, …) VALUES (…), …` with a literal or parameter for `col` in every row (`id` if listed,
///   else the first column), with no ON CONFLICT, `DO NOTHING`, or `(col) DO UPDATE` that does not set `col`.
///
/// `None`: the whole table (a key that changes, another shape, a sub-select, COPY, MERGE, TRUNCATE, …).
pub fn write_pins(stmt: &NodeEnum, sql: &str) -> Option<Pinned> {
    match stmt {
        NodeEnum::UpdateStmt(u) => {
            if u.with_clause.is_some() || !u.from_clause.is_empty() {
                return None;
            }
            let table = u.relation.as_ref()?;
            let (column, keys) = pinned_by(u.where_clause.as_deref()?, table, sql)?;
            if u.target_list.iter().any(|t| target_name(t).is_none_or(|n| n == column)) {
                return None; // the key itself changes: rows move between keys
            }
            Some(Pinned { table: name_of(table), column, keys })
        }
        NodeEnum::DeleteStmt(d) => {
            if d.with_clause.is_some() || !d.using_clause.is_empty() {
                return None;
            }
            let table = d.relation.as_ref()?;
            let (column, keys) = pinned_by(d.where_clause.as_deref()?, table, sql)?;
            Some(Pinned { table: name_of(table), column, keys })
        }
        NodeEnum::InsertStmt(i) => insert_pins(i, sql),
        _ => None,
    }
}

fn insert_pins(i: &protobuf::InsertStmt, sql: &str) -> Option<Pinned> {
    if i.with_clause.is_some() {
        return None;
    }
    let table = i.relation.as_ref()?;
    let cols: Vec<&str> = i.cols.iter().map(target_name).collect::<Option<_>>()?;
    let at = cols.iter().position(|c| *c == "id").or((!cols.is_empty()).then_some(0))?;
    let column = cols[at].to_string();
    if let Some(c) = &i.on_conflict_clause {
        let nothing = c.action == OnConflictAction::OnconflictNothing as i32;
        let on_key = c.action == OnConflictAction::OnconflictUpdate as i32
            && c.infer.as_ref().is_some_and(|inf| {
                inf.conname.is_empty()
                    && matches!(inf.index_elems.as_slice(), [e] if matches!(&e.node, Some(NodeEnum::IndexElem(x)) if x.name == column && x.expr.is_none()))
            })
            && c.target_list.iter().all(|t| target_name(t).is_some_and(|n| n != column));
        if !(nothing || on_key) {
            return None;
        }
    }
    let Some(NodeEnum::SelectStmt(s)) = i.select_stmt.as_ref()?.node.as_ref() else { return None };
    if s.values_lists.is_empty() || !s.from_clause.is_empty() || s.with_clause.is_some() {
        return None;
    }
    let mut keys = Vec::with_capacity(s.values_lists.len());
    for row in &s.values_lists {
        let Some(NodeEnum::List(l)) = &row.node else { return None };
        keys.push(key_of(l.items.get(at)?, sql)?);
    }
    Some(Pinned { table: name_of(table), column, keys })
}

/// The column a WHERE clause pins rows by and the keys it allows: `col = k`, `col IN (k, …)`, or an AND with one
/// of those among its terms (the rows are a subset of that key's).
fn pinned_by(w: &Node, table: &protobuf::RangeVar, sql: &str) -> Option<(String, Vec<KeyRef>)> {
    match &w.node {
        Some(NodeEnum::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => b.args.iter().find_map(|a| pinned_by(a, table, sql)),
        Some(NodeEnum::AExpr(e)) if e.kind == AExprKind::AexprOp as i32 && operator(&e.name) == Some("=") => {
            let (l, r) = (e.lexpr.as_deref()?, e.rexpr.as_deref()?);
            let (col, value) = match (column_of(l, table), column_of(r, table)) {
                (Some(c), None) => (c, r),
                (None, Some(c)) => (c, l),
                _ => return None,
            };
            Some((col, vec![key_of(value, sql)?]))
        }
        Some(NodeEnum::AExpr(e)) if e.kind == AExprKind::AexprIn as i32 && operator(&e.name) == Some("=") => {
            let col = column_of(e.lexpr.as_deref()?, table)?;
            let Some(NodeEnum::List(l)) = &e.rexpr.as_deref()?.node else { return None };
            let keys = l.items.iter().map(|k| key_of(k, sql)).collect::<Option<Vec<_>>>()?;
            Some((col, keys))
        }
        _ => None,
    }
}

/// A column of the target table: unqualified, or qualified by its alias (or name, without one).
fn column_of(n: &Node, table: &protobuf::RangeVar) -> Option<String> {
    let Some(NodeEnum::ColumnRef(c)) = &n.node else { return None };
    let mut fields: Vec<&str> = c
        .fields
        .iter()
        .map(|f| match &f.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let name = fields.pop()?.to_string();
    let qualifier = match &table.alias {
        Some(a) => vec![a.aliasname.as_str()],
        None => [&table.catalogname, &table.schemaname, &table.relname].into_iter().filter(|p| !p.is_empty()).map(String::as_str).collect(),
    };
    (fields.is_empty() || fields == qualifier).then_some(name)
}

/// A key: `$n`, an integer literal, or a plain `'string'` (E'', U&'' and backslashes mean other things under other
/// settings, so they do not count).
fn key_of(n: &Node, sql: &str) -> Option<KeyRef> {
    match &n.node {
        Some(NodeEnum::ParamRef(p)) if p.number >= 1 => Some(KeyRef::Param(p.number as usize - 1)),
        Some(NodeEnum::AConst(c)) if !c.isnull => match &c.val {
            Some(Val::Ival(i)) => Some(KeyRef::Literal(i.ival.to_string())),
            Some(Val::Sval(s)) => {
                let written = format!("'{}'", s.sval.replace('\'', "''"));
                let at = usize::try_from(c.location).ok()?;
                (sql.get(at..)?.starts_with(&written) && !s.sval.contains('\\')).then(|| KeyRef::Literal(s.sval.clone()))
            }
            _ => None,
        },
        _ => None,
    }
}

fn operator(name: &[Node]) -> Option<&str> {
    match name {
        [n] => match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        },
        _ => None,
    }
}

fn target_name(n: &Node) -> Option<&str> {
    match &n.node {
        Some(NodeEnum::ResTarget(t)) if t.indirection.is_empty() => Some(t.name.as_str()),
        _ => None,
    }
}

fn name_of(t: &protobuf::RangeVar) -> String {
    [&t.catalogname, &t.schemaname, &t.relname].into_iter().filter(|p| !p.is_empty()).cloned().collect::<Vec<_>>().join(".")
}

/// A key value in a strict canonical form, or `None`. Keys are compared only in forms where equal values are
/// identical bytes whatever the column's type and collation: an integer written `0` or `-?[1-9][0-9]*` within
/// 64 bits, or a uuid in lower-case 8-4-4-4-12 hex. Any other form (`007`, `+7`, `7.0`, `ABC`, text) gets no
/// precision: a read keyed by it depends on the whole table, a write by it voids the whole table.
pub fn canonical_text(v: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(v).ok()?;
    if is_canonical_integer(s) || is_canonical_uuid(s) {
        return Some(s.to_string());
    }
    None
}

fn is_canonical_integer(s: &str) -> bool {
    s.parse::<i64>().is_ok_and(|i| i.to_string() == s)
}

fn is_canonical_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
            }
        })
}

/// A binary-format key value of the declared type `oid` in the strict form of `canonical_text`; `None` for types
/// other than int2/int4/int8/uuid or a length that does not fit.
pub fn canonical_binary(v: &[u8], oid: u32) -> Option<String> {
    match (oid, v.len()) {
        (21, 2) => Some(i16::from_be_bytes([v[0], v[1]]).to_string()),
        (23, 4) => Some(i32::from_be_bytes(v.try_into().ok()?).to_string()),
        (20, 8) => Some(i64::from_be_bytes(v.try_into().ok()?).to_string()),
        (2950, 16) => {
            let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
            Some(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(sql: &str) -> Option<Pinned> {
        let parsed = pg_query::parse(sql, 0).ok()?;
        let node = parsed.protobuf.stmts.first()?.stmt.as_ref()?.node.as_ref()?;
        write_pins(node, sql)
    }

    fn keys(sql: &str) -> Option<(String, String, Vec<KeyRef>)> {
        pins(sql).map(|p| (p.table, p.column, p.keys))
    }

    use KeyRef::{Literal as L, Param as P};

    #[test]
    fn writes_pinned_by_one_column_name_their_keys() {
        assert_eq!(keys("UPDATE t SET v = v + 1 WHERE k = $1"), Some(("t".into(), "k".into(), vec![P(0)])));
        assert_eq!(
            keys("UPDATE s.t AS x SET v = $1 WHERE x.k = 7 AND version = $2"),
            Some(("s.t".into(), "k".into(), vec![L("7".into())]))
        );
        assert_eq!(keys("DELETE FROM t WHERE id IN (1, 2, $1)"), Some(("t".into(), "id".into(), vec![L("1".into()), L("2".into()), P(0)])));
        assert_eq!(keys("DELETE FROM t WHERE 'a' = code"), Some(("t".into(), "code".into(), vec![L("a".into())])));
        assert_eq!(keys("INSERT INTO t (v, id) VALUES ($1, $2), (3, 4)"), Some(("t".into(), "id".into(), vec![P(1), L("4".into())])));
        assert_eq!(
            keys("INSERT INTO t (k, v) VALUES (5, 'x') ON CONFLICT (k) DO UPDATE SET v = excluded.v"),
            Some(("t".into(), "k".into(), vec![L("5".into())]))
        );
        assert_eq!(
            keys("INSERT INTO t (k, v) VALUES (5, 'x') ON CONFLICT DO NOTHING"),
            Some(("t".into(), "k".into(), vec![L("5".into())]))
        );
    }

    #[test]
    fn anything_else_is_the_whole_table() {
        for sql in [
            "UPDATE t SET k = k + 1 WHERE k = 7",        // the key moves
            "UPDATE t SET v = 1 WHERE k > 7",            // not pinned
            "UPDATE t SET v = 1 WHERE k = 7 OR k = 8",   // OR
            "UPDATE t SET v = 1 FROM u WHERE t.k = u.k", // a join
            "UPDATE t SET v = 1 WHERE u.k = 7",          // another table's column
            "UPDATE t SET v = 1 WHERE k = (SELECT 7)",   // a sub-select
            "UPDATE t SET v = 1 WHERE k = E'7'",         // escape string
            "DELETE FROM t USING u WHERE t.k = 7",
            "DELETE FROM t",
            "INSERT INTO t VALUES (1, 2)", // no column list
            "INSERT INTO t (k, v) SELECT k, v FROM u",
            "INSERT INTO t (k, v) VALUES (DEFAULT, 1)",
            "INSERT INTO t (k, v) VALUES (1, 2) ON CONFLICT (email) DO UPDATE SET v = 1",
            "INSERT INTO t (k, v) VALUES (1, 2) ON CONFLICT (k) DO UPDATE SET k = 3",
            "INSERT INTO t (k, v) VALUES (1, 2) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET v = 1",
            "WITH x AS (SELECT 1) UPDATE t SET v = 1 WHERE k = 1",
            "TRUNCATE t",
            "COPY t FROM STDIN",
        ] {
            assert_eq!(pins(sql), None, "{sql}");
        }
    }

    #[test]
    fn only_strict_forms_are_keys() {
        for ok in ["0", "7", "-12", "9223372036854775807", "123e4567-e89b-12d3-a456-426614174000"] {
            assert_eq!(canonical_text(ok.as_bytes()).as_deref(), Some(ok));
        }
        for no in ["007", "+7", " 7", "7 ", "7.0", "-0", "9223372036854775808", "abc", "123E4567-E89B-12D3-A456-426614174000", ""] {
            assert_eq!(canonical_text(no.as_bytes()), None, "{no:?}");
        }
        assert_eq!(canonical_binary(&7i32.to_be_bytes(), 23).as_deref(), Some("7"));
        assert_eq!(canonical_binary(&(-7i64).to_be_bytes(), 20).as_deref(), Some("-7"));
        assert_eq!(canonical_binary(&7i32.to_be_bytes(), 700), None, "float4 is not a key form");
        let u = [0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3, 0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00];
        assert_eq!(canonical_binary(&u, 2950).as_deref(), Some("123e4567-e89b-12d3-a456-426614174000"));
    }
}
