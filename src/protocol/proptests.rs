//! Property tests: whatever bytes a client or server sends, the frame splitter and the request parser never panic,
//! never read past a frame, and account for every byte they take.

use bytes::BytesMut;
use proptest::prelude::*;

use super::codes::*;
use super::frame::Frames;
use super::message::View;
use super::request::Input;

/// One frame as a client might send it: a real or random type byte, a body, and a length that is usually true
/// and sometimes a lie.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let tags = prop_oneof![
        Just(QUERY),
        Just(PARSE),
        Just(BIND),
        Just(DESCRIBE),
        Just(EXECUTE),
        Just(SYNC),
        Just(FLUSH),
        Just(CLOSE),
        Just(TERMINATE),
        Just(FUNCTION_CALL),
        Just(COPY_DATA),
        Just(COPY_DONE),
        any::<u8>(),
    ];
    // Bodies made of NULs, small numbers and letters, so C strings, counts and names all occur.
    let body = prop::collection::vec(prop_oneof![Just(0u8), 0u8..4, Just(b'S'), Just(b'P'), any::<u8>()], 0..40);
    let lie = prop_oneof![8 => Just(0i64), 1 => -8i64..8, 1 => any::<i32>().prop_map(i64::from)];
    (tags, body, lie).prop_map(|(tag, body, lie)| {
        let len = (body.len() as i64 + 4 + lie) as i32;
        let mut f = vec![tag];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&body);
        f
    })
}

/// A stream: frames back to back, maybe cut short, maybe with garbage after.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(frame(), 0..12), any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(
        |(frames, cut, tail)| {
            let mut s: Vec<u8> = frames.concat();
            s.truncate(cut.index(s.len() + 1));
            s.extend_from_slice(&tail);
            s
        },
    )
}

const MAX: usize = 1 << 16;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn frames_lie_inside_the_buffer_back_to_back(s in stream(), client in any::<bool>()) {
        let mut frames = if client { Frames::client(&s, MAX) } else { Frames::server(&s, MAX) };
        let mut at = 0;
        for f in frames.by_ref() {
            let Ok(f) = f else { break };
            prop_assert_eq!(f.start, at);
            prop_assert!(f.len >= 5 && f.end() <= s.len());
            prop_assert_eq!(f.raw(&s).len(), f.len);
            prop_assert_eq!(f.body(&s).len(), f.len - 5);
            at = f.end();
        }
        prop_assert_eq!(frames.consumed(), at);
    }

    #[test]
    fn requests_cover_exactly_the_frames_taken_and_spans_stay_in_their_frame(s in stream()) {
        let mut rbuf = BytesMut::from(&s[..]);
        let mut taken = 0;
        let mut reuse = Input::default();
        // Bounded: each round takes at least one frame or stops.
        for _ in 0..s.len() + 1 {
            let before = rbuf.len();
            let input = match Input::take(&mut rbuf, MAX, std::mem::take(&mut reuse)) {
                Ok(Some(i)) => i,
                Ok(None) | Err(_) => break,
            };
            prop_assert_eq!(before - rbuf.len(), input.buf.len());
            prop_assert_eq!(&s[taken..taken + input.buf.len()], &input.buf[..]);
            taken += input.buf.len();
            let mut end = 0;
            for m in &input.msgs {
                prop_assert_eq!(m.start as usize, end);
                prop_assert!(m.end as usize <= input.buf.len() && m.len() >= 5);
                end = m.end as usize;
                let inside = |sp: super::message::Span| sp.start >= m.start + 5 && sp.end <= m.end && sp.start <= sp.end;
                let ok = match m.view {
                    View::Raw => true,
                    View::Query { sql } => inside(sql),
                    View::Parse { name, query, types } => inside(name) && inside(query) && inside(types),
                    View::Bind { portal, statement, rest } => inside(portal) && inside(statement) && inside(rest),
                    View::Target { name, .. } => inside(name),
                    View::Execute { portal, .. } => inside(portal),
                };
                prop_assert!(ok, "a span outside its message: {:?}", m);
            }
            // Requests partition the messages in order.
            let mut next = 0;
            for r in &input.reqs {
                prop_assert_eq!(r.first, next);
                prop_assert!(r.end > r.first && r.end <= input.msgs.len());
                next = r.end;
                let _ = input.req_bytes(r);
                let _ = input.synced(r);
            }
            prop_assert_eq!(next, input.msgs.len());
            let _ = (input.charge(0, false), input.first_costly(0, true));
            if input.terminate {
                break;
            }
            reuse = input;
        }
    }
}
