//! The shared cache tier in Redis (`--cache-redis`): a local miss looks in Redis before Postgres, and a fill is
//! written there too, so N instances make one upstream query per entry, not N, and a new instance starts warm.
//!
//! Freshness mirrors `deps.rs` with generations kept in one Redis hash (`<prefix>gen`): `e` the epoch, `a:t` /
//! `w:t` a table's any/whole counters, `p:t` and `c:t:col` its pinned writes (all columns / one column), `r:N` the
//! row slot N of (table, column, key). Every invalidation this instance applies (its own writes and those it
//! hears of) is also added there. An entry is a Redis hash: the exact key material `m` (compared, so a hash
//! collision of the key name can never serve another statement's rows), the bytes `b`, and `g:<field>` = the
//! generation it was filled under. Both the lookup and the store are one Lua script each (one round trip): the
//! lookup returns the entry only if every generation it read is current, else a snapshot of this request's
//! generations; the store writes the entry only if that snapshot is still current.
//!
//! While an invalidation of this instance is not yet in Redis, nothing is read from it (so a session never reads
//! past its own write); one that could not be written voids every shared entry once Redis answers again.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::deps::{bare, Point};
use super::invalidation::Invalidation;
use crate::redis::Redis;

/// Reads a generation; a field `x\x01y` is the difference of two (a point read's "pinned writes by other
/// columns").
const GEN_FN: &str = r"
local function gen(f)
  local i = string.find(f, '\1', 1, true)
  if i then
    return (tonumber(redis.call('HGET', KEYS[2], string.sub(f, 1, i - 1))) or 0)
      - (tonumber(redis.call('HGET', KEYS[2], string.sub(f, i + 1))) or 0)
  end
  return tonumber(redis.call('HGET', KEYS[2], f)) or 0
end
";

/// KEYS: entry, generations. ARGV: key material, then the generation fields this request reads.
/// Returns {1, bytes, pttl} for a current entry, else {0, generation of each field}.
const LOOKUP: &str = r"
local e = redis.call('HGETALL', KEYS[1])
if #e > 0 then
  local m, b, ok, has = nil, nil, true, {}
  for i = 1, #e, 2 do
    local f = e[i]
    if f == 'm' then m = e[i + 1]
    elseif f == 'b' then b = e[i + 1]
    elseif string.sub(f, 1, 2) == 'g:' then
      local g = string.sub(f, 3)
      has[g] = true
      if gen(g) ~= tonumber(e[i + 1]) then ok = false end
    end
  end
  for i = 2, #ARGV do if not has[ARGV[i]] then ok = false end end
  if ok and m == ARGV[1] and b then return {1, b, redis.call('PTTL', KEYS[1])} end
end
local r = {0}
for i = 2, #ARGV do r[i] = gen(ARGV[i]) end
return r
";

/// KEYS: entry, generations. ARGV: key material, bytes, TTL ms, then (field, generation) pairs.
const STORE: &str = r"
for i = 4, #ARGV, 2 do if gen(ARGV[i]) ~= tonumber(ARGV[i + 1]) then return 0 end end
redis.call('DEL', KEYS[1])
local a = {'m', ARGV[1], 'b', ARGV[2]}
for i = 4, #ARGV, 2 do a[#a + 1] = 'g:' .. ARGV[i]; a[#a + 1] = ARGV[i + 1] end
redis.call('HSET', KEYS[1], unpack(a))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Row slots in Redis (as many as the local ones).
const SLOTS: u64 = 1 << 16;
/// How long writing an invalidation or an entry may take (off the request path).
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct SharedStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stores: AtomicU64,
    /// Lookups not made: Redis down, or an invalidation of this instance not yet written.
    pub skipped: AtomicU64,
}

pub struct Shared {
    redis: Arc<Redis>,
    gen_key: String,
    lookup: Script,
    store: Script,
    bumps: mpsc::UnboundedSender<Vec<String>>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<String>>>>,
    /// Invalidations queued and not yet written.
    pending: Arc<AtomicU64>,
    pub stats: SharedStats,
}

/// What a lookup in Redis found.
pub enum Found {
    Hit {
        bytes: Bytes,
        ttl: Duration,
    },
    /// Not there (or stale): fill it, under these generations.
    Miss(SharedFill),
    /// Redis not asked or did not answer.
    Skip,
}

/// What a fill needs to be written to Redis when it completes.
pub struct SharedFill {
    pub tier: Arc<Shared>,
    name: String,
    material: Vec<u8>,
    gens: Vec<(String, i64)>,
}

impl Shared {
    pub fn new(redis: Arc<Redis>) -> Arc<Shared> {
        let (bumps, rx) = mpsc::unbounded_channel();
        Arc::new(Shared {
            gen_key: redis.key(format_args!("gen")),
            redis,
            lookup: Script::new(&format!("{GEN_FN}{LOOKUP}")),
            store: Script::new(&format!("{GEN_FN}{STORE}")),
            bumps,
            rx: Mutex::new(Some(rx)),
            pending: Arc::default(),
            stats: SharedStats::default(),
        })
    }

    /// Invalidations of this instance not yet written to Redis.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// The Redis generation fields a fill reading `tables` (one maybe only at `point`) depends on.
    pub fn fields<S: AsRef<str>>(tables: &[S], point: Option<&Point<'_>>) -> Vec<String> {
        let mut f = vec!["e".to_string()];
        for t in tables {
            let t = bare(t.as_ref());
            match point {
                Some(p) if bare(p.table) == t => {
                    f.push(format!("w:{t}"));
                    f.push(format!("p:{t}\x01c:{t}:{}", p.column));
                    f.push(format!("r:{}", slot(t, p.column, p.key)));
                }
                _ => f.push(format!("a:{t}")),
            }
        }
        f
    }

    /// Looks the entry of `material` up; on a miss, the generations to fill it under.
    pub async fn find(self: &Arc<Self>, material: Vec<u8>, fields: Vec<String>) -> Found {
        if self.pending.load(Ordering::Acquire) > 0 || self.redis.missing_invalidations() || !self.redis.is_up() {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Found::Skip;
        }
        let name = self.redis.key(format_args!("c:{}", hex(&Sha256::digest(&material))));
        let mut call = self.lookup.key(&name);
        call.key(&self.gen_key).arg(&material[..]);
        for f in &fields {
            call.arg(f);
        }
        let Some(v) = self.redis.call(|mut c| async move { call.invoke_async::<Value>(&mut c).await }).await else {
            return Found::Skip;
        };
        let Value::Array(items) = v else { return Found::Skip };
        match items.as_slice() {
            [Value::Int(1), Value::BulkString(b), Value::Int(pttl)] if *pttl > 0 => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Found::Hit { bytes: Bytes::copy_from_slice(b), ttl: Duration::from_millis(*pttl as u64) }
            }
            [Value::Int(0), gens @ ..] if gens.len() == fields.len() => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let gens = fields.into_iter().zip(gens).map(|(f, g)| (f, if let Value::Int(n) = g { *n } else { -1 })).collect();
                Found::Miss(SharedFill { tier: self.clone(), name, material, gens })
            }
            _ => Found::Skip,
        }
    }

    /// An invalidation this instance applied: added to Redis in order, off the request path.
    pub fn bump(&self, inv: &Invalidation) {
        let fields = match inv {
            Invalidation::Flush => vec!["e".to_string()],
            Invalidation::Tables(ts) => ts.iter().flat_map(|t| [format!("w:{}", bare(t)), format!("a:{}", bare(t))]).collect(),
            Invalidation::Rows { table, column, keys } => {
                let t = bare(table);
                let mut f: Vec<String> = keys.iter().map(|k| format!("r:{}", slot(t, column, k))).collect();
                f.extend([format!("c:{t}:{column}"), format!("p:{t}"), format!("a:{t}")]);
                f
            }
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.bumps.send(fields).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.redis.lost_invalidation("the invalidation writer stopped");
        }
    }

    /// Writes queued invalidations to Redis until the process ends (spawned by `serve`). One that cannot be
    /// written marks Redis down and voids the whole shared tier when it is back.
    pub async fn run(self: Arc<Self>) {
        let Some(mut rx) = self.rx.lock().take() else { return };
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut pipe = redis::pipe();
            for f in batch.iter().flatten() {
                pipe.cmd("HINCRBY").arg(&self.gen_key).arg(f).arg(1).ignore();
            }
            let ok = self.redis.call_within(WRITE_TIMEOUT, |mut c| async move { pipe.query_async::<()>(&mut c).await }).await.is_some();
            if !ok {
                self.redis.lost_invalidation("an invalidation could not be written to Redis");
            }
            self.pending.fetch_sub(batch.len() as u64, Ordering::AcqRel);
        }
    }
}

impl SharedFill {
    /// Writes a completed fill (spawned: the client already has its answer).
    pub fn store(self, bytes: Bytes, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        tokio::spawn(async move {
            let tier = self.tier.clone();
            let mut call = tier.store.key(&self.name);
            call.key(&tier.gen_key).arg(&self.material[..]).arg(&bytes[..]).arg(ttl.as_millis().max(1) as u64);
            for (f, g) in &self.gens {
                call.arg(f).arg(*g);
            }
            let stored = tier.redis.call_within(WRITE_TIMEOUT, |mut c| async move { call.invoke_async::<i64>(&mut c).await }).await;
            if stored == Some(1) {
                tier.stats.stores.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// The key material of a local cache key, with this process's numbers replaced by what they stand for: the
/// database and user (pool), the output settings' text, and for the extended protocol the statement's full text
/// and parameter types. Every part is length-prefixed.
pub fn material(local: &[u8], db: &str, user: &str, output: &[u8], statement: Option<(&[u8], &[u8])>) -> Option<Vec<u8>> {
    let mut m = Vec::with_capacity(local.len() + 64);
    let part = |m: &mut Vec<u8>, p: &[u8]| {
        m.extend_from_slice(&(p.len() as u32).to_le_bytes());
        m.extend_from_slice(p);
    };
    m.push(*local.first()?);
    part(&mut m, db.as_bytes());
    part(&mut m, user.as_bytes());
    part(&mut m, output);
    // local: kind (1), pool (4), output (8), then the text (Q) or statement id (8) + flags + Bind (E).
    match (local[0], statement) {
        (b'Q', None) => part(&mut m, local.get(13..)?),
        (b'E', Some((text, types))) => {
            part(&mut m, text);
            part(&mut m, types);
            part(&mut m, local.get(21..)?);
        }
        _ => return None,
    }
    Some(m)
}

/// A stable row slot (the same in every instance and version: FNV-1a).
fn slot(table: &str, column: &str, key: &str) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for p in [table, column, key] {
        h.write(p.as_bytes());
        h.write(&[0]);
    }
    h.finish() % SLOTS
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_replaces_local_numbers_and_keeps_everything_else() {
        let mut k = vec![];
        let q = super::super::key::simple(&mut k, 3, 9, b"SELECT 1").to_vec();
        let a = material(&q, "app", "u", b"TimeZone=UTC\0", None).unwrap();
        let q2 = super::super::key::simple(&mut k, 4, 10, b"SELECT 1").to_vec();
        assert_eq!(a, material(&q2, "app", "u", b"TimeZone=UTC\0", None).unwrap(), "pool and output numbers are local");
        assert_ne!(a, material(&q, "app", "v", b"TimeZone=UTC\0", None).unwrap());
        assert_ne!(a, material(&q, "app", "u", b"", None).unwrap());
        let e = super::super::key::extended(&mut k, 3, 9, 77, true, false, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec();
        let b = material(&e, "app", "u", b"", Some((b"SELECT $1", b"\0\x01\0\0\0\x17"))).unwrap();
        assert_ne!(b, material(&e, "app", "u", b"", Some((b"SELECT $1", b"\0\x01\0\0\0\x14"))).unwrap(), "parameter types");
        assert!(b.ends_with(b"\x01\0\0\0\x01\0\0\0\x017\0\0"), "flags and Bind as sent");
        assert!(material(&e, "app", "u", b"", None).is_none());
    }

    #[test]
    fn fields_mirror_the_local_dependencies() {
        let p = Point { table: "public.t", column: "id", key: "7" };
        let f = Shared::fields(&["t", "u"], Some(&p));
        assert_eq!(f[0], "e");
        assert_eq!(f[1], "w:t");
        assert_eq!(f[2], "p:t\x01c:t:id");
        assert!(f[3].starts_with("r:"));
        assert_eq!(f[4], "a:u");
        assert_eq!(slot("t", "id", "7"), slot("t", "id", "7"));
    }
}
