//! The cache's stop in a client's request path, after a miss of the fast lookup (`Cache::get`): decide whether the
//! statement may be cached (`policy.rs`), look up row-level security and temporary tables once per table, then
//! fill it (single flight: one identical request at a time goes upstream, the others wait for its result).

use std::sync::Arc;
use std::time::Duration;

use super::capture::Capture;
use super::writes::Writes;
use super::{policy, Cache, Entry, Lookup};
use crate::backend::{Pool, ReleaseState};
use crate::error::Result;
use crate::sql::Analysis;

pub enum Outcome {
    Hit(Arc<Entry>),
    /// Forward the request; its reply fills the cache.
    Fill(Capture),
    /// Not cacheable: forward it.
    Pass,
}

/// After a miss of `key`: whether the request may be cached and who fills it. `analysis` is the statement's.
pub async fn miss(
    cache: &Arc<Cache>,
    pool: &Arc<Pool>,
    wait: Duration,
    key: &[u8],
    sql: &[u8],
    analysis: &Analysis,
    writes: &Writes,
) -> Result<Outcome> {
    let Some(decision) = policy::decide(&cache.config, sql, analysis) else { return Ok(Outcome::Pass) };
    if !decision.opted_in && flagged(cache, pool, wait, &decision.tables).await? {
        return Ok(Outcome::Pass);
    }
    loop {
        match cache.lookup(key, sql, |t, at| writes.wrote_since(t, at)) {
            Lookup::Hit(e) => return Ok(Outcome::Hit(e)),
            Lookup::Fill(fill) => {
                let deps = cache.generations.snapshot(&decision.tables);
                return Ok(Outcome::Fill(Capture::new(cache.clone(), fill, deps, decision.ttl)));
            }
            Lookup::Wait(notify) => {
                // Wait for the identical request in flight, then look again.
                let woken = notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if cache.filling(key) && tokio::time::timeout(wait, woken).await.is_err() {
                    return Ok(Outcome::Pass);
                }
            }
        }
    }
}

/// Whether one of `tables` has row-level security or is temporary: looked up in the catalog once (then every
/// 30 s) on a server connection of the client's pool. A failed lookup counts as flagged (not cached).
async fn flagged(cache: &Cache, pool: &Arc<Pool>, wait: Duration, tables: &[String]) -> Result<bool> {
    if let Some(f) = cache.flagged(tables) {
        return Ok(f);
    }
    let mut co = pool.checkout(wait).await?;
    match co.conn().simple_rows(&super::flags_sql(tables)).await {
        Ok(rows) => {
            co.state = ReleaseState::Clean;
            cache.record_flags(rows);
        }
        Err(e) => tracing::warn!(error = %e, "row-level security lookup failed; not caching"),
    }
    drop(co);
    Ok(cache.flagged(tables).unwrap_or(true))
}
