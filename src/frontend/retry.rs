//! The once-only transparent retry after a DDL changed a prepared statement's result type: Postgres answers
//! "cached plan must not change result type" (0A000); outside a transaction nothing ran, so pgsurge closes its
//! stale server-side statement and runs the request again, as if the DDL had come before it.

use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::codes::*;
use crate::protocol::message::View;
use crate::protocol::request::{Input, Kind, Req};
use crate::protocol::view::ErrorView;
use crate::state::session::SessionState;
use crate::state::Statement;

#[derive(Default)]
pub struct Retry {
    /// The request as the client sent it, and its statement.
    kept: Option<(Bytes, Arc<Statement>)>,
    /// The failed run's ReadyForQuery is not the client's.
    pub swallow_rfq: bool,
    /// Set while the re-run is in flight, so it cannot retry again.
    retried: bool,
    /// The request to run again, handed back to the client's input.
    pub pending: Option<Bytes>,
}

impl Retry {
    /// Before a fresh request is forwarded (nothing owed, autocommit): keep it if it is exactly a
    /// Bind/[Describe]/Execute/Sync of a named statement.
    pub fn arm(&mut self, input: &Input, req: &Req, state: &SessionState, fresh: bool) {
        self.kept = None;
        if !fresh || std::mem::take(&mut self.retried) {
            return;
        }
        let Kind::Lookup(l) = req.kind else { return };
        if l.parse.is_some() {
            return;
        }
        let View::Bind { statement, .. } = input.msgs[l.bind].view else { return };
        if let Some(stmt) = state.stmts.get(input.at(statement)) {
            self.kept = Some((input.req_bytes(req), stmt.clone()));
        }
    }

    /// Whether this server frame is the "cached plan must not change result type" error of the kept request,
    /// outside a transaction; if so the request will run again, and the statement to close is returned.
    pub fn stale_plan(&mut self, tag: u8, frame: &[u8], status: TxStatus) -> Option<Arc<Statement>> {
        if tag != ERROR_RESPONSE || self.kept.is_none() || status != TxStatus::Idle {
            return None;
        }
        let e = ErrorView::parse(&frame[5..]).unwrap_or_default();
        if e.code != "0A000" || !e.message.starts_with("cached plan must not change result type") {
            return None;
        }
        let (bytes, stmt) = self.kept.take()?;
        self.swallow_rfq = true;
        self.retried = true;
        self.pending = Some(bytes);
        Some(stmt)
    }
}
