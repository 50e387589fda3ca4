//! Maps one top-level parse-tree node to its [`StatementClass`].
//!
//! Writes are found by what the tree contains (any INSERT/UPDATE/DELETE/MERGE node, including
//! inside a CTE), not only by the top-level statement type, because
//! `WITH d AS (DELETE ...) SELECT ...` is a SELECT that deletes.

use super::tree::Facts;
use super::{StatementClass, TxKind};
use pg_query::protobuf::{self, TransactionStmtKind, VariableSetKind};
use pg_query::NodeEnum;

/// The class of a single statement whose full-tree facts are `facts`.
pub(super) fn classify(node: &NodeEnum, facts: &Facts) -> StatementClass {
    use StatementClass as C;
    match node {
        NodeEnum::SelectStmt(s) => {
            if facts.has_dml || s.into_clause.is_some() {
                C::Write
            } else {
                C::Select
            }
        }
        NodeEnum::InsertStmt(_) | NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) | NodeEnum::MergeStmt(_) => C::Write,
        NodeEnum::CopyStmt(c) if c.is_from => C::Write,
        NodeEnum::CopyStmt(_) => C::CopyTo,
        NodeEnum::TransactionStmt(t) => C::Transaction(tx_kind(t.kind)),
        NodeEnum::VariableSetStmt(v) => set_class(v),
        // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT and RESET ALL.
        NodeEnum::DiscardStmt(d) if d.target == protobuf::DiscardMode::DiscardAll as i32 => C::RoleChange,
        NodeEnum::DiscardStmt(_) => C::Other,
        NodeEnum::VariableShowStmt(_) => C::Show,
        NodeEnum::ExplainStmt(e) => explain_class(e, facts),
        // The planner turns SELECT INTO into this; CREATE TABLE AS is DDL that also writes.
        NodeEnum::CreateTableAsStmt(c) if c.is_select_into => C::Write,
        NodeEnum::GrantStmt(_)
        | NodeEnum::GrantRoleStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_)
        | NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::DropRoleStmt(_)
        | NodeEnum::ReassignOwnedStmt(_)
        | NodeEnum::DropOwnedStmt(_)
        | NodeEnum::AlterOwnerStmt(_)
        | NodeEnum::CreatePolicyStmt(_)
        | NodeEnum::AlterPolicyStmt(_) => C::Privilege,
        NodeEnum::TruncateStmt(_)
        | NodeEnum::CommentStmt(_)
        | NodeEnum::RenameStmt(_)
        | NodeEnum::RefreshMatViewStmt(_)
        | NodeEnum::DefineStmt(_)
        | NodeEnum::SecLabelStmt(_)
        | NodeEnum::CompositeTypeStmt(_)
        | NodeEnum::IndexStmt(_)
        | NodeEnum::ViewStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::ImportForeignSchemaStmt(_)
        | NodeEnum::AlterObjectSchemaStmt(_)
        | NodeEnum::AlterObjectDependsStmt(_) => C::Ddl,
        _ => by_variant_name(facts),
    }
}

/// The many CREATE/ALTER/DROP statement types are DDL; naming each of the ~80 is error-prone,
/// so fall back on the protobuf variant name. The walk starts at the statement node, so the
/// first node type it recorded is the statement's own.
fn by_variant_name(facts: &Facts) -> StatementClass {
    let Some(name) = facts.node_types.first() else {
        return StatementClass::Other;
    };
    let ddl_prefixes = ["Create", "Alter", "Drop"];
    if ddl_prefixes.iter().any(|p| name.starts_with(p)) {
        StatementClass::Ddl
    } else {
        StatementClass::Other
    }
}

fn tx_kind(kind: i32) -> TxKind {
    use TransactionStmtKind as K;
    match TransactionStmtKind::try_from(kind) {
        Ok(K::TransStmtBegin | K::TransStmtStart) => TxKind::Begin,
        Ok(K::TransStmtCommit) => TxKind::Commit,
        Ok(K::TransStmtSavepoint) => TxKind::Savepoint,
        Ok(K::TransStmtRelease) => TxKind::Release,
        Ok(K::TransStmtRollbackTo) => TxKind::RollbackTo,
        Ok(K::TransStmtPrepare) => TxKind::Prepare,
        Ok(K::TransStmtCommitPrepared) => TxKind::CommitPrepared,
        Ok(K::TransStmtRollbackPrepared) => TxKind::RollbackPrepared,
        // An unknown kind cannot come from the parser; ROLLBACK is the safe reading.
        Ok(K::TransStmtRollback | K::Undefined) | Err(_) => TxKind::Rollback,
    }
}

/// SET ROLE / SET SESSION AUTHORIZATION / RESET ROLE change whose privileges apply; everything
/// else is an ordinary setting. RESET ALL does not touch the role (those GUCs are NO_RESET_ALL).
fn set_class(v: &protobuf::VariableSetStmt) -> StatementClass {
    let role_guc = matches!(v.name.as_str(), "role" | "session_authorization");
    let resets_all = v.kind == VariableSetKind::VarResetAll as i32;
    if role_guc && !resets_all {
        StatementClass::RoleChange
    } else {
        StatementClass::Set
    }
}

/// Plain EXPLAIN only plans. EXPLAIN ANALYZE runs the statement, so a DML inside it writes.
fn explain_class(e: &protobuf::ExplainStmt, facts: &Facts) -> StatementClass {
    let analyze = e.options.iter().any(|opt| match &opt.node {
        Some(NodeEnum::DefElem(d)) => d.defname == "analyze" && !defelem_false(d),
        _ => false,
    });
    let inner_writes = facts.has_dml
        || matches!(e.query.as_deref().and_then(|q| q.node.as_ref()),
            Some(NodeEnum::SelectStmt(s)) if s.into_clause.is_some())
        || matches!(e.query.as_deref().and_then(|q| q.node.as_ref()), Some(NodeEnum::CreateTableAsStmt(_)));
    if analyze && inner_writes {
        StatementClass::Write
    } else {
        StatementClass::Other
    }
}

/// `EXPLAIN (ANALYZE false)` / `(ANALYZE off)` / `(ANALYZE 0)`.
fn defelem_false(d: &protobuf::DefElem) -> bool {
    let value = match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        Some(NodeEnum::String(s)) => s.sval.to_ascii_lowercase(),
        Some(NodeEnum::Boolean(b)) => b.boolval.to_string(),
        Some(NodeEnum::Integer(i)) => i.ival.to_string(),
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(protobuf::a_const::Val::Boolval(b)) => b.boolval.to_string(),
            Some(protobuf::a_const::Val::Ival(i)) => i.ival.to_string(),
            Some(protobuf::a_const::Val::Sval(s)) => s.sval.to_ascii_lowercase(),
            _ => return false,
        },
        _ => return false,
    };
    matches!(value.as_str(), "false" | "off" | "0" | "no")
}
