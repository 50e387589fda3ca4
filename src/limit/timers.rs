//! The session's one timer for `query_timeout` and `idle_transaction_timeout`: armed only while one applies,
//! allocated once per session (and only when a timeout is configured), reset only when its deadline changes.
//! After a query_timeout cancel it stays armed for `query_cancel_timeout`: a server that does not answer the
//! cancel (a network that stopped answering) must not hold the client past that.

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
}

pub struct SessionTimers {
    query: Duration,
    cancel_grace: Duration,
    idle_tx: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<(Fired, Instant)>,
    busy_since: Option<Instant>,
    idle_since: Option<Instant>,
    /// When the running request was cancelled (it is not cancelled again; the grace runs from then).
    cancelled: Option<Instant>,
}

impl SessionTimers {
    pub fn new(cfg: &LimitConfig) -> SessionTimers {
        SessionTimers {
            query: cfg.query_timeout,
            cancel_grace: cfg.query_cancel_timeout,
            idle_tx: cfg.idle_transaction_timeout,
            sleep: None,
            armed: None,
            busy_since: None,
            idle_since: None,
            cancelled: None,
        }
    }

    fn enabled(&self) -> bool {
        !self.query.is_zero() || !self.idle_tx.is_zero()
    }

    /// Called before each wait: `busy` = replies are outstanding; `idle_in_tx` = the client holds a server inside
    /// a transaction and owes nothing. Arms, moves or disarms the timer.
    pub fn update(&mut self, busy: bool, idle_in_tx: bool) {
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
        let want = match (self.busy_since, self.idle_since) {
            (Some(_), _) if self.cancelled.is_some() => self.cancelled.map(|c| (Fired::CancelUnanswered, c + self.cancel_grace)),
            (Some(t), _) if !self.query.is_zero() => Some((Fired::Query, t + self.query)),
            (_, Some(t)) if !self.idle_tx.is_zero() => Some((Fired::IdleInTransaction, t + self.idle_tx)),
            _ => None,
        };
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
            self.query.saturating_add(self.cancel_grace)
        }
    }

    /// How long a query_timeout cancel, and the answer to it, may take.
    pub fn cancel_grace(&self) -> Duration {
        self.cancel_grace
    }

    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Resolves when the armed timer fires (pending forever when disarmed; guard the select! arm with is_armed).
    pub async fn fired(&mut self) -> Fired {
        match (self.armed, self.sleep.as_mut()) {
            (Some((kind, _)), Some(s)) => {
                s.as_mut().await;
                self.armed = None;
                if kind == Fired::Query {
                    self.cancelled = Some(Instant::now());
                }
                kind
            }
            _ => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        let mut off = SessionTimers::new(&LimitConfig::default());
        off.update(true, true);
        assert!(!off.is_armed());
    }
}
