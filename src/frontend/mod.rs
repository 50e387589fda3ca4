//! Client side: the listener, the startup/auth handshake, and the per-client pipeline: the connection
//! (`conn.rs`), the stages a request goes through (`session.rs`), local answers (`local.rs`), and the relay to
//! the server connection (`relay.rs`, `forward.rs`, the owed-replies queue `expect.rs`, `retry.rs`), and the slow
//! lane's client half (`slow.rs`: a checkout's class, each request's run time).

pub mod accept;
pub mod buffers;
pub mod conn;
pub mod expect;
pub mod forward;
pub mod handshake;
pub mod listener;
pub mod local;
pub mod park;
pub mod relay;
pub mod retry;
pub mod session;
pub mod slow;
pub mod unix;
