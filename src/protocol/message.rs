//! A client message decoded once: its type, where it lies in the input, and the fields the proxy acts on
//! (Query text, Parse/Bind/Describe/Close/Execute parts) as spans of that input. A body that does not decode is
//! `View::Raw` and is forwarded untouched for Postgres to judge.

use bytes::BufMut;
use bytes::BytesMut;

use super::codes::*;
use super::encode::put_msg;
use super::frame::{get_cstr, At};

/// A byte range of the input a message was decoded from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    fn within(outer: &[u8], inner: &[u8]) -> Span {
        let start = (inner.as_ptr() as usize - outer.as_ptr() as usize) as u32;
        Span { start, end: start + inner.len() as u32 }
    }

    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// The fields of one message the proxy may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Nothing to look at (Sync, Flush, COPY traffic, FunctionCall), or a body that does not decode.
    Raw,
    Query {
        sql: Span,
    },
    /// `types`: the raw parameter-type section (count + OIDs), checked to be whole.
    Parse {
        name: Span,
        query: Span,
        types: Span,
    },
    /// `rest`: everything after the statement name (parameter formats, values, result formats).
    Bind {
        portal: Span,
        statement: Span,
        rest: Span,
    },
    /// Describe or Close: `kind` is `S` (statement) or `P` (portal).
    Target {
        kind: u8,
        name: Span,
    },
    Execute {
        portal: Span,
        max_rows: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub start: u32,
    pub end: u32,
    pub view: View,
}

impl Msg {
    /// Decodes the message `at` of `buf` (a complete frame).
    pub fn decode(buf: &[u8], at: At) -> Msg {
        let body = at.body(buf);
        let view = match at.tag {
            QUERY => query(buf, body),
            PARSE => parse(buf, body),
            BIND => bind(buf, body),
            DESCRIBE | CLOSE => target(buf, body),
            EXECUTE => execute(buf, body),
            _ => None,
        };
        Msg { tag: at.tag, start: at.start as u32, end: at.end() as u32, view: view.unwrap_or(View::Raw) }
    }

    /// The whole frame within `buf`.
    pub fn raw<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn query(buf: &[u8], body: &[u8]) -> Option<View> {
    let mut b = body;
    let sql = get_cstr(&mut b)?;
    // Bytes after the terminator: Postgres refuses the message (08P01); so must anything that answers it.
    b.is_empty().then(|| View::Query { sql: Span::within(buf, sql) })
}

fn parse(buf: &[u8], body: &[u8]) -> Option<View> {
    let (name, query, types) = parse_view(body)?;
    Some(View::Parse { name: Span::within(buf, name), query: Span::within(buf, query), types: Span::within(buf, types) })
}

fn bind(buf: &[u8], body: &[u8]) -> Option<View> {
    let mut b = body;
    let portal = get_cstr(&mut b)?;
    let statement = get_cstr(&mut b)?;
    Some(View::Bind { portal: Span::within(buf, portal), statement: Span::within(buf, statement), rest: Span::within(buf, b) })
}

fn target(buf: &[u8], body: &[u8]) -> Option<View> {
    let (kind, name) = target_view(body)?;
    Some(View::Target { kind, name: Span::within(buf, name) })
}

fn execute(buf: &[u8], body: &[u8]) -> Option<View> {
    let mut b = body;
    let portal = get_cstr(&mut b)?;
    let max_rows = i32::from_be_bytes(b.try_into().ok()?);
    Some(View::Execute { portal: Span::within(buf, portal), max_rows })
}

/// A Parse body: statement name, query text, and the raw parameter-type section (count + OIDs).
pub fn parse_view(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut b = body;
    let name = get_cstr(&mut b)?;
    let query = get_cstr(&mut b)?;
    if b.len() < 2 {
        return None;
    }
    let n = i16::from_be_bytes([b[0], b[1]]);
    if n < 0 || b.len() != 2 + 4 * n as usize {
        return None;
    }
    Some((name, query, b))
}

/// A Describe or Close body: kind (`S` or `P`) and name.
pub fn target_view(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, mut rest) = body.split_first()?;
    let name = get_cstr(&mut rest)?;
    rest.is_empty().then_some((kind, name))
}

/// Parameter `index` of a Bind (`rest`: the body after the statement name): its format code and its value
/// (`None`: SQL NULL). `None` if the Bind does not hold that parameter; every count and length is checked.
pub fn bind_param(rest: &[u8], index: usize) -> Option<(i16, Option<&[u8]>)> {
    let mut b = rest;
    let nfmt = take_i16(&mut b)?;
    if nfmt < 0 || b.len() < nfmt as usize * 2 {
        return None;
    }
    let (formats, tail) = b.split_at(nfmt as usize * 2);
    let format = match nfmt {
        0 => 0,
        1 => i16::from_be_bytes([formats[0], formats[1]]),
        _ => i16::from_be_bytes(formats.get(index * 2..index * 2 + 2)?.try_into().ok()?),
    };
    b = tail;
    let nparams = take_i16(&mut b)?;
    if nparams < 0 || index >= nparams as usize {
        return None;
    }
    for i in 0..=index {
        let len = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        b = &b[4..];
        let value = match len {
            -1 => None,
            n if n >= 0 && n as usize <= b.len() => {
                let (v, rest) = b.split_at(n as usize);
                b = rest;
                Some(v)
            }
            _ => return None,
        };
        if i == index {
            return Some((format, value));
        }
    }
    None
}

/// The declared type OID of parameter `index` in a Parse's parameter-type section (0: unspecified).
pub fn param_type(types: &[u8], index: usize) -> u32 {
    types.get(2 + index * 4..6 + index * 4).and_then(|o| o.try_into().ok()).map_or(0, u32::from_be_bytes)
}

fn take_i16(b: &mut &[u8]) -> Option<i16> {
    let v = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    *b = &b[2..];
    Some(v)
}

/// Appends a Parse frame.
pub fn put_parse(out: &mut BytesMut, name: &[u8], query: &[u8], types: &[u8]) {
    put_msg(out, PARSE, |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(query);
        b.put_u8(0);
        b.put_slice(types);
    });
}

/// Appends a Bind frame naming `statement`, with the parameter and result sections `rest` as the client sent them.
pub fn put_bind(out: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    put_msg(out, BIND, |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(statement);
        b.put_u8(0);
        b.put_slice(rest);
    });
}

/// Appends a Describe or Close (`tag`) of the statement `name`.
pub fn put_statement_target(out: &mut BytesMut, tag: u8, name: &[u8]) {
    put_msg(out, tag, |b| {
        b.put_u8(b'S');
        b.put_slice(name);
        b.put_u8(0);
    });
}

/// The five bytes of a message with an empty body (ParseComplete, CloseComplete, ...).
pub const fn empty(tag: u8) -> [u8; 5] {
    [tag, 0, 0, 0, 4]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::Frames;

    fn decode_all(buf: &[u8]) -> Vec<Msg> {
        Frames::client(buf, 1 << 20).map(|f| Msg::decode(buf, f.unwrap())).collect()
    }

    #[test]
    fn views_point_into_the_input() {
        let mut b = BytesMut::new();
        put_parse(&mut b, b"s1", b"SELECT $1", &[0, 1, 0, 0, 0, 23]);
        put_bind(&mut b, b"", b"s1", b"\0\0\0\x01\0\0\0\x017\0\0");
        put_msg(&mut b, EXECUTE, |b| b.put_slice(b"\0\0\0\0\x05"));
        let m = decode_all(&b);
        let View::Parse { name, query, types } = m[0].view else { panic!("{:?}", m[0]) };
        assert_eq!((name.of(&b), query.of(&b), types.of(&b)), (&b"s1"[..], &b"SELECT $1"[..], &[0, 1, 0, 0, 0, 23][..]));
        let View::Bind { portal, statement, rest } = m[1].view else { panic!() };
        assert_eq!((portal.of(&b), statement.of(&b), rest.len()), (&b""[..], &b"s1"[..], 11));
        assert_eq!(m[2].view, View::Execute { portal: Span { start: m[2].start + 5, end: m[2].start + 5 }, max_rows: 5 });
        assert_eq!(m[1].raw(&b)[0], BIND);
    }

    #[test]
    fn bind_parameters_are_read_with_every_length_checked() {
        // two formats (text, binary), two values ("7", 4 bytes), no result formats
        let rest = b"\0\x02\0\0\0\x01\0\x02\0\0\0\x017\0\0\0\x04\0\0\0\x07\0\0";
        assert_eq!(bind_param(rest, 0), Some((0, Some(&b"7"[..]))));
        assert_eq!(bind_param(rest, 1), Some((1, Some(&[0, 0, 0, 7][..]))));
        assert_eq!(bind_param(rest, 2), None);
        assert_eq!(bind_param(b"\0\0\0\x01\xff\xff\xff\xff\0\0", 0), Some((0, None)), "NULL");
        assert_eq!(bind_param(b"\0\0\0\x01\0\0\0\x09ab", 0), None, "a length past the end");
        assert_eq!(bind_param(b"\0\x05\0\0", 0), None, "formats past the end");
        assert_eq!(bind_param(b"\xff\xff", 0), None);
        assert_eq!(param_type(&[0, 2, 0, 0, 0, 23, 0, 0, 0, 20], 1), 20);
        assert_eq!(param_type(&[0, 0], 0), 0);
    }

    #[test]
    fn bodies_that_do_not_decode_are_raw() {
        let mut b = BytesMut::new();
        put_msg(&mut b, PARSE, |b| b.put_slice(b"s\0SELECT 1\0\0\x02\0\0\0\x17")); // claims 2 types, has 1
        put_msg(&mut b, CLOSE, |b| b.put_slice(b"Sname")); // no terminator
        put_msg(&mut b, EXECUTE, |b| b.put_slice(b"\0\0\0")); // short row limit
        put_msg(&mut b, QUERY, |b| b.put_slice(b"SELECT 1")); // no terminator
        put_msg(&mut b, QUERY, |b| b.put_slice(b"SELECT 1\0junk")); // bytes after it
        assert!(decode_all(&b).iter().all(|m| m.view == View::Raw));
        assert_eq!(target_view(b"Sname\0"), Some((b'S', &b"name"[..])));
    }
}
