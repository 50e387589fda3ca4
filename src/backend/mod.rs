//! Server side: connections to Postgres, the per-(database, user) pools with their slow lanes, and the checkout
//! guard.

pub mod checkout;
pub mod lane;
pub mod pool;
pub mod server;

pub use checkout::{Checkout, ReleaseState};
pub use pool::{Pool, PoolKey};
pub use server::{ServerConn, ServerTarget, UpstreamCredential};
