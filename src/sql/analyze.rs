//! [`analyze`]: one parse, then class, tables, functions, flags and cacheability of a statement.

use std::collections::BTreeSet;

use super::classify::classify;
use super::hints::parse_hints;
use super::tree::{self, Facts};
use super::volatility::{volatility, Volatility};
use super::{reason, Analysis, Cacheability, Hints, StatementClass};
use pg_query::protobuf::{self, ObjectType};
use pg_query::NodeEnum;

/// Analyses `sql` (one or more statements) with Postgres' parser. Never fails: unparsable
/// text comes back as [`StatementClass::ParseError`], which callers must treat as unknown
/// (forward it, never cache it).
pub fn analyze(sql: &str) -> Analysis {
    let hints = parse_hints(sql);
    let parsed = match pg_query::parse(sql, 0) {
        Ok(parsed) => parsed,
        Err(_) => return unusable(StatementClass::ParseError, reason::PARSE_ERROR, hints),
    };
    let nodes: Vec<&NodeEnum> = parsed.protobuf.stmts.iter().filter_map(|raw| raw.stmt.as_ref()?.node.as_ref()).collect();
    if nodes.is_empty() {
        return unusable(StatementClass::Empty, reason::EMPTY, hints);
    }

    let mut statements = Vec::with_capacity(nodes.len());
    let mut all = Facts::default();
    let mut written: BTreeSet<String> = BTreeSet::new();
    let mut copied_out: BTreeSet<String> = BTreeSet::new();
    let mut select_into = false;
    let mut copy_in = false;
    for node in &nodes {
        let facts = tree::collect(node);
        let class = classify(node, &facts);
        match node {
            NodeEnum::SelectStmt(s) => {
                if let Some(rel) = s.into_clause.as_ref().and_then(|i| i.rel.as_ref()) {
                    select_into = true;
                    written.insert(qualified(&rel.catalogname, &rel.schemaname, &rel.relname));
                }
            }
            NodeEnum::CopyStmt(c) => {
                copy_in |= c.is_from && c.filename.is_empty() && !c.is_program;
                if let Some(rel) = &c.relation {
                    let name = qualified(&rel.catalogname, &rel.schemaname, &rel.relname);
                    if c.is_from {
                        written.insert(name)
                    } else {
                        copied_out.insert(name)
                    };
                }
            }
            NodeEnum::DropStmt(d) => written.extend(drop_targets(d)),
            _ => {}
        }
        // DDL and privilege statements may change anything they name: flush all of it.
        if matches!(class, StatementClass::Ddl | StatementClass::Privilege) {
            written.extend(facts.relations.iter().cloned());
        }
        statements.push(class);
        merge(&mut all, facts);
    }

    // pg_query labels a COPY TO relation as DML; it is only read.
    let pg_selected: BTreeSet<String> = parsed.select_tables().into_iter().collect();
    for name in parsed.dml_tables() {
        if !copied_out.contains(&name) || all.dml_targets.contains(&name) {
            written.insert(name);
        }
    }
    written.extend(parsed.ddl_tables());
    written.extend(all.dml_targets.iter().cloned());

    // Anything pg_query did not call a pure write target is a read (including relations its
    // partial walker never saw: those sit inside expressions).
    let tables_read: BTreeSet<String> =
        all.relations.iter().filter(|r| pg_selected.contains(*r) || copied_out.contains(*r) || !written.contains(*r)).cloned().collect();
    let reads_catalog = tables_read.iter().any(|t| is_catalog(t));
    let reads_temp = tables_read.iter().any(|t| schema_of(t).is_some_and(|s| s.starts_with("pg_temp")));

    let class = if statements.len() == 1 { statements[0] } else { StatementClass::Multiple };
    let mut analysis = Analysis {
        class,
        statements,
        tables_read: tables_read.into_iter().collect(),
        tables_written: written.into_iter().collect(),
        functions: all.functions.iter().map(|(f, _)| f.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        locking: all.locking,
        select_into,
        tablesample: all.tablesample,
        reads_catalog,
        cacheable: Cacheability::Yes,
        hints,
        point_read: None,
        write_pins: None,
        copy_in,
    };
    let top_is_select = matches!(nodes[0], NodeEnum::SelectStmt(_));
    analysis.cacheable = cacheability(&analysis, &all, top_is_select, reads_temp);
    if let [node] = nodes.as_slice() {
        if class == StatementClass::Write {
            analysis.write_pins = super::pins::write_pins(node, sql);
        }
        if class == StatementClass::Select && analysis.cacheable == Cacheability::Yes {
            analysis.point_read = super::batchable(sql).map(|b| super::pins::Pinned {
                table: b.table,
                column: b.key_column,
                keys: vec![match b.literal {
                    Some(l) => super::pins::KeyRef::Literal(l),
                    None => super::pins::KeyRef::Param(0),
                }],
            });
        }
    }
    analysis
}

/// Applies the read-cache rules that the text decides, in the priority documented on
/// [`Cacheability::No`]: opt-in-able reasons (unknown function, temp, catalog) come last.
fn cacheability(a: &Analysis, facts: &Facts, top_is_select: bool, reads_temp: bool) -> Cacheability {
    use Cacheability::No;
    if a.class == StatementClass::Multiple {
        return No(reason::MULTIPLE);
    }
    if a.hints.nocache {
        return No(reason::NOCACHE_HINT);
    }
    if a.select_into {
        return No(reason::SELECT_INTO);
    }
    if a.class != StatementClass::Select {
        // A SELECT classed as a write can only be one with INSERT/UPDATE/DELETE in a CTE.
        let cte_write = facts.has_dml && a.statements.len() == 1 && top_is_select;
        return No(if cte_write { reason::DATA_MODIFYING_CTE } else { reason::NOT_SELECT });
    }
    if a.locking {
        return No(reason::LOCKING);
    }
    if a.tablesample {
        return No(reason::TABLESAMPLE);
    }
    if facts.sql_value_function {
        return No(reason::SQL_VALUE_FUNCTION);
    }
    if facts.time_literal {
        return No(reason::TIME_LITERAL);
    }
    let verdicts: Vec<Volatility> = facts.functions.iter().map(|(f, n)| volatility(f, *n)).collect();
    if verdicts.contains(&Volatility::NotImmutable) {
        return No(reason::NON_IMMUTABLE_FUNCTION);
    }
    if verdicts.contains(&Volatility::Unknown) {
        return No(reason::UNKNOWN_FUNCTION);
    }
    if reads_temp {
        return No(reason::TEMP_TABLE);
    }
    if a.reads_catalog {
        return No(reason::CATALOG);
    }
    Cacheability::Yes
}

fn unusable(class: StatementClass, why: &'static str, hints: Hints) -> Analysis {
    Analysis {
        class,
        statements: vec![class],
        tables_read: Vec::new(),
        tables_written: Vec::new(),
        functions: Vec::new(),
        locking: false,
        select_into: false,
        tablesample: false,
        reads_catalog: false,
        cacheable: Cacheability::No(why),
        hints,
        point_read: None,
        write_pins: None,
        copy_in: false,
    }
}

fn merge(all: &mut Facts, facts: Facts) {
    all.relations.extend(facts.relations);
    all.functions.extend(facts.functions);
    all.dml_targets.extend(facts.dml_targets);
    all.has_dml |= facts.has_dml;
    all.locking |= facts.locking;
    all.tablesample |= facts.tablesample;
    all.sql_value_function |= facts.sql_value_function;
    all.time_literal |= facts.time_literal;
}

/// `DROP TABLE/VIEW/MATERIALIZED VIEW/FOREIGN TABLE/SEQUENCE a, s.b`: names are lists of
/// strings there, not RangeVars, and pg_query only reports DROP TABLE.
fn drop_targets(d: &protobuf::DropStmt) -> Vec<String> {
    let relation_kinds = [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectForeignTable,
        ObjectType::ObjectSequence,
    ];
    if !relation_kinds.iter().any(|k| *k as i32 == d.remove_type) {
        return Vec::new();
    }
    let name_of = |object: &pg_query::Node| -> Option<String> {
        let Some(NodeEnum::List(list)) = &object.node else { return None };
        let parts: Vec<&str> = list
            .items
            .iter()
            .filter_map(|i| match &i.node {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        Some(parts.join("."))
    };
    d.objects.iter().filter_map(name_of).collect()
}

fn qualified(catalog: &str, schema: &str, rel: &str) -> String {
    [catalog, schema, rel].into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>().join(".")
}

/// The schema part of `schema.rel` or `db.schema.rel`.
fn schema_of(name: &str) -> Option<&str> {
    let mut parts = name.rsplit('.');
    parts.next();
    parts.next()
}

/// System catalogs: explicitly in a system schema, or an unqualified `pg_*` name, which
/// resolves to pg_catalog first because pg_catalog is implicitly first on the search_path.
fn is_catalog(name: &str) -> bool {
    match schema_of(name) {
        Some(schema) => matches!(schema, "pg_catalog" | "information_schema" | "pg_toast"),
        None => name.starts_with("pg_"),
    }
}
