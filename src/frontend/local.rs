//! Requests pgsurge answers itself because no server needs to see them: closing the client's own named statements
//! (they stay prepared on the servers for other clients), a lone Sync, Flushes with nothing pending; and the
//! SQL commands about prepared statements it must track (`DEALLOCATE`, `DISCARD ALL`).

use bytes::{Bytes, BytesMut};

use crate::backend::ServerConn;
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

/// Simple-query commands about prepared statements that pgsurge must see: `DEALLOCATE name` of a protocol-level
/// statement is answered here (the reply is returned); `DEALLOCATE ALL` and `DISCARD ALL` also forget them (and go
/// to the server).
pub fn statement_commands(sql: &[u8], stmts: &mut Statements, conn: &mut ServerConn, status: TxStatus) -> Option<Bytes> {
    // The hot path: nearly every query is neither; decide that without allocating.
    let head = sql.trim_ascii_start();
    if sql.len() > 64
        || !(head.len() >= 7
            && (head[..7].eq_ignore_ascii_case(b"discard") || head.len() >= 10 && head[..10].eq_ignore_ascii_case(b"deallocate")))
    {
        return None;
    }
    let text = String::from_utf8_lossy(sql);
    let words: Vec<String> = text.trim().trim_end_matches(';').split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["discard", "all"] | ["deallocate", "all"] | ["deallocate", "prepare", "all"] => {
            stmts.clear();
            conn.prepared.clear();
            conn.unclosed.clear();
            if words[0] == "discard" {
                conn.applied = Default::default();
            }
            None
        }
        ["deallocate", name] | ["deallocate", "prepare", name] => {
            let name = name.trim_matches('"');
            stmts.remove(name.as_bytes())?;
            let mut out = BytesMut::new();
            encode::put_command_complete(&mut out, "DEALLOCATE");
            encode::put_ready_for_query(&mut out, status);
            Some(out.freeze())
        }
        _ => None,
    }
}
