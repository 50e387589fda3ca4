//! The first whole request at the front of a client's buffer, when it has one of the two shapes the cache and
//! the batcher can answer without a server: a simple Query, or `[Parse] Bind [Describe portal] Execute Sync`
//! on the unnamed portal. Anything else is forwarded as it is.

use crate::protocol::codes::*;
use crate::protocol::frame::{complete_len, get_cstr};
use crate::protocol::view;

use super::statements as st;

/// A Parse in the request: client statement name, text, raw parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Simple {
        sql: &'a [u8],
    },
    Extended {
        parse: Option<Parse<'a>>,
        /// Statement named by Bind (may be the one parsed just before).
        statement: &'a [u8],
        /// The Bind body after the statement name: parameter formats, values, result formats.
        bind_rest: &'a [u8],
        /// A Describe of the portal asks for the RowDescription.
        describe: bool,
    },
}

/// The first request in `buf` (complete frames only) and the bytes it spans.
pub fn first(buf: &[u8]) -> Option<(Request<'_>, usize)> {
    let frames = Frames { buf, at: 0 };
    let mut it = frames.peekable();
    let (tag, body) = it.next()?;
    if tag == QUERY {
        let sql = view::query_text(body)?;
        return Some((Request::Simple { sql }, 0)).map(|(r, _)| (r, 5 + body.len()));
    }
    let mut len = 0;
    let mut parse = None;
    let (mut tag, mut body) = (tag, body);
    if tag == PARSE {
        let (name, query, param_types) = st::parse_view(body)?;
        parse = Some(Parse { name, query, param_types });
        len += 5 + body.len();
        (tag, body) = it.next()?;
    }
    if tag != BIND {
        return None;
    }
    let (portal, statement, bind_rest) = st::bind_view(body)?;
    if !portal.is_empty() {
        return None;
    }
    len += 5 + body.len();
    let (mut tag, mut body) = it.next()?;
    let mut describe = false;
    if tag == DESCRIBE {
        if st::target_view(body) != Some((b'P', &b""[..])) {
            return None;
        }
        describe = true;
        len += 5 + body.len();
        (tag, body) = it.next()?;
    }
    if tag != EXECUTE {
        return None;
    }
    let mut b = body;
    let portal = get_cstr(&mut b)?;
    if !portal.is_empty() || b != [0, 0, 0, 0] {
        return None; // a row limit means portal suspension: not ours to answer
    }
    len += 5 + body.len();
    let (tag, body) = it.next()?;
    if tag != SYNC {
        return None;
    }
    len += 5 + body.len();
    Some((Request::Extended { parse, statement, bind_rest, describe }, len))
}

struct Frames<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = (u8, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let n = complete_len(&self.buf[self.at..], usize::MAX).ok()??;
        let f = (self.buf[self.at], &self.buf[self.at + 5..self.at + n]);
        self.at += n;
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::put_msg;
    use bytes::{BufMut, BytesMut};

    fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
        put_msg(out, tag, |b| b.put_slice(body));
    }

    #[test]
    fn a_simple_query_is_one_request() {
        let mut b = BytesMut::new();
        msg(&mut b, QUERY, b"SELECT 1\0");
        msg(&mut b, QUERY, b"SELECT 2\0");
        let (r, n) = first(&b).unwrap();
        assert_eq!(r, Request::Simple { sql: b"SELECT 1" });
        assert_eq!(n, 14);
    }

    #[test]
    fn parse_bind_describe_execute_sync_is_one_request() {
        let mut b = BytesMut::new();
        msg(&mut b, PARSE, b"\0SELECT $1\0\0\0");
        msg(&mut b, BIND, b"\0\0\0\0\0\x01\0\0\0\x011\0\0");
        msg(&mut b, DESCRIBE, b"P\0");
        msg(&mut b, EXECUTE, b"\0\0\0\0\0");
        msg(&mut b, SYNC, b"");
        let (r, n) = first(&b).unwrap();
        assert_eq!(n, b.len());
        let Request::Extended { parse, statement, describe, .. } = r else { panic!() };
        assert_eq!(parse.unwrap().query, b"SELECT $1");
        assert_eq!((statement, describe), (&b""[..], true));
    }

    #[test]
    fn other_shapes_are_not_requests_we_answer() {
        let mut b = BytesMut::new();
        msg(&mut b, BIND, b"\0\0\0\0\0\0\0\0");
        msg(&mut b, EXECUTE, b"\0\0\0\0\x05"); // max 5 rows
        msg(&mut b, SYNC, b"");
        assert_eq!(first(&b), None);
        let mut b = BytesMut::new();
        msg(&mut b, PARSE, b"s\0SELECT 1\0\0\0");
        msg(&mut b, SYNC, b"");
        assert_eq!(first(&b), None);
    }
}
