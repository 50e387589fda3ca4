//! Statement analyses (pg_query), once per distinct text: a bounded memo shared by the cache, write tracking and
//! prepared statements (which also keep theirs on the statement itself).

use std::sync::Arc;

use bytes::Bytes;

use crate::sql::Analysis;

/// Distinct texts remembered; past this the least useful are forgotten (and parsed again if they come back).
const CAPACITY: usize = 10_000;

pub struct Analyses {
    map: quick_cache::sync::Cache<Bytes, Arc<Analysis>>,
}

impl Default for Analyses {
    fn default() -> Self {
        Analyses { map: quick_cache::sync::Cache::new(CAPACITY) }
    }
}

impl Analyses {
    /// The analysis of `sql`, parsed on first sight.
    pub fn get(&self, sql: &[u8]) -> Arc<Analysis> {
        if let Some(a) = self.map.get(sql) {
            return a;
        }
        let a = Arc::new(crate::sql::analyze(&String::from_utf8_lossy(sql)));
        self.map.insert(Bytes::copy_from_slice(sql), a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_analysed_once() {
        let a = Analyses::default();
        let x = a.get(b"SELECT * FROM t");
        assert!(Arc::ptr_eq(&x, &a.get(b"SELECT * FROM t")));
        assert_eq!(x.tables_read, vec!["t".to_string()]);
    }
}
