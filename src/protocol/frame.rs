//! Splitting a byte stream into `[tag][len:i32][body]` frames without copying, with hostile lengths refused.

use bytes::{Buf, Bytes, BytesMut};

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

/// A stateless splitter with a per-direction maximum message size.
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
}
