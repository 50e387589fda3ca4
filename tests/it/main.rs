//! Integration tests against a real Postgres, one module per feature; see harness.rs for what they share.

mod harness;

mod auth;
mod limits;
mod pooling;
mod resilience;
mod wire;
