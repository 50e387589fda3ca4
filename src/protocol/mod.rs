//! The Postgres wire protocol, pure and I/O-free: frame splitting (one set of rules), client messages decoded
//! once and grouped into requests, startup packets, typed views and encoders.
//!
//! Frames are kept as raw `Bytes`; the proxy decodes only the few messages it must look at and forwards the
//! rest byte for byte.

pub mod codes;
pub mod encode;
pub mod frame;
pub mod message;
pub mod request;
pub mod startup;
pub mod view;

#[cfg(test)]
mod proptests;

pub use frame::{Frame, FrameError, FrameSplitter};
