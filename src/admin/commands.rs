//! The console commands PgBouncer users script against, beside SHOW: `SET key = value`, `KILL [db]`,
//! `KILL_CLIENT id`, `RECONNECT [db]`, `WAIT_CLOSE [db]`, `DISABLE db`, `ENABLE db`, `SUSPEND`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::app::App;
use crate::error::{Error, Result};
use crate::protocol::encode::{self, ErrorFields};

/// Runs `verb` if it is one of these commands (the caller has checked the user is an admin); None if it is not.
pub async fn run(app: &Arc<App>, verb: &str, command: &str, arg: Option<&str>, out: &mut BytesMut) -> Option<Result<()>> {
    let r = match verb {
        "SET" => set(app, command, out),
        "KILL" => match kill(app, arg) {
            Ok(()) => {
                gone(app, arg, None).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        "KILL_CLIENT" => match kill_client(app, arg) {
            Ok(id) => {
                gone(app, None, Some(id)).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        "RECONNECT" => known_db(app, arg).map(|()| reconnect(app, arg)),
        "WAIT_CLOSE" => match known_db(app, arg) {
            Ok(()) => {
                wait_close(app, arg).await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        "DISABLE" | "ENABLE" => match arg {
            None => Err(Error::Syntax(format!("{verb} needs a database name"))),
            Some(db) => known_db(app, Some(db)).map(|()| app.ops.set_disabled(db, verb == "DISABLE")),
        },
        "SUSPEND" => {
            // pgsurge cannot hand its sockets to another process; the nearest safe thing is PAUSE of everything.
            app.pause(None);
            while app.active_servers(None) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            notice(out, "SUSPEND is served as PAUSE: pgsurge does not hand sockets over; RESUME ends it");
            Ok(())
        }
        _ => return None,
    };
    if r.is_ok() {
        encode::put_command_complete(out, verb);
    }
    Some(r)
}

/// `SET key = value`, `SET key TO value`, `set key=value`.
fn set(app: &App, command: &str, out: &mut BytesMut) -> Result<()> {
    let rest = command.trim()[3..].trim();
    let (key, value) = match rest.split_once('=') {
        Some((k, v)) => (k.trim(), v.trim()),
        None => {
            let mut it = rest.splitn(3, char::is_whitespace);
            match (it.next(), it.next(), it.next()) {
                (Some(k), Some(to), Some(v)) if to.eq_ignore_ascii_case("to") => (k, v.trim()),
                _ => return Err(Error::Syntax(format!("SET key = value, not {command:?}"))),
            }
        }
    };
    let value = unquote(value);
    let notes = app.set_key(key, &value).map_err(|e| Error::Config(format!("SET {key} failed: {e}")))?;
    for n in notes {
        notice(out, &n);
    }
    Ok(())
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        return v[1..v.len() - 1].replace("''", "'");
    }
    v.to_string()
}

fn known_db(app: &App, db: Option<&str>) -> Result<()> {
    match db {
        Some(d) if !app.config.load().databases.contains_key(d) => Err(Error::Protocol(format!("no such database: {d}"))),
        _ => Ok(()),
    }
}

/// `KILL [db]`: closes the clients of `db` (every client when none is named) and their server connections.
fn kill(app: &App, db: Option<&str>) -> Result<()> {
    known_db(app, db)?;
    for c in app.ops.clients.snapshot() {
        if let Some(slot) = &c.slot {
            if db.is_none_or(|d| c.database == d) {
                slot.stop();
            }
        }
    }
    reconnect(app, db);
    Ok(())
}

/// Waits (bounded) until the stopped clients have left the registry, so SHOW CLIENTS right after no longer lists them.
async fn gone(app: &App, db: Option<&str>, id: Option<u64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline
        && app
            .ops
            .clients
            .snapshot()
            .iter()
            .any(|c| c.slot.as_ref().is_some_and(|s| s.is_stopped()) && db.is_none_or(|d| c.database == d) && id.is_none_or(|i| c.id == i))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `KILL_CLIENT id`: closes one client, by the id SHOW CLIENTS gives.
fn kill_client(app: &App, id: Option<&str>) -> Result<u64> {
    let id: u64 = id.and_then(|i| i.parse().ok()).ok_or_else(|| Error::Protocol("invalid client pointer supplied".into()))?;
    let c = app.ops.clients.snapshot().into_iter().find(|c| c.id == id).ok_or_else(|| Error::Protocol("client not found".into()))?;
    match &c.slot {
        Some(slot) => {
            slot.stop();
            Ok(id)
        }
        None => Err(Error::NotSupported("a console session cannot be killed".into())),
    }
}

fn reconnect(app: &App, db: Option<&str>) {
    for p in app.pools() {
        if db.is_none_or(|d| p.key.database == d) {
            p.reconnect();
        }
    }
}

/// `WAIT_CLOSE [db]`: waits until the server connections a RECONNECT (or a reload) asked to close are gone.
async fn wait_close(app: &App, db: Option<&str>) {
    loop {
        let open: usize = app.pools().iter().filter(|p| db.is_none_or(|d| p.key.database == d)).map(|p| p.closing_count()).sum();
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn notice(out: &mut BytesMut, message: &str) {
    encode::put_notice(out, &ErrorFields { severity: "NOTICE", code: "00000", message, detail: None, hint: None });
}
