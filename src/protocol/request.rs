//! What a client sent, parsed once: every complete frame taken off the read buffer as one `Input`, each message
//! decoded (`message.rs`), and the messages grouped into requests — a simple Query, a FunctionCall, an
//! extended-protocol run up to its Sync, COPY traffic — each classified by the shape the proxy's stages answer.
//! Every stage (limits, local answers, cache, batcher, forwarding) reads this; none walks the bytes again.

use bytes::{Bytes, BytesMut};

use super::codes::*;
use super::frame::{FrameError, Frames};
use super::message::{Msg, Span, View};

/// The complete frames of one read, decoded and grouped.
#[derive(Debug, Default)]
pub struct Input {
    pub buf: Bytes,
    pub msgs: Vec<Msg>,
    pub reqs: Vec<Req>,
    /// A Terminate came (after `reqs`; anything after it is ignored).
    pub terminate: bool,
}

/// One request: the messages `first..end` of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    pub first: usize,
    pub end: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One Query.
    Simple,
    /// One FunctionCall.
    Function,
    /// `[Parse] Bind [Describe portal] Execute Sync` on the unnamed portal, no row limit, the Parse (if any)
    /// preparing the statement the Bind names: the shape the cache and the batcher can answer.
    Lookup(Lookup),
    /// `[Close statement]... Sync`, or a lone Sync: pgsurge can answer it without a server.
    CloseSync,
    /// Flushes before anything else of a run.
    Flush,
    /// Any other extended-protocol run: ended by its Sync (`synced`), or not complete yet.
    Extended { synced: bool },
    /// CopyData / CopyDone / CopyFail.
    Copy,
}

/// Positions (message indexes) of a lookup's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub parse: Option<usize>,
    pub bind: usize,
    pub describe: bool,
}

impl Input {
    /// Its allocations, for the next input (the bytes they pointed into are let go).
    pub fn recycled(mut self) -> Input {
        self.buf = Bytes::new();
        self
    }

    /// Takes every complete frame off the front of `rbuf` and parses it; `None` if there is not one yet. A
    /// frame that breaks the rules (bad length, over `max`, unknown type) is an error for the whole connection.
    pub fn take(rbuf: &mut BytesMut, max: usize, mut reuse: Input) -> Result<Option<Input>, FrameError> {
        reuse.msgs.clear();
        reuse.reqs.clear();
        reuse.terminate = false;
        let mut frames = Frames::client(rbuf, max);
        for f in frames.by_ref() {
            let f = f?;
            if f.tag == TERMINATE {
                reuse.terminate = true;
                break;
            }
            reuse.msgs.push(Msg::decode(rbuf, f));
        }
        let used = frames.consumed();
        if used == 0 {
            return Ok(None);
        }
        if used > u32::MAX as usize {
            // Spans are 32-bit: a client that piled up 4 GiB of messages unanswered is refused.
            return Err(FrameError::TooLong { tag: '?', len: used, max: u32::MAX as usize });
        }
        reuse.buf = rbuf.split_to(used).freeze();
        group(&reuse.buf, &reuse.msgs, &mut reuse.reqs);
        Ok(Some(reuse))
    }

    /// The bytes of a span.
    pub fn at(&self, s: Span) -> &[u8] {
        s.of(&self.buf)
    }

    /// The raw bytes of messages `from..to`.
    pub fn raw(&self, from: usize, to: usize) -> &[u8] {
        if from >= to {
            return &[];
        }
        &self.buf[self.msgs[from].start as usize..self.msgs[to - 1].end as usize]
    }

    /// A request's bytes as a shared slice (no copy).
    pub fn req_bytes(&self, r: &Req) -> Bytes {
        self.buf.slice(self.msgs[r.first].start as usize..self.msgs[r.end - 1].end as usize)
    }

    /// Rate-limit tokens the requests from `from` on take: one per Query, FunctionCall and extended-protocol run;
    /// a run the previous input left open (`continuing`) was paid when it began; Flushes and COPY data are free.
    pub fn charge(&self, from: usize, continuing: bool) -> u32 {
        let mut open = continuing;
        self.reqs.iter().skip(from).map(|r| self.cost(r, &mut open)).sum()
    }

    /// The index of the first request from `from` on that takes a token (`continuing` as in `charge`).
    pub fn first_costly(&self, from: usize, continuing: bool) -> Option<usize> {
        let mut open = continuing;
        (from..self.reqs.len()).find(|&i| self.cost(&self.reqs[i], &mut open) > 0)
    }

    /// Tokens one request takes; `open`: an extended-protocol run is open before it (updated past it).
    fn cost(&self, r: &Req, open: &mut bool) -> u32 {
        match r.kind {
            Kind::Simple | Kind::Function => {
                *open = false;
                1
            }
            Kind::Lookup(_) | Kind::CloseSync | Kind::Extended { .. } => {
                let paid = std::mem::replace(open, !self.synced(r));
                u32::from(!paid)
            }
            Kind::Flush | Kind::Copy => 0,
        }
    }

    /// Whether request `r` ends with a Query, FunctionCall or Sync (after which Postgres sends ReadyForQuery).
    pub fn synced(&self, r: &Req) -> bool {
        matches!(self.msgs[r.end - 1].tag, QUERY | FUNCTION_CALL | SYNC)
    }
}

fn is_extended(tag: u8) -> bool {
    matches!(tag, PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | SYNC)
}

/// Groups `msgs` into requests.
fn group(buf: &[u8], msgs: &[Msg], reqs: &mut Vec<Req>) {
    let mut i = 0;
    while i < msgs.len() {
        let first = i;
        let kind = match msgs[i].tag {
            QUERY => {
                i += 1;
                Kind::Simple
            }
            FUNCTION_CALL => {
                i += 1;
                Kind::Function
            }
            COPY_DATA | COPY_DONE | COPY_FAIL => {
                while i < msgs.len() && matches!(msgs[i].tag, COPY_DATA | COPY_DONE | COPY_FAIL) {
                    i += 1;
                }
                Kind::Copy
            }
            FLUSH => {
                while i < msgs.len() && msgs[i].tag == FLUSH {
                    i += 1;
                }
                Kind::Flush
            }
            _ => {
                let mut synced = false;
                while i < msgs.len() && is_extended(msgs[i].tag) {
                    i += 1;
                    if msgs[i - 1].tag == SYNC {
                        synced = true;
                        break;
                    }
                }
                classify(buf, &msgs[first..i], first, synced)
            }
        };
        reqs.push(Req { first, end: i, kind });
    }
}

/// The shape of one extended-protocol run.
fn classify(buf: &[u8], run: &[Msg], first: usize, synced: bool) -> Kind {
    if !synced {
        return Kind::Extended { synced: false };
    }
    let body = &run[..run.len() - 1];
    if body.iter().all(|m| matches!(m.view, View::Target { kind: b'S', .. }) && m.tag == CLOSE) {
        return Kind::CloseSync;
    }
    lookup(buf, body, first).map(Kind::Lookup).unwrap_or(Kind::Extended { synced: true })
}

/// `[Parse] Bind [Describe portal ""] Execute("", 0)` (the Sync is already cut off).
fn lookup(buf: &[u8], body: &[Msg], first: usize) -> Option<Lookup> {
    let mut at = 0;
    let mut parse = None;
    let mut parsed_name = None;
    if let Some(Msg { tag: PARSE, view: View::Parse { name, .. }, .. }) = body.first() {
        parse = Some(first);
        parsed_name = Some(name.of(buf));
        at = 1;
    }
    let Some(Msg { tag: BIND, view: View::Bind { portal, statement, .. }, .. }) = body.get(at) else { return None };
    if !portal.is_empty() || parsed_name.is_some_and(|n| n != statement.of(buf)) {
        return None;
    }
    let bind = first + at;
    at += 1;
    let mut describe = false;
    if let Some(Msg { tag: DESCRIBE, view, .. }) = body.get(at) {
        if !matches!(view, View::Target { kind: b'P', name } if name.is_empty()) {
            return None;
        }
        describe = true;
        at += 1;
    }
    let Some(Msg { tag: EXECUTE, view: View::Execute { portal, max_rows: 0 }, .. }) = body.get(at) else { return None };
    if !portal.is_empty() || at + 1 != body.len() {
        return None; // a named portal or a row limit means portal suspension: not ours to answer
    }
    Some(Lookup { parse, bind, describe })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::put_msg;
    use bytes::BufMut;

    fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        put_msg(out, tag, |b| b.put_slice(body));
    }

    fn take(b: &BytesMut) -> Input {
        let mut buf = b.clone();
        Input::take(&mut buf, 1 << 20, Input::default()).unwrap().unwrap()
    }

    fn kinds(i: &Input) -> Vec<Kind> {
        i.reqs.iter().map(|r| r.kind).collect()
    }

    #[test]
    fn simple_queries_are_one_request_each() {
        let mut b = BytesMut::new();
        msg(&mut b, QUERY, b"SELECT 1\0");
        msg(&mut b, QUERY, b"SELECT 2\0");
        let i = take(&b);
        assert_eq!(kinds(&i), vec![Kind::Simple, Kind::Simple]);
        assert_eq!(i.charge(0, false), 2);
        let View::Query { sql } = i.msgs[1].view else { panic!() };
        assert_eq!(i.at(sql), b"SELECT 2");
    }

    #[test]
    fn parse_bind_describe_execute_sync_is_a_lookup() {
        let mut b = BytesMut::new();
        msg(&mut b, PARSE, b"\0SELECT $1\0\0\0");
        msg(&mut b, BIND, b"\0\0\0\0\0\x01\0\0\0\x011\0\0");
        msg(&mut b, DESCRIBE, b"P\0");
        msg(&mut b, EXECUTE, b"\0\0\0\0\0");
        msg(&mut b, SYNC, b"");
        let i = take(&b);
        assert_eq!(kinds(&i), vec![Kind::Lookup(Lookup { parse: Some(0), bind: 1, describe: true })]);
        assert_eq!(i.req_bytes(&i.reqs[0]).len(), b.len());
        assert!(i.synced(&i.reqs[0]));
    }

    #[test]
    fn other_runs_are_forwarded_as_they_are() {
        let mut b = BytesMut::new();
        msg(&mut b, BIND, b"\0\0\0\0\0\0\0\0");
        msg(&mut b, EXECUTE, b"\0\0\0\0\x05"); // max 5 rows: portal suspension
        msg(&mut b, SYNC, b"");
        msg(&mut b, PARSE, b"s\0SELECT 1\0\0\0");
        msg(&mut b, BIND, b"\0t\0\0\0\0\0\0\0"); // binds another statement than it parsed
        msg(&mut b, EXECUTE, b"\0\0\0\0\0");
        msg(&mut b, SYNC, b"");
        msg(&mut b, PARSE, b"u\0SELECT 1\0\0\0");
        let i = take(&b);
        assert_eq!(kinds(&i), vec![Kind::Extended { synced: true }, Kind::Extended { synced: true }, Kind::Extended { synced: false }]);
        assert_eq!(i.charge(0, false), 3);
        assert_eq!(i.charge(0, true), 2, "the first run continues one already paid for");
        assert_eq!(i.first_costly(0, true), Some(1));
    }

    #[test]
    fn flushes_closes_and_copy_data_are_their_own_requests() {
        let mut b = BytesMut::new();
        msg(&mut b, FLUSH, b"");
        msg(&mut b, CLOSE, b"Ss1\0");
        msg(&mut b, CLOSE, b"Ss2\0");
        msg(&mut b, SYNC, b"");
        msg(&mut b, SYNC, b"");
        msg(&mut b, COPY_DATA, b"1\t2\n");
        msg(&mut b, COPY_DONE, b"");
        msg(&mut b, QUERY, b"SELECT 1\0");
        msg(&mut b, TERMINATE, b"");
        msg(&mut b, QUERY, b"never\0");
        let i = take(&b);
        assert_eq!(kinds(&i), vec![Kind::Flush, Kind::CloseSync, Kind::CloseSync, Kind::Copy, Kind::Simple]);
        assert!(i.terminate);
        assert_eq!(i.charge(0, false), 3);
        assert_eq!(i.charge(0, true), 2, "a Flush before it does not end the run it continues");
        assert_eq!(i.first_costly(0, false), Some(1), "a Flush costs nothing");
    }

    #[test]
    fn nothing_complete_is_nothing_and_bad_frames_are_errors() {
        let mut partial = BytesMut::from(&b"Q\0\0\0\x09SEL"[..]);
        assert!(Input::take(&mut partial, 1024, Input::default()).unwrap().is_none());
        assert_eq!(partial.len(), 8, "the partial frame stays for the next read");
        let mut unknown = BytesMut::from(&b"\xf6\0\0\x03\xe8"[..]);
        assert!(Input::take(&mut unknown, 1024, Input::default()).is_err());
        let mut huge = BytesMut::from(&b"Q\x40\0\0\0"[..]);
        assert!(Input::take(&mut huge, 1024, Input::default()).is_err());
    }
}
