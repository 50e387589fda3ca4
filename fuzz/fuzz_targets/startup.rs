//! The first packet of a connection: its length check, then its parser, on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsurge::protocol::startup::{complete_len, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(len)) = complete_len(data) {
        assert!(len >= 8 && len <= data.len());
        let _ = parse(&data[..len]);
    }
    let _ = parse(data);
});
