//! Statements, shared by every client and both sides of the proxy: one registry keyed by the full text and the
//! parameter type OIDs (never a hash alone), the server-side name pgsurge prepares each under, and what is known
//! about each — its session effects, its analysis, its N+1 shape, what a server taught us about it and its
//! slow-lane identity — computed once, so a repeated statement costs a pointer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::analyses::Analyses;
use crate::protocol::message::put_parse;
use crate::sql::session::Effect;
use crate::sql::{Analysis, BatchShape};

/// One distinct statement (text + parameter types).
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The name pgsurge gives it on server connections.
    pub server_name: String,
    /// A whole Parse frame under `server_name`.
    pub parse: Bytes,
    pub query: Bytes,
    /// The raw parameter-type section of its Parse (count + OIDs).
    pub types: Bytes,
    /// What executing it does to the session (a prepared `SET`, `LISTEN`, ...).
    pub effects: Vec<Effect>,
    analysis: OnceLock<Arc<Analysis>>,
    lookup: OnceLock<Option<Arc<LookupFacts>>>,
    group: OnceLock<Option<u64>>,
    /// Parameter type OIDs a server reported for it (ParameterDescription), for those the Parse left unspecified.
    described: OnceLock<Box<[u32]>>,
    shape: OnceLock<crate::sql::normalize::Shape>,
}

/// A statement of the N+1 shape (`SELECT … FROM t WHERE col = $1`) and what a server told us about it.
#[derive(Debug)]
pub struct LookupFacts {
    pub shape: BatchShape,
    learned: Mutex<Learned>,
}

/// What a server told us about a lookup's key parameter (learned once, by the first batch that needs it).
#[derive(Debug, Clone)]
pub enum Learned {
    Unknown,
    /// The parameter's type has no plain array form, or the statement has not exactly one parameter.
    Never,
    Ready(Arc<Ready>),
}

/// A lookup ready to merge: the key's element type and the merged statement.
#[derive(Debug)]
pub struct Ready {
    pub elem_oid: u32,
    /// Columns of the original statement.
    pub ncols: usize,
    pub merged: Arc<Statement>,
}

impl LookupFacts {
    pub fn learned(&self) -> Learned {
        self.learned.lock().clone()
    }

    pub fn learn(&self, l: Learned) {
        *self.learned.lock() = l;
    }
}

impl Statement {
    /// Its analysis (pg_query), shared with every statement of the same text.
    pub fn analysis(&self, analyses: &Analyses) -> &Arc<Analysis> {
        self.analysis.get_or_init(|| analyses.get(&self.query))
    }

    /// Its N+1 shape, if it has one. Statements that cannot be one are ruled out without parsing.
    pub fn lookup(&self) -> Option<&Arc<LookupFacts>> {
        self.lookup
            .get_or_init(|| {
                if !could_be_lookup(&self.query) {
                    return None;
                }
                let shape = std::str::from_utf8(&self.query).ok().and_then(crate::sql::batchable).filter(|s| s.literal.is_none())?;
                Some(Arc::new(LookupFacts { shape, learned: Mutex::new(Learned::Unknown) }))
            })
            .as_ref()
    }

    /// The type OID of parameter `i`: as the Parse declared it, else as a server described it (0: unknown).
    pub fn param_oid(&self, i: usize) -> u32 {
        match crate::protocol::message::param_type(&self.types, i) {
            0 => self.described.get().and_then(|d| d.get(i).copied()).unwrap_or(0),
            oid => oid,
        }
    }

    /// What a server said the parameter types are (the first description is kept: they depend only on the text,
    /// the declared types and the tables it names, and a mismatch can only make a key unusable, see sql::pins).
    pub fn described(&self, oids: Box<[u32]>) {
        let _ = self.described.set(oids);
    }

    /// The fingerprint group N+1 reports use (never a cache key).
    pub fn group(&self) -> Option<u64> {
        *self.group.get_or_init(|| crate::sql::fingerprint_group(&String::from_utf8_lossy(&self.query)))
    }

    /// Its identity for the slow lane's estimates (its text normalised: `sql::normalize`).
    pub fn shape(&self) -> crate::sql::normalize::Shape {
        *self.shape.get_or_init(|| crate::sql::normalize::shape(&self.query, &mut Vec::new()))
    }
}

/// A point lookup starts with SELECT (after blanks and comments) and has `=` and a `$`: a byte check that spares
/// the parser nearly every other statement.
fn could_be_lookup(sql: &[u8]) -> bool {
    let head = sql.trim_ascii_start();
    let starts = head.len() >= 6 && head[..6].eq_ignore_ascii_case(b"select") || head.starts_with(b"/*") || head.starts_with(b"--");
    starts && sql.contains(&b'=') && sql.contains(&b'$')
}

/// Statements kept alive after their last client let go, newest first out last: a driver that prepares and closes
/// a statement around every query (tokio-postgres' `query(&str)`) gets the same statement, so the same cache keys
/// and learned facts, each time.
const RECENT: usize = 1024;

/// The process-wide statement registry. Entries die with the last client that uses them and once `RECENT` newer
/// statements were made.
pub struct Registry {
    map: Mutex<std::collections::HashMap<(Bytes, Bytes), Weak<Statement>>>,
    recent: Mutex<std::collections::VecDeque<Arc<Statement>>>,
    next: AtomicU64,
    /// Random per process, in every server-side name: a client cannot name (Bind, Close, DEALLOCATE) a statement
    /// pgsurge prepared for other clients.
    prefix: String,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            map: Mutex::default(),
            recent: Mutex::default(),
            next: AtomicU64::new(0),
            prefix: format!("{:016x}", rand::random::<u64>()),
        }
    }
}

impl Registry {
    /// The shared statement for this text and these parameter types.
    pub fn intern(&self, query: &[u8], types: &[u8]) -> Arc<Statement> {
        let key = (Bytes::copy_from_slice(query), Bytes::copy_from_slice(types));
        let mut map = self.map.lock();
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let server_name = format!("pgsurge_{}_{id}", self.prefix);
        let mut parse = BytesMut::with_capacity(query.len() + types.len() + 32);
        put_parse(&mut parse, server_name.as_bytes(), query, types);
        let s = Arc::new(Statement {
            id,
            server_name,
            parse: parse.freeze(),
            effects: crate::sql::session::effects(query),
            query: key.0.clone(),
            types: key.1.clone(),
            analysis: OnceLock::new(),
            lookup: OnceLock::new(),
            group: OnceLock::new(),
            described: OnceLock::new(),
            shape: OnceLock::new(),
        });
        map.insert(key, Arc::downgrade(&s));
        let mut recent = self.recent.lock();
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(s.clone());
        s
    }

    pub fn len(&self) -> usize {
        self.map.lock().values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::parse_view;

    #[test]
    fn the_same_text_and_types_share_one_statement_and_different_types_do_not() {
        let r = Registry::default();
        let a = r.intern(b"SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let b = r.intern(b"SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let c = r.intern(b"SELECT $1", &[0, 1, 0, 0, 0, 20]);
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.server_name, c.server_name);
        let (name, q, types) = parse_view(&a.parse[5..]).unwrap();
        assert_eq!((name, q, types), (a.server_name.as_bytes(), &b"SELECT $1"[..], &[0, 1, 0, 0, 0, 23][..]));
    }

    #[test]
    fn a_statement_outlives_its_last_client_until_many_newer_ones_were_made() {
        let r = Registry::default();
        let id = r.intern(b"SELECT 1", &[0, 0]).id;
        assert_eq!(r.intern(b"SELECT 1", &[0, 0]).id, id, "prepared again after every client closed it");
        for i in 0..RECENT {
            r.intern(format!("SELECT {i} + 1").as_bytes(), &[0, 0]);
        }
        assert_ne!(r.intern(b"SELECT 1", &[0, 0]).id, id, "then it is gone");
        assert!(r.len() <= RECENT);
    }

    #[test]
    fn facts_are_computed_once_and_only_where_they_can_apply() {
        let r = Registry::default();
        let lookup = r.intern(b"SELECT name FROM users WHERE id = $1", &[0, 0]);
        assert_eq!(lookup.lookup().unwrap().shape.table, "users");
        assert!(Arc::ptr_eq(lookup.lookup().unwrap(), lookup.lookup().unwrap()));
        assert!(r.intern(b"UPDATE users SET name = $2 WHERE id = $1", &[0, 0]).lookup().is_none());
        assert!(r.intern(b"SELECT 1", &[0, 0]).lookup().is_none());
        let a = Analyses::default();
        assert_eq!(lookup.analysis(&a).tables_read, vec!["users".to_string()]);
    }
}
