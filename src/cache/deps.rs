//! Freshness without scans. Per table, generations bumped by the writes pgsurge sees or hears of; per row key, a
//! slot of a fixed array of generations. An entry remembers the generations it was filled under and is void once
//! one moved:
//! - an entry that reads a table as a whole depends on `any`, bumped by every write to it;
//! - a point read (`… WHERE col = k`) depends on `whole` (writes that do not pin their rows), on the pinned writes
//!   by other columns (`pinned` minus its column's count), and on the slot of (table, col, k), bumped by a write
//!   pinned to that key. Slots are shared by hashing: a collision voids an entry too soon, never too late.
//!
//! Tables are known by their bare relation name (`s.t` and `t` are one), which can only void too much. An epoch,
//! bumped by DDL, privileges and role changes, voids everything.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// One table's generations. Entries hold the handle, so checking one is a few atomic loads, not a lookup.
#[derive(Debug, Default)]
pub struct Table {
    pub name: Arc<str>,
    any: AtomicU64,
    whole: AtomicU64,
    pinned: AtomicU64,
    columns: Mutex<HashMap<Arc<str>, Arc<AtomicU64>>>,
}

impl Table {
    fn column(&self, name: &str) -> Arc<AtomicU64> {
        let mut c = self.columns.lock();
        match c.get(name) {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(AtomicU64::new(0));
                c.insert(Arc::from(name), g.clone());
                g
            }
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Acquire)
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::AcqRel);
}

/// What one entry read, and the generations it read it under.
#[derive(Debug)]
pub enum Dep {
    Table { table: Arc<Table>, any: u64 },
    Row { table: Arc<Table>, column: Arc<AtomicU64>, whole: u64, others: u64, slot: usize, row: u64 },
}

impl Dep {
    pub fn table(&self) -> &Table {
        match self {
            Dep::Table { table, .. } | Dep::Row { table, .. } => table,
        }
    }
}

/// What an entry depends on: the epoch and each table (or row) it read.
#[derive(Debug, Default)]
pub struct Deps {
    pub epoch: u64,
    pub reads: Box<[Dep]>,
}

/// A point read: the table (as written), column and canonical key of the one row it depends on.
pub struct Point<'a> {
    pub table: &'a str,
    pub column: &'a str,
    pub key: &'a str,
}

/// Distinct table names tracked; past this every handle is dropped and the epoch moves (everything is void).
const MAX_TABLES: usize = 100_000;
/// Row slots: 64 Ki generations (512 KiB).
const SLOTS: usize = 1 << 16;

pub struct Generations {
    tables: Mutex<HashMap<Arc<str>, Arc<Table>>>,
    epoch: AtomicU64,
    rows: Box<[AtomicU64]>,
}

impl Default for Generations {
    fn default() -> Self {
        Generations { tables: Mutex::default(), epoch: AtomicU64::new(0), rows: (0..SLOTS).map(|_| AtomicU64::new(0)).collect() }
    }
}

/// The name a table's generation is kept under: its relation name without schema or database.
pub fn bare(name: &str) -> &str {
    match name.bytes().rposition(|b| b == b'.') {
        Some(dot) => &name[dot + 1..],
        None => name,
    }
}

impl Generations {
    fn table(&self, map: &mut HashMap<Arc<str>, Arc<Table>>, name: &str) -> Arc<Table> {
        let n = bare(name);
        match map.get(n) {
            Some(t) => t.clone(),
            None => {
                let name: Arc<str> = Arc::from(n);
                let t = Arc::new(Table { name: name.clone(), ..Default::default() });
                map.insert(name, t.clone());
                t
            }
        }
    }

    /// The handles of `names` (created on first sight).
    fn tables<S: AsRef<str>>(&self, names: &[S]) -> Vec<Arc<Table>> {
        let mut map = self.tables.lock();
        if map.len() + names.len() > MAX_TABLES {
            map.clear();
            bump(&self.epoch);
        }
        names.iter().map(|n| self.table(&mut map, n.as_ref())).collect()
    }

    /// The slot of one key's generation.
    pub fn slot(&self, table: &str, column: &str, key: &str) -> usize {
        // Slots are this process's own (payloads carry keys); a chosen collision can only void an entry too soon.
        foldhash::fast::FixedState::default().hash_one((bare(table), column, key)) as usize % SLOTS
    }

    /// The dependencies of a fill that begins now, reading `tables` (one of them, maybe, only at `point`).
    pub fn snapshot<S: AsRef<str>>(&self, tables: &[S], point: Option<Point<'_>>) -> Deps {
        let epoch = load(&self.epoch);
        let reads = self
            .tables(tables)
            .into_iter()
            .map(|table| match &point {
                Some(p) if bare(p.table) == &*table.name => {
                    let column = table.column(p.column);
                    let slot = self.slot(p.table, p.column, p.key);
                    let (whole, others) = (load(&table.whole), load(&table.pinned).wrapping_sub(load(&column)));
                    Dep::Row { row: load(&self.rows[slot]), slot, whole, others, column, table }
                }
                _ => Dep::Table { any: load(&table.any), table },
            })
            .collect();
        Deps { epoch, reads }
    }

    /// A write to these tables that does not pin its rows: every entry that read one of them is void.
    pub fn bump_tables<S: AsRef<str>>(&self, names: &[S]) -> usize {
        let tables = self.tables(names);
        for t in &tables {
            bump(&t.whole);
            bump(&t.any);
        }
        tables.len()
    }

    /// A write to the rows of `table` whose `column` is one of `keys`: void are the entries that read the table as
    /// a whole, point reads by another column, and point reads of those keys.
    pub fn bump_rows<S: AsRef<str>>(&self, table: &str, column: &str, keys: &[S]) {
        let t = self.tables(&[table]).remove(0);
        for k in keys {
            bump(&self.rows[self.slot(table, column, k.as_ref())]);
        }
        bump(&t.column(column));
        bump(&t.pinned);
        bump(&t.any);
    }

    /// Everything is void.
    pub fn flush(&self) {
        bump(&self.epoch);
    }

    /// Whether nothing `d` depends on has moved.
    pub fn current(&self, d: &Deps) -> bool {
        d.epoch == load(&self.epoch)
            && d.reads.iter().all(|r| match r {
                Dep::Table { table, any } => load(&table.any) == *any,
                Dep::Row { table, column, whole, others, slot, row } => {
                    load(&table.whole) == *whole
                        && load(&table.pinned).wrapping_sub(load(column)) == *others
                        && load(&self.rows[*slot]) == *row
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point<'a>(table: &'a str, column: &'a str, key: &'a str) -> Option<Point<'a>> {
        Some(Point { table, column, key })
    }

    #[test]
    fn a_write_voids_what_read_the_table_however_it_was_named() {
        let g = Generations::default();
        let a = g.snapshot(&["public.accounts"], None);
        let b = g.snapshot(&["branches"], None);
        assert!(g.current(&a) && g.current(&b));
        g.bump_tables(&["accounts"]);
        assert!(!g.current(&a), "public.accounts and accounts are one table here");
        assert!(g.current(&b));
        g.flush();
        assert!(!g.current(&b));
    }

    #[test]
    fn a_pinned_write_voids_its_keys_the_whole_table_readers_and_other_columns_only() {
        let g = Generations::default();
        let row7 = g.snapshot(&["t"], point("t", "id", "7"));
        let row8 = g.snapshot(&["t"], point("public.t", "id", "8"));
        let by_email = g.snapshot(&["t"], point("t", "email", "7"));
        let scan = g.snapshot(&["t"], None);
        let other = g.snapshot(&["u"], point("u", "id", "7"));
        g.bump_rows("s.t", "id", &["7"]);
        assert!(!g.current(&row7), "its key");
        assert!(g.current(&row8), "another key of the same column");
        assert!(!g.current(&by_email), "a point read by another column cannot know which rows moved");
        assert!(!g.current(&scan), "whole-table readers");
        assert!(g.current(&other), "another table");
        let row8_again = g.snapshot(&["t"], point("t", "id", "8"));
        g.bump_tables(&["t"]);
        assert!(!g.current(&row8) && !g.current(&row8_again), "a write that pins nothing voids every point read");
    }
}
