//! The checkout guard: owns a server connection for one client; on drop it returns it clean, resets it in the
//! background (ROLLBACK / DISCARD ALL with a timeout), or closes it. A dirty connection never reaches a client.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::pool::Pool;
use super::server::ServerConn;
use crate::protocol::codes::TxStatus;

/// What the session knows of the connection's state when it lets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseState {
    /// ReadyForQuery idle, nothing in flight: straight back to the pool.
    Clean,
    /// Idle between statements but inside a transaction, or a session ending: reset before reuse.
    NeedsReset { rollback: bool, discard: bool },
    /// Mid-query or unknown: close it.
    Broken,
}

const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
    /// Units of shared budgets (max_db_connections / max_user_connections), released with the permit.
    pub(super) budget: Option<crate::limit::BudgetPermit>,
    /// Held by slow work: counted against the pool's slow lane (backend/lane.rs) until given back.
    pub lane: Option<super::lane::LaneSlot>,
    pub state: ReleaseState,
}

impl Checkout {
    pub(super) fn new(conn: Box<ServerConn>, pool: Arc<Pool>, permit: OwnedSemaphorePermit) -> Checkout {
        pool.stats.active.fetch_add(1, Ordering::Relaxed);
        Checkout { conn: Some(conn), pool, permit: Some(permit), budget: None, lane: None, state: ReleaseState::Broken }
    }

    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("present until drop")
    }

    pub fn conn_ref(&self) -> &ServerConn {
        self.conn.as_ref().expect("present until drop")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        self.pool.stats.active.fetch_sub(1, Ordering::Relaxed);
        let Some(conn) = self.conn.take() else { return };
        match self.state {
            ReleaseState::Clean => {
                self.pool.checkin(conn);
                self.permit = None;
                self.pool.lane.wake(); // the permit is free: a slow checkout may take it
            }
            ReleaseState::Broken => {
                self.pool.stats.closed_dirty.fetch_add(1, Ordering::Relaxed);
                self.pool.forget(conn);
                self.permit = None;
                self.pool.lane.wake();
            }
            ReleaseState::NeedsReset { rollback, discard } => {
                let pool = self.pool.clone();
                // The permit stays taken until the reset ends, so the pool never exceeds its size.
                let permit = self.permit.take();
                let id = conn.id;
                let budget = self.budget.take();
                let lane = self.lane.take();
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(async move {
                            let ok = tokio::time::timeout(RESET_TIMEOUT, reset(conn, rollback, discard)).await;
                            match ok {
                                Ok(Some(c)) => pool.checkin(c),
                                Ok(None) | Err(_) => {
                                    pool.stats.closed_dirty.fetch_add(1, Ordering::Relaxed);
                                    pool.closed(id);
                                }
                            }
                            drop(permit);
                            drop(budget);
                            drop(lane);
                            pool.lane.wake();
                        });
                    }
                    Err(_) => {
                        self.pool.stats.closed_dirty.fetch_add(1, Ordering::Relaxed);
                        self.pool.forget(conn);
                        drop((permit, lane));
                        self.pool.lane.wake();
                    }
                }
            }
        }
    }
}

/// Rolls back and/or discards session state; returns the connection only if it ends idle and error-free.
async fn reset(mut conn: Box<ServerConn>, rollback: bool, discard: bool) -> Option<Box<ServerConn>> {
    if rollback && conn.run_own_query("ROLLBACK").await.ok()? != TxStatus::Idle {
        return None;
    }
    if discard {
        if conn.run_own_query("DISCARD ALL").await.ok()? != TxStatus::Idle {
            return None;
        }
        conn.applied = Default::default();
        conn.prepared.clear();
        conn.unclosed.clear();
    }
    Some(conn)
}
