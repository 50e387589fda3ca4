//! The session's one timer for `query_timeout`, `idle_transaction_timeout`, `client_idle_timeout` and
//! `transaction_timeout` (global, or the user's own): armed only while one applies, allocated once per session
//! (and only when a timeout is configured), reset only when its deadline changes. After a query_timeout cancel it
//! stays armed for `query_cancel_timeout`: a server that does not answer the cancel (a network that stopped
//! answering) must not hold the client past that.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::config::LimitConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// A request has been waiting for its answers longer than `query_timeout`: cancel it upstream.
    Query,
    /// The client sat idle inside a transaction longer than `idle_transaction_timeout`.
    IdleInTransaction,
    /// The request was cancelled for query_timeout and its answer has not come within `query_cancel_timeout`:
    /// give up on the server connection.
    CancelUnanswered,
    /// The client sat idle outside a transaction longer than `client_idle_timeout`.
    ClientIdle,
    /// A transaction has been open longer than `transaction_timeout`.
    Transaction,
}

pub struct SessionTimers {
    query: Ms,
    cancel_grace: Ms,
    idle_tx: Ms,
    client_idle: Ms,
    tx: Ms,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<(Fired, Instant)>,
    busy_since: Option<Instant>,
    idle_since: Option<Instant>,
    /// When the running request was cancelled (it is not cancelled again; the grace runs from then).
    cancelled: Option<Instant>,
    client_idle_since: Option<Instant>,
    tx_since: Option<Instant>,
}

/// A timeout in whole milliseconds (sub-millisecond parts round up): 4 bytes, not a `Duration`'s 16, in every
/// client's timers (park.rs keeps them for each idle client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ms(u32);

impl Ms {
    fn of(d: Duration) -> Ms {
        Ms(u32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX))
    }

    fn get(self) -> Duration {
        Duration::from_millis(u64::from(self.0))
    }

    fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl SessionTimers {
    pub fn new(cfg: &LimitConfig) -> SessionTimers {
        SessionTimers {
            query: Ms::of(cfg.query_timeout),
            cancel_grace: Ms::of(cfg.query_cancel_timeout),
            idle_tx: Ms::of(cfg.idle_transaction_timeout),
            client_idle: Ms::of(cfg.client_idle_timeout),
            tx: Ms::of(cfg.transaction_timeout),
            sleep: None,
            armed: None,
            busy_since: None,
            idle_since: None,
            cancelled: None,
            client_idle_since: None,
            tx_since: None,
        }
    }

    /// The timers of a client of `user`: its own timeouts where it has them.
    pub fn for_user(cfg: &LimitConfig, user: &str) -> SessionTimers {
        let mut t = SessionTimers::new(cfg);
        if let Some(u) = cfg.user_timeouts.get(user) {
            t.query = u.query.map_or(t.query, Ms::of);
            t.idle_tx = u.idle_transaction.map_or(t.idle_tx, Ms::of);
            t.client_idle = u.client_idle.map_or(t.client_idle, Ms::of);
            t.tx = u.transaction.map_or(t.tx, Ms::of);
        }
        t
    }

    fn enabled(&self) -> bool {
        !self.query.is_zero() || !self.idle_tx.is_zero() || !self.client_idle.is_zero() || !self.tx.is_zero()
    }

    /// Called before each wait: `busy` = replies are outstanding; `idle_in_tx` = the client holds a server inside
    /// a transaction and owes nothing. Arms, moves or disarms the timer.
    pub fn update(&mut self, busy: bool, idle_in_tx: bool) {
        self.update_with(busy, idle_in_tx, idle_in_tx);
    }

    /// `update`, knowing also whether a transaction is open (`in_tx`, busy or not): a client neither busy nor in
    /// a transaction is idle (client_idle_timeout); a transaction is timed from its start (transaction_timeout).
    pub fn update_with(&mut self, busy: bool, idle_in_tx: bool, in_tx: bool) {
        if !self.enabled() {
            return;
        }
        if !busy && !in_tx {
            self.client_idle_since.get_or_insert_with(Instant::now);
        } else {
            self.client_idle_since = None;
        }
        if in_tx {
            self.tx_since.get_or_insert_with(Instant::now);
        } else {
            self.tx_since = None;
        }
        self.arm(busy, idle_in_tx);
    }

    fn arm(&mut self, busy: bool, idle_in_tx: bool) {
        if !self.enabled() {
            return;
        }
        let now = || Instant::now();
        if busy {
            self.busy_since.get_or_insert_with(now);
        } else {
            self.busy_since = None;
            self.cancelled = None;
        }
        if idle_in_tx {
            self.idle_since.get_or_insert_with(now);
        } else {
            self.idle_since = None;
        }
        // The earliest deadline of the timeouts that apply now; a cancelled request waits out its grace instead
        // of its query_timeout.
        let query = match self.cancelled {
            Some(c) => self.busy_since.map(|_| (Fired::CancelUnanswered, c + self.cancel_grace.get())),
            None => self.busy_since.filter(|_| !self.query.is_zero()).map(|t| (Fired::Query, t + self.query.get())),
        };
        let candidates = [
            query,
            self.idle_since.filter(|_| !self.idle_tx.is_zero()).map(|t| (Fired::IdleInTransaction, t + self.idle_tx.get())),
            self.client_idle_since.filter(|_| !self.client_idle.is_zero()).map(|t| (Fired::ClientIdle, t + self.client_idle.get())),
            self.tx_since.filter(|_| !self.tx.is_zero()).map(|t| (Fired::Transaction, t + self.tx.get())),
        ];
        let want = candidates.into_iter().flatten().min_by_key(|(_, at)| *at);
        if want != self.armed {
            self.armed = want;
            if let Some((_, at)) = want {
                match self.sleep.as_mut() {
                    Some(s) => s.as_mut().reset(at),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        }
    }

    /// The server sent something: after a cancel, it is alive and answering, so its grace starts again (a
    /// pipelined request after the cancelled one is not cut off while the server works through it).
    pub fn heard(&mut self) {
        if self.cancelled.is_some() {
            self.cancelled = Some(Instant::now());
        }
    }

    /// The longest a request may wait for its server where this timer cannot watch (a batch the session runs
    /// itself): query_timeout + query_cancel_timeout; unbounded (TCP's own timeouts) without query_timeout.
    pub fn bound(&self) -> Duration {
        if self.query.is_zero() {
            Duration::MAX
        } else {
            self.query.get().saturating_add(self.cancel_grace.get())
        }
    }

    /// How long a query_timeout cancel, and the answer to it, may take.
    pub fn cancel_grace(&self) -> Duration {
        self.cancel_grace.get()
    }

    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Resolves when the armed timer fires (pending forever when disarmed; guard the select! arm with is_armed).
    pub async fn fired(&mut self) -> Fired {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await
    }

    /// `fired` as a poll (a parked client polls it without a future of its own).
    pub fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Fired> {
        let (Some((kind, _)), Some(s)) = (self.armed, self.sleep.as_mut()) else { return std::task::Poll::Pending };
        std::task::ready!(std::future::Future::poll(s.as_mut(), cx));
        self.armed = None;
        if kind == Fired::Query {
            self.cancelled = Some(Instant::now());
        }
        std::task::Poll::Ready(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_kept_in_whole_milliseconds_rounding_up_and_saturating() {
        assert_eq!(Ms::of(Duration::from_millis(300)).get(), Duration::from_millis(300));
        assert_eq!(Ms::of(Duration::from_micros(1_500)).get(), Duration::from_millis(2), "a part of a millisecond counts");
        assert!(Ms::of(Duration::ZERO).is_zero() && !Ms::of(Duration::from_nanos(1)).is_zero(), "only 0 is off");
        assert_eq!(Ms::of(Duration::from_secs(u64::MAX)).0, u32::MAX, "longer than ~49 days saturates");
    }

    #[tokio::test(start_paused = true)]
    async fn arms_for_the_state_the_session_is_in() {
        let cfg =
            LimitConfig { query_timeout: Duration::from_secs(2), idle_transaction_timeout: Duration::from_secs(5), ..Default::default() };
        let mut t = SessionTimers::new(&cfg);
        t.update(false, false);
        assert!(!t.is_armed());
        t.update(true, false);
        assert_eq!(t.fired().await, Fired::Query);
        let cancelled = Instant::now();
        t.update(true, false);
        assert_eq!(t.fired().await, Fired::CancelUnanswered, "a cancelled request is not cancelled twice");
        assert_eq!(cancelled.elapsed(), Duration::from_secs(1), "query_cancel_timeout's default");
        t.update(true, false);
        t.update(false, false);
        t.update(true, false);
        assert_eq!(t.fired().await, Fired::Query, "the next request has its own query_timeout");
        t.update(false, false);
        t.update(false, true);
        let start = Instant::now();
        assert_eq!(t.fired().await, Fired::IdleInTransaction);
        assert_eq!(start.elapsed(), Duration::from_secs(5));

        // After a cancel, a server that keeps answering is given its grace again from what it last sent.
        t.update(false, false);
        t.update(true, false);
        assert_eq!(t.fired().await, Fired::Query);
        tokio::time::sleep(Duration::from_millis(800)).await;
        t.heard();
        let heard = Instant::now();
        t.update(true, false);
        assert_eq!(t.fired().await, Fired::CancelUnanswered);
        assert_eq!(heard.elapsed(), Duration::from_secs(1));
        // client_idle_timeout while idle outside a transaction; transaction_timeout from the transaction's start;
        // a user's own value wins.
        let mut cfg = LimitConfig { client_idle_timeout: Duration::from_secs(3), transaction_timeout: Duration::from_secs(7), ..cfg };
        cfg.user_timeouts
            .insert("u".into(), crate::limit::config::UserTimeouts { client_idle: Some(Duration::from_secs(1)), ..Default::default() });
        let mut t = SessionTimers::for_user(&cfg, "u");
        t.update_with(false, false, false);
        assert_eq!(t.fired().await, Fired::ClientIdle);
        let mut t = SessionTimers::for_user(&cfg, "other");
        t.update_with(false, false, true);
        let start = Instant::now();
        t.update_with(true, false, true);
        assert_eq!(t.fired().await, Fired::Query, "the statement's 2 s come first");
        t.update_with(false, true, true);
        assert_eq!(t.fired().await, Fired::IdleInTransaction);
        assert_eq!(start.elapsed(), Duration::from_secs(7), "5 s idle after the 2 s statement");
        let mut t = SessionTimers::for_user(&LimitConfig { transaction_timeout: Duration::from_secs(4), ..Default::default() }, "x");
        t.update_with(true, false, true);
        assert_eq!(t.fired().await, Fired::Transaction);

        let mut off = SessionTimers::new(&LimitConfig::default());
        off.update(true, true);
        assert!(!off.is_armed());
    }
}
