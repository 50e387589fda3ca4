//! Integration tests against a real Postgres, one module per feature; see harness.rs for what they share.

mod harness;

mod auth;
mod batch;
mod blackhole;
mod cache;
mod demo;
mod drivers;
mod failover;
mod hostile;
mod invalidation;
mod limits;
mod openfiles;
mod ops;
mod pooling;
mod process;
mod redis;
mod resilience;
mod slow;
mod tls;
mod unix;
mod wire;
