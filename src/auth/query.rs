//! auth_query: the secret of a user who is not in the config is looked up upstream (by default in
//! `pg_shadow`) over a connection logged in as `auth_user`, and cached briefly. A SCRAM secret found this way
//! authenticates the client, whose proven keys then log it in upstream by passthrough: no plaintext stored.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::app::App;
use crate::auth::secret::Secret;
use crate::backend::{ServerConn, ServerTarget, UpstreamCredential};
use crate::config::{Database, User};
use crate::error::{Error, Result};
use crate::protocol::codes::*;
use crate::protocol::encode::{self, put_cstr, put_msg};
use crate::protocol::view::ErrorView;

/// How long a found secret is reused before it is looked up again (a changed password is seen this late).
const FOUND_TTL: Duration = Duration::from_secs(30);
/// How long a miss is remembered: short, but a burst of logins as an unknown user costs one lookup.
const MISSING_TTL: Duration = Duration::from_secs(2);

/// A lookup's result and when it was made.
type Looked = (Instant, Option<Secret>);

/// Lookups by (database, user).
#[derive(Default)]
pub struct AuthCache(Mutex<HashMap<(String, String), Looked>>);

impl App {
    /// The user `name` as auth_query finds it through `db`'s upstream; None if the lookup finds no such user
    /// (or auth_query is not configured).
    pub async fn auth_query_user(&self, db: &Database, name: &str) -> Result<Option<User>> {
        let cfg = self.config.load_full();
        // A database's own auth_user (pgbouncer.ini) wins; its password comes from the users.
        let global = cfg.auth_user.clone();
        let Some((auth_user, password)) = db.auth_user.clone().map(|u| (u, None)).or(global) else { return Ok(None) };
        // auth_dbname: the lookup runs in that configured database instead.
        let look_in = db.auth_dbname.as_ref().and_then(|n| cfg.databases.get(n)).unwrap_or(db);
        let key = (db.name.clone(), name.to_string());
        if let Some((at, secret)) = self.ops.auth_cache.0.lock().get(&key) {
            let ttl = if secret.is_some() { FOUND_TTL } else { MISSING_TTL };
            if at.elapsed() < ttl {
                return Ok(secret.clone().map(|s| user(name, s, &cfg)));
            }
        }
        let credential = match password {
            Some(p) => UpstreamCredential::Password(p),
            None => match cfg.users.get(&auth_user).map(|u| &u.secret) {
                Some(Secret::Plain(p)) => UpstreamCredential::Password(p.clone()),
                Some(Secret::Md5(h)) => UpstreamCredential::Md5(h.clone()),
                _ => return Err(Error::Config(format!("auth_user {auth_user:?} needs auth_password or a plaintext/md5 password"))),
            },
        };
        let target = ServerTarget {
            host: look_in.host.clone(),
            port: look_in.port,
            dbname: look_in.dbname.clone(),
            user: auth_user,
            credential,
            max_prepared: std::num::NonZeroUsize::MIN,
            tls: cfg.server_tls.clone(),
            more_hosts: db.more_hosts.clone().into(),
            attrs: db.target_session_attrs,
            tcp: cfg.server_tcp,
        };
        let secret = lookup(&target, &cfg.auth_query, name, cfg.server_connect_timeout).await?;
        if secret.is_none() {
            tracing::info!(user = name, db = %db.name, "auth_query found no such user");
        }
        self.ops.auth_cache.0.lock().insert(key, (Instant::now(), secret.clone()));
        Ok(secret.map(|s| user(name, s, &cfg)))
    }
}

fn user(name: &str, secret: Secret, cfg: &crate::config::Config) -> User {
    User { name: name.to_string(), secret, auth: cfg.auth_type, pool_size: None }
}

/// Runs `query` with `$1 = name` on a fresh connection; the second column of the first row is the secret.
async fn lookup(target: &ServerTarget, query: &str, name: &str, timeout: Duration) -> Result<Option<Secret>> {
    let mut conn = ServerConn::connect(0, target, timeout).await?;
    let mut out = BytesMut::with_capacity(256);
    put_msg(&mut out, PARSE, |b| {
        put_cstr(b, "");
        put_cstr(b, query);
        b.put_i16(0);
    });
    put_msg(&mut out, BIND, |b| {
        put_cstr(b, "");
        put_cstr(b, "");
        b.put_i16(0);
        b.put_i16(1);
        b.put_i32(name.len() as i32);
        b.put_slice(name.as_bytes());
        b.put_i16(0);
    });
    put_msg(&mut out, EXECUTE, |b| {
        put_cstr(b, "");
        b.put_i32(1);
    });
    put_msg(&mut out, SYNC, |_| {});
    conn.send(&out).await?;
    let mut found = None;
    let mut err = None;
    loop {
        let (tag, body) = tokio::time::timeout(timeout, conn.read_msg())
            .await
            .map_err(|_| Error::UpstreamLost("auth_query did not answer in time".into()))??;
        match tag {
            DATA_ROW if found.is_none() => found = Some(second_column(&body)),
            ERROR_RESPONSE => err = Some(ErrorView::parse(&body).unwrap_or_default()),
            READY_FOR_QUERY => break,
            _ => {}
        }
    }
    let _ = conn.send(&encode::terminate()).await;
    if let Some(e) = err {
        tracing::warn!(code = %e.code, message = %e.message, "auth_query failed");
        return Err(Error::Server(ErrorView { severity: "FATAL".into(), message: format!("auth_query failed: {}", e.message), ..e }));
    }
    // A user found with no password (NULL) exists, with no secret: only `trust` lets it in.
    Ok(found.map(|s| s.map(|s| Secret::from_config(&s)).unwrap_or(Secret::None)))
}

/// The text of a DataRow's second column (the secret), if it is there and not NULL.
fn second_column(body: &[u8]) -> Option<String> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if n < 2 {
        return None;
    }
    let mut at = 2;
    for i in 0..2 {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            return None;
        }
        let end = at.checked_add(len as usize)?;
        if i == 1 {
            return Some(String::from_utf8_lossy(body.get(at..end)?).into_owned());
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_the_second_column_and_hostile_rows_give_none() {
        let mut row = BytesMut::new();
        row.put_i16(2);
        for v in ["bob", "SCRAM-SHA-256$x"] {
            row.put_i32(v.len() as i32);
            row.put_slice(v.as_bytes());
        }
        assert_eq!(second_column(&row).as_deref(), Some("SCRAM-SHA-256$x"));
        assert_eq!(second_column(&row[..row.len() - 1]), None);
        let mut bad = BytesMut::new();
        bad.put_i16(2);
        bad.put_i32(i32::MAX);
        assert_eq!(second_column(&bad), None);
    }
}
