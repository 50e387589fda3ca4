//! The SQL analysis (pg_query's parser, then pgsurge's walk of its tree) and the lexical session-effects scan on
//! arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pgsurge::sql::session::effects(data);
    if let Ok(sql) = std::str::from_utf8(data) {
        let a = pgsurge::sql::analyze(sql);
        let _ = (a.class, a.cacheable, a.point_read, a.write_pins);
        let _ = pgsurge::sql::batchable(sql);
    }
});
