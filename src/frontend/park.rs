//! An idle client parked: between requests a client holds only what must outlive them (its socket, session state,
//! limits and timers, ~0.6 KB inline in its task), and the working `Session` (relay, fills, parse buffers) is
//! rebuilt on the heap when it sends again. This is what keeps 10,000 idle clients to a few MiB.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::sync::watch;

use super::buffers::Buffers;
use super::conn::ClientConn;
use super::relay::{Parts, Relay};
use super::session::Session;
use crate::app::Shutdown;
use crate::batch::detect::Tracker;
use crate::cache::writes::Writes;
use crate::config::{Config, PoolMode};
use crate::error::{Error, Result};
use crate::limit::{Admission, Fired, SessionTimers};
use crate::net::Stream;
use crate::state::session::SessionState;
use crate::state::Statement;

/// How `Session::run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    /// The client left (or sent Terminate).
    Ended,
    /// Between requests, nothing held or owed: the session may be parked until the client sends again.
    Idle,
}

/// What an idle client keeps; the rest of its `Session` is dropped.
pub struct Parked {
    stream: Stream,
    buffers: Arc<Buffers>,
    state: SessionState,
    /// The client's unnamed statement (it may Bind it in a later transaction).
    unnamed: Option<Arc<Statement>>,
    cancel: Arc<crate::cancel::CancelSlot>,
    parts: Parts,
    config: Arc<ArcSwap<Config>>,
    errors: Arc<crate::admin::ErrorCounts>,
    mode: PoolMode,
    writes: Writes,
    nplus: Tracker,
    admission: Option<Admission>,
    timers: SessionTimers,
    shutdown: watch::Receiver<Shutdown>,
}

impl Session {
    /// Nothing held, owed, half-received or half-done: the client may be parked. Only clients whose sockets can
    /// be waited on for readability park (TLS may hold decrypted bytes the socket no longer shows).
    pub(super) fn may_park(&self) -> bool {
        self.relay.server.is_none()
            && self.relay.quiet()
            && self.relay.notify.is_empty()
            && self.relay.retry.pending.is_none()
            && self.fill.is_none()
            && self.ticket.is_none()
            && !self.skipping
            && self.conn.parkable()
    }

    /// Keeps what outlives the request; drops the working state and frees its box (taken by value: a box only
    /// moved out of would be freed when the caller's variable is next assigned).
    pub fn park(self: Box<Self>) -> Parked {
        let mut s = *self;
        // Idle from now (a client parked straight after login has not been through the loop that arms this).
        s.timers.update_with(false, false, false);
        let (stream, buffers) = s.conn.parked();
        Parked {
            stream,
            buffers,
            state: s.state,
            unnamed: s.relay.unnamed,
            cancel: s.relay.cancel,
            parts: s.parts,
            config: s.config,
            errors: s.errors,
            mode: s.mode,
            writes: s.writes,
            nplus: s.nplus,
            admission: s.admission,
            timers: s.timers,
            shutdown: s.shutdown,
        }
    }

    /// The working session again, as it was parked.
    pub fn unpark(p: Parked) -> Box<Session> {
        let cfg = p.config.load();
        let (wait_timeout, max_message) = (cfg.query_wait_timeout, cfg.max_message_size);
        drop(cfg);
        let mut relay = Relay::new(p.cancel);
        relay.unnamed = p.unnamed;
        Box::new(Session {
            conn: ClientConn::new(p.stream, BytesMut::new(), p.buffers, max_message),
            relay,
            state: p.state,
            parts: p.parts,
            config: p.config,
            errors: p.errors,
            mode: p.mode,
            fill: None,
            writes: p.writes,
            nplus: p.nplus,
            ticket: None,
            skipping: false,
            wait_timeout,
            admission: p.admission,
            timers: p.timers,
            shutdown: p.shutdown,
            key: Vec::new(),
            spare: None,
        })
    }
}

impl Parked {
    /// Waits until the client sends (or closes), or until what ends an idle session: a stop (KILL_CLIENT, an
    /// immediate shutdown) or the client idle timer. `Err`: the session ends with it.
    /// One poll function, not a select of futures: the wait adds a few bytes to the parked task, not hundreds.
    pub async fn wait(&mut self) -> Result<()> {
        std::future::poll_fn(|cx| {
            if std::pin::Pin::new(&mut self.cancel.stopped()).poll(cx).is_ready() {
                return Poll::Ready(Err(Error::Shutdown));
            }
            if let Poll::Ready(r) = self.stream.poll_read_ready(cx) {
                return Poll::Ready(r.map_err(Error::from));
            }
            self.timers.poll_fired(cx).map(|k| match k {
                Fired::ClientIdle => Err(Error::ClientIdleTimeout),
                Fired::Transaction => Err(Error::TransactionTimeout),
                Fired::IdleInTransaction => Err(Error::IdleInTransactionTimeout),
                // Nothing runs while parked: nothing to cancel.
                Fired::Query | Fired::CancelUnanswered => Ok(()),
            })
        })
        .await
    }
}
