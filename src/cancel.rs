//! Cancel requests: each client gets pgsurge's own BackendKeyData; a cancel is forwarded only to the server
//! connection running that client's query at that moment, and the client cannot hand that connection back to
//! the pool until the forwarded cancel has been delivered, so it never lands on the next client's query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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
    /// Wakes a client that is still waiting for a server connection: its request is cancelled in the queue.
    pub waiting_cancel: tokio::sync::Notify,
    /// Held by a cancel in flight; the session takes it to change targets, so it waits for the delivery.
    target: tokio::sync::Mutex<Option<Arc<CancelTarget>>>,
    /// What the client is doing, for SHOW CLIENTS: kept by `set`/`try_set`/`mark_waiting`, one relaxed store each.
    state: AtomicU8,
    /// When the client started waiting for a server connection, in µs since `created`.
    wait_started_us: AtomicU64,
    created: Instant,
}

pub struct WaitingGuard<'a>(&'a CancelSlot);

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
    pub async fn set(&self, t: Option<Arc<CancelTarget>>) {
        self.note(t.is_some());
        *self.target.lock().await = t;
    }

    fn note(&self, active: bool) {
        self.state.store(if active { 2 } else { 0 }, Ordering::Relaxed);
    }

    /// The session is about to wait for a server connection; the guard marks it idle again if the wait ends
    /// without one (timeout, cancel).
    pub fn waiting(&self) -> WaitingGuard<'_> {
        self.wait_started_us.store(self.created.elapsed().as_micros() as u64, Ordering::Relaxed);
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

    /// Cancels the query of the server connection this client holds now, if any (query_timeout). Delivered under
    /// the slot's lock, so the connection cannot be handed to another client meanwhile.
    pub async fn cancel_current(&self) {
        let guard = self.target.lock().await;
        if let Some(t) = guard.as_ref() {
            if let Err(e) = forward(t).await {
                tracing::warn!(error = %e, "forwarding a query_timeout cancel failed");
            }
        }
    }

    /// Non-waiting version for the hot path: succeeds unless a cancel is being delivered right now.
    pub fn try_set(&self, t: Option<Arc<CancelTarget>>) -> Result<(), Option<Arc<CancelTarget>>> {
        match self.target.try_lock() {
            Ok(mut g) => {
                self.note(t.is_some());
                *g = t;
                Ok(())
            }
            Err(_) => Err(t),
        }
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
            waiting_cancel: tokio::sync::Notify::new(),
            target: tokio::sync::Mutex::new(None),
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

    /// Handles one CancelRequest: silently ignored unless the key matches a live client with a query running.
    pub async fn cancel(&self, pid: u32, secret: &[u8]) {
        let Some(slot) = self.slots.lock().get(&pid).cloned() else { return };
        if secret != slot.secret.to_be_bytes() {
            return;
        }
        let guard = slot.target.lock().await;
        let Some(t) = guard.as_ref() else {
            // No query on a server: if the client waits in the queue, its wait ends with 57014.
            slot.waiting_cancel.notify_waiters();
            return;
        };
        if let Err(e) = forward(t).await {
            tracing::warn!(error = %e, "forwarding a cancel request failed");
        }
        drop(guard);
    }
}

/// Sends the CancelRequest and waits for Postgres to close the connection, which it does after signalling.
pub async fn forward(t: &CancelTarget) -> std::io::Result<()> {
    let fut = async {
        let mut s = TcpStream::connect((t.host.as_str(), t.port)).await?;
        s.write_all(&encode::cancel_request(t.pid, &t.secret)).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), fut).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
