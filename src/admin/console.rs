//! The admin console session: simple-query commands (`SHOW …`, `RELOAD`, `PAUSE`, `RESUME`, `SHUTDOWN`) answered
//! by pgsurge itself. The extended protocol is refused with a clear error (tools and exporters use simple queries).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::show::SHOWS;
use super::Role;
use crate::app::{App, Shutdown};
use crate::error::{Error, Result, Severity};
use crate::protocol::codes::*;
use crate::protocol::encode::{self, ErrorFields};
use crate::protocol::frame::complete_len;
use crate::protocol::view;

/// Largest console message accepted.
const MAX_MESSAGE: usize = 64 * 1024;

/// Serves one console client until it leaves or pgsurge stops. `greeting` already holds AuthenticationOk,
/// ParameterStatus and BackendKeyData.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    app: Arc<App>,
    stream: &mut S,
    mut rbuf: BytesMut,
    role: Role,
    mut greeting: BytesMut,
) -> Result<()> {
    encode::put_ready_for_query(&mut greeting, TxStatus::Idle);
    stream.write_all(&greeting).await?;
    let mut shutdown = app.shutdown.subscribe();
    let mut skipping = false;
    loop {
        while let Some(n) = complete_len(&rbuf, MAX_MESSAGE).map_err(|e| Error::Protocol(e.to_string()))? {
            let frame = rbuf.split_to(n);
            let mut out = BytesMut::new();
            match frame[0] {
                TERMINATE => return Ok(()),
                QUERY => {
                    let text = view::query_text(&frame[5..]).ok_or_else(|| Error::Protocol("malformed Query message".into()))?;
                    let text = String::from_utf8_lossy(text).into_owned();
                    app.ops.console_queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    run_query(&app, role, &text, &mut out).await;
                    encode::put_ready_for_query(&mut out, TxStatus::Idle);
                }
                SYNC => {
                    skipping = false;
                    encode::put_ready_for_query(&mut out, TxStatus::Idle);
                }
                PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH if !skipping => {
                    skipping = true;
                    write_error(
                        &app,
                        &Error::NotSupported("the pgsurge admin console answers the simple query protocol only".into()),
                        &mut out,
                    );
                }
                PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH => {}
                t => return Err(Error::Protocol(format!("invalid frontend message type {t}"))),
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
        }
        tokio::select! {
            r = stream.read_buf(&mut rbuf) => if r? == 0 { return Ok(()) },
            _ = shutdown.changed() => if *shutdown.borrow() == Shutdown::Immediate { return Err(Error::Shutdown) },
        }
    }
}

fn write_error(app: &App, e: &Error, out: &mut BytesMut) {
    app.ops.errors.count(e.sqlstate());
    // Every console error ends only the command, whatever its kind.
    e.write_with(out, Severity::Error);
}

/// Runs each `;`-separated command; the first error ends the query, as in Postgres.
async fn run_query(app: &Arc<App>, role: Role, text: &str, out: &mut BytesMut) {
    let commands: Vec<&str> = text.split(';').map(str::trim).filter(|c| !c.is_empty()).collect();
    if commands.is_empty() {
        encode::put_empty_query(out);
        return;
    }
    for c in commands {
        if let Err(e) = run_command(app, role, c, out).await {
            write_error(app, &e, out);
            return;
        }
    }
}

async fn run_command(app: &Arc<App>, role: Role, command: &str, out: &mut BytesMut) -> Result<()> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let verb = words[0].to_ascii_uppercase();
    let arg = words.get(1).map(|w| w.trim_matches('"'));
    let admin_only = || match role {
        Role::Admin => Ok(()),
        Role::Stats => Err(Error::InsufficientPrivilege(format!("{verb} needs an admin user (admin_users)"))),
    };
    match verb.as_str() {
        "SHOW" => {
            // Everything after SHOW, so two-word commands (SHOW CACHE STATEMENTS) match too.
            let what = words[1..].iter().map(|w| w.trim_matches('"').to_ascii_uppercase()).collect::<Vec<_>>().join(" ");
            if what.is_empty() {
                return Err(Error::Syntax("SHOW what? Try SHOW HELP".into()));
            }
            if what == "HELP" {
                return help(out);
            }
            let s = SHOWS
                .iter()
                .find(|s| s.name == what)
                .ok_or_else(|| Error::Syntax(format!("unknown SHOW command {what:?}; SHOW HELP lists them")))?;
            (s.run)(app).encode(out, "SHOW");
            Ok(())
        }
        // Drivers set session parameters at connect (JDBC); for a stats user that is all SET can be.
        "SET" if role == Role::Stats => {
            encode::put_command_complete(out, "SET");
            Ok(())
        }
        "RELOAD" => {
            admin_only()?;
            let notes = app.reload_from_settings().map_err(|e| {
                tracing::error!(error = %e, "RELOAD refused; the running configuration stays");
                Error::Config(format!("RELOAD failed, see logs for additional details ({e}); the running configuration stays"))
            })?;
            for n in notes {
                notice(out, &n);
            }
            encode::put_command_complete(out, "RELOAD");
            Ok(())
        }
        "PAUSE" => {
            admin_only()?;
            check_db(app, arg)?;
            app.pause(arg);
            // Like PgBouncer: answer once the transactions in flight on those pools have ended.
            while app.active_servers(arg) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            encode::put_command_complete(out, "PAUSE");
            Ok(())
        }
        "RESUME" => {
            admin_only()?;
            check_db(app, arg)?;
            app.resume(arg);
            encode::put_command_complete(out, "RESUME");
            Ok(())
        }
        "SHUTDOWN" => {
            admin_only()?;
            tracing::info!("SHUTDOWN from the admin console: draining; in-flight transactions may finish");
            app.shutdown.send_if_modified(|s| {
                let was = *s;
                *s = (*s).max(Shutdown::Draining);
                *s != was
            });
            // Clients waiting for a server would wait in vain: they are told now (FATAL 57P01).
            for c in app.ops.clients.snapshot() {
                if let (Some(slot), crate::cancel::ClientState::Waiting) = (&c.slot, c.state()) {
                    slot.stop();
                }
            }
            encode::put_command_complete(out, "SHUTDOWN");
            Ok(())
        }
        other => {
            admin_only()?;
            match super::commands::run(app, other, command, arg, out).await {
                Some(r) => r,
                None => Err(Error::Syntax(format!("unknown admin console command {other:?}; SHOW HELP lists them"))),
            }
        }
    }
}

fn check_db(app: &App, db: Option<&str>) -> Result<()> {
    match db {
        Some(d) if !app.config.load().databases.contains_key(d) => Err(Error::NoSuchDatabase(d.to_string())),
        _ => Ok(()),
    }
}

fn notice(out: &mut BytesMut, message: &str) {
    encode::put_notice(out, &ErrorFields { severity: "NOTICE", code: "00000", message, detail: None, hint: None });
}

fn help(out: &mut BytesMut) -> Result<()> {
    let shows: Vec<&str> = SHOWS.iter().map(|s| s.name).collect();
    let detail = format!("SHOW HELP|{}\nRELOAD\nPAUSE [db]\nRESUME [db]\nSHUTDOWN", shows.join("|"));
    encode::put_notice(
        out,
        &ErrorFields { severity: "NOTICE", code: "00000", message: "Console usage", detail: Some(&detail), hint: None },
    );
    encode::put_command_complete(out, "SHOW");
    Ok(())
}
