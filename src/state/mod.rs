//! State both sides of the proxy share, below `frontend/` and `backend/`: session settings, the statement
//! registry with what is known about each statement, the analysis memo, run-time estimates for the slow lane,
//! and a client's session state.

pub mod analyses;
pub mod estimates;
pub mod session;
pub mod settings;
pub mod statements;

pub use analyses::Analyses;
pub use settings::Settings;
pub use statements::{Registry, Statement};
