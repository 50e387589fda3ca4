//! Splitting a byte stream into `[tag][len:i32][body]` frames without copying: the one set of length rules for
//! both directions, with hostile lengths refused before anything is reserved and a client's message type checked
//! on its first byte.

use bytes::{Buf, Bytes, BytesMut};

use super::codes::*;

/// One whole message: its type byte and the raw bytes (header included), ready to forward as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {max}")]
    TooLong { tag: char, len: usize, max: usize },
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
}

/// The message types a client may send once logged in (Postgres refuses anything else on its first byte).
pub fn is_frontend_type(tag: u8) -> bool {
    matches!(
        tag,
        QUERY | PARSE | BIND | DESCRIBE | EXECUTE | SYNC | FLUSH | CLOSE | TERMINATE | FUNCTION_CALL | COPY_DATA | COPY_DONE | COPY_FAIL
    )
}

/// Where the first complete frame in `buf` ends, if it is complete.
///
/// The length is checked against `max` before the caller reserves anything, so a claimed 2 GiB message costs
/// nothing but this error.
#[inline]
pub fn complete_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { tag: tag as char, len: len as i64 });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLong { tag: tag as char, len: total, max });
    }
    Ok((buf.len() >= total).then_some(total))
}

/// `complete_len` for a client's stream: an unknown message type is refused as soon as its first byte arrives,
/// before its claimed length is even read.
#[inline]
pub fn frontend_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    match buf.first() {
        Some(&tag) if !is_frontend_type(tag) => Err(FrameError::UnknownType(tag)),
        _ => complete_len(buf, max),
    }
}

/// One complete frame at `start` of some buffer: its type and total length (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub tag: u8,
    pub start: usize,
    pub len: usize,
}

impl At {
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    /// The frame's body within `buf`.
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start + 5..self.end()]
    }

    /// The whole frame within `buf`.
    pub fn raw<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start..self.end()]
    }
}

/// The complete frames at the front of a buffer, in order; stops at the first incomplete one. `consumed()` says
/// where the complete ones end.
pub struct Frames<'a> {
    buf: &'a [u8],
    at: usize,
    max: usize,
    check: fn(&[u8], usize) -> Result<Option<usize>, FrameError>,
}

impl<'a> Frames<'a> {
    /// A server's stream (any message type).
    pub fn server(buf: &'a [u8], max: usize) -> Frames<'a> {
        Frames { buf, at: 0, max, check: complete_len }
    }

    /// A client's stream: unknown message types are an error.
    pub fn client(buf: &'a [u8], max: usize) -> Frames<'a> {
        Frames { buf, at: 0, max, check: frontend_len }
    }

    /// Bytes taken by the complete frames returned so far.
    pub fn consumed(&self) -> usize {
        self.at
    }
}

impl Iterator for Frames<'_> {
    type Item = Result<At, FrameError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match (self.check)(&self.buf[self.at..], self.max) {
            Ok(Some(len)) => {
                let f = At { tag: self.buf[self.at], start: self.at, len };
                self.at += len;
                Some(Ok(f))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// A stateless splitter with a per-direction maximum message size (login and pgsurge's own queries).
#[derive(Debug, Clone, Copy)]
pub struct FrameSplitter {
    pub max_len: usize,
}

impl FrameSplitter {
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// Takes the first complete frame off the front of `buf`.
    pub fn split(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match complete_len(buf, self.max_len)? {
            Some(n) => {
                let tag = buf[0];
                Ok(Some(Frame { tag, raw: buf.split_to(n).freeze() }))
            }
            None => Ok(None),
        }
    }
}

/// Reads a NUL-terminated string from the front of `b`, advancing it.
pub fn get_cstr<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = &b[..end];
    *b = &b[end + 1..];
    Some(s)
}

/// Reads a big-endian i32 from the front of `b`, advancing it.
pub fn get_i32(b: &mut &[u8]) -> Option<i32> {
    if b.len() < 4 {
        return None;
    }
    Some(b.get_i32())
}

/// Reads a big-endian i16 from the front of `b`, advancing it.
pub fn get_i16(b: &mut &[u8]) -> Option<i16> {
    if b.len() < 2 {
        return None;
    }
    Some(b.get_i16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_only_complete_frames() {
        let s = FrameSplitter::new(1024);
        let mut buf = BytesMut::from(&b"Z\0\0\0\x05IQ\0\0"[..]);
        let f = s.split(&mut buf).unwrap().unwrap();
        assert_eq!(f.tag, b'Z');
        assert_eq!(f.body(), b"I");
        assert_eq!(s.split(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"Q\0\0");
    }

    #[test]
    fn refuses_lengths_below_four_and_over_the_limit() {
        let s = FrameSplitter::new(100);
        let mut neg = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(s.split(&mut neg), Err(FrameError::BadLength { .. })));
        let mut huge = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(s.split(&mut huge), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn a_client_s_unknown_type_is_refused_on_its_first_byte() {
        assert_eq!(frontend_len(b"\xf6", 1 << 20), Err(FrameError::UnknownType(0xf6)));
        assert_eq!(frontend_len(b"\xf6\0\0\x03\xe8tenbytes..", 1 << 20), Err(FrameError::UnknownType(0xf6)));
        assert_eq!(frontend_len(b"Q\0\0", 1 << 20), Ok(None), "a known type waits for its header");
        assert_eq!(complete_len(b"\xf6\0\0\0\x04", 100), Ok(Some(5)), "servers may send any type");
    }

    #[test]
    fn frames_walk_complete_frames_and_stop_at_the_partial_one() {
        let buf = b"1\0\0\0\x042\0\0\0\x04D\0\0\0\x06abZ\0\0";
        let mut it = Frames::server(buf, 1024);
        let tags: Vec<u8> = it.by_ref().map(|f| f.unwrap().tag).collect();
        assert_eq!(tags, b"12D");
        assert_eq!(it.consumed(), 17);
        let mut bad = Frames::client(b"Q\0\0\0\x05;\x99", 1024);
        assert!(bad.next().unwrap().is_ok());
        assert_eq!(bad.next(), Some(Err(FrameError::UnknownType(0x99))));
    }
}
