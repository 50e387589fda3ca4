//! The batcher's stop in a client's request path (after the cache, before the pool): a point lookup that would
//! wait for a server connection joins the pending batch of its statement; the batch's first member (the leader)
//! runs it on the server it checks out, and every member builds its own answer from the shared result.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{distinct, run, wire, BatchKey, Batcher, LeaderGuard, Outcome, Role};
use crate::backend::{Pool, ServerConn};
use crate::cache::config::BatchConfig;
use crate::error::Result;
use crate::state::statements::{Learned, LookupFacts};
use crate::state::{Registry, Settings, Statement};

/// Client encodings in which `\` or `"` bytes can occur inside a multibyte character: an array literal built
/// byte-wise would mean something else, so text-format keys in these are not merged.
const UNSAFE_ENCODINGS: &[&str] = &[
    "sjis",
    "shiftjis",
    "mskanji",
    "big5",
    "gbk",
    "uhc",
    "gb18030",
    "johab",
    "win932",
    "win936",
    "win949",
    "win950",
    "cp932",
    "cp936",
    "cp949",
    "cp950",
    "windows932",
    "windows936",
    "windows949",
    "windows950",
];

/// One lookup asking to take part.
pub struct Ask<'a> {
    pub statement: &'a Statement,
    pub facts: &'a LookupFacts,
    pub pool: &'a Pool,
    /// The session's output-changing settings (`state::settings::Outputs`).
    pub output: u64,
    pub settings: &'a Settings,
    /// The Bind after its statement name (formats, the one value, result formats), as a slice of the input.
    pub bind: Bytes,
    pub describe: bool,
}

/// Where `ask` goes (see `Batcher::join`): alone when a server is free and fewer than `concurrency` lookups or
/// batches of its statement run; else into the batch collecting members. Never merged: a statement a server said
/// cannot be, or a text-format key in an encoding where bytes could hide a quote.
pub fn join(batcher: &Arc<Batcher>, cfg: &BatchConfig, ask: Ask<'_>) -> Role {
    let Some(bind) = wire::lookup_bind(&ask.bind) else { return Role::Pass };
    if matches!(ask.facts.learned(), Learned::Never) || (bind.param_format == 0 && !encoding_is_safe(ask.settings)) {
        return Role::Pass;
    }
    let key = BatchKey {
        pool: ask.pool.id,
        output: ask.output,
        statement: ask.statement.id,
        param_format: bind.param_format,
        // Copies, not slices: a key lives as long as its batch, and a slice would keep the whole read buffer.
        result_formats: Bytes::copy_from_slice(bind.result_formats),
        describe: ask.describe,
    };
    let param = bind.param.map(Bytes::copy_from_slice);
    let alone_ok = cfg.max_wait.is_zero() && ask.pool.has_free_server();
    batcher.join(key, param, cfg.max_batch_size, alone_ok, concurrency(cfg, ask.pool))
}

/// Lookups or batches of one statement running at once: `[batch] concurrency`, or a quarter of the pool.
pub fn concurrency(cfg: &BatchConfig, pool: &Pool) -> usize {
    if cfg.concurrency > 0 {
        cfg.concurrency
    } else {
        (pool.size() / 4).max(1)
    }
}

/// On the server connection the leader holds (its settings already applied): learns the key's type if need be,
/// closes the batch, runs the merged statement and hands every member its share. `None`: run alone (every
/// member is told so when the guard is dropped).
pub async fn lead(
    conn: &mut ServerConn,
    registry: &Registry,
    batcher: &Batcher,
    guard: &LeaderGuard,
    mut rx: oneshot::Receiver<Outcome>,
    statement: &Statement,
    facts: &LookupFacts,
) -> Result<Option<(Arc<wire::Fetched>, usize)>> {
    let ready = match facts.learned() {
        Learned::Ready(r) => r,
        Learned::Never => return Ok(None),
        Learned::Unknown => match run::learn(conn, registry, &facts.shape, &statement.query, &statement.types).await? {
            Learned::Ready(r) => {
                facts.learn(Learned::Ready(r.clone()));
                r
            }
            Learned::Never => {
                facts.learn(Learned::Never);
                return Ok(None);
            }
            Learned::Unknown => return Ok(None),
        },
    };
    let key = &guard.key;
    let Some(formats) = wire::merged_result_formats(&key.result_formats, ready.ncols) else { return Ok(None) };
    let askers = guard.close();
    let (keys, at) = distinct(&askers);
    let fetched = run::execute(conn, &ready, key.param_format, &keys, &formats).await?;
    let Some(fetched) = fetched else {
        batcher.count(&statement.query, |s| s.fallbacks += 1);
        return Ok(None); // dropping the members' senders tells them to run alone
    };
    let rows: u64 = fetched.rows.iter().map(|r| r.1).sum();
    batcher.count(&statement.query, |s| {
        s.batches += 1;
        s.lookups += askers.len() as u64;
        s.distinct_keys += keys.len() as u64;
        s.rows += rows;
        s.largest = s.largest.max(askers.len() as u64);
    });
    let fetched = Arc::new(fetched);
    for (a, i) in askers.into_iter().zip(at) {
        let _ = a.tx.send(Outcome::Done(fetched.clone(), i));
    }
    match rx.try_recv() {
        Ok(Outcome::Done(f, i)) => Ok(Some((f, i))),
        _ => Ok(None),
    }
}

/// Whether text-format keys can be put into an array literal byte-wise in the client's encoding.
pub fn encoding_is_safe(settings: &Settings) -> bool {
    match settings.get("client_encoding") {
        None => true,
        Some(sql) => {
            let v = sql.to_ascii_lowercase().replace(['_', '-'], "");
            !UNSAFE_ENCODINGS.iter().any(|e| v.contains(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_encodings_that_hide_quotes_are_unsafe() {
        let s =
            |v: &str| -> Settings { [("client_encoding".to_string(), crate::sql::session::set_config_sql("client_encoding", v))].into() };
        assert!(encoding_is_safe(&Settings::new()));
        assert!(encoding_is_safe(&s("UTF8")));
        assert!(!encoding_is_safe(&s("SJIS")));
        assert!(!encoding_is_safe(&s("Shift_JIS")));
        assert!(!encoding_is_safe(&s("WIN-932")));
    }
}
