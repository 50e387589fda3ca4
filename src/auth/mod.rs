//! Authentication: stored secrets, SCRAM-SHA-256 both ways (server side for clients, client side for
//! upstream, including passthrough with a client's keys), and md5.

pub mod md5;
pub mod query;
pub mod scram;
pub mod secret;
