//! What the client is owed, in order: one entry per message forwarded to the server, plus responses pgsurge
//! makes itself (a ParseComplete for a statement the server already has) and replies it must swallow (its own
//! re-Parse, its SET on checkout). Server frames are matched against the front of this queue.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::codes::*;
use crate::sql::session::Effect;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// `stmt`: the registry id a named Parse prepares on this server, forgotten again if it fails.
    Parse {
        swallow: bool,
        stmt: Option<u64>,
    },
    Bind,
    DescribeStatement,
    DescribePortal,
    /// `effects`: session changes that take hold when the statement completes (a SET sent by Parse/Bind).
    Execute {
        effects: Vec<Effect>,
    },
    /// `closing`: the server name of a statement pgsurge closes itself (an LRU eviction, a stale plan).
    Close {
        swallow: bool,
        closing: Option<String>,
    },
    Sync,
    /// A simple Query or FunctionCall: everything up to its ReadyForQuery; its `effects` count if no error came.
    Query {
        swallow: bool,
        effects: Vec<Effect>,
        failed: bool,
    },
    /// pgsurge's NOTIFY of what a request's writes voided: swallowed up to its ReadyForQuery, except an
    /// ErrorResponse when `errors` (it ran inside the client's transaction, which it failed: the client must know).
    Notify {
        errors: bool,
    },
    /// pgsurge's own statement re-applying one setting on checkout: swallowed; if it fails, `name` is unapplied.
    Setting {
        name: String,
        failed: bool,
    },
    /// Bytes pgsurge answers itself once everything before them has been answered.
    Synthetic(Bytes),
    /// Where the client ended a COPY IN (CopyDone/CopyFail): no reply, only a boundary for the rule below.
    CopyEnd,
}

/// What to do with one server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    Swallow,
}

/// The shape of a queue entry, for matching without borrowing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Parse(bool),
    Bind,
    Describe,
    Execute,
    Close(bool),
    Sync,
    Other,
}

fn kind(e: &Expect) -> Kind {
    match e {
        Expect::Parse { swallow, .. } => Kind::Parse(*swallow),
        Expect::Bind => Kind::Bind,
        Expect::DescribeStatement | Expect::DescribePortal => Kind::Describe,
        Expect::Execute { .. } => Kind::Execute,
        Expect::Close { swallow, .. } => Kind::Close(*swallow),
        Expect::Sync => Kind::Sync,
        _ => Kind::Other,
    }
}

#[derive(Debug, Default)]
pub struct Expectations {
    q: VecDeque<Expect>,
    /// The server is in COPY IN: it ignores Sync (and Flush) until the client's CopyDone/CopyFail.
    copy_in: bool,
    /// An error ended an extended-protocol run whose Sync the client has not sent yet: the server ignores
    /// every message up to that Sync, so nothing is owed for them (src/frontend/session.rs drops them).
    aborted: bool,
    /// Statements pgsurge closed whose Close the server skipped after an error: still prepared there.
    unclosed: Vec<String>,
}

impl Expectations {
    pub fn push(&mut self, e: Expect) {
        self.q.push_back(e);
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn clear(&mut self) {
        self.q.clear();
        self.copy_in = false;
        self.aborted = false;
    }

    /// The server is skipping messages until the client's next Sync.
    pub fn server_skipping(&self) -> bool {
        self.aborted
    }

    /// Server names of statements whose Close the server skipped (they are still prepared there).
    pub fn take_unclosed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unclosed)
    }

    /// A client Sync: owed a ReadyForQuery unless the server is in COPY IN, where it ignores Sync.
    pub fn client_sync(&mut self) {
        self.aborted = false;
        if !self.copy_in {
            self.q.push_back(Expect::Sync);
        }
    }

    /// The client's CopyDone or CopyFail.
    pub fn client_copy_end(&mut self) {
        self.copy_in = false;
        self.q.push_back(Expect::CopyEnd);
    }

    /// Synthetic responses now at the front: they are due immediately.
    pub fn take_due(&mut self, out: &mut Vec<Bytes>) {
        loop {
            match self.q.front() {
                Some(Expect::Synthetic(_)) => {
                    if let Some(Expect::Synthetic(b)) = self.q.pop_front() {
                        out.push(b);
                    }
                }
                Some(Expect::CopyEnd) => {
                    self.q.pop_front();
                }
                _ => return,
            }
        }
    }

    /// Accounts for one server frame and says whether the client should see it. Statements whose Parse failed
    /// or was skipped are added to `unprepared` (the server does not have them after all); session effects of
    /// statements that completed go to `done`; settings pgsurge failed to re-apply go to `unapplied`.
    pub fn on_server_frame(&mut self, tag: u8, unprepared: &mut Vec<u64>, done: &mut Vec<Effect>) -> Action {
        let Some(front) = self.q.front_mut() else {
            return Action::Forward; // asynchronous messages (notices, notifications, a FATAL)
        };
        match front {
            Expect::Query { swallow, failed, .. } => {
                let swallow = *swallow;
                match tag {
                    COPY_IN_RESPONSE => self.copy_in = true,
                    ERROR_RESPONSE => {
                        self.copy_in = false;
                        *failed = true;
                    }
                    READY_FOR_QUERY => {
                        if let Some(Expect::Query { effects, failed: false, .. }) = self.q.pop_front() {
                            done.extend(effects);
                        }
                    }
                    _ => {}
                }
                return if swallow { Action::Swallow } else { Action::Forward };
            }
            Expect::Notify { errors } => {
                let errors = *errors;
                match tag {
                    ERROR_RESPONSE if errors => return Action::Forward,
                    ERROR_RESPONSE => tracing::warn!("pgsurge's NOTIFY of a write failed; other instances learn of the write by TTL"),
                    READY_FOR_QUERY => {
                        self.q.pop_front();
                    }
                    _ => {}
                }
                return Action::Swallow;
            }
            Expect::Setting { failed, name } => {
                match tag {
                    ERROR_RESPONSE => *failed = true,
                    READY_FOR_QUERY => {
                        if *failed {
                            done.push(Effect::Unapplied { name: std::mem::take(name) });
                        }
                        self.q.pop_front();
                    }
                    _ => {}
                }
                return Action::Swallow;
            }
            _ => {}
        }
        let front = kind(front);
        match tag {
            NOTICE_RESPONSE | PARAMETER_STATUS | NOTIFICATION => Action::Forward,
            COPY_IN_RESPONSE => {
                // Syncs the client pipelined before its copy data are ignored by the server: nothing is owed.
                self.copy_in = true;
                let mut end = self.q.iter().position(|e| *e == Expect::CopyEnd).unwrap_or(self.q.len());
                let mut i = 1;
                while i < end {
                    if self.q[i] == Expect::Sync {
                        self.q.remove(i);
                        end -= 1;
                    } else {
                        i += 1;
                    }
                }
                Action::Forward
            }
            ERROR_RESPONSE => {
                self.copy_in = false;
                // The server now skips every message up to the client's next Sync (simple Queries included), and
                // so do the replies the client is owed. If that Sync has not been sent yet, what the client
                // sends until it is skipped too.
                if front == Kind::Sync {
                    return Action::Forward; // an error at Sync itself (the implicit COMMIT): no skipping follows
                }
                loop {
                    match self.q.front() {
                        Some(Expect::Sync) => break,
                        None => {
                            self.aborted = true;
                            break;
                        }
                        _ => {}
                    }
                    match self.q.pop_front() {
                        Some(Expect::Parse { stmt: Some(id), .. }) => unprepared.push(id),
                        Some(Expect::Close { closing: Some(name), .. }) => self.unclosed.push(name),
                        _ => {}
                    }
                }
                Action::Forward
            }
            READY_FOR_QUERY => {
                if front == Kind::Sync {
                    self.q.pop_front();
                }
                Action::Forward
            }
            PARSE_COMPLETE => self.complete(matches!(front, Kind::Parse(_)), front == Kind::Parse(true)),
            BIND_COMPLETE => self.complete(front == Kind::Bind, false),
            CLOSE_COMPLETE => self.complete(matches!(front, Kind::Close(_)), front == Kind::Close(true)),
            ROW_DESCRIPTION | NO_DATA => self.complete(matches!(front, Kind::Describe), false),
            COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED => {
                if front == Kind::Execute {
                    if let Some(Expect::Execute { effects }) = self.q.pop_front() {
                        if tag == COMMAND_COMPLETE {
                            done.extend(effects);
                        }
                    }
                }
                Action::Forward
            }
            _ => Action::Forward, // DataRow, ParameterDescription, COPY traffic: part of the front's answer
        }
    }

    fn complete(&mut self, matches: bool, swallow: bool) -> Action {
        if matches {
            self.q.pop_front();
        }
        if swallow {
            Action::Swallow
        } else {
            Action::Forward
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(e: &mut Expectations, tags: &[u8]) -> Vec<Action> {
        tags.iter().map(|&t| e.on_server_frame(t, &mut vec![], &mut vec![])).collect()
    }

    #[test]
    fn a_reparse_is_swallowed_and_the_rest_forwarded() {
        let mut e = Expectations::default();
        for x in [Expect::Parse { swallow: true, stmt: Some(1) }, Expect::Bind, Expect::Execute { effects: vec![] }, Expect::Sync] {
            e.push(x);
        }
        use Action::*;
        assert_eq!(feed(&mut e, b"12DDCZ"), vec![Swallow, Forward, Forward, Forward, Forward, Forward]);
        assert!(e.is_empty());
    }

    #[test]
    fn a_synthetic_reply_waits_for_everything_before_it() {
        let mut e = Expectations::default();
        e.push(Expect::Bind);
        e.push(Expect::Synthetic(Bytes::from_static(b"3\0\0\0\x04")));
        e.push(Expect::Sync);
        let mut due = vec![];
        e.take_due(&mut due);
        assert!(due.is_empty());
        e.on_server_frame(BIND_COMPLETE, &mut vec![], &mut vec![]);
        e.take_due(&mut due);
        assert_eq!(due.len(), 1);
    }

    #[test]
    fn an_error_skips_to_sync_dropping_what_postgres_would_not_answer() {
        let mut e = Expectations::default();
        for x in [
            Expect::Bind,
            Expect::Synthetic(Bytes::new()),
            Expect::Parse { swallow: false, stmt: Some(7) },
            Expect::Execute { effects: vec![] },
            Expect::Sync,
        ] {
            e.push(x);
        }
        let mut unprepared = vec![];
        e.on_server_frame(ERROR_RESPONSE, &mut unprepared, &mut vec![]);
        assert_eq!(unprepared, vec![7], "a Parse the server skipped did not prepare anything");
        let mut due = vec![];
        e.take_due(&mut due);
        assert!(due.is_empty(), "the CloseComplete after a failed Bind is never sent");
        e.on_server_frame(READY_FOR_QUERY, &mut vec![], &mut vec![]);
        assert!(e.is_empty());
    }

    #[test]
    fn an_error_before_the_sync_was_sent_skips_what_the_client_sends_until_it() {
        // psycopg pipeline: Parse, Bind of `SELECT 1/0`; the error arrives before the rest of the run is sent.
        let mut e = Expectations::default();
        e.push(Expect::Parse { swallow: false, stmt: None });
        e.push(Expect::Bind);
        assert!(!e.server_skipping());
        feed(&mut e, b"1E");
        assert!(e.is_empty());
        assert!(e.server_skipping(), "the server ignores the client's messages until its Sync");
        e.client_sync();
        assert!(!e.server_skipping());
        assert_eq!(feed(&mut e, b"Z"), vec![Action::Forward]);
        assert!(e.is_empty(), "the ReadyForQuery answers the Sync: the server can go back to the pool");
    }

    #[test]
    fn an_error_at_sync_itself_skips_nothing() {
        let mut e = Expectations::default();
        e.push(Expect::Bind);
        e.push(Expect::Execute { effects: vec![] });
        e.client_sync();
        feed(&mut e, b"2CE");
        assert!(!e.server_skipping());
        feed(&mut e, b"Z");
        assert!(e.is_empty());
    }

    #[test]
    fn a_close_the_server_skipped_leaves_the_statement_prepared() {
        let mut e = Expectations::default();
        e.push(Expect::Bind);
        e.push(Expect::Close { swallow: true, closing: Some("pgsurge_3".into()) });
        e.push(Expect::Parse { swallow: true, stmt: Some(4) });
        e.client_sync();
        let mut unprepared = vec![];
        e.on_server_frame(ERROR_RESPONSE, &mut unprepared, &mut vec![]);
        assert_eq!(unprepared, vec![4]);
        assert_eq!(e.take_unclosed(), vec!["pgsurge_3".to_string()]);
        assert!(!e.server_skipping(), "the Sync was already sent");
    }

    #[test]
    fn syncs_sent_before_copy_data_are_owed_nothing() {
        // tokio-postgres: Bind, Execute, Sync, then CopyData..., CopyDone, Sync.
        let mut e = Expectations::default();
        e.push(Expect::Bind);
        e.push(Expect::Execute { effects: vec![] });
        e.client_sync();
        e.on_server_frame(BIND_COMPLETE, &mut vec![], &mut vec![]);
        e.on_server_frame(COPY_IN_RESPONSE, &mut vec![], &mut vec![]);
        e.client_sync(); // ignored by the server while it copies
        e.client_copy_end();
        e.client_sync();
        e.on_server_frame(COMMAND_COMPLETE, &mut vec![], &mut vec![]);
        e.take_due(&mut vec![]);
        e.on_server_frame(READY_FOR_QUERY, &mut vec![], &mut vec![]);
        assert!(e.is_empty());
    }

    #[test]
    fn a_query_s_effects_count_only_if_it_did_not_fail() {
        let set = Effect::Set { name: "search_path".into(), sql: "SET search_path = a".into() };
        let mut e = Expectations::default();
        e.push(Expect::Query { swallow: false, effects: vec![set.clone()], failed: false });
        e.push(Expect::Query { swallow: false, effects: vec![set.clone()], failed: false });
        let mut done = vec![];
        for t in b"CZ" {
            e.on_server_frame(*t, &mut vec![], &mut done);
        }
        assert_eq!(done, vec![set]);
        done.clear();
        for t in b"EZ" {
            e.on_server_frame(*t, &mut vec![], &mut done);
        }
        assert!(done.is_empty());
    }

    #[test]
    fn a_setting_that_fails_to_reapply_is_reported() {
        let mut e = Expectations::default();
        e.push(Expect::Setting { name: "search_path".into(), failed: false });
        let mut done = vec![];
        for t in b"EZ" {
            assert_eq!(e.on_server_frame(*t, &mut vec![], &mut done), Action::Swallow);
        }
        assert_eq!(done, vec![Effect::Unapplied { name: "search_path".into() }]);
    }

    #[test]
    fn a_notify_is_swallowed_but_its_error_reaches_the_client_inside_its_transaction() {
        use Action::*;
        let mut e = Expectations::default();
        e.push(Expect::Execute { effects: vec![] });
        e.push(Expect::Notify { errors: true });
        e.client_sync();
        assert_eq!(feed(&mut e, b"CCZZ"), vec![Forward, Swallow, Swallow, Forward]);
        assert!(e.is_empty());
        e.push(Expect::Notify { errors: true });
        e.client_sync();
        assert_eq!(feed(&mut e, b"EZZ"), vec![Forward, Swallow, Forward], "a commit-time failure, as the client sees it");
        e.push(Expect::Notify { errors: false });
        assert_eq!(feed(&mut e, b"EZ"), vec![Swallow, Swallow], "in a transaction of its own: the client's write stands");
        assert!(e.is_empty());
    }

    #[test]
    fn a_swallowed_query_hides_everything_up_to_its_ready_for_query() {
        let mut e = Expectations::default();
        e.push(Expect::Setting { name: "timezone".into(), failed: false });
        e.push(Expect::Query { swallow: false, effects: vec![], failed: false });
        use Action::*;
        assert_eq!(feed(&mut e, b"SCZ"), vec![Swallow, Swallow, Swallow]);
        assert_eq!(feed(&mut e, b"TDCZ"), vec![Forward; 4]);
        assert!(e.is_empty());
    }
}
