//! Requests pgsurge answers itself because no server needs to see them: closing the client's own named statements
//! (they stay prepared on the servers for other clients), a lone Sync, Flushes with nothing pending; and the
//! SQL commands about prepared statements it must track (`DEALLOCATE`, `DISCARD ALL`).

use bytes::{Bytes, BytesMut};

use crate::protocol::codes::*;
use crate::protocol::encode;
use crate::protocol::message::{empty, View};
use crate::protocol::request::{Input, Req};
use crate::state::session::Statements;

/// The answer to `[Close statement]... Sync` when every statement it closes is one of the client's named ones:
/// CloseComplete for each, then ReadyForQuery (idle). `None` if one is not (the server must answer).
pub fn close_sync(input: &Input, req: &Req, stmts: &mut Statements) -> Option<BytesMut> {
    let closes = &input.msgs[req.first..req.end - 1];
    let names = closes.iter().map(|m| match m.view {
        View::Target { kind: b'S', name } => Some(input.at(name)),
        _ => None,
    });
    if !names.clone().all(|n| n.is_some_and(|n| stmts.contains_key(n))) {
        return None;
    }
    let mut out = BytesMut::with_capacity(closes.len() * 5 + 6);
    for name in names.flatten() {
        stmts.remove(name);
        out.extend_from_slice(&empty(CLOSE_COMPLETE));
    }
    encode::put_ready_for_query(&mut out, TxStatus::Idle);
    Some(out)
}

/// `DEALLOCATE name` of one of the client's protocol-level statements is answered here (the reply is returned). (`DEALLOCATE
/// ALL` and `DISCARD ALL` go to the server; their effects clear the client's statements once they succeed.)
pub fn statement_commands(sql: &[u8], stmts: &mut Statements, status: TxStatus) -> Option<Bytes> {
    // The hot path: nearly every query is not one; decide that without allocating.
    let head = sql.trim_ascii_start();
    if sql.len() > 200 || !(head.len() >= 10 && head[..10].eq_ignore_ascii_case(b"deallocate")) {
        return None;
    }
    let text = String::from_utf8_lossy(sql);
    let words: Vec<&str> = text.trim().trim_end_matches(';').split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let name = match lower.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["deallocate", n] | ["deallocate", "prepare", n] if *n != "all" => words[words.len() - 1].to_string(),
        _ => return None,
    };
    // An unquoted name folds to lower case; a quoted one is taken as written.
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    };
    stmts.remove(name.as_bytes())?;
    let mut out = BytesMut::new();
    encode::put_command_complete(&mut out, "DEALLOCATE");
    encode::put_ready_for_query(&mut out, status);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_names_fold_like_identifiers() {
        let registry = crate::state::Registry::default();
        let mut stmts = Statements::default();
        for name in ["s1", "S1"] {
            stmts.insert(Bytes::from(name), registry.intern(b"SELECT 1", b"\0\0"));
        }
        assert!(statement_commands(b"DEALLOCATE \"S1\"", &mut stmts, TxStatus::Idle).is_some());
        assert!(stmts.contains_key(&b"s1"[..]) && !stmts.contains_key(&b"S1"[..]));
        assert!(statement_commands(b"deallocate prepare S1;", &mut stmts, TxStatus::Idle).is_some());
        assert!(stmts.is_empty());
        assert!(statement_commands(b"DEALLOCATE ALL", &mut stmts, TxStatus::Idle).is_none(), "goes to the server");
        assert!(statement_commands(b"DEALLOCATE unknown", &mut stmts, TxStatus::Idle).is_none());
    }
}
