//! Recognises the N+1 shape `SELECT <row exprs> FROM <table> WHERE <col> = $1` (see [`batchable`]).

use super::merge::{deparse_select, is_bare_star, merged_parts, type_ident, with_param};
use super::tree;
use super::volatility::{volatility, FuncKind, Volatility};
use pg_query::protobuf::{self, a_const::Val, AExprKind, SetOperation};
use pg_query::{Node, NodeEnum};

/// Expression node types a batched target may contain: row-local, no sub-selects, no
/// parameters, no session values. Functions are checked separately against the allowlist.
const TARGET_NODES: &[&str] = &[
    "ResTarget",
    "ColumnRef",
    "AStar",
    "AConst",
    "TypeCast",
    "AExpr",
    "BoolExpr",
    "NullTest",
    "BooleanTest",
    "CaseExpr",
    "CaseWhen",
    "CoalesceExpr",
    "MinMaxExpr",
    "FuncCall",
    "RowExpr",
    "AArrayExpr",
    "CollateClause",
    "AIndirection",
    "AIndices",
    "List",
];

/// A statement that can be merged with others of the same text into one round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchShape {
    /// The table as written (`users`, `app.users`).
    pub table: String,
    /// The key column compared with the parameter.
    pub key_column: String,
    /// For the simple-protocol form `WHERE id = 42` / `WHERE code = 'abc'`: the literal's value
    /// as text, to be sent as a text-format array element. `None` for `= $1`.
    pub literal: Option<String>,
    /// The array element type that reproduces the literal's own type, when the text fixes it:
    /// `Some("int4")` for an integer literal (Postgres types `42` as int4, so `text_col = 42`
    /// must still fail in the merged query). `None` for `$1` and string literals.
    pub literal_type: Option<&'static str>,
    /// The single-key statement with `$1` in place of the literal (the original text for `$1`
    /// forms). For `$1` and string literals, Parse/Describe it to learn the key's type OID for
    /// [`array_cast_type`]: an unknown-typed `$1` resolves exactly like an untyped `'abc'`.
    pub param_sql: String,
    merged_prefix: String,
    merged_suffix: String,
}

impl BatchShape {
    /// One statement with one array parameter `$1` (elements: the keys) whose text depends only
    /// on `array_type_name` (e.g. `"int8"` from [`array_cast_type`]), never on the batch size.
    /// Columns: the original target list, then the 1-based position of the key in the array
    /// (`pgsurge_ord`, bigint) as the LAST column; rows are ordered by it. A key with no row,
    /// or a NULL element, yields no row; a duplicated key yields its rows once per position.
    pub fn merged_sql(&self, array_type_name: &str) -> String {
        format!("{}{}{}", self.merged_prefix, type_ident(array_type_name), self.merged_suffix)
    }
}

/// Recognises exactly `SELECT <targets> FROM <table> [alias] WHERE <col> = $1` (or `$1 = col`,
/// or an integer/plain string literal instead of `$1`); `None` for anything else.
pub fn batchable(sql: &str) -> Option<BatchShape> {
    // Our own identifiers must not be referable by the original statement: if it mentioned
    // pgsurge_k, the merged query could succeed where the original fails.
    if sql.to_ascii_lowercase().contains("pgsurge_") {
        return None;
    }
    let parsed = pg_query::parse(sql, 0).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else { return None };
    let Some(NodeEnum::SelectStmt(select)) = raw.stmt.as_ref()?.node.as_ref() else { return None };
    if !is_plain_select(select) {
        return None;
    }
    let [from] = select.from_clause.as_slice() else { return None };
    let Some(NodeEnum::RangeVar(table)) = &from.node else { return None };
    let qualifier = qualifier_of(table);
    let (key_column, key_side) = key_predicate(select.where_clause.as_deref()?, table)?;
    let literal = literal_text(sql, key_side)?;

    let facts = tree::collect(&raw.stmt);
    let expected_params: &[i32] = if literal.is_some() { &[] } else { &[1] };
    if facts.params != expected_params || !targets_are_row_local(&select.target_list) {
        return None;
    }

    let (merged_prefix, merged_suffix) = merged_parts(select, from, &qualifier, &key_column)?;
    let param_sql = match literal {
        None => sql.to_string(),
        Some(_) => deparse_select(with_param(select))?,
    };
    Some(BatchShape {
        table: qualifier_of_table(table).join("."),
        key_column,
        literal_type: literal_type(key_side),
        literal: literal.map(|l| l.to_string()),
        param_sql,
        merged_prefix,
        merged_suffix,
    })
}

/// Maps a parameter type OID (from ParameterDescription) to the name used in `$1::<name>[]`.
/// Only built-in types with a plain `=` operator; `None` means "do not batch".
pub fn array_cast_type(oid: u32) -> Option<&'static str> {
    ARRAY_TYPES.iter().find(|(o, _)| *o == oid).map(|(_, name)| *name)
}

/// Built-in types whose `=` is the ordinary equality the original `col = $1` would use.
const ARRAY_TYPES: &[(u32, &str)] = &[
    (16, "bool"),
    (17, "bytea"),
    (19, "name"),
    (20, "int8"),
    (21, "int2"),
    (23, "int4"),
    (25, "text"),
    (26, "oid"),
    (700, "float4"),
    (701, "float8"),
    (1042, "bpchar"),
    (1043, "varchar"),
    (1082, "date"),
    (1114, "timestamp"),
    (1184, "timestamptz"),
    (1700, "numeric"),
    (2950, "uuid"),
];

/// No DISTINCT, INTO, GROUP BY, HAVING, WINDOW, VALUES, ORDER BY, LIMIT/OFFSET, locking, CTE
/// or set operation.
fn is_plain_select(s: &protobuf::SelectStmt) -> bool {
    s.op == SetOperation::SetopNone as i32
        && s.larg.is_none()
        && s.rarg.is_none()
        && s.with_clause.is_none()
        && s.into_clause.is_none()
        && s.distinct_clause.is_empty()
        && s.group_clause.is_empty()
        && s.having_clause.is_none()
        && s.window_clause.is_empty()
        && s.values_lists.is_empty()
        && s.sort_clause.is_empty()
        && s.limit_offset.is_none()
        && s.limit_count.is_none()
        && s.locking_clause.is_empty()
}

/// `col = <param or literal>` or `<param or literal> = col`, with the column unqualified or
/// qualified by the alias (or, without an alias, by the table name as written).
fn key_predicate<'a>(where_clause: &'a Node, table: &protobuf::RangeVar) -> Option<(String, &'a Node)> {
    let Some(NodeEnum::AExpr(expr)) = &where_clause.node else { return None };
    if expr.kind != AExprKind::AexprOp as i32 || string_list(&expr.name)? != ["="] {
        return None;
    }
    let (left, right) = (expr.lexpr.as_deref()?, expr.rexpr.as_deref()?);
    let (column, value) = match (&left.node, &right.node) {
        (Some(NodeEnum::ColumnRef(c)), _) => (c, right),
        (_, Some(NodeEnum::ColumnRef(c))) => (c, left),
        _ => return None,
    };
    let mut fields = string_list(&column.fields)?;
    let name = fields.pop()?;
    if !fields.is_empty() && fields != qualifier_of(table) {
        return None;
    }
    Some((name, value))
}

/// `Some(None)` for `$1`, `Some(Some(text))` for an integer or plain `'string'` literal, `None`
/// for anything else. A string only counts if its source text is exactly `'...'` with doubled
/// quotes: E'', U&'', $$ $$ and backslashes mean different things under other settings.
fn literal_text<'a>(sql: &str, value: &'a Node) -> Option<Option<std::borrow::Cow<'a, str>>> {
    match &value.node {
        Some(NodeEnum::ParamRef(p)) if p.number == 1 => Some(None),
        Some(NodeEnum::AConst(c)) if !c.isnull => match &c.val {
            Some(Val::Ival(i)) => Some(Some(i.ival.to_string().into())),
            Some(Val::Sval(s)) => {
                let written = format!("'{}'", s.sval.replace('\'', "''"));
                let at = usize::try_from(c.location).ok()?;
                let plain = sql.get(at..)?.starts_with(&written) && !s.sval.contains('\\');
                plain.then_some(Some(s.sval.as_str().into()))
            }
            _ => None,
        },
        _ => None,
    }
}

fn literal_type(value: &Node) -> Option<&'static str> {
    match &value.node {
        Some(NodeEnum::AConst(protobuf::AConst { val: Some(Val::Ival(_)), .. })) => Some("int4"),
        _ => None,
    }
}

/// Targets may only be expressions over the row: allowed node types, immutable scalar
/// functions, and unqualified `*` only as a whole target (we qualify those).
fn targets_are_row_local(targets: &[Node]) -> bool {
    let facts = tree::collect(&targets.to_vec());
    let top_level_stars = targets.iter().filter(|t| is_bare_star(t)).count();
    facts.node_types.iter().all(|t| TARGET_NODES.contains(&t.as_str()))
        && facts.bare_stars == top_level_stars
        && !facts.sql_value_function
        && !facts.time_literal
        && facts.functions.iter().all(|(name, nargs)| volatility(name, *nargs) == Volatility::Immutable(FuncKind::Scalar))
}

/// The name that qualifies the table's columns: its alias, else the table name as written.
fn qualifier_of(table: &protobuf::RangeVar) -> Vec<String> {
    match &table.alias {
        Some(alias) => vec![alias.aliasname.clone()],
        None => qualifier_of_table(table),
    }
}

fn qualifier_of_table(t: &protobuf::RangeVar) -> Vec<String> {
    [&t.catalogname, &t.schemaname, &t.relname].into_iter().filter(|p| !p.is_empty()).cloned().collect()
}

/// The strings of a list of `String` nodes; `None` if any element is something else (`*`).
fn string_list(nodes: &[Node]) -> Option<Vec<String>> {
    nodes
        .iter()
        .map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}
