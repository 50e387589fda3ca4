//! Cancel requests: each client gets pgsurge's own BackendKeyData; a cancel is forwarded only to the server
//! connection running that client's query at that moment, and the client cannot hand that connection back to
//! the pool until the forwarded cancel has been delivered, so it never lands on the next client's query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::protocol::encode;

/// The server connection a client is using now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: u32,
    pub secret: Vec<u8>,
}

/// One client's cancel state.
pub struct CancelSlot {
    secret: u32,
    /// A cancel came while the client held no server: a wait in progress (for a server connection, a rate-limit
    /// token, a batch) ends with 57014. Cleared when a wait begins (`wait_cancelled`).
    cancel_in_wait: AtomicBool,
    /// The server connection the client holds now, and how many cancels are being delivered to it: while one
    /// is, the session cannot change targets (it waits on `delivered`). A plain lock held for a few instructions:
    /// the session sets the target twice per transaction.
    target: Mutex<Target>,
    delivered: tokio::sync::Notify,
    /// What the client is doing, for SHOW CLIENTS: kept by `set`/`try_set`/`mark_waiting`, one relaxed store each.
    state: AtomicU8,
    /// Set by an immediate shutdown; the session's loop watches it through `stopped()` (lock-free, unlike a
    /// watch channel's `changed()` or a `Notify`, which take a lock on every poll).
    stop: AtomicBool,
    /// The session task's waker, for both flags (only that task waits on them).
    waker: futures_util::task::AtomicWaker,
    /// When the client started waiting for a server connection, in µs since `created`.
    wait_started_us: AtomicU64,
    created: Instant,
}

#[derive(Default)]
struct Target {
    current: Option<Arc<CancelTarget>>,
    delivering: u32,
}

/// A cancel being delivered: ends the delivery however the delivering future ends.
struct Delivering<'a>(&'a CancelSlot);

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        self.0.target.lock().delivering -= 1;
        self.0.delivered.notify_waiters();
    }
}

pub struct WaitingGuard<'a>(&'a CancelSlot);

/// Resolves once its flag is set (see `CancelSlot::stopped`, `CancelSlot::wait_cancelled`).
pub struct Flag<'a>(&'a AtomicBool, &'a futures_util::task::AtomicWaker);

impl std::future::Future for Flag<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.1.register(cx.waker());
        if self.0.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.state.compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A client's state as the admin console shows it (PgBouncer's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, no server connection.
    Idle,
    /// Waiting in a pool's queue.
    Waiting,
    /// Holding a server connection.
    Active,
}

impl ClientState {
    pub fn name(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

impl CancelSlot {
    /// Sets the target, after any cancel being delivered to the current one has been.
    pub async fn set(&self, mut t: Option<Arc<CancelTarget>>) {
        loop {
            // Created before the check, so a delivery ending in between still wakes it.
            let delivered = self.delivered.notified();
            match self.try_set(t) {
                Ok(()) => return,
                Err(back) => t = back,
            }
            delivered.await;
        }
    }

    /// Ends this client's session at its next turn (an immediate shutdown).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether `stop` has been called.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Resolves once `stop` has been called.
    pub fn stopped(&self) -> Flag<'_> {
        Flag(&self.stop, &self.waker)
    }

    /// Begins a wait (for a server connection, a token, a batch): resolves if the client cancels during it.
    pub fn wait_cancelled(&self) -> Flag<'_> {
        self.cancel_in_wait.store(false, Ordering::Release);
        Flag(&self.cancel_in_wait, &self.waker)
    }

    /// Starts delivering a cancel to the current target, if there is one.
    fn begin_delivery(&self) -> Option<(Arc<CancelTarget>, Delivering<'_>)> {
        let mut g = self.target.lock();
        let t = g.current.clone()?;
        g.delivering += 1;
        Some((t, Delivering(self)))
    }

    fn note(&self, active: bool) {
        self.state.store(if active { 2 } else { 0 }, Ordering::Relaxed);
    }

    /// The session is about to wait for a server connection; the guard marks it idle again if the wait ends
    /// without one (timeout, cancel).
    pub fn waiting(&self, now: Instant) -> WaitingGuard<'_> {
        self.wait_started_us.store(now.saturating_duration_since(self.created).as_micros() as u64, Ordering::Relaxed);
        self.state.store(1, Ordering::Relaxed);
        WaitingGuard(self)
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// How long since `mark_waiting` (meaningful while waiting).
    pub fn waiting_for(&self, now: Instant) -> std::time::Duration {
        let since = self.created + std::time::Duration::from_micros(self.wait_started_us.load(Ordering::Relaxed));
        now.saturating_duration_since(since)
    }

    /// Cancels the query of the server connection this client holds now, if any (query_timeout), trying for at
    /// most `within`. While it is delivered the session cannot change targets, so the connection cannot be handed
    /// to another client meanwhile.
    pub async fn cancel_current(&self, within: std::time::Duration) {
        if let Some((t, _delivering)) = self.begin_delivery() {
            if let Err(e) = forward_within(&t, within).await {
                tracing::warn!(error = %e, "forwarding a query_timeout cancel failed");
            }
        }
    }

    /// Forgets the target at once, even while a cancel is being delivered to it: for a server connection that is
    /// being closed, which no other client can get (a late cancel reaches only its own backend, by its secret).
    pub fn clear_now(&self) {
        let mut g = self.target.lock();
        self.note(false);
        g.current = None;
    }

    /// Non-waiting version for the hot path: succeeds unless a cancel is being delivered right now.
    pub fn try_set(&self, t: Option<Arc<CancelTarget>>) -> Result<(), Option<Arc<CancelTarget>>> {
        let mut g = self.target.lock();
        if g.delivering > 0 {
            return Err(t);
        }
        self.note(t.is_some());
        g.current = t;
        Ok(())
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<u32, Arc<CancelSlot>>>,
}

/// Removes the slot when the client session ends.
pub struct CancelGuard<'a> {
    reg: &'a CancelRegistry,
    pub pid: u32,
    pub secret: u32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.reg.slots.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Registers a new client and returns its key (random, unique among live clients).
    pub fn register(&self) -> CancelGuard<'_> {
        let secret: u32 = rand::random();
        let slot = Arc::new(CancelSlot {
            secret,
            cancel_in_wait: AtomicBool::new(false),
            target: Mutex::new(Target::default()),
            delivered: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            waker: Default::default(),
            state: AtomicU8::new(0),
            wait_started_us: AtomicU64::new(0),
            created: Instant::now(),
        });
        let mut slots = self.slots.lock();
        let pid = loop {
            let pid: u32 = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !slots.contains_key(&pid) {
                break pid;
            }
        };
        slots.insert(pid, slot.clone());
        CancelGuard { reg: self, pid, secret, slot }
    }

    /// Stops every live client session (an immediate shutdown).
    pub fn stop_all(&self) {
        for slot in self.slots.lock().values() {
            slot.stop();
        }
    }

    /// Handles one CancelRequest: silently ignored unless the key matches a live client with a query running.
    pub async fn cancel(&self, pid: u32, secret: &[u8]) {
        let Some(slot) = self.slots.lock().get(&pid).cloned() else { return };
        if secret != slot.secret.to_be_bytes() {
            return;
        }
        let Some((t, _delivering)) = slot.begin_delivery() else {
            // No query on a server: if the client waits in the queue, its wait ends with 57014.
            slot.cancel_in_wait.store(true, Ordering::Release);
            slot.waker.wake();
            return;
        };
        if let Err(e) = forward(&t).await {
            tracing::warn!(error = %e, "forwarding a cancel request failed");
        }
    }
}

/// Sends the CancelRequest and waits for Postgres to close the connection, which it does after signalling.
pub async fn forward(t: &CancelTarget) -> std::io::Result<()> {
    forward_within(t, std::time::Duration::from_secs(5)).await
}

/// `forward`, given up after `within` (a server that does not answer must not hold the delivery, and with it the
/// session, any longer).
pub async fn forward_within(t: &CancelTarget, within: std::time::Duration) -> std::io::Result<()> {
    let fut = async {
        let mut s = crate::net::dial(&t.host, t.port).await?;
        s.write_all(&encode::cancel_request(t.pid, &t.secret)).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(within, fut).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
