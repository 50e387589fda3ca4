//! The relay between a client and the server connection it holds: checking one out (with the client's settings
//! applied), the replies the client is owed (`expect.rs`), server frames passed back in order with pgsurge's own
//! replies swallowed and its synthetic ones slipped in, and giving the connection back at ReadyForQuery idle.
//! Client frames going the other way are in `forward.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use super::conn::ClientConn;
use super::expect::{Action, Expect, Expectations};
use super::retry::Retry;
use super::slow::Class;
use crate::backend::{Checkout, Pool, ReleaseState};
use crate::cache::capture::Capture;
use crate::cache::writes::Writes;
use crate::cache::Cache;
use crate::cancel::CancelSlot;
use crate::error::{Error, Result};
use crate::protocol::codes::*;
use crate::protocol::frame::complete_len;
use crate::protocol::message::put_statement_target;
use crate::protocol::{encode, view};
use crate::sql::session::Effect;
use crate::state::session::{PinChange, SessionState};
use crate::state::{Analyses, Registry, Statement};

/// The shared parts a client's session uses, handed to it at login.
pub struct Parts {
    pub pool: Arc<Pool>,
    pub registry: Arc<Registry>,
    pub analyses: Arc<Analyses>,
    pub cache: Option<Arc<Cache>>,
    pub batcher: Arc<crate::batch::Batcher>,
    pub outputs: Arc<crate::state::settings::Outputs>,
}

impl Parts {
    /// Counts a change in whether the session is pinned to its server connection.
    pub fn pinned(&self, change: PinChange) {
        match change {
            PinChange::Pinned => {
                self.pool.stats.pinned.fetch_add(1, Ordering::Relaxed);
                self.pool.stats.pins_total.fetch_add(1, Ordering::Relaxed);
            }
            PinChange::Unpinned => {
                self.pool.stats.pinned.fetch_sub(1, Ordering::Relaxed);
            }
            PinChange::None => {}
        }
    }
}

/// What forwarding reads and changes besides the relay itself.
pub struct Ctx<'a> {
    pub conn: &'a mut ClientConn,
    pub state: &'a mut SessionState,
    /// A cache fill in progress: the replies are copied into it.
    pub fill: &'a mut Option<Capture>,
    pub writes: &'a mut Writes,
    pub parts: &'a Parts,
}

pub struct Relay {
    pub server: Option<Checkout>,
    /// Replies the client is still owed, in order.
    pub expect: Expectations,
    /// Extended-protocol messages forwarded since the last Sync: the server must stay ours.
    pub unsynced: bool,
    /// The unnamed statement last parsed, and the statement of the portal last bound (for its effects at Execute).
    pub(super) unnamed: Option<Arc<Statement>>,
    pub(super) portal: Option<Arc<Statement>>,
    /// The Bind of that portal after its statement name (its parameters), for the keys a write names.
    pub(super) portal_bind: Option<bytes::Bytes>,
    /// What forwarded writes voided, to announce to other instances after the request (`notify_after`).
    pub(super) notify: Vec<crate::cache::invalidation::Invalidation>,
    /// Statements a Describe asked about, in order: their ParameterDescriptions teach their parameter types.
    pub(super) describing: std::collections::VecDeque<Arc<Statement>>,
    /// The run being forwarded has an Execute with a row limit (its portal may be suspended past its Sync).
    pub(super) run_limited: bool,
    /// This checkout has the client's own unnamed statement (it parsed one here).
    pub(super) unnamed_here: bool,
    /// A COPY FROM STDIN is in flight: announcements wait for its end.
    pub(super) copying: super::forward::Copying,
    pub retry: Retry,
    /// The slow lane's measurements of the requests forwarded (frontend/slow.rs).
    pub(super) runs: super::slow::Runs,
    pub cancel: Arc<CancelSlot>,
    /// The deadline of checkout waits, reused across them (see `Pool::checkout_for`).
    wait_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// `PGSURGE_LOG=pgsurge::wire=trace` was on when the session began.
    pub(super) trace: bool,
}

/// The type OIDs of a ParameterDescription body.
fn parameter_types(body: &[u8]) -> Option<Box<[u32]>> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let oids = body.get(2..)?;
    if n < 0 || oids.len() != n as usize * 4 {
        return None;
    }
    Some(oids.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

impl Relay {
    pub fn new(cancel: Arc<CancelSlot>) -> Relay {
        Relay {
            server: None,
            expect: Expectations::default(),
            unsynced: false,
            unnamed: None,
            portal: None,
            portal_bind: None,
            notify: vec![],
            copying: super::forward::Copying::No,
            unnamed_here: false,
            run_limited: false,
            describing: Default::default(),
            retry: Retry::default(),
            runs: Default::default(),
            cancel,
            wait_timer: None,
            trace: tracing::enabled!(target: "pgsurge::wire", tracing::Level::TRACE),
        }
    }

    /// Nothing owed, nothing half-sent: the server connection may go back.
    pub fn quiet(&self) -> bool {
        self.expect.is_empty() && !self.unsynced
    }

    /// Checks out a server connection, in the slow lane if `class` says so, and brings its session settings in
    /// line with the client's.
    pub async fn acquire(
        &mut self,
        pool: &Arc<Pool>,
        state: &SessionState,
        fair: Option<&crate::limit::Key>,
        wait: Duration,
        class: Class,
    ) -> Result<()> {
        let slow = match &class {
            Class::Slow(e) => Some(e),
            _ => None,
        };
        let mut co = match if slow.is_some() { None } else { pool.try_checkout_now() } {
            Some(co) => co,
            None => {
                let now = tokio::time::Instant::now();
                let _waiting = self.cancel.waiting(now);
                let timer = self.wait_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO))).as_mut();
                let co = tokio::select! {
                    biased;
                    r = pool.checkout_for(now, wait, fair, Some(timer), slow.is_some()) => r?,
                    _ = self.cancel.wait_cancelled() => return Err(Error::Canceled("user request")),
                    // SHUTDOWN stops the clients still waiting for a server: none will come for them.
                    _ = self.cancel.stopped() => return Err(Error::Shutdown),
                };
                if let Some(e) = slow {
                    e.lane_waited(now.elapsed());
                }
                co
            }
        };
        if let Err(t) = self.cancel.try_set(Some(co.conn_ref().cancel_target.clone())) {
            self.cancel.set(t).await;
        }
        let sync = if Arc::ptr_eq(&state.wanted, &co.conn_ref().applied) {
            vec![]
        } else {
            let sync = crate::state::settings::sync_statements(&state.wanted, &co.conn_ref().applied);
            if sync.is_empty() {
                co.conn().applied = state.wanted.clone(); // equal already: share, so the next checkout compares pointers
            }
            sync
        };
        if !sync.is_empty() {
            // One Query per setting, pipelined in one write: a bad value fails alone and is reported back.
            let mut out = BytesMut::new();
            for (name, sql) in sync {
                out.extend_from_slice(&encode::query(&sql));
                self.expect.push(Expect::Setting { name, failed: false });
            }
            let conn = co.conn();
            conn.send(&out).await?;
            conn.applied = state.wanted.clone();
        }
        self.server = Some(co);
        self.unnamed_here = false;
        self.runs.start(class);
        Ok(())
    }

    /// Reads the replies to pgsurge's own setting statements sent at checkout, so the connection is ready for a
    /// statement pgsurge runs itself (a batch).
    pub async fn settle(&mut self, state: &mut SessionState) -> Result<()> {
        let co = self.server.as_mut().expect("acquired");
        let conn = co.conn();
        let (mut unprepared, mut done) = (vec![], vec![]);
        while !self.expect.is_empty() {
            let f = crate::batch::run::frame(conn).await?;
            self.expect.on_server_frame(f[0], &mut unprepared, &mut done);
            for e in done.drain(..) {
                state.apply(e, &mut conn.applied);
            }
        }
        Ok(())
    }

    /// Gives the server connection back; a cancel being delivered to it finishes first, unless it is being closed.
    pub async fn release(&mut self, state: ReleaseState) {
        if let Some(mut co) = self.server.take() {
            if state == ReleaseState::Broken {
                self.cancel.clear_now(); // closed, never reused: no need to wait for a cancel a dead network holds
            } else if self.cancel.try_set(None).is_err() {
                self.cancel.set(None).await;
            }
            co.state = state;
        }
    }

    /// The server connection died under this client: purge dead idle connections; the client gets 08006.
    pub async fn server_lost(&mut self, pool: &Pool, fill: &mut Option<Capture>, err: Option<std::io::Error>) -> Error {
        let reason = err.map(|e| e.to_string()).unwrap_or_else(|| "server closed the connection unexpectedly".into());
        tracing::warn!(pool = %pool.key.database, reason, "server connection lost");
        self.release(ReleaseState::Broken).await;
        self.expect.clear();
        *fill = None;
        pool.purge_dead_idle();
        Error::UpstreamLost(reason)
    }

    /// query_timeout's cancel went unanswered (a network that stopped answering, a server that ignores it): the
    /// server connection is closed, its pool slot freed, and the client gets 57014 and is disconnected.
    pub async fn abandon(&mut self, pool: &Pool, fill: &mut Option<Capture>) -> Error {
        tracing::warn!(pool = %pool.key.database, "query_timeout: the server did not end the cancelled statement; closing its connection");
        self.release(ReleaseState::Broken).await;
        self.expect.clear();
        *fill = None;
        Error::Canceled("query_timeout; the server did not answer the cancel within query_cancel_timeout, so its connection was closed")
    }

    /// At session end: hand the server back clean, reset it, or (mid-query) cancel the query and close it.
    pub async fn release_at_end(&mut self, state: &mut SessionState, parts: &Parts, session_mode: bool) {
        let pinned = !state.pins.is_empty();
        if pinned {
            state.pins.clear();
            parts.pinned(PinChange::Unpinned);
        }
        let Some(co) = self.server.as_ref() else { return };
        let quiet = self.quiet() && co.conn_ref().rbuf.is_empty();
        let end = if !quiet {
            let target = co.conn_ref().cancel_target.clone();
            tokio::spawn(async move {
                let _ = crate::cancel::forward(&target).await;
            });
            ReleaseState::Broken
        } else if state.status == TxStatus::Idle && !session_mode && !pinned {
            ReleaseState::Clean
        } else {
            // A pinned session leaves LISTENs, temp tables, locks or cursors behind: DISCARD ALL clears them.
            ReleaseState::NeedsReset { rollback: state.status != TxStatus::Idle, discard: session_mode || pinned }
        };
        self.release(end).await;
    }

    /// Forwards every complete server frame read so far, in one write; swallows replies to pgsurge's own
    /// messages and slips in the replies it owes itself, in order. Gives the server back when the client is done
    /// with it (transaction mode).
    pub async fn on_server(&mut self, cx: &mut Ctx<'_>, transaction_mode: bool) -> Result<()> {
        let co = self.server.as_mut().expect("reading a server we hold");
        let conn = co.conn();
        let mut at = 0;
        let mut run_from = 0;
        let mut out: Option<BytesMut> = None;
        let mut due = vec![];
        let mut unprepared = vec![];
        let mut done = vec![];
        let mut turned_slow = false;
        while let Some(n) =
            complete_len(&conn.rbuf[at..], crate::backend::server::MAX_SERVER_MESSAGE).map_err(|e| Error::UpstreamLost(e.to_string()))?
        {
            let tag = conn.rbuf[at];
            let mut action = self.expect.on_server_frame(tag, &mut unprepared, &mut done);
            let stale = if action == Action::Forward { self.retry.stale_plan(tag, &conn.rbuf[at..at + n], cx.state.status) } else { None };
            if let Some(stmt) = stale {
                // Close the stale statement (after the failed run's Sync, which the server already has); the
                // request then goes again and is re-parsed on demand.
                conn.prepared.pop(&stmt.id);
                let mut close = BytesMut::new();
                put_statement_target(&mut close, CLOSE, stmt.server_name.as_bytes());
                close.extend_from_slice(&encode::flush());
                conn.send(&close).await?;
                self.expect.push(Expect::Close { swallow: true, closing: Some(stmt.server_name.clone()) });
                action = Action::Swallow;
            } else if tag == READY_FOR_QUERY && self.retry.swallow_rfq {
                self.retry.swallow_rfq = false;
                action = Action::Swallow;
            }
            for e in done.drain(..) {
                if matches!(e, Effect::DiscardAll | Effect::Deallocate(None)) {
                    // Done (not merely sent): the client's named statements and this server's are gone.
                    cx.state.stmts.clear();
                    conn.prepared.clear();
                    conn.unclosed.clear();
                }
                cx.state.completed(e, &mut conn.applied);
            }
            match tag {
                COMMAND_COMPLETE if action == Action::Forward => {
                    cx.state.commit_seen |= conn.rbuf.get(at + 5..at + 11) == Some(b"COMMIT");
                }
                PARAMETER_DESCRIPTION if action == Action::Forward => {
                    if let (Some(stmt), Some(oids)) = (self.describing.pop_front(), parameter_types(&conn.rbuf[at + 5..at + n])) {
                        stmt.described(oids);
                    }
                }
                READY_FOR_QUERY if action == Action::Forward => {
                    self.describing.clear();
                    if let Some(s) = conn.rbuf.get(at + 5).copied().and_then(TxStatus::from_byte) {
                        cx.state.ready(s, &mut conn.applied);
                        if s == TxStatus::Idle {
                            cx.parts.pool.stats.transactions.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.runs.is_on() {
                            // A transaction that has held its server past the threshold is slow from now on.
                            let held = self.runs.ready();
                            let threshold = cx.parts.pool.lane.threshold_us();
                            turned_slow |= s != TxStatus::Idle && threshold > 0 && held.as_micros() > u128::from(threshold);
                        }
                    }
                }
                PARAMETER_STATUS if action == Action::Forward => {
                    if let Some((k, v)) = view::parameter_status(&conn.rbuf[at + 5..at + n]) {
                        cx.state.reported(&k, &v, &mut conn.applied);
                    }
                }
                ERROR_RESPONSE if action == Action::Swallow => {
                    let e = view::ErrorView::parse(&conn.rbuf[at + 5..at + n]).unwrap_or_default();
                    tracing::warn!(code = %e.code, message = %e.message, "re-applying a client's session setting failed");
                }
                _ => {}
            }
            self.expect.take_due(&mut due);
            if action == Action::Forward {
                if let Some(c) = cx.fill.as_mut() {
                    if c.frame(&conn.rbuf[at..at + n]) {
                        if let Some(c) = cx.fill.take() {
                            c.finish();
                        }
                    } else {
                        for d in &due {
                            c.synthetic(d);
                        }
                    }
                }
                if tag == READY_FOR_QUERY && cx.state.status == TxStatus::Idle {
                    if let Some(cache) = &cx.parts.cache {
                        cx.writes.visible(cache);
                    }
                }
            }
            if action == Action::Swallow || !due.is_empty() {
                let o = out.get_or_insert_with(BytesMut::new);
                let end = if action == Action::Swallow { at } else { at + n };
                o.extend_from_slice(&conn.rbuf[run_from..end]);
                for d in due.drain(..) {
                    o.extend_from_slice(&d);
                }
                run_from = at + n;
            }
            at += n;
        }
        for id in unprepared {
            conn.prepared.pop(&id);
        }
        conn.unclosed.extend(self.expect.take_unclosed());
        if self.trace {
            super::forward::trace_chunk("server", &conn.rbuf[..at], cx.conn.peer(), conn.id, self.expect.len());
        }
        let written = match out.as_mut() {
            Some(o) => {
                o.extend_from_slice(&conn.rbuf[run_from..at]);
                if !o.is_empty() {
                    cx.conn.stream.write_all(o).await?;
                }
                o.len()
            }
            None if at > 0 => {
                cx.conn.stream.write_all(&conn.rbuf[..at]).await?;
                at
            }
            None => 0,
        };
        let pool = &cx.parts.pool;
        pool.stats.bytes_to_client.fetch_add(written as u64, Ordering::Relaxed);
        conn.rbuf.advance(at);
        let drained = conn.rbuf.is_empty();
        if let Some(again) = self.retry.pending.take() {
            cx.conn.unread(&again);
        }
        let quiet = self.quiet();
        if quiet {
            self.runs.quiet();
        }
        if transaction_mode && drained && quiet && cx.state.is_free() {
            self.release(ReleaseState::Clean).await;
        } else if let Some(co) = self.server.as_mut() {
            if turned_slow && cx.state.status != TxStatus::Idle && co.lane.is_none() {
                co.lane = Some(cx.parts.pool.lane.promote());
            } else if cx.state.status == TxStatus::Idle && quiet {
                co.lane = None; // the transaction is over; a pinned session keeps its server, not a lane slot
            }
        }
        Ok(())
    }
}
