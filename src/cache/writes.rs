//! Writes seen on one session: a statement that writes voids the cache entries of the tables it touches when it
//! is sent and again when its transaction ends (other sessions may have filled entries from the old rows in
//! between); DDL, privileges and anything opaque void everything; and the session never reads an entry filled
//! before its own write to one of its tables (read-your-writes).

use std::collections::HashMap;

use tokio::time::Instant;

use super::deps::bare;
use super::Cache;
use crate::sql::{Analysis, StatementClass};

#[derive(Default)]
pub struct Writes {
    /// Tables (bare names) this session wrote, and when.
    wrote: HashMap<String, Instant>,
    /// Tables written (or a flush owed) by the current transaction: voided again when it ends.
    tx_tables: Vec<String>,
    tx_flush: bool,
}

impl Writes {
    /// Before a statement goes upstream.
    pub fn note(&mut self, cache: &Cache, a: &Analysis) {
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
        if write && !a.tables_written.is_empty() {
            cache.bump(&a.tables_written);
            let now = Instant::now();
            for t in &a.tables_written {
                self.wrote.insert(bare(t).to_string(), now);
            }
            self.tx_tables.extend(a.tables_written.iter().cloned());
        }
        if flush || (write && a.tables_written.is_empty()) {
            cache.flush();
            self.tx_flush = true;
        }
    }

    /// When a transaction (or an autocommit statement) ends: its writes are visible now; void again.
    pub fn visible(&mut self, cache: &Cache) {
        if !self.tx_tables.is_empty() {
            let tables = std::mem::take(&mut self.tx_tables);
            cache.bump(&tables);
            let now = Instant::now();
            for t in tables {
                self.wrote.insert(bare(&t).to_string(), now);
            }
        }
        if std::mem::take(&mut self.tx_flush) {
            cache.flush();
        }
    }

    /// Whether this session wrote `table` (a bare name) after `at`.
    pub fn wrote_since(&self, table: &str, at: Instant) -> bool {
        !self.wrote.is_empty() && self.wrote.get(table).is_some_and(|w| *w >= at)
    }
}
