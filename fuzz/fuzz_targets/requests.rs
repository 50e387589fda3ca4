//! The request parser on an arbitrary client stream: every span stays inside its message, requests partition the
//! messages, and the buffer loses exactly what was taken.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsurge::protocol::message::{Span, View};
use pgsurge::protocol::request::Input;

fuzz_target!(|data: &[u8]| {
    let mut rbuf = BytesMut::from(data);
    let mut reuse = Input::default();
    for _ in 0..=data.len() {
        let before = rbuf.len();
        let input = match Input::take(&mut rbuf, 1 << 20, std::mem::take(&mut reuse)) {
            Ok(Some(i)) => i,
            _ => break,
        };
        assert_eq!(before - rbuf.len(), input.buf.len());
        for m in &input.msgs {
            let inside = |s: Span| s.start >= m.start + 5 && s.start <= s.end && s.end <= m.end;
            let ok = match m.view {
                View::Raw => true,
                View::Query { sql } => inside(sql),
                View::Parse { name, query, types } => inside(name) && inside(query) && inside(types),
                View::Bind { portal, statement, rest } => inside(portal) && inside(statement) && inside(rest),
                View::Target { name, .. } => inside(name),
                View::Execute { portal, .. } => inside(portal),
            };
            assert!(ok);
            let _ = m.raw(&input.buf);
        }
        let mut next = 0;
        for r in &input.reqs {
            assert_eq!(r.first, next);
            next = r.end;
            let _ = (input.req_bytes(r), input.synced(r));
        }
        assert_eq!(next, input.msgs.len());
        let _ = (input.charge(0, false), input.first_costly(0, true));
        if input.terminate {
            break;
        }
        reuse = input;
    }
});
