//! The slow lane's client side (the pool's half is backend/lane.rs): which lane a transaction's checkout takes —
//! the class of the statement its first request executes — and how long each forwarded request runs, from when it
//! was sent to its ReadyForQuery, fed to its statement's estimate (state/estimates.rs). While the lane is off
//! (`slow_query_threshold` 0) nothing here runs but one atomic load per checkout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::relay::Parts;
use crate::backend::lane::Lane;
use crate::protocol::message::View;
use crate::protocol::request::{Input, Kind, Req};
use crate::state::estimates::Estimate;
use crate::state::session::SessionState;
use crate::state::Statement;

/// The lane a checkout takes.
#[derive(Debug)]
pub enum Class {
    /// Nothing measured: the lane is off, the pool is in session mode, or the checkout is pgsurge's own (a batch).
    Off,
    /// The pool's own queue: a fast statement, or one not known (never seen before: fast).
    Fast(Option<Arc<Estimate>>),
    /// A slow statement: the slow lane's queue and share.
    Slow(Arc<Estimate>),
}

/// The class of `req`, the request about to check out a server connection (`resolved`: its statement, when the
/// session has resolved it already).
pub fn class(
    parts: &Parts,
    state: &SessionState,
    input: &Input,
    req: &Req,
    resolved: Option<&Arc<Statement>>,
    runs: &mut Runs,
    transaction_mode: bool,
) -> Class {
    let lane = &parts.pool.lane;
    let threshold = lane.threshold_us();
    if threshold == 0 || !transaction_mode {
        return Class::Off;
    }
    match estimate_of(lane, state, input, req, resolved, &mut runs.buf) {
        Some(e) if e.is_slow(threshold) => Class::Slow(e),
        e => Class::Fast(e),
    }
}

/// The estimate of the statement `req` executes first: a simple query's text, or the statement of its first
/// Execute's portal (parsed in the request, or prepared before). None: it executes nothing (a Parse/Describe run).
fn estimate_of(
    lane: &Lane,
    state: &SessionState,
    input: &Input,
    req: &Req,
    resolved: Option<&Arc<Statement>>,
    buf: &mut Vec<u8>,
) -> Option<Arc<Estimate>> {
    let estimates = lane.estimates();
    if let Some(s) = resolved {
        return Some(estimates.of_statement(s, buf));
    }
    match req.kind {
        Kind::Simple => match input.msgs[req.first].view {
            View::Query { sql } => Some(estimates.of_text(input.at(sql), buf)),
            _ => None,
        },
        Kind::Lookup(_) | Kind::Extended { .. } => {
            // What the last Bind binds: the text of a Parse of this request, or a statement prepared before.
            let mut parsed: Option<(&[u8], &[u8])> = None;
            let mut bound: Option<Result<&[u8], Arc<Statement>>> = None;
            for m in &input.msgs[req.first..req.end] {
                match m.view {
                    View::Parse { name, query, .. } => parsed = Some((input.at(name), input.at(query))),
                    View::Bind { statement, .. } => {
                        let name = input.at(statement);
                        bound = match parsed {
                            Some((n, text)) if n == name => Some(Ok(text)),
                            _ if name.is_empty() => state.last_unnamed().cloned().map(Err),
                            _ => state.stmts.get(name).cloned().map(Err),
                        };
                    }
                    View::Execute { .. } => {
                        return match bound? {
                            Ok(text) => Some(estimates.of_text(text, buf)),
                            Err(s) => Some(estimates.of_statement(&s, buf)),
                        };
                    }
                    _ => {}
                }
            }
            None
        }
        _ => None,
    }
}

/// The requests forwarded on the server connection held, not answered yet, with when each was sent.
#[derive(Debug, Default)]
pub struct Runs {
    /// Measuring on this checkout (the lane was on when it was made, in transaction mode).
    on: bool,
    pending: VecDeque<(Option<Arc<Estimate>>, Instant)>,
    /// When the previous ReadyForQuery came: a pipelined request's run starts there at the earliest.
    last_end: Option<Instant>,
    /// The statement the open extended-protocol run executes first.
    run: Option<Arc<Estimate>>,
    /// The estimate of the request that made the checkout (its class), so forwarding does not look it up again.
    first: Option<Arc<Estimate>>,
    /// When the checkout was made: how long the transaction has held its server connection.
    since: Option<Instant>,
    /// Where statement texts are normalised (reused).
    buf: Vec<u8>,
}

impl Runs {
    /// A checkout was made for a request of `class`.
    pub fn start(&mut self, class: Class) {
        self.pending.clear();
        (self.run, self.last_end) = (None, None);
        (self.on, self.first) = match class {
            Class::Off => (false, None),
            Class::Fast(e) => (true, e),
            Class::Slow(e) => (true, Some(e)),
        };
        self.since = self.on.then(Instant::now);
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// A Query (or, without `sql`, a FunctionCall) was forwarded.
    pub fn query(&mut self, lane: &Lane, sql: Option<&[u8]>) {
        let e = self.first.take().or_else(|| sql.map(|sql| lane.estimates().of_text(sql, &mut self.buf)));
        self.pending.push_back((e, Instant::now()));
    }

    /// An Execute of a portal of `stmt` was forwarded: the run up to its Sync is measured as the first one's.
    pub fn execute(&mut self, lane: &Lane, stmt: Option<&Arc<Statement>>) {
        if self.run.is_none() {
            self.run = self.first.take().or_else(|| stmt.map(|s| lane.estimates().of_statement(s, &mut self.buf)));
        }
    }

    /// A Sync was forwarded: the run up to it is one request.
    pub fn sync(&mut self) {
        let e = self.run.take();
        self.pending.push_back((e, Instant::now()));
    }

    /// A ReadyForQuery went to the client: the oldest request is answered; its statement learns how long it ran.
    /// Returns how long the transaction has held its server connection.
    pub fn ready(&mut self) -> Duration {
        let now = Instant::now();
        if let Some((Some(e), sent)) = self.pending.pop_front() {
            e.record(now.duration_since(self.last_end.map_or(sent, |end| end.max(sent))));
        }
        self.last_end = Some(now);
        self.first = None;
        self.since.map_or(Duration::ZERO, |s| now.duration_since(s))
    }

    /// Nothing is owed any more: a request still listed got no ReadyForQuery of its own (a Sync inside COPY, a
    /// re-run), so the list starts afresh.
    pub fn quiet(&mut self) {
        self.pending.clear();
        self.run = None;
    }
}
