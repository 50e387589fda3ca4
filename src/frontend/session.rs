//! The per-client pipeline. What a client sends is parsed once into requests (protocol/request.rs); each request
//! goes, in order, through limits -> local answers -> cache -> batcher -> pool (the slow lane for a slow statement,
//! slow.rs), and is forwarded to the server connection it then holds (forward.rs); replies come back through the
//! relay (relay.rs), which gives the server back at ReadyForQuery idle (transaction mode).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::conn::ClientConn;
pub use super::park::Run;
use super::relay::{Ctx, Parts, Relay};
use super::slow::Class;
use crate::app::Shutdown;
use crate::backend::ReleaseState;
use crate::batch::{detect::Tracker, stage as batching, LeaderGuard, Outcome, Role, Ticket};
use crate::cache::capture::Capture;
use crate::cache::config::BatchConfig;
use crate::cache::writes::Writes;
use crate::cache::{key, stage as caching};
use crate::cancel::CancelSlot;
use crate::config::{Config, PoolMode};
use crate::error::{Error, Result, Severity};
use crate::limit::{Fired, SessionTimers};
use crate::protocol::codes::*;
use crate::protocol::encode;
use crate::protocol::message::View;
use crate::protocol::request::{Input, Kind, Lookup, Req};
use crate::state::session::SessionState;
use crate::state::statements::LookupFacts;
use crate::state::{Settings, Statement};

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

/// Whether a stage answered the request.
enum Done {
    Answered,
    Pass,
}

enum Io {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Shutdown,
    Timer(Fired),
}

pub struct Session {
    pub conn: ClientConn,
    pub(super) relay: Relay,
    pub(super) state: SessionState,
    pub(super) parts: Parts,
    pub(super) config: Arc<ArcSwap<Config>>,
    pub(super) errors: Arc<crate::admin::ErrorCounts>,
    pub(super) mode: PoolMode,
    /// A cache fill in progress, and the writes this session made (src/cache).
    pub(super) fill: Option<Capture>,
    pub(super) writes: Writes,
    /// N+1 detection state (src/batch/detect.rs).
    pub(super) nplus: Tracker,
    /// A lookup running alone, counted so that lookups of its statement arriving meanwhile batch behind it.
    pub(super) ticket: Option<Ticket>,
    /// After a local error in an extended-protocol run: drop messages until Sync, as Postgres does.
    pub(super) skipping: bool,
    pub(super) wait_timeout: Duration,
    /// This client's connection caps and rates (src/limit); set after login.
    pub admission: Option<crate::limit::Admission>,
    /// query_timeout / idle_transaction_timeout.
    pub(super) timers: SessionTimers,
    pub(super) shutdown: watch::Receiver<Shutdown>,
    /// The cache key of the request at hand (reused: no allocation per request).
    pub(super) key: Vec<u8>,
    /// Allocations of the last input, reused by the next (dropped when parked).
    pub(super) spare: Option<Input>,
}

/// A lookup request's statement, resolved once for every stage.
struct Resolved {
    statement: Arc<Statement>,
    /// The request prepares it (Parse) rather than binding one prepared before.
    parsed: bool,
    /// A named Parse: the name the client gives it.
    name: Option<bytes::Bytes>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        parts: Parts,
        config: Arc<ArcSwap<Config>>,
        errors: Arc<crate::admin::ErrorCounts>,
        shutdown: watch::Receiver<Shutdown>,
        conn: ClientConn,
        mode: PoolMode,
        wanted: Settings,
        cancel: Arc<CancelSlot>,
    ) -> Session {
        let cfg = config.load();
        if *shutdown.borrow() == Shutdown::Immediate {
            cancel.stop(); // registered after `App::shutdown_now` went through the clients
        }
        let state = SessionState::new(parts.pool.share_settings(&wanted), wanted);
        Session {
            conn,
            relay: Relay::new(cancel),
            state,
            mode,
            fill: None,
            writes: Writes::default(),
            nplus: Tracker::default(),
            ticket: None,
            skipping: false,
            wait_timeout: cfg.query_wait_timeout,
            admission: None,
            timers: SessionTimers::new(&cfg.limits),
            shutdown,
            key: Vec::new(),
            spare: None,
            errors,
            config: config.clone(),
            parts,
        }
    }

    /// Runs until the client leaves or an error ends the session; releases the server connection properly.
    /// `Ok(Run::Idle)`: the client is between requests with nothing held or owed, and may be parked (park.rs).
    pub async fn run(&mut self) -> Result<Run> {
        let r = self.serve().await;
        if !matches!(r, Ok(Run::Idle)) {
            Box::pin(self.relay.release_at_end(&mut self.state, &self.parts, self.mode == PoolMode::Session)).await;
        }
        r
    }

    fn ctx(&mut self) -> (&mut Relay, Ctx<'_>) {
        let cx = Ctx { conn: &mut self.conn, state: &mut self.state, fill: &mut self.fill, writes: &mut self.writes, parts: &self.parts };
        (&mut self.relay, cx)
    }

    /// The timeouts of the client's user (its own, from a pgbouncer.ini `[users]` line, else the global ones).
    pub fn set_user_timeouts(&mut self, user: &str) {
        self.timers = SessionTimers::for_user(&self.config.load().limits, user);
    }

    /// The futures of the stages and the relay are boxed (one allocation per input or server read): the loop's
    /// own state, held by every idle client's task, then stays small (7.4 KB per client unboxed, bench/idle.sh).
    async fn serve(&mut self) -> Result<Run> {
        // Parked only after a read: a wake-up with nothing to read waits here rather than parking again at once.
        let mut heard = false;
        loop {
            if Box::pin(self.handle_input()).await? == Flow::Exit {
                return Ok(Run::Ended);
            }
            let held = self.relay.server.is_some();
            let quiet = self.relay.quiet();
            let in_tx = held && self.state.status != TxStatus::Idle;
            self.timers.update_with(held && !self.relay.expect.is_empty(), in_tx && quiet, in_tx);
            if !held {
                self.conn.idle();
                if heard && self.may_park() {
                    return Ok(Run::Idle);
                }
            }
            let ev = match self.relay.server.as_mut() {
                Some(co) => {
                    let conn = co.conn();
                    tokio::select! {
                        biased;
                        r = conn.stream.read_buf(&mut conn.rbuf) => Io::Server(r),
                        r = self.conn.read() => Io::Client(r),
                        _ = self.relay.cancel.stopped() => Io::Shutdown,
                        k = self.timers.fired(), if self.timers.is_armed() => Io::Timer(k),
                    }
                }
                // biased: a fixed order needs no random number per wait.
                None => tokio::select! {
                    biased;
                    _ = self.relay.cancel.stopped() => Io::Shutdown,
                    r = self.conn.read() => Io::Client(r),
                    k = self.timers.fired(), if self.timers.is_armed() => Io::Timer(k),
                },
            };
            match ev {
                Io::Client(Ok(0)) => return Ok(Run::Ended),
                Io::Client(Ok(_)) => heard = true,
                Io::Client(Err(e)) => return Err(e.into()),
                Io::Server(Ok(n)) if n > 0 => {
                    self.timers.heard();
                    let tx = self.mode == PoolMode::Transaction;
                    let (relay, mut cx) = self.ctx();
                    Box::pin(relay.on_server(&mut cx, tx)).await?;
                    if self.relay.quiet() {
                        self.ticket = None;
                    }
                }
                Io::Server(r) => return Err(Box::pin(self.relay.server_lost(&self.parts.pool, &mut self.fill, r.err())).await),
                Io::Shutdown => return Err(Error::Shutdown),
                Io::Timer(Fired::ClientIdle) => return Err(Error::ClientIdleTimeout),
                Io::Timer(Fired::Transaction) => return Err(Error::TransactionTimeout),
                Io::Timer(Fired::Query) => {
                    tracing::info!(pool = %self.parts.pool.key.database, "query timeout: cancelling the running statement (query_timeout)");
                    // The client then gets Postgres' own 57014; the slot's lock keeps the cancel off other clients.
                    let (slot, within) = (self.relay.cancel.clone(), self.timers.cancel_grace());
                    tokio::spawn(async move { slot.cancel_current(within).await });
                }
                Io::Timer(Fired::CancelUnanswered) => return Err(self.relay.abandon(&self.parts.pool, &mut self.fill).await),
                Io::Timer(Fired::IdleInTransaction) => return Err(Error::IdleInTransactionTimeout),
            }
        }
    }

    /// Handles every complete request received so far.
    async fn handle_input(&mut self) -> Result<Flow> {
        while let Some(input) = self.conn.input(&mut self.spare)? {
            let r = self.handle(&input).await;
            let terminate = input.terminate;
            self.spare = Some(input.recycled());
            if r? == Flow::Exit || terminate {
                return Ok(Flow::Exit);
            }
        }
        Ok(Flow::Continue)
    }

    /// Takes the requests of `input` through the stages in order; once a server is held, the rest of the input
    /// is forwarded to it in one write.
    async fn handle(&mut self, input: &Input) -> Result<Flow> {
        // Requests before `paid` have their tokens; `refused` is the first one that was refused its own.
        let mut paid = 0;
        let mut refused: Option<(usize, Error)> = None;
        let mut i = 0;
        while i < input.reqs.len() {
            let req = input.reqs[i];
            if self.skipping {
                self.skip(input, &req).await?;
                i += 1;
                continue;
            }
            if let Some((_, e)) = refused.take_if(|(j, _)| *j == i) {
                self.fail(input, &req, e).await?;
                i += 1;
                paid = i;
                continue;
            }
            if i >= paid {
                match self.check_limits(input, i).await {
                    Ok(()) => paid = input.reqs.len(),
                    Err(e) => {
                        // The free requests before the first that costs a token (Flushes) go on as usual.
                        let j = input.first_costly(i, self.relay.unsynced).unwrap_or(i);
                        refused = Some((j, e));
                        paid = j;
                        continue;
                    }
                }
            }
            let resolved = match req.kind {
                Kind::Lookup(l) => self.resolve(input, l),
                _ => None,
            };
            if let Some(r) = &resolved {
                self.nplus.observe(&self.parts.batcher.detect, &r.statement, Instant::now());
            }
            let free = self.relay.server.is_none() && self.state.is_free() && self.relay.quiet() && self.fill.is_none();
            if free {
                self.ticket = None; // a lookup that ran alone is over
                if let Done::Answered = self.answer_here(input, &req, resolved.as_ref()).await? {
                    i += 1;
                    continue;
                }
            }
            if self.relay.server.is_none() {
                if *self.shutdown.borrow() != Shutdown::Running {
                    return Err(Error::Shutdown);
                }
                if let Err(e) = self.acquire(input, &req, resolved.as_ref()).await {
                    if e.severity() == Severity::Fatal {
                        return Err(e);
                    }
                    self.fail(input, &req, e).await?;
                    i += 1;
                    continue;
                }
            }
            // Only a lone request can be re-run transparently: replies to anything after it would overtake it.
            let fresh = self.state.status == TxStatus::Idle && self.relay.expect.is_empty() && i + 1 == input.reqs.len();
            self.relay.retry.arm(input, &req, &self.state, fresh);
            let (relay, mut cx) = self.ctx();
            relay.forward(&mut cx, input, req.first).await?;
            return Ok(Flow::Continue);
        }
        Ok(Flow::Continue)
    }

    /// Requests answered without a server: local ones, cache hits, batch members.
    async fn answer_here(&mut self, input: &Input, req: &Req, resolved: Option<&Resolved>) -> Result<Done> {
        match req.kind {
            Kind::Flush => Ok(Done::Answered), // nothing is pending: nothing to flush
            Kind::CloseSync => match super::local::close_sync(input, req, &mut self.state.stmts) {
                Some(reply) => {
                    self.conn.write(&reply).await?;
                    Ok(Done::Answered)
                }
                None => Ok(Done::Pass),
            },
            Kind::Simple => {
                let View::Query { sql } = input.msgs[req.first].view else { return Ok(Done::Pass) };
                self.cache(input.at(sql), None).await
            }
            Kind::Lookup(l) => {
                let Some(r) = resolved else { return Ok(Done::Pass) };
                let View::Bind { rest, .. } = input.msgs[l.bind].view else { return Ok(Done::Pass) };
                if let Done::Answered = self.cache(&r.statement.query, Some((r, l, input.at(rest)))).await? {
                    return Ok(Done::Answered);
                }
                match r.statement.lookup() {
                    Some(facts) => self.batch(input, req, l, r, facts.clone()).await,
                    None => Ok(Done::Pass),
                }
            }
            _ => Ok(Done::Pass),
        }
    }

    /// The statement of a lookup request, if it is one the cache or batcher can key: one it parses, or a named
    /// one prepared before.
    fn resolve(&mut self, input: &Input, l: Lookup) -> Option<Resolved> {
        match l.parse.map(|p| input.msgs[p].view) {
            Some(View::Parse { name, query, types }) if name.is_empty() => {
                let statement = self.state.unnamed(&self.parts.registry, input.at(query), input.at(types));
                Some(Resolved { statement, parsed: true, name: None })
            }
            Some(View::Parse { name, query, types }) => {
                let statement = self.parts.registry.intern(input.at(query), input.at(types));
                // Copied: a slice would keep the whole read buffer alive as long as the statement lives.
                Some(Resolved { statement, parsed: true, name: Some(bytes::Bytes::copy_from_slice(input.at(name))) })
            }
            _ => {
                let View::Bind { statement, .. } = input.msgs[l.bind].view else { return None };
                let name = input.at(statement);
                (!name.is_empty()).then(|| self.state.stmts.get(name).cloned()).flatten().map(|statement| Resolved {
                    statement,
                    parsed: false,
                    name: None,
                })
            }
        }
    }

    /// The cache's stop: a hit is written straight to the client; a cacheable miss starts a fill.
    async fn cache(&mut self, sql: &[u8], lookup: Option<(&Resolved, Lookup, &[u8])>) -> Result<Done> {
        let Some(cache) = self.parts.cache.clone() else { return Ok(Done::Pass) };
        let output = self.state.output_id(&self.parts.outputs);
        let pool = self.parts.pool.id;
        let key = match lookup {
            None => key::simple(&mut self.key, pool, output, sql),
            Some((r, l, bind)) => key::extended(&mut self.key, pool, output, r.statement.id, r.parsed, l.describe, bind),
        };
        let writes = &self.writes;
        let entry = match cache.get(key, |d, at| writes.wrote_since(d, at)) {
            Some(e) => e,
            None => {
                let (analysis, bind, statement) = match lookup {
                    None => (self.parts.analyses.get(sql), None, None),
                    Some((r, _, bind)) => (r.statement.analysis(&self.parts.analyses).clone(), Some(bind), Some(&*r.statement)),
                };
                let miss = caching::Miss { key, sql, analysis: &analysis, bind, statement, settings: &self.state.wanted };
                match caching::miss(&cache, &self.parts.pool, self.wait_timeout, &miss, writes).await? {
                    caching::Outcome::Hit(e) => e,
                    caching::Outcome::Fill(c) => {
                        self.fill = Some(c);
                        return Ok(Done::Pass);
                    }
                    caching::Outcome::Pass => return Ok(Done::Pass),
                }
            }
        };
        if let Some((r, ..)) = lookup {
            self.prepared(r);
        }
        self.conn.write(&entry.bytes).await?;
        Ok(Done::Answered)
    }

    /// A named statement the client parsed in a request pgsurge answered itself: it is the client's now.
    fn prepared(&mut self, r: &Resolved) {
        if let Some(name) = &r.name {
            self.state.stmts.insert(name.clone(), r.statement.clone());
        }
    }

    /// The batcher's stop: a lookup that would wait for a server joins a batch.
    async fn batch(&mut self, input: &Input, req: &Req, l: Lookup, r: &Resolved, facts: Arc<LookupFacts>) -> Result<Done> {
        let cfg = self.config.load().batch.clone();
        if !cfg.enabled || self.mode != PoolMode::Transaction {
            return Ok(Done::Pass);
        }
        let output = self.state.output_id(&self.parts.outputs);
        let View::Bind { rest, .. } = input.msgs[l.bind].view else { return Ok(Done::Pass) };
        let ask = batching::Ask {
            statement: &r.statement,
            facts: &facts,
            pool: &self.parts.pool,
            output,
            settings: &self.state.wanted,
            bind: input.buf.slice_ref(input.at(rest)),
            describe: l.describe,
        };
        match batching::join(&self.parts.batcher, &cfg, ask) {
            Role::Pass => Ok(Done::Pass),
            Role::Alone(ticket) => {
                self.ticket = Some(ticket);
                Ok(Done::Pass)
            }
            Role::Follower(rx) => self.follow(input, req, rx, l, r).await,
            Role::Leader(guard, rx) => self.lead(input, req, guard, rx, l, r, &facts, &cfg).await,
        }
    }

    /// A batch's leader: waits for its turn (members keep joining), checks out a server, runs the merged
    /// statement and answers everyone; if that fails, each member runs alone (this one on the server it holds).
    #[allow(clippy::too_many_arguments)]
    async fn lead(
        &mut self,
        input: &Input,
        req: &Req,
        mut guard: LeaderGuard,
        rx: oneshot::Receiver<Outcome>,
        l: Lookup,
        r: &Resolved,
        facts: &LookupFacts,
        cfg: &BatchConfig,
    ) -> Result<Done> {
        if !cfg.max_wait.is_zero() {
            tokio::time::sleep(cfg.max_wait).await;
        }
        let depth = batching::concurrency(cfg, &self.parts.pool);
        let slot = self.relay.cancel.clone();
        let waiting = slot.waiting(Instant::now());
        // One deadline for the turn and the checkout together.
        let deadline = Instant::now() + self.wait_timeout;
        tokio::select! {
            _ = guard.turn(depth, deadline) => {}
            _ = slot.wait_cancelled() => {
                drop((guard, waiting));
                self.fail(input, req, Error::Canceled("user request")).await?;
                return Ok(Done::Answered);
            }
        }
        drop(waiting);
        let fair = self.admission.as_ref().map(|a| &a.fair_key);
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self.relay.acquire(&self.parts.pool, &self.state, fair, left, Class::Off).await {
            drop(guard);
            if e.severity() == Severity::Fatal {
                return Err(e);
            }
            self.fail(input, req, e).await?;
            return Ok(Done::Answered);
        }
        let (parts, relay, state, bound) = (&self.parts, &mut self.relay, &mut self.state, self.timers.bound());
        let run = async {
            relay.settle(state).await?;
            let conn = relay.server.as_mut().expect("acquired").conn();
            batching::lead(conn, &parts.registry, &parts.batcher, &guard, rx, &r.statement, facts).await
        };
        // Bounded as a request is (query_timeout + query_cancel_timeout): a dead network must not hold the batch.
        let led =
            tokio::time::timeout(bound, run).await.unwrap_or_else(|_| Err(Error::UpstreamLost("no answer within query_timeout".into())));
        drop(guard);
        match led {
            Ok(Some((fetched, k))) => {
                self.parts.pool.stats.queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.relay.release(ReleaseState::Clean).await;
                self.deliver(fetched.reply(k, r.parsed, l.describe), r).await
            }
            Ok(None) => Ok(Done::Pass),
            Err(e) => {
                // The server connection failed under the batch: give it up; this lookup retries alone.
                tracing::warn!(error = %e, "batch failed on its server connection; lookups run alone");
                self.relay.expect.clear();
                self.relay.release(ReleaseState::Broken).await;
                self.parts.pool.purge_dead_idle();
                Ok(Done::Pass)
            }
        }
    }

    /// A batch member waits for its leader; a cancel or disconnect detaches only this member.
    async fn follow(&mut self, input: &Input, req: &Req, mut rx: oneshot::Receiver<Outcome>, l: Lookup, r: &Resolved) -> Result<Done> {
        let waiting = self.relay.cancel.waiting(Instant::now());
        // One wait for the whole loop: a cancel that lands while the loop turns is not lost.
        let slot = self.relay.cancel.clone();
        let mut cancelled = slot.wait_cancelled();
        let outcome = loop {
            tokio::select! {
                o = &mut rx => break o.unwrap_or(Outcome::Retry),
                _ = &mut cancelled => {
                    drop((rx, waiting));
                    self.fail(input, req, Error::Canceled("user request")).await?;
                    return Ok(Done::Answered);
                }
                n = self.conn.read(), if self.conn.may_read_ahead() => match n {
                    Ok(0) => return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                },
            }
        };
        drop(waiting);
        match outcome {
            Outcome::Done(fetched, k) => self.deliver(fetched.reply(k, r.parsed, l.describe), r).await,
            Outcome::Retry => Ok(Done::Pass),
        }
    }

    /// Answers this client with the reply built for it; a cache fill in progress takes it too.
    async fn deliver(&mut self, reply: BytesMut, r: &Resolved) -> Result<Done> {
        self.prepared(r);
        if let Some(c) = self.fill.take() {
            c.reply(&reply);
        }
        self.conn.write(&reply).await?;
        Ok(Done::Answered)
    }

    /// Checks out a server connection for this client, for `req`: in the slow lane if its statement is slow.
    async fn acquire(&mut self, input: &Input, req: &Req, resolved: Option<&Resolved>) -> Result<()> {
        let tx = self.mode == PoolMode::Transaction;
        let stmt = resolved.map(|r| &r.statement);
        let class = super::slow::class(&self.parts, &self.state, input, req, stmt, &mut self.relay.runs, tx);
        let fair = self.admission.as_ref().map(|a| &a.fair_key);
        self.relay.acquire(&self.parts.pool, &self.state, fair, self.wait_timeout, class).await
    }

    /// Spends the rate-limit tokens of the requests from `from` on (src/limit): outside a transaction waits up to
    /// `limit_max_delay`, inside one (a refusal would abort it) up to `query_wait_timeout`; then ERROR 53400.
    async fn check_limits(&mut self, input: &Input, from: usize) -> Result<()> {
        let Some(adm) = self.admission.as_mut() else { return Ok(()) };
        if !adm.is_active() {
            return Ok(());
        }
        let n = input.charge(from, self.relay.unsynced);
        if n == 0 {
            return Ok(());
        }
        // Inside a transaction, or while a server is held, a refusal would abort more than this request: wait longer.
        let in_tx = self.state.status != TxStatus::Idle || self.relay.server.is_some();
        let wait = if in_tx { self.wait_timeout } else { adm.max_delay() };
        tokio::select! {
            r = adm.request(n, !in_tx, wait) => r,
            _ = self.relay.cancel.wait_cancelled() => Err(Error::Canceled("user request")),
        }
    }

    /// Answers `req` with `err` as Postgres would: the error, then ReadyForQuery if the request ends with a Query
    /// or Sync; without one, messages are dropped until the client's Sync arrives.
    async fn fail(&mut self, input: &Input, req: &Req, err: Error) -> Result<()> {
        self.fill = None;
        self.ticket = None;
        self.errors.count(err.sqlstate());
        let mut out = BytesMut::new();
        err.write_to(&mut out);
        if input.synced(req) {
            encode::put_ready_for_query(&mut out, self.state.status);
        } else {
            self.skipping = true;
        }
        if self.relay.server.is_none() {
            self.relay.unsynced = false;
        }
        self.conn.write(&out).await
    }

    /// In skip mode: drops `req`; if it ends with a Sync, answers it and skipping ends.
    async fn skip(&mut self, input: &Input, req: &Req) -> Result<()> {
        if input.msgs[req.end - 1].tag == SYNC {
            self.skipping = false;
            let mut out = BytesMut::new();
            encode::put_ready_for_query(&mut out, self.state.status);
            self.conn.write(&out).await?;
        }
        Ok(())
    }
}
