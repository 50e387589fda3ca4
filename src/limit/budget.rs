//! Server-connection budgets shared by several pools: `max_db_connections` (all users of one database, served
//! round-robin by user or client address) and `max_user_connections` (all databases of one user).

use std::sync::Arc;

use tokio::time::Instant;

use super::fair::{FairPermit, FairQueue};
use super::rate::Key;

/// The budgets one pool draws from, besides its own size.
pub struct Budgets {
    pub user: Option<Arc<FairQueue>>,
    pub db: Option<Arc<FairQueue>>,
}

/// Units of the shared budgets held by one checkout; returned on drop.
pub struct BudgetPermit {
    _user: Option<FairPermit>,
    _db: Option<FairPermit>,
}

impl Budgets {
    /// Waits (round-robin across `key`s) for a unit of each budget, until `deadline`.
    pub async fn acquire(&self, key: &Key, deadline: Instant) -> Option<BudgetPermit> {
        let user = match &self.user {
            Some(q) => Some(q.acquire(key, deadline).await?),
            None => None,
        };
        let db = match &self.db {
            Some(q) => Some(q.acquire(key, deadline).await?),
            None => None,
        };
        Some(BudgetPermit { _user: user, _db: db })
    }
}
