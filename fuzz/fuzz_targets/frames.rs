//! The frame splitter on arbitrary bytes, both directions: frames lie inside the input, back to back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsurge::protocol::frame::{FrameSplitter, Frames};

fuzz_target!(|data: &[u8]| {
    for client in [true, false] {
        let mut frames = if client { Frames::client(data, 1 << 20) } else { Frames::server(data, 1 << 20) };
        let mut at = 0;
        for f in frames.by_ref() {
            let Ok(f) = f else { break };
            assert_eq!(f.start, at);
            assert!(f.end() <= data.len());
            at = f.end();
        }
        assert_eq!(frames.consumed(), at);
    }
    let mut buf = BytesMut::from(data);
    let splitter = FrameSplitter::new(1 << 20);
    while let Ok(Some(f)) = splitter.split(&mut buf) {
        let _ = f.body();
    }
});
