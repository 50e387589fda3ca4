//! The cache's stop in a client's request path, after a miss of the fast lookup (`Cache::get`): decide whether the
//! statement may be cached (`policy.rs`), look up row-level security and temporary tables once per table, then
//! fill it (single flight: one identical request at a time goes upstream, the others wait for its result).

use std::sync::Arc;
use std::time::Duration;

use super::capture::Capture;
use super::deps::Point;
use super::key::row_keys;
use super::shared::{self, Found, Shared};
use super::writes::Writes;
use super::{policy, Cache, Entry, Lookup, TableFacts};
use crate::backend::{Pool, ReleaseState};
use crate::error::Result;
use crate::sql::Analysis;

// Built once per request and moved once into the relay; boxing the capture would add an allocation per miss.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    Hit(Arc<Entry>),
    /// Forward the request; its reply fills the cache.
    Fill(Capture),
    /// Not cacheable: forward it.
    Pass,
}

/// The request a miss is about.
pub struct Miss<'a> {
    pub key: &'a [u8],
    pub sql: &'a [u8],
    pub analysis: &'a Analysis,
    /// The Bind after its statement name, and the statement (extended protocol).
    pub bind: Option<&'a [u8]>,
    pub statement: Option<&'a crate::state::Statement>,
    /// The session's settings (the shared tier keys by their output-changing text).
    pub settings: &'a crate::state::settings::Settings,
}

/// After a miss of `m.key`: whether the request may be cached and who fills it.
pub async fn miss(cache: &Arc<Cache>, pool: &Arc<Pool>, wait: Duration, m: &Miss<'_>, writes: &Writes) -> Result<Outcome> {
    if cache.blind() {
        return Ok(Outcome::Pass);
    }
    let Some(decision) = policy::decide(&cache.config, m.sql, m.analysis) else { return Ok(Outcome::Pass) };
    let Some(facts) = facts(cache, pool, wait, &decision.tables).await? else { return Ok(Outcome::Pass) };
    if !decision.opted_in && facts.iter().any(|f| f.refused) {
        return Ok(Outcome::Pass);
    }
    // A point read depends on its one row, when its key has a strict form and a write to one row of its table
    // changes no other.
    let oid = |i| m.statement.map_or(0, |s| s.param_oid(i));
    let precise = !facts.iter().any(|f| f.side_effects);
    let point = m.analysis.point_read.as_ref().filter(|_| precise).and_then(|p| Some((p, row_keys(&p.keys, m.bind, oid)?)));
    let point = point.as_ref().map(|(p, k)| Point { table: &p.table, column: &p.column, key: &k[0] });
    // What cascades into the tables read is read too.
    let mut tables = decision.tables.clone();
    for p in facts.iter().flat_map(|f| &f.parents) {
        if !tables.contains(p) {
            tables.push(p.clone());
        }
    }
    let (key, sql) = (m.key, m.sql);
    loop {
        match cache.lookup(key, sql, |d, at| writes.wrote_since(d, at)) {
            Lookup::Hit(e) => return Ok(Outcome::Hit(e)),
            Lookup::Fill(fill) => {
                let started = tokio::time::Instant::now();
                let deps = cache.generations.snapshot(&tables, point.as_ref().map(|p| Point { ..*p }));
                let shared = match &cache.shared {
                    Some(tier) => match shared_lookup(tier, pool, m, &tables, point.as_ref()).await {
                        Found::Hit { bytes, ttl } => {
                            let ttl = ttl.min(decision.ttl);
                            let upstream_us = 0;
                            let entry =
                                Entry { bytes, deps, filled_at: started, expires: started + ttl, stats: fill.stats.clone(), upstream_us };
                            let e = cache.store_shared(fill.key.clone(), entry);
                            cache.finish(&fill);
                            return Ok(Outcome::Hit(e));
                        }
                        Found::Miss(f) => Some(f),
                        Found::Skip => None,
                    },
                    None => None,
                };
                return Ok(Outcome::Fill(Capture::new(cache.clone(), fill, deps, decision.ttl).shared(shared)));
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

/// The shared tier's answer for `m` (its key material built only here, on a local miss).
async fn shared_lookup(tier: &Arc<Shared>, pool: &Pool, m: &Miss<'_>, tables: &[String], point: Option<&Point<'_>>) -> Found {
    let output = crate::state::settings::output_text(m.settings);
    let statement = m.statement.map(|s| (&s.query[..], &s.types[..]));
    let Some(material) = shared::material(m.key, &pool.key.database, &pool.key.user, &output, statement) else { return Found::Skip };
    tier.find(material, Shared::fields(tables, point)).await
}

/// What the catalog says of `tables`: looked up once (then every 30 s) on a server connection of the client's
/// pool. None if the lookup failed (then the read is not cached).
async fn facts(cache: &Cache, pool: &Arc<Pool>, wait: Duration, tables: &[String]) -> Result<Option<Vec<Arc<TableFacts>>>> {
    if let Some(f) = cache.facts(tables) {
        return Ok(Some(f));
    }
    let mut co = match pool.checkout(wait).await {
        Ok(co) => co,
        Err(e) => {
            tracing::debug!(error = %e, "no server for the catalog lookup; not caching");
            return Ok(None);
        }
    };
    match co.conn().simple_rows(&super::facts_sql(tables)).await {
        Ok(rows) => {
            co.state = ReleaseState::Clean;
            cache.record_facts(rows);
        }
        Err(e) => tracing::warn!(error = %e, "catalog lookup of the tables read failed; not caching"),
    }
    drop(co);
    Ok(cache.facts(tables))
}
