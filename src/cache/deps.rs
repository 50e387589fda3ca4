//! Freshness without scans: a generation per table, bumped by every write pgsurge sees to it, and an epoch bumped
//! by DDL, privileges and role changes. An entry remembers the generations it was filled under and is void once
//! one moved. Tables are known by their bare relation name (`s.t` and `t` are one), which can only void too much.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// One table's generation. Entries hold the handle, so checking one is an atomic load, not a lookup.
#[derive(Debug)]
pub struct Table {
    pub name: Arc<str>,
    gen: AtomicU64,
}

impl Table {
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }
}

/// Distinct table names tracked; past this every handle is dropped and the epoch moves (everything is void).
const MAX_TABLES: usize = 100_000;

#[derive(Default)]
pub struct Generations {
    tables: Mutex<HashMap<Arc<str>, Arc<Table>>>,
    /// Bumped by DDL, GRANT/REVOKE, role changes: every older entry is void.
    epoch: AtomicU64,
}

/// The name a table's generation is kept under: its relation name without schema or database.
pub fn bare(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// What an entry depends on: the epoch and each table's generation when its fill began.
#[derive(Debug, Default)]
pub struct Deps {
    pub epoch: u64,
    pub tables: Box<[(Arc<Table>, u64)]>,
}

impl Generations {
    /// The handles of `names` (created on first sight).
    pub fn tables<S: AsRef<str>>(&self, names: &[S]) -> Vec<Arc<Table>> {
        let mut map = self.tables.lock();
        if map.len() + names.len() > MAX_TABLES {
            map.clear();
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        names
            .iter()
            .map(|n| {
                let n = bare(n.as_ref());
                match map.get(n) {
                    Some(t) => t.clone(),
                    None => {
                        let name: Arc<str> = Arc::from(n);
                        let t = Arc::new(Table { name: name.clone(), gen: AtomicU64::new(0) });
                        map.insert(name, t.clone());
                        t
                    }
                }
            })
            .collect()
    }

    /// The dependencies of a fill that begins now.
    pub fn snapshot<S: AsRef<str>>(&self, names: &[S]) -> Deps {
        let epoch = self.epoch.load(Ordering::Acquire);
        let tables = self.tables(names).into_iter().map(|t| (t.clone(), t.generation())).collect();
        Deps { epoch, tables }
    }

    /// A write to these tables: every entry that read one of them is void from now on. Returns how many moved.
    pub fn bump<S: AsRef<str>>(&self, names: &[S]) -> usize {
        let tables = self.tables(names);
        for t in &tables {
            t.gen.fetch_add(1, Ordering::AcqRel);
        }
        tables.len()
    }

    /// Everything is void.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether nothing `d` depends on has moved.
    pub fn current(&self, d: &Deps) -> bool {
        d.epoch == self.epoch.load(Ordering::Acquire) && d.tables.iter().all(|(t, g)| t.generation() == *g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_voids_what_read_the_table_however_it_was_named() {
        let g = Generations::default();
        let a = g.snapshot(&["public.accounts"]);
        let b = g.snapshot(&["branches"]);
        assert!(g.current(&a) && g.current(&b));
        g.bump(&["accounts"]);
        assert!(!g.current(&a), "public.accounts and accounts are one table here");
        assert!(g.current(&b));
        g.flush();
        assert!(!g.current(&b));
    }
}
