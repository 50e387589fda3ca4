//! Builds the merged `unnest($1::T[]) WITH ORDINALITY` statement for a [`super::BatchShape`].
//!
//! The merged statement is built by editing the parse tree and deparsing it with pg_query,
//! not by pasting source text: the parser has already resolved quoting, comments and casing,
//! and the deparser re-quotes identifiers correctly, so odd names (`"Order"`, `"a""b"`) cannot
//! break the SQL. The original target list is kept as a tree, so every output column keeps
//! the name Postgres derives for it (alias, column name, function name or `?column?`).
//! Deparsing happens once, when the shape is recognised, with a placeholder type name;
//! `merged_sql` only splices the array type in, so it cannot fail and its text depends on the
//! type alone.

use pg_query::protobuf;
use pg_query::{Node, NodeEnum};

/// The merged statement, before the placeholders are filled in. Its ON clause is rewritten
/// to the real key column; `pgsurge_type` becomes the array element type.
const TEMPLATE: &str = "SELECT pgsurge_k.pgsurge_ord FROM pgsurge_t \
     JOIN unnest($1::pgsurge_type[]) WITH ORDINALITY AS pgsurge_k(pgsurge_key, pgsurge_ord) \
     ON pgsurge_t.pgsurge_col = pgsurge_k.pgsurge_key ORDER BY pgsurge_k.pgsurge_ord";
const TYPE_PLACEHOLDER: &str = "pgsurge_type";

/// Merges and deparses, returning the text before and after the array element type name.
pub(super) fn merged_parts(s: &protobuf::SelectStmt, from: &Node, qualifier: &[String], key: &str) -> Option<(String, String)> {
    let merged = deparse_select(merge_tree(s, from, qualifier, key)?)?;
    let (prefix, suffix) = merged.split_once(TYPE_PLACEHOLDER)?;
    // The placeholder must be the only occurrence, or the splice would be ambiguous.
    (!suffix.contains(TYPE_PLACEHOLDER)).then(|| (prefix.to_string(), suffix.to_string()))
}

/// Grafts the original targets and table into the template.
fn merge_tree(s: &protobuf::SelectStmt, from: &Node, qualifier: &[String], key: &str) -> Option<protobuf::SelectStmt> {
    let template = pg_query::parse(TEMPLATE, 0).ok()?;
    let Some(NodeEnum::SelectStmt(t)) = template.protobuf.stmts.first()?.stmt.as_ref()?.node.clone() else {
        return None;
    };
    let mut merged = *t;
    let mut targets = s.target_list.clone();
    for target in &mut targets {
        // `*` would also expand pgsurge_k's columns: make it `<alias>.*`.
        if is_bare_star(target) {
            let mut fields: Vec<Node> = qualifier.iter().map(|q| string_node(q)).collect();
            fields.push(Node { node: Some(NodeEnum::AStar(protobuf::AStar {})) });
            let star = Node { node: Some(NodeEnum::ColumnRef(protobuf::ColumnRef { fields, location: -1 })) };
            let res = protobuf::ResTarget { val: Some(Box::new(star)), location: -1, ..Default::default() };
            *target = Node { node: Some(NodeEnum::ResTarget(Box::new(res))) };
        }
    }
    targets.append(&mut merged.target_list);
    merged.target_list = targets;

    let Some(NodeEnum::JoinExpr(join)) = merged.from_clause.first_mut()?.node.as_mut() else { return None };
    join.larg = Some(Box::new(from.clone()));
    let Some(NodeEnum::AExpr(on)) = join.quals.as_deref_mut()?.node.as_mut() else { return None };
    let Some(NodeEnum::ColumnRef(left)) = on.lexpr.as_deref_mut()?.node.as_mut() else { return None };
    left.fields = qualifier.iter().chain(std::iter::once(&key.to_string())).map(|f| string_node(f)).collect();
    Some(merged)
}

/// The original statement with its key literal replaced by `$1`.
pub(super) fn with_param(s: &protobuf::SelectStmt) -> protobuf::SelectStmt {
    let mut s = s.clone();
    if let Some(NodeEnum::AExpr(expr)) = s.where_clause.as_deref_mut().and_then(|w| w.node.as_mut()) {
        for side in [&mut expr.lexpr, &mut expr.rexpr].into_iter().flatten() {
            if matches!(side.node, Some(NodeEnum::AConst(_))) {
                side.node = Some(NodeEnum::ParamRef(protobuf::ParamRef { number: 1, location: -1 }));
            }
        }
    }
    s
}

pub(super) fn deparse_select(s: protobuf::SelectStmt) -> Option<String> {
    NodeEnum::SelectStmt(Box::new(s)).deparse(Default::default()).ok()
}

/// A whole target that is an unqualified `*`.
pub(super) fn is_bare_star(target: &Node) -> bool {
    let Some(NodeEnum::ResTarget(t)) = &target.node else { return false };
    let Some(NodeEnum::ColumnRef(c)) = t.val.as_deref().and_then(|v| v.node.as_ref()) else { return false };
    matches!(c.fields.as_slice(), [Node { node: Some(NodeEnum::AStar(_)) }])
}

fn string_node(s: &str) -> Node {
    Node { node: Some(NodeEnum::String(protobuf::String { sval: s.to_string() })) }
}

/// A type name as SQL: simple lowercase names as they are, anything else double-quoted, so a
/// caller's mistake yields "type does not exist" (and a per-request fallback), never injection.
pub(super) fn type_ident(name: &str) -> String {
    let simple = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if simple {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}
