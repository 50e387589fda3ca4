//! `[cache]` and `[batch]` configuration: the file tables, the `--cache`/`--batch` flags, and validation.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Dur;

/// `[cache]` as written in the file.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub enabled: Option<bool>,
    pub max_bytes: Option<u64>,
    pub max_entry_bytes: Option<usize>,
    pub default_ttl: Option<Dur>,
    pub notify: Option<bool>,
    pub notify_channel: Option<String>,
    /// Keep entries in Redis too, shared by every instance (needs `redis_url`).
    pub redis: Option<bool>,
    #[serde(default)]
    pub rules: Vec<CacheRule>,
}

/// `[[cache.rules]]`: match by table or by exact statement text; set a TTL or opt in/out.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    pub table: Option<String>,
    pub statement: Option<String>,
    /// false: never cache; true: cache even what is otherwise refused for a soft reason (catalogs,
    /// functions not on the allowlist, inside a transaction).
    pub cache: Option<bool>,
    pub ttl: Option<Dur>,
}

/// The validated cache configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub enabled: bool,
    pub max_bytes: u64,
    pub max_entry_bytes: usize,
    pub default_ttl: Duration,
    /// Share invalidations with other instances through Postgres NOTIFY on `notify_channel`.
    pub notify: bool,
    pub notify_channel: String,
    /// The shared tier in Redis (cache/shared.rs).
    pub redis: bool,
    pub rules: Vec<CacheRule>,
}

/// The flags beside the `[cache]` table.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheFlags {
    /// `--cache`
    pub enabled: Option<bool>,
    /// `--cache-ttl`
    pub ttl: Option<Dur>,
    /// `--cache-notify`
    pub notify: Option<bool>,
    /// `--cache-redis`
    pub redis: Option<bool>,
}

impl CacheConfig {
    /// Flags win over the file.
    pub fn build(file: &CacheSettings, flags: CacheFlags) -> Result<CacheConfig, String> {
        let c = CacheConfig {
            enabled: flags.enabled.or(file.enabled).unwrap_or(false),
            max_bytes: file.max_bytes.unwrap_or(256 << 20),
            max_entry_bytes: file.max_entry_bytes.unwrap_or(1 << 20),
            default_ttl: flags.ttl.or(file.default_ttl).map(|d| d.0).unwrap_or(Duration::from_secs(1)),
            notify: flags.notify.or(file.notify).unwrap_or(false),
            notify_channel: file.notify_channel.clone().unwrap_or_else(|| "pgsurge_invalidate".into()),
            redis: flags.redis.or(file.redis).unwrap_or(false),
            rules: file.rules.clone(),
        };
        if c.redis && !c.enabled {
            return Err("cache.redis (--cache-redis) needs the cache on (--cache)".into());
        }
        if c.notify && !c.enabled {
            return Err("cache.notify (--cache-notify) needs the cache on (--cache)".into());
        }
        let ch = &c.notify_channel;
        let valid = !ch.is_empty() && ch.len() < 64 && ch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid || ch.as_bytes()[0].is_ascii_digit() {
            return Err(format!("cache.notify_channel {ch:?}: lower-case letters, digits and _, at most 63, not starting with a digit"));
        }
        if c.max_entry_bytes as u64 > c.max_bytes {
            return Err("cache.max_entry_bytes is larger than cache.max_bytes".into());
        }
        for (i, r) in c.rules.iter().enumerate() {
            if r.table.is_some() == r.statement.is_some() {
                return Err(format!("cache.rules[{i}]: give exactly one of table or statement"));
            }
        }
        Ok(c)
    }
}

/// `[batch]` as written in the file.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub enabled: Option<bool>,
    pub max_batch_size: Option<usize>,
    pub max_wait: Option<Dur>,
    pub concurrency: Option<usize>,
}

/// The validated batcher configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    pub enabled: bool,
    pub max_batch_size: usize,
    pub max_wait: Duration,
    /// Lookups or batches of one statement running on servers at once (0: a quarter of the pool, at least 1).
    pub concurrency: usize,
}

impl BatchConfig {
    pub fn build(file: &BatchSettings, flag: Option<bool>) -> Result<BatchConfig, String> {
        let c = BatchConfig {
            enabled: flag.or(file.enabled).unwrap_or(false),
            max_batch_size: file.max_batch_size.unwrap_or(500),
            max_wait: file.max_wait.map(|d| d.0).unwrap_or(Duration::ZERO),
            concurrency: file.concurrency.unwrap_or(0),
        };
        if c.max_batch_size < 2 {
            return Err("batch.max_batch_size must be at least 2".into());
        }
        Ok(c)
    }
}
