//! The untyped first packet of a connection: StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.

use super::codes::*;
use super::frame::get_cstr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Startup { version: u32, params: Vec<(String, String)> },
    SslRequest,
    GssEncRequest,
    Cancel { pid: u32, secret: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(i64),
    #[error("unsupported frontend protocol {}.{}: server supports 3.0 to 3.2", .0 >> 16, .0 & 0xffff)]
    UnsupportedVersion(u32),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Length of the startup packet at the front of `buf` when complete (length checked before any allocation).
pub fn complete_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if !(8..=MAX_STARTUP_LEN as i64).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok((buf.len() as i64 >= len).then_some(len as usize))
}

/// Parses one whole startup packet (length prefix included, as `complete_len` measured it).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let (Some(code), Some(mut body)) = (packet.get(4..8), packet.get(8..)) else {
        return Err(StartupError::BadLength(packet.len() as i64));
    };
    let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            if body.len() < 8 || body.len() > 4 + 256 {
                return Err(StartupError::Malformed("cancel request key"));
            }
            let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(StartupPacket::Cancel { pid, secret: body[4..].to_vec() })
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let name = get_cstr(&mut body).ok_or(StartupError::Malformed("unterminated parameter name"))?;
                if name.is_empty() {
                    break;
                }
                let value = get_cstr(&mut body).ok_or(StartupError::Malformed("unterminated parameter value"))?;
                let name = String::from_utf8(name.to_vec()).map_err(|_| StartupError::Malformed("parameter name is not UTF-8"))?;
                let value = String::from_utf8(value.to_vec()).map_err(|_| StartupError::Malformed("parameter value is not UTF-8"))?;
                params.push((name, value));
            }
            if !body.is_empty() {
                return Err(StartupError::Malformed("bytes after the terminator"));
            }
            Ok(StartupPacket::Startup { version: v, params })
        }
        v => Err(StartupError::UnsupportedVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;

    #[test]
    fn parses_a_startup_message() {
        let pkt = encode::startup(&[("user", "app"), ("database", "db")]);
        let StartupPacket::Startup { version, params } = parse(&pkt).unwrap() else { panic!() };
        assert_eq!(version, PROTOCOL_3_0);
        assert_eq!(params, vec![("user".into(), "app".into()), ("database".into(), "db".into())]);
    }

    #[test]
    fn refuses_absurd_lengths_before_reading() {
        assert_eq!(complete_len(b"\x7f\xff\xff\xff"), Err(StartupError::BadLength(0x7fff_ffff)));
        assert_eq!(complete_len(b"\0\0\0\x02"), Err(StartupError::BadLength(2)));
        assert_eq!(complete_len(b"\0\0\0\x10\0"), Ok(None));
    }

    #[test]
    fn a_cancel_request_round_trips() {
        let pkt = encode::cancel_request(42, &[1, 2, 3, 4]);
        assert_eq!(complete_len(&pkt), Ok(Some(16)));
        assert_eq!(parse(&pkt).unwrap(), StartupPacket::Cancel { pid: 42, secret: vec![1, 2, 3, 4] });
    }

    #[test]
    fn refuses_protocol_2_and_garbage() {
        assert!(matches!(parse(b"\0\0\0\x08\0\x02\0\0"), Err(StartupError::UnsupportedVersion(_))));
        assert!(matches!(parse(b"\0\0\0\x0b\0\x03\0\0abc"), Err(StartupError::Malformed(_))));
    }
}
