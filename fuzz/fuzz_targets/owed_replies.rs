//! The owed-replies queue: what pgsurge expects from a server (chosen by the first bytes), fed arbitrary server
//! frames (the rest). Whatever the server sends, the queue answers Forward or Swallow and never panics.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgsurge::frontend::expect::{Expect, Expectations};
use pgsurge::protocol::frame::Frames;

fn expect(b: u8) -> Option<Expect> {
    Some(match b % 16 {
        0 => Expect::Parse { swallow: b & 16 != 0, stmt: Some(u64::from(b)) },
        1 => Expect::Bind,
        2 => Expect::DescribeStatement,
        3 => Expect::DescribePortal,
        4 => Expect::Execute { effects: vec![] },
        5 => Expect::Close { swallow: b & 16 != 0, closing: (b & 32 != 0).then(|| "s".to_string()) },
        6 => Expect::Query { swallow: b & 16 != 0, effects: vec![], failed: false },
        7 => Expect::Notify { errors: b & 16 != 0 },
        8 => Expect::Setting { name: "x".into(), failed: false },
        9 => Expect::Synthetic(Bytes::from_static(b"1\0\0\0\x04")),
        10 => Expect::CopyEnd,
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = (n as usize % 16).min(rest.len());
    let (plan, server) = rest.split_at(n);
    let mut q = Expectations::default();
    for &b in plan {
        match b % 16 {
            11 => q.client_sync(),
            12 => q.client_copy_end(),
            _ => {
                if let Some(e) = expect(b) {
                    q.push(e);
                }
            }
        }
    }
    let (mut unprepared, mut done, mut due) = (vec![], vec![], vec![]);
    for f in Frames::server(server, 1 << 20) {
        let Ok(f) = f else { break };
        let _ = q.on_server_frame(f.tag, &mut unprepared, &mut done);
        q.take_due(&mut due);
        let _ = (q.len(), q.server_skipping(), q.take_unclosed());
    }
});
