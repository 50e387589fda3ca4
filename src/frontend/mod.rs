//! Client side: the listener, the startup/auth handshake, and the per-client session loop.

pub mod batching;
pub mod expect;
pub mod handshake;
pub mod intercept;
pub mod listener;
pub mod params;
pub mod request;
pub mod session;
pub mod statements;
