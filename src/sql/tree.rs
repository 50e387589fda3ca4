//! A complete walk over a pg_query parse tree, collecting the facts the analysis needs.
//!
//! pg_query's own `nodes()` iterator only descends into the node types it cares about (it
//! misses e.g. `ARRAY[...]`, indirection, `ROW(...)` and window definitions), so a `random()`
//! or a catalog sub-select hidden there would be missed, and the cache would serve a wrong
//! answer. Instead we serialise the tree with serde (every protobuf struct derives
//! `Serialize`) and visit every object: nothing can hide. The walk is iterative, so tree depth
//! cannot overflow our stack (prost already refuses trees nested deeper than 100 messages).

use serde_json::{Map, Value};

/// Everything interesting found anywhere below a node.
#[derive(Debug, Default)]
pub(super) struct Facts {
    /// Every relation reference (`RangeVar`), as `schema.name` or `name`, in order of discovery.
    pub relations: Vec<String>,
    /// Every function call: dotted name as written and argument count.
    pub functions: Vec<(String, usize)>,
    /// Targets of INSERT/UPDATE/DELETE/MERGE nodes found anywhere, including in CTEs.
    pub dml_targets: Vec<String>,
    /// An INSERT/UPDATE/DELETE/MERGE node exists somewhere.
    pub has_dml: bool,
    /// `FOR UPDATE/SHARE/NO KEY UPDATE/KEY SHARE` anywhere, sub-selects included.
    pub locking: bool,
    /// `TABLESAMPLE` anywhere.
    pub tablesample: bool,
    /// `CURRENT_USER`, `CURRENT_TIMESTAMP`, `LOCALTIME`, ... anywhere.
    pub sql_value_function: bool,
    /// A string constant reading `now`, `today`, `tomorrow` or `yesterday`: cast to a date or
    /// time type it changes with the clock, and we cannot see the target type reliably.
    pub time_literal: bool,
    /// Sub-selects (`SubLink`, `RangeSubselect`) anywhere.
    pub subquery: bool,
    /// Unqualified `*` column references (they expand over every FROM item).
    pub bare_stars: usize,
    /// Numbers of the `$n` parameter references, one entry per occurrence.
    pub params: Vec<i32>,
    /// Names of every node type seen (protobuf variant names such as `FuncCall`).
    pub node_types: Vec<String>,
}

/// Serialises `node` and walks all of it.
pub(super) fn collect<T: serde::Serialize>(node: &T) -> Facts {
    let mut facts = Facts::default();
    // Serialising protobuf structs to a Value cannot fail (no maps with non-string keys).
    let Ok(root) = serde_json::to_value(node) else {
        return facts;
    };
    let mut stack: Vec<&Value> = vec![&root];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                visit_object(map, &mut facts);
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items.iter()),
            _ => {}
        }
    }
    facts
}

fn visit_object(map: &Map<String, Value>, facts: &mut Facts) {
    // Unwrapped structs (InsertStmt.relation, CallStmt.funccall ...) have no variant name, so
    // RangeVar and FuncCall are recognised by their fields rather than by their wrapper.
    if map.contains_key("relname") && map.contains_key("relpersistence") {
        facts.relations.push(range_var_name(map));
    }
    if map.contains_key("funcname") && map.contains_key("agg_star") {
        let nargs = map.get("args").and_then(Value::as_array).map_or(0, Vec::len);
        facts.functions.push((dotted(map.get("funcname")), nargs));
    }
    // Node wrappers serialise as {"node": {"VariantName": {...}}}; oneof fields such as
    // A_Const.val as {"Sval": {...}}. Variant names are the only capitalised keys.
    for (key, body) in map {
        if !key.starts_with(|c: char| c.is_ascii_uppercase()) {
            continue;
        }
        let Value::Object(body) = body else { continue };
        visit_typed(key, body, facts);
    }
}

fn visit_typed(kind: &str, body: &Map<String, Value>, facts: &mut Facts) {
    match kind {
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
            facts.has_dml = true;
            if let Some(Value::Object(rel)) = body.get("relation") {
                facts.dml_targets.push(range_var_name(rel));
            }
        }
        "LockingClause" => facts.locking = true,
        "RangeTableSample" => facts.tablesample = true,
        "SqlvalueFunction" => facts.sql_value_function = true,
        "SubLink" | "RangeSubselect" => facts.subquery = true,
        "ColumnRef" => {
            let fields = body.get("fields").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
            if let [only] = fields {
                if only.pointer("/node/AStar").is_some() {
                    facts.bare_stars += 1;
                }
            }
        }
        "ParamRef" => {
            let n = body.get("number").and_then(Value::as_i64).unwrap_or(0);
            facts.params.push(i32::try_from(n).unwrap_or(0));
        }
        "Sval" => {
            let text = body.get("sval").and_then(Value::as_str).unwrap_or("");
            if is_time_word(text) {
                facts.time_literal = true;
            }
        }
        _ => {}
    }
    // Sval/Ival/... are A_Const payloads and String is an identifier, not node types of interest.
    if !matches!(kind, "Sval" | "Ival" | "Fval" | "Boolval" | "Bsval" | "String") {
        facts.node_types.push(kind.to_string());
    }
}

/// `schema.rel` if a schema was written, else `rel`; the catalog part (`db.schema.rel`) is kept
/// too, since Postgres accepts it for the current database.
pub(super) fn range_var_name(map: &Map<String, Value>) -> String {
    let part = |k: &str| map.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let parts = [part("catalogname"), part("schemaname"), part("relname")];
    parts.into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>().join(".")
}

/// Joins a list of `String` nodes (a qualified name) with dots.
fn dotted(list: Option<&Value>) -> String {
    let Some(Value::Array(items)) = list else { return String::new() };
    let names = items.iter().filter_map(|item| item.pointer("/node/String/sval")?.as_str());
    names.collect::<Vec<_>>().join(".")
}

/// The special date/time input strings that mean a moment relative to the current time.
fn is_time_word(text: &str) -> bool {
    let word = text.trim();
    ["now", "today", "tomorrow", "yesterday"].iter().any(|w| word.eq_ignore_ascii_case(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(sql: &str) -> Facts {
        collect(&pg_query::parse(sql, 0).unwrap().protobuf)
    }

    #[test]
    fn finds_functions_hidden_where_pg_query_nodes_does_not_look() {
        let f = facts("SELECT ARRAY[random()], (ROW(1, clock_timestamp())).f1 FROM t");
        let names: Vec<_> = f.functions.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"random") && names.contains(&"clock_timestamp"), "{names:?}");
    }

    #[test]
    fn finds_relations_inside_array_sub_selects_and_dml_targets() {
        let f = facts("SELECT ARRAY(SELECT x FROM pg_catalog.pg_class) FROM s.t");
        assert!(f.relations.contains(&"pg_catalog.pg_class".to_string()));
        assert!(f.relations.contains(&"s.t".to_string()));
        let f = facts("WITH d AS (DELETE FROM logs RETURNING id) SELECT * FROM d");
        assert!(f.has_dml);
        assert_eq!(f.dml_targets, vec!["logs"]);
    }

    #[test]
    fn spots_time_words_value_functions_locking_sampling_and_params() {
        assert!(facts("SELECT ' Today '::date").time_literal);
        assert!(!facts("SELECT 'nowhere'").time_literal);
        assert!(facts("SELECT 1 WHERE x = CURRENT_DATE").sql_value_function);
        assert!(facts("SELECT * FROM (SELECT * FROM t FOR SHARE) s").locking);
        assert!(facts("SELECT * FROM t TABLESAMPLE SYSTEM (1)").tablesample);
        assert_eq!(facts("SELECT $1, $2, $1").params.len(), 3);
    }

    #[test]
    fn counts_function_arguments() {
        let f = facts("SELECT length(name) FROM t");
        assert_eq!(f.functions, vec![("length".to_string(), 1)]);
    }
}
