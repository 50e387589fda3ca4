//! Server side: connections to Postgres (several hosts, target_session_attrs, keepalive), the per-(database, user) pools with their slow lanes, and the checkout
//! guard.

pub mod checkout;
pub mod hosts;
pub mod lane;
pub mod pool;
pub mod server;
pub mod socket;
pub mod stats;

pub use checkout::{Checkout, ReleaseState};
pub use pool::{Pool, PoolKey};
pub use server::{ServerConn, ServerTarget, UpstreamCredential};
