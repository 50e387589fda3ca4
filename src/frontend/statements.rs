//! Named prepared statements in transaction mode: one registry keyed by the full statement text and parameter
//! type OIDs (never a hash alone), server-side names of pgsurge's own, and the rewrites of Parse, Bind,
//! Describe and Close that let a client's statements follow it onto any server connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

use crate::protocol::codes::*;
use crate::protocol::encode::put_msg;
use crate::protocol::frame::get_cstr;

/// One distinct statement (text + parameter types), shared by every client that prepares it.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The name pgsurge gives it on server connections.
    pub server_name: String,
    /// A whole Parse frame under `server_name`.
    pub parse: Bytes,
    pub query: Bytes,
    /// What executing it does to the session (a prepared `SET`, `LISTEN`, ...), decided once.
    pub effects: Vec<crate::sql::session::Effect>,
}

/// The process-wide statement registry. Entries die with the last client that uses them.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<(Bytes, Bytes), Weak<Statement>>>,
    next: AtomicU64,
}

impl Registry {
    /// The shared statement for this text and these parameter types.
    pub fn intern(&self, query: &[u8], param_types: &[u8]) -> Arc<Statement> {
        let key = (Bytes::copy_from_slice(query), Bytes::copy_from_slice(param_types));
        let mut map = self.map.lock();
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        if map.len() > 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let server_name = format!("pgsurge_{id}");
        let mut parse = BytesMut::with_capacity(query.len() + param_types.len() + 32);
        put_msg(&mut parse, PARSE, |b| {
            b.put_slice(server_name.as_bytes());
            b.put_u8(0);
            b.put_slice(query);
            b.put_u8(0);
            b.put_slice(param_types);
        });
        let effects = crate::sql::session::effects(query);
        let s = Arc::new(Statement { id, server_name, parse: parse.freeze(), query: key.0.clone(), effects });
        map.insert(key, Arc::downgrade(&s));
        s
    }

    pub fn len(&self) -> usize {
        self.map.lock().values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Parse body: statement name, query text, and the raw parameter-type section (count + OIDs).
pub fn parse_view(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut b = body;
    let name = get_cstr(&mut b)?;
    let query = get_cstr(&mut b)?;
    if b.len() < 2 {
        return None;
    }
    let n = i16::from_be_bytes([b[0], b[1]]);
    if n < 0 || b.len() != 2 + 4 * n as usize {
        return None;
    }
    Some((name, query, b))
}

/// A Bind body split at its statement name: (portal, statement, rest).
pub fn bind_view(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut b = body;
    let portal = get_cstr(&mut b)?;
    let stmt = get_cstr(&mut b)?;
    Some((portal, stmt, b))
}

/// A Describe or Close body: kind ('S' or 'P') and name.
pub fn target_view(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, mut rest) = body.split_first()?;
    let name = get_cstr(&mut rest)?;
    rest.is_empty().then_some((kind, name))
}

/// Appends a Bind frame naming the server-side statement instead of the client's.
pub fn put_bind(out: &mut BytesMut, portal: &[u8], server_name: &str, rest: &[u8]) {
    put_msg(out, BIND, |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(server_name.as_bytes());
        b.put_u8(0);
        b.put_slice(rest);
    });
}

/// Appends a Describe or Close of a statement under its server-side name.
pub fn put_target(out: &mut BytesMut, tag: u8, server_name: &str) {
    put_msg(out, tag, |b| {
        b.put_u8(b'S');
        b.put_slice(server_name.as_bytes());
        b.put_u8(0);
    });
}

/// The four bytes of a message with an empty body (ParseComplete, CloseComplete, ...).
pub fn empty_msg(tag: u8) -> Bytes {
    Bytes::copy_from_slice(&[tag, 0, 0, 0, 4])
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn views_reject_truncated_bodies() {
        assert_eq!(parse_view(b"s\0SELECT 1\0\0\x02\0\0\0\x17"), None);
        assert_eq!(bind_view(b"portal\0"), None);
        assert_eq!(target_view(b"Sname"), None);
        assert_eq!(target_view(b"Sname\0"), Some((b'S', &b"name"[..])));
    }
}
