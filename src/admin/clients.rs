//! The registry of live client sessions for SHOW CLIENTS and /metrics: a client registers once at login and is
//! removed when its task ends; its state is read from its cancel slot, which the session already updates at
//! checkout and release, so the per-query cost is nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::cancel::{CancelSlot, ClientState};

pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub local_addr: Option<SocketAddr>,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub connect_time: SystemTime,
    pub tls: bool,
    /// None for admin console sessions.
    pub slot: Option<Arc<CancelSlot>>,
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match &self.slot {
            Some(s) => s.state(),
            None => ClientState::Active,
        }
    }

    /// How long the client has been waiting for a server connection now (zero unless waiting).
    pub fn waiting_for(&self, now: Instant) -> std::time::Duration {
        match &self.slot {
            Some(s) if s.state() == ClientState::Waiting => s.waiting_for(now),
            _ => std::time::Duration::ZERO,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.slot.is_none()
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    /// Ids of clients, and of server connections too (pools share it): one sequence, as PgBouncer's.
    pub ids: Arc<AtomicU64>,
    live: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// Removes the client from the registry when its task ends, however it ends.
pub struct ClientGuard<'a> {
    reg: &'a ClientRegistry,
    /// What was registered (the session logs its names from here rather than keep copies).
    pub info: Arc<ClientInfo>,
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.reg.live.lock().remove(&self.info.id);
    }
}

impl ClientRegistry {
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        addr: SocketAddr,
        local_addr: Option<SocketAddr>,
        user: &str,
        database: &str,
        application_name: &str,
        tls: bool,
        slot: Option<Arc<CancelSlot>>,
    ) -> ClientGuard<'_> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let info = ClientInfo {
            id,
            addr,
            local_addr,
            user: user.to_string(),
            database: database.to_string(),
            application_name: application_name.to_string(),
            connect_time: SystemTime::now(),
            tls,
            slot,
        };
        let info = Arc::new(info);
        self.live.lock().insert(id, info.clone());
        ClientGuard { reg: self, info }
    }

    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        self.live.lock().values().cloned().collect()
    }
}
