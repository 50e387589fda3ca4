//! Writes seen on one session: a statement that writes voids the cache entries it touched when it is sent and
//! again when its transaction ends (other sessions may have filled entries from the old rows in between) — only
//! the point entries of the keys it names when its text pins its rows (`sql::pins`), else its whole tables; DDL,
//! privileges and anything opaque void everything. The session never reads an entry filled before its own write
//! to one of its tables (read-your-writes). What each write voided is returned, for other instances.

use std::collections::HashMap;

use tokio::time::Instant;

use super::deps::{bare, Dep};
use super::invalidation::Invalidation;
use super::Cache;
use crate::sql::{Analysis, StatementClass};

/// Nothing until the session's first write (most sessions of a read-heavy app never write: 8 bytes each).
#[derive(Default)]
pub struct Writes(Option<Box<Seen>>);

#[derive(Default)]
struct Seen {
    /// Tables (bare names) this session wrote without pinning its rows, and when.
    tables: HashMap<String, Instant>,
    /// Row slots (`deps::Generations::slot`) of the keys it wrote, and when; and, per table, its latest such write.
    rows: HashMap<usize, Instant>,
    rows_latest: HashMap<String, Instant>,
    /// What the current transaction voided: voided again when it ends.
    tx: Vec<Invalidation>,
}

/// Row writes remembered per session; past this they count as whole-table writes.
const MAX_ROWS: usize = 4096;

impl Writes {
    /// Before a statement goes upstream. `keys`: the canonical values of the keys its text pins (`key::row_keys`),
    /// when every one has a strict form. Returns what it voids, if anything.
    pub fn note(&mut self, cache: &Cache, a: &Analysis, keys: Option<Vec<String>>) -> Option<Invalidation> {
        let mut flush = false;
        let mut write = false;
        let one = [a.class];
        let classes = if a.class == StatementClass::Multiple { &a.statements[..] } else { &one[..] };
        for c in classes {
            match c {
                StatementClass::Write => write = true,
                StatementClass::Ddl
                | StatementClass::Privilege
                | StatementClass::RoleChange
                | StatementClass::Other
                | StatementClass::ParseError => flush = true,
                _ => {}
            }
        }
        let inv = if flush || (write && a.tables_written.is_empty()) {
            Invalidation::Flush
        } else if !write {
            return None;
        } else {
            match (&a.write_pins, keys) {
                (Some(p), Some(keys)) if a.tables_written.iter().all(|t| bare(t) == bare(&p.table)) => {
                    Invalidation::Rows { table: p.table.clone(), column: p.column.clone(), keys }
                }
                _ => Invalidation::Tables(a.tables_written.clone()),
            }
        };
        cache.apply(&inv);
        let seen = self.0.get_or_insert_with(Default::default);
        seen.mark(cache, &inv);
        seen.tx.push(inv.clone());
        Some(inv)
    }

    /// When a transaction (or an autocommit statement) ends: its writes are visible now; void again.
    pub fn visible(&mut self, cache: &Cache) {
        if let Some(seen) = &mut self.0 {
            for inv in std::mem::take(&mut seen.tx) {
                cache.apply(&inv);
                seen.mark(cache, &inv);
            }
        }
    }

    /// Whether this session wrote what `read` depends on after `at` (an entry filled then must not answer it).
    pub fn wrote_since(&self, read: &Dep, at: Instant) -> bool {
        let Some(seen) = &self.0 else { return false };
        if seen.tables.is_empty() && seen.rows_latest.is_empty() {
            return false;
        }
        let after = |w: Option<&Instant>| w.is_some_and(|w| *w >= at);
        let t = &*read.table().name;
        after(seen.tables.get(t))
            || match read {
                Dep::Table { .. } => after(seen.rows_latest.get(t)),
                Dep::Row { slot, .. } => after(seen.rows.get(slot)),
            }
    }
}

impl Seen {
    fn mark(&mut self, cache: &Cache, inv: &Invalidation) {
        let now = Instant::now();
        match inv {
            Invalidation::Tables(t) => {
                for t in t {
                    self.tables.insert(bare(t).to_string(), now);
                }
            }
            Invalidation::Rows { table, column, keys } => {
                if self.rows.len() + keys.len() > MAX_ROWS {
                    self.rows.clear();
                    self.tables.insert(bare(table).to_string(), now);
                    return;
                }
                for k in keys {
                    self.rows.insert(cache.generations.slot(table, column, k), now);
                }
                self.rows_latest.insert(bare(table).to_string(), now);
            }
            Invalidation::Flush => {}
        }
    }
}
