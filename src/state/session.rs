//! One client's session as Postgres would keep it, apart from any server connection: the settings it expects,
//! its named statements, what pins it to a server, and its transaction status. The frontend changes it as
//! replies complete; the cache and batcher read it for their keys.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use super::settings::{self, Outputs, Settings};
use super::statements::{Registry, Statement};
use crate::protocol::codes::TxStatus;
use crate::sql::session::{Effect, Pin};

/// A client's named prepared statements, by the name it gave them.
pub type Statements = std::collections::HashMap<Bytes, Arc<Statement>>;

pub struct SessionState {
    /// Settings this client expects on whatever server it lands on. Shared (`Arc`) with every session of the pool
    /// that logged in with the same settings, and handed to the server connections they run on: a checkout whose
    /// server already holds these settings is a pointer compare.
    pub wanted: Arc<Settings>,
    /// Those it logged in with (what RESET returns to).
    pub startup: Settings,
    /// The number of `wanted`'s output-changing settings; recomputed after a change, when a key first needs it.
    /// (Ids start at 1: `NonZeroU64` makes the Option 8 bytes, not 16.)
    output: Option<std::num::NonZeroU64>,
    /// Why this client must keep its server connection (LISTEN, temp tables, ...); empty: it need not.
    pub pins: BTreeSet<Pin>,
    /// Named prepared statements (client name -> shared statement).
    pub stmts: Statements,
    /// The last unnamed statement resolved: drivers repeat the same text, and a repeat costs one compare.
    unnamed: Option<Arc<Statement>>,
    pub status: TxStatus,
    /// SETs done inside the open transaction: they hold only if it commits.
    staged: Vec<Effect>,
    /// A `COMMIT` command tag was seen since the last ReadyForQuery.
    pub commit_seen: bool,
}

/// How a statement changed whether the session is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinChange {
    None,
    Pinned,
    Unpinned,
}

impl SessionState {
    pub fn new(wanted: Arc<Settings>, startup: Settings) -> SessionState {
        SessionState {
            wanted,
            startup,
            output: None,
            pins: BTreeSet::new(),
            stmts: Statements::default(),
            unnamed: None,
            status: TxStatus::Idle,
            staged: vec![],
            commit_seen: false,
        }
    }

    /// The number of this session's output-changing settings, for cache and batch keys.
    pub fn output_id(&mut self, outputs: &Outputs) -> u64 {
        self.output.get_or_insert_with(|| std::num::NonZeroU64::new(outputs.id(&self.wanted)).unwrap_or(std::num::NonZeroU64::MIN)).get()
    }

    fn wanted_mut(&mut self) -> &mut Settings {
        self.output = None;
        Arc::make_mut(&mut self.wanted)
    }

    /// The shared statement for an unnamed Parse of `query` with `types`.
    pub fn unnamed(&mut self, registry: &Registry, query: &[u8], types: &[u8]) -> Arc<Statement> {
        match &self.unnamed {
            Some(s) if s.query == query && s.types == types => s.clone(),
            _ => {
                let s = registry.intern(query, types);
                self.unnamed = Some(s.clone());
                s
            }
        }
    }

    /// The client's unnamed statement (its last unnamed Parse), if it made one.
    pub fn last_unnamed(&self) -> Option<&Arc<Statement>> {
        self.unnamed.as_ref()
    }

    /// A statement's effect on settings completed: it holds now in autocommit, or at COMMIT of its transaction.
    pub fn completed(&mut self, e: Effect, applied: &mut Arc<Settings>) {
        if self.status == TxStatus::Idle {
            self.apply(e, applied);
        } else {
            self.staged.push(e);
        }
    }

    /// ReadyForQuery with `now`: a transaction that ended applies its SETs if it committed.
    pub fn ready(&mut self, now: TxStatus, applied: &mut Arc<Settings>) {
        if self.status != TxStatus::Idle && now == TxStatus::Idle {
            let committed = std::mem::take(&mut self.commit_seen);
            for e in std::mem::take(&mut self.staged) {
                if committed {
                    self.apply(e, applied);
                }
            }
        }
        self.commit_seen = false;
        self.status = now;
    }

    /// A ParameterStatus the server reported: the session has that value now, and so does the server.
    pub fn reported(&mut self, name: &str, value: &str, applied: &mut Arc<Settings>) {
        if settings::is_session_setting(name) {
            let k = name.to_ascii_lowercase();
            let sql = settings::set_config_sql(&k, value);
            Arc::make_mut(applied).insert(k.clone(), sql.clone());
            self.wanted_mut().insert(k, sql);
        }
    }

    /// Applies a completed statement's effect on settings to what the client wants and what the server has.
    pub fn apply(&mut self, e: Effect, applied: &mut Arc<Settings>) {
        match e {
            Effect::Set { name, sql } => {
                Arc::make_mut(applied).insert(name.clone(), sql.clone());
                self.wanted_mut().insert(name, sql);
            }
            Effect::Reset { name } => {
                // The server went back to its default; the client's default is its startup value, if any.
                Arc::make_mut(applied).remove(&name);
                match self.startup.get(&name).cloned() {
                    Some(v) => self.wanted_mut().insert(name, v),
                    None => self.wanted_mut().remove(&name),
                };
            }
            Effect::ResetAll | Effect::DiscardAll => {
                Arc::make_mut(applied).clear();
                let startup = self.startup.clone();
                *self.wanted_mut() = startup;
            }
            Effect::Unapplied { name } => {
                // The client's value does not apply here: stop asking, and make sure the next client resets it.
                self.wanted_mut().remove(&name);
                Arc::make_mut(applied).insert(name, String::new());
            }
            _ => {}
        }
    }

    /// Records what ties the client to its server connection (and what releases it).
    pub fn note_pins(&mut self, fx: &[Effect]) -> PinChange {
        if fx.is_empty() {
            return PinChange::None;
        }
        let pins = &mut self.pins;
        let was = !pins.is_empty();
        for e in fx {
            match e {
                Effect::Pin(p) => {
                    pins.insert(p.clone());
                }
                Effect::Unlisten(None) => pins.retain(|p| !matches!(p, Pin::Listen(_))),
                Effect::Unlisten(Some(c)) => {
                    pins.remove(&Pin::Listen(c.clone()));
                }
                Effect::Deallocate(None) => pins.retain(|p| !matches!(p, Pin::SqlPrepare(_))),
                Effect::Deallocate(Some(n)) => {
                    pins.remove(&Pin::SqlPrepare(n.clone()));
                }
                Effect::AdvisoryUnlockAll => {
                    pins.remove(&Pin::AdvisoryLock);
                }
                Effect::CloseAllCursors => {
                    pins.remove(&Pin::HoldCursor);
                }
                Effect::DiscardTemp => {
                    pins.remove(&Pin::TempObject);
                }
                Effect::DiscardAll => pins.clear(),
                Effect::ResetAll => {
                    pins.remove(&Pin::OpaqueSetting);
                }
                _ => {}
            }
        }
        match (was, pins.is_empty()) {
            (false, false) => PinChange::Pinned,
            (true, true) => PinChange::Unpinned,
            _ => PinChange::None,
        }
    }

    /// Whether the session can be answered without a server: autocommit, unpinned.
    pub fn is_free(&self) -> bool {
        self.status == TxStatus::Idle && self.pins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (SessionState, Arc<Settings>) {
        let startup: Settings = [("timezone".to_string(), "SET TimeZone = 'UTC'".to_string())].into();
        (SessionState::new(Arc::new(startup.clone()), startup), Arc::new(Settings::new()))
    }

    #[test]
    fn a_set_inside_a_transaction_holds_only_if_it_commits() {
        let (mut s, mut applied) = state();
        let set = Effect::Set { name: "search_path".into(), sql: "SET search_path = a".into() };
        s.status = TxStatus::InTransaction;
        s.completed(set.clone(), &mut applied);
        s.ready(TxStatus::Idle, &mut applied);
        assert!(!s.wanted.contains_key("search_path"), "rolled back: no COMMIT tag seen");
        s.status = TxStatus::InTransaction;
        s.completed(set, &mut applied);
        s.commit_seen = true;
        s.ready(TxStatus::Idle, &mut applied);
        assert_eq!(s.wanted["search_path"], "SET search_path = a");
        assert_eq!(applied["search_path"], "SET search_path = a");
    }

    #[test]
    fn reset_returns_to_the_startup_value_and_changes_the_output_id() {
        let (mut s, mut applied) = state();
        let outputs = Outputs::default();
        let before = s.output_id(&outputs);
        s.apply(Effect::Set { name: "timezone".into(), sql: "SET TimeZone = 'Asia/Tokyo'".into() }, &mut applied);
        assert_ne!(s.output_id(&outputs), before);
        s.apply(Effect::Reset { name: "timezone".into() }, &mut applied);
        assert_eq!(s.wanted["timezone"], "SET TimeZone = 'UTC'");
        assert_eq!(s.output_id(&outputs), before);
    }

    #[test]
    fn pins_are_counted_once_and_released() {
        let (mut s, _) = state();
        assert_eq!(s.note_pins(&[Effect::Pin(Pin::Listen("a".into()))]), PinChange::Pinned);
        assert_eq!(s.note_pins(&[Effect::Pin(Pin::TempObject)]), PinChange::None);
        assert_eq!(s.note_pins(&[Effect::DiscardAll]), PinChange::Unpinned);
        assert!(s.is_free());
    }

    #[test]
    fn a_repeated_unnamed_statement_is_the_same_one() {
        let (mut s, _) = state();
        let r = Registry::default();
        let a = s.unnamed(&r, b"SELECT $1", b"\0\0");
        assert!(Arc::ptr_eq(&a, &s.unnamed(&r, b"SELECT $1", b"\0\0")));
        assert!(!Arc::ptr_eq(&a, &s.unnamed(&r, b"SELECT $1", b"\0\x01\0\0\0\x17")));
    }
}
