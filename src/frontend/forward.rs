//! Client messages to the server connection the client holds: forwarded as received, in one write, except the
//! client's named statements, which are renamed to pgsurge's server-side names and prepared on this connection
//! first if it has not seen them. Each message adds what the client is owed to the relay's queue.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use super::expect::{Expect, Expectations};
use super::relay::{Ctx, Relay};
use crate::backend::ServerConn;
use crate::cache::invalidation::Invalidation;
use crate::cache::key::{no_types, row_keys};
use crate::error::Result;
use crate::protocol::codes::*;
use crate::protocol::message::{empty, put_bind, put_statement_target, View};
use crate::protocol::request::Input;
use crate::state::Statement;
use std::sync::Arc;

impl Relay {
    /// Sends the messages `from..` of `input` to the server.
    pub async fn forward(&mut self, cx: &mut Ctx<'_>, input: &Input, from: usize) -> Result<()> {
        let co = self.server.as_mut().expect("acquired");
        let conn = co.conn();
        let buf = &input.buf[..];
        let msgs = &input.msgs[from..];
        if self.trace {
            trace_chunk("client", input.raw(from, input.msgs.len()), cx.conn.peer(), conn.id, self.expect.len());
        }
        let mut out: Option<BytesMut> = None;
        let mut run_from = msgs.first().map_or(0, |m| m.start as usize);
        let mut queries = 0u64;
        for m in msgs {
            // None: forward this message verbatim. Some(bytes): send these instead (empty: send nothing).
            let mut replace: Option<BytesMut> = None;
            match m.tag {
                tag if self.expect.server_skipping() && tag != SYNC => {
                    // An error ended this extended-protocol run: Postgres ignores everything up to the client's
                    // Sync (simple Queries too), so pgsurge drops it here; nothing is owed, prepared or run.
                    self.unsynced = true;
                    replace = Some(BytesMut::new());
                }
                QUERY | FUNCTION_CALL => {
                    queries += 1;
                    self.unsynced = false;
                    let sql = match m.view {
                        View::Query { sql } => Some(sql.of(buf)),
                        _ => None,
                    };
                    let local = sql.and_then(|sql| super::local::statement_commands(sql, &mut cx.state.stmts, cx.state.status));
                    match local {
                        Some(reply) => {
                            self.expect.push(Expect::Synthetic(reply));
                            replace = Some(BytesMut::new());
                        }
                        None => {
                            if let (Some(cache), Some(sql)) = (&cx.parts.cache, sql) {
                                let a = cx.parts.analyses.get(sql);
                                let keys = a.write_pins.as_ref().and_then(|p| row_keys(&p.keys, None, no_types));
                                if let Some(inv) = cx.writes.note(cache, &a, keys) {
                                    announce(&mut self.notify, &mut self.copying, inv, a.copy_in.then_some(Copying::Simple));
                                }
                            }
                            if self.runs.is_on() {
                                self.runs.query(&cx.parts.pool.lane, sql);
                            }
                            let fx = sql.map(crate::sql::session::effects).unwrap_or_default();
                            cx.parts.pinned(cx.state.note_pins(&fx));
                            self.expect.push(Expect::Query { swallow: false, effects: fx, failed: false });
                            replace = announce_at(&mut self.notify, self.copying, &mut self.expect, cx, m.raw(buf), false);
                            if replace.is_some() {
                                self.unnamed_here = false;
                            }
                        }
                    }
                }
                SYNC => {
                    queries += 1;
                    self.unsynced = false;
                    // In the run's own transaction when nothing of it can outlive its Sync (a suspended portal
                    // would not survive pgsurge's simple Query): one commit for the write and its NOTIFY.
                    let inside = !std::mem::take(&mut self.run_limited);
                    replace = announce_at(&mut self.notify, self.copying, &mut self.expect, cx, m.raw(buf), inside);
                    if replace.is_some() {
                        self.unnamed_here = false; // a simple Query drops the server's unnamed statement
                    }
                    self.expect.client_sync();
                    if self.runs.is_on() {
                        self.runs.sync();
                    }
                }
                COPY_DONE | COPY_FAIL => {
                    self.expect.client_copy_end();
                    // A COPY begun by a simple Query has ended; one begun by Execute ends at the next Sync.
                    if std::mem::replace(&mut self.copying, Copying::No) == Copying::Simple {
                        replace = announce_at(&mut self.notify, self.copying, &mut self.expect, cx, m.raw(buf), false);
                    }
                }
                PARSE => {
                    self.unsynced = true;
                    match m.view {
                        View::Parse { name, query, types } if !name.is_empty() => {
                            let stmt = cx.parts.registry.intern(query.of(buf), types.of(buf));
                            cx.state.stmts.insert(Bytes::copy_from_slice(name.of(buf)), stmt.clone());
                            let mut b = BytesMut::new();
                            if conn.prepared.get(&stmt.id).is_some() {
                                self.expect.push(Expect::Synthetic(Bytes::from_static(&PARSE_COMPLETE_MSG)));
                            } else {
                                prepare_on(conn, &stmt, &mut self.expect, &mut b, false);
                            }
                            replace = Some(b);
                        }
                        View::Parse { query, types, .. } => {
                            self.unnamed = Some(cx.state.unnamed(&cx.parts.registry, query.of(buf), types.of(buf)));
                            self.unnamed_here = true;
                            self.expect.push(Expect::Parse { swallow: false, stmt: None });
                        }
                        _ => self.expect.push(Expect::Parse { swallow: false, stmt: None }),
                    }
                }
                BIND => {
                    self.unsynced = true;
                    self.portal = None;
                    if let View::Bind { portal, statement, rest } = m.view {
                        self.portal_bind = Some(input.buf.slice_ref(rest.of(buf)));
                        if let Some(stmt) = cx.state.stmts.get(statement.of(buf)).cloned() {
                            let mut b = BytesMut::new();
                            ensure_prepared(conn, &stmt, &mut self.expect, &mut b);
                            put_bind(&mut b, portal.of(buf), stmt.server_name.as_bytes(), rest.of(buf));
                            replace = Some(b);
                            self.portal = Some(stmt);
                        } else if statement.is_empty() {
                            replace = own_unnamed(&mut self.unnamed_here, &mut self.unnamed, &mut self.expect, cx, m.raw(buf));
                            self.portal.clone_from(&self.unnamed);
                        }
                    }
                    self.expect.push(Expect::Bind);
                }
                DESCRIBE => {
                    self.unsynced = true;
                    if let View::Target { kind: b'S', name } = m.view {
                        if let Some(stmt) = cx.state.stmts.get(name.of(buf)).cloned() {
                            let mut b = BytesMut::new();
                            ensure_prepared(conn, &stmt, &mut self.expect, &mut b);
                            put_statement_target(&mut b, DESCRIBE, stmt.server_name.as_bytes());
                            replace = Some(b);
                            self.describing.push_back(stmt);
                        } else if name.is_empty() {
                            replace = own_unnamed(&mut self.unnamed_here, &mut self.unnamed, &mut self.expect, cx, m.raw(buf));
                            self.describing.extend(self.unnamed.clone());
                        }
                    }
                    let portal = matches!(m.view, View::Target { kind: b'P', .. });
                    self.expect.push(if portal { Expect::DescribePortal } else { Expect::DescribeStatement });
                }
                CLOSE => {
                    self.unsynced = true;
                    match m.view {
                        View::Target { kind: b'S', name } if !name.is_empty() && cx.state.stmts.remove(name.of(buf)).is_some() => {
                            // The server keeps it (other clients may use it); the client gets its CloseComplete.
                            self.expect.push(Expect::Synthetic(Bytes::from_static(&CLOSE_COMPLETE_MSG)));
                            replace = Some(BytesMut::new());
                        }
                        _ => self.expect.push(Expect::Close { swallow: false, closing: None }),
                    }
                }
                EXECUTE => {
                    self.unsynced = true;
                    self.run_limited |= matches!(m.view, View::Execute { max_rows, .. } if max_rows > 0);
                    if self.runs.is_on() {
                        self.runs.execute(&cx.parts.pool.lane, self.portal.as_ref());
                    }
                    let effects = match self.portal.clone() {
                        Some(stmt) => {
                            cx.parts.pinned(cx.state.note_pins(&stmt.effects));
                            if let Some(cache) = &cx.parts.cache {
                                let a = stmt.analysis(&cx.parts.analyses);
                                let keys = a
                                    .write_pins
                                    .as_ref()
                                    .and_then(|p| row_keys(&p.keys, self.portal_bind.as_deref(), |i| stmt.param_oid(i)));
                                if let Some(inv) = cx.writes.note(cache, a, keys) {
                                    announce(&mut self.notify, &mut self.copying, inv, a.copy_in.then_some(Copying::Extended));
                                }
                            }
                            stmt.effects.clone()
                        }
                        None => vec![],
                    };
                    self.expect.push(Expect::Execute { effects });
                }
                _ => {} // Flush and CopyData belong to a request already accounted for
            }
            if let Some(r) = replace {
                let o = out.get_or_insert_with(|| BytesMut::with_capacity(buf.len() + 64));
                o.extend_from_slice(&buf[run_from..m.start as usize]);
                o.extend_from_slice(&r);
                run_from = m.end as usize;
            }
        }
        let end = msgs.last().map_or(run_from, |m| m.end as usize);
        let sent = match out.as_mut() {
            Some(o) => {
                o.extend_from_slice(&buf[run_from..end]);
                conn.send(o).await?;
                o.len()
            }
            None => {
                let start = msgs.first().map_or(end, |m| m.start as usize);
                conn.send(&buf[start..end]).await?;
                end - start
            }
        };
        let stats = &cx.parts.pool.stats;
        stats.bytes_to_server.fetch_add(sent as u64, Ordering::Relaxed);
        stats.queries.fetch_add(queries, Ordering::Relaxed);
        self.write_due(cx).await
    }

    /// Writes synthetic replies that are due now (everything before them has been answered).
    pub(super) async fn write_due(&mut self, cx: &mut Ctx<'_>) -> Result<()> {
        let mut due = vec![];
        self.expect.take_due(&mut due);
        if !due.is_empty() {
            let bytes = due.concat();
            if let Some(c) = cx.fill.as_mut() {
                c.synthetic(&bytes);
            }
            cx.conn.write(&bytes).await?;
        }
        Ok(())
    }
}

/// Before a Bind or Describe of the unnamed statement (`raw`) on a connection this client has not parsed one
/// on: the server's unnamed statement may be another client's. The client's own last one is parsed again first
/// (its ParseComplete swallowed); if it has none, the server's is closed, so the message fails as it would on a
/// fresh connection. `None`: the client's own is there.
fn own_unnamed(
    here: &mut bool,
    unnamed: &mut Option<Arc<Statement>>,
    expect: &mut Expectations,
    cx: &Ctx<'_>,
    raw: &[u8],
) -> Option<BytesMut> {
    if *here {
        return None;
    }
    *here = true;
    let mut b = BytesMut::with_capacity(raw.len() + 64);
    match cx.state.last_unnamed() {
        Some(stmt) => {
            crate::protocol::message::put_parse(&mut b, b"", &stmt.query, &stmt.types);
            expect.push(Expect::Parse { swallow: true, stmt: None });
            *unnamed = Some(stmt.clone());
        }
        None => {
            put_statement_target(&mut b, CLOSE, b"");
            expect.push(Expect::Close { swallow: true, closing: None });
        }
    }
    b.extend_from_slice(raw);
    Some(b)
}

/// A COPY FROM STDIN in flight, and how it began: nothing but its data may reach the server until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copying {
    No,
    /// By a simple Query: it ends with the client's CopyDone/CopyFail.
    Simple,
    /// By Execute: the client's Sync after its CopyDone/CopyFail ends it.
    Extended,
}

/// Queues what a forwarded write voids, for other instances (`[cache] notify`). A COPY FROM STDIN (`copy`) holds
/// the announcement until the copy ends.
fn announce(notify: &mut Vec<Invalidation>, copying: &mut Copying, inv: Invalidation, copy: Option<Copying>) {
    notify.push(inv);
    if let Some(c) = copy {
        *copying = c;
    }
}

/// At a client message that ends a request (`raw`: its Query, Sync or CopyDone/CopyFail), the NOTIFY of what the
/// request's writes voided, on the same connection, so it lands in the client's transaction when there is one
/// (delivered at COMMIT, dropped on ROLLBACK). `inside`: before a Sync, in the run's own implicit transaction
/// (one commit for both; if the NOTIFY fails, so did the client's transaction, and it sees the error); else after
/// the message (an autocommit statement's NOTIFY commits on its own, right after it). Its reply is swallowed.
/// `None`: nothing to add.
fn announce_at(
    notify: &mut Vec<Invalidation>,
    copying: Copying,
    expect: &mut Expectations,
    cx: &Ctx<'_>,
    raw: &[u8],
    inside: bool,
) -> Option<BytesMut> {
    if notify.is_empty() || copying != Copying::No {
        return None;
    }
    let items = std::mem::take(notify);
    let n = cx.parts.cache.as_ref()?.notifier.as_ref()?;
    let statement = n.statement(&items);
    let mut out = BytesMut::with_capacity(raw.len() + statement.len());
    if inside {
        out.extend_from_slice(&statement);
        out.extend_from_slice(raw);
    } else {
        out.extend_from_slice(raw);
        out.extend_from_slice(&statement);
    }
    expect.push(Expect::Notify { errors: inside });
    Some(out)
}

const PARSE_COMPLETE_MSG: [u8; 5] = empty(PARSE_COMPLETE);
const CLOSE_COMPLETE_MSG: [u8; 5] = empty(CLOSE_COMPLETE);

/// Queues a Parse of `stmt` under its server name on this connection, evicting (and closing) the least
/// recently used statement if the connection's set is full.
fn prepare_on(conn: &mut ServerConn, stmt: &Statement, expect: &mut Expectations, out: &mut BytesMut, swallow: bool) {
    if let Some(i) = conn.unclosed.iter().position(|n| *n == stmt.server_name) {
        // An earlier Close of it was skipped after an error: close it for real before preparing it again.
        let name = conn.unclosed.swap_remove(i);
        put_statement_target(out, CLOSE, name.as_bytes());
        expect.push(Expect::Close { swallow: true, closing: Some(name) });
    }
    if let Some((_, evicted)) = conn.prepared.push(stmt.id, stmt.server_name.clone()) {
        if evicted != stmt.server_name {
            put_statement_target(out, CLOSE, evicted.as_bytes());
            expect.push(Expect::Close { swallow: true, closing: Some(evicted) });
        }
    }
    out.extend_from_slice(&stmt.parse);
    expect.push(Expect::Parse { swallow, stmt: Some(stmt.id) });
}

/// Before a Bind or Describe of `stmt`: prepares it here if this server connection has not seen it.
fn ensure_prepared(conn: &mut ServerConn, stmt: &Statement, expect: &mut Expectations, out: &mut BytesMut) {
    if conn.prepared.get(&stmt.id).is_none() {
        prepare_on(conn, stmt, expect, out, true);
    }
}

/// `PGSURGE_LOG=pgsurge::wire=trace`: one line per chunk relayed, with its message types in order (a debugging
/// aid for protocol sequences; decided once per session, so it costs nothing when off).
pub(super) fn trace_chunk(from: &str, chunk: &[u8], client: Option<std::net::SocketAddr>, server: u64, owed: usize) {
    let tags: String = crate::protocol::frame::Frames::server(chunk, usize::MAX).map_while(|f| f.ok()).map(|f| f.tag as char).collect();
    tracing::trace!(target: "pgsurge::wire", ?client, server, owed, from, "{tags}");
}
