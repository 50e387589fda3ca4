//! Encoders for the messages pgsurge writes itself (errors, auth, its own queries, admin result sets).

use bytes::{BufMut, Bytes, BytesMut};

use super::codes::*;

/// Appends one message `[tag][len][body]` to `out`, the body written by `f`.
pub fn put_msg(out: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    f(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn one(tag: u8, f: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    put_msg(&mut b, tag, f);
    b.freeze()
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// StartupMessage for protocol 3.0 (no type byte).
pub fn startup(params: &[(&str, &str)]) -> Bytes {
    let mut b = BytesMut::with_capacity(128);
    b.put_i32(0);
    b.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut b, k);
        put_cstr(&mut b, v);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

pub fn cancel_request(pid: u32, secret: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(12 + secret.len() as i32);
    b.put_u32(CANCEL_REQUEST);
    b.put_u32(pid);
    b.put_slice(secret);
    b.freeze()
}

/// Severity and fields of an ErrorResponse or NoticeResponse that pgsurge raises itself.
#[derive(Debug, Clone)]
pub struct ErrorFields<'a> {
    pub severity: &'a str,
    pub code: &'a str,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

pub fn put_error(out: &mut BytesMut, e: &ErrorFields<'_>) {
    put_msg(out, ERROR_RESPONSE, |b| put_fields(b, e));
}

pub fn put_notice(out: &mut BytesMut, e: &ErrorFields<'_>) {
    put_msg(out, NOTICE_RESPONSE, |b| put_fields(b, e));
}

fn put_fields(b: &mut BytesMut, e: &ErrorFields<'_>) {
    for (k, v) in [
        (b'S', Some(e.severity)),
        (b'V', Some(e.severity)),
        (b'C', Some(e.code)),
        (b'M', Some(e.message)),
        (b'D', e.detail),
        (b'H', e.hint),
    ] {
        if let Some(v) = v {
            b.put_u8(k);
            put_cstr(b, v);
        }
    }
    b.put_u8(0);
}

pub fn auth_ok() -> Bytes {
    one(AUTHENTICATION, |b| b.put_i32(AUTH_OK))
}

pub fn auth_cleartext() -> Bytes {
    one(AUTHENTICATION, |b| b.put_i32(AUTH_CLEARTEXT))
}

pub fn auth_md5(salt: [u8; 4]) -> Bytes {
    one(AUTHENTICATION, |b| {
        b.put_i32(AUTH_MD5);
        b.put_slice(&salt);
    })
}

pub fn auth_sasl(mechanisms: &[&str]) -> Bytes {
    one(AUTHENTICATION, |b| {
        b.put_i32(AUTH_SASL);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    })
}

pub fn auth_sasl_continue(data: &[u8]) -> Bytes {
    one(AUTHENTICATION, |b| {
        b.put_i32(AUTH_SASL_CONTINUE);
        b.put_slice(data);
    })
}

pub fn auth_sasl_final(data: &[u8]) -> Bytes {
    one(AUTHENTICATION, |b| {
        b.put_i32(AUTH_SASL_FINAL);
        b.put_slice(data);
    })
}

/// PasswordMessage carrying a cleartext or md5 password (NUL-terminated).
pub fn password(pw: &[u8]) -> Bytes {
    one(PASSWORD, |b| {
        b.put_slice(pw);
        b.put_u8(0);
    })
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Bytes {
    one(PASSWORD, |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    })
}

pub fn sasl_response(data: &[u8]) -> Bytes {
    one(PASSWORD, |b| b.put_slice(data))
}

pub fn put_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put_msg(out, PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn put_backend_key_data(out: &mut BytesMut, pid: u32, secret: u32) {
    put_msg(out, BACKEND_KEY_DATA, |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

pub fn put_ready_for_query(out: &mut BytesMut, status: TxStatus) {
    put_msg(out, READY_FOR_QUERY, |b| b.put_u8(status.byte()));
}

/// NegotiateProtocolVersion: the newest minor version we speak (0) and the `_pq_.` options we did not take.
pub fn negotiate_protocol_version(newest_minor: u32, unrecognized: &[&str]) -> Bytes {
    one(NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_u32(newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    })
}

pub fn query(sql: &str) -> Bytes {
    one(QUERY, |b| put_cstr(b, sql))
}

/// A Flush message: the server sends what it has buffered without ending the extended-query run.
pub fn flush() -> Bytes {
    one(FLUSH, |_| {})
}

pub fn terminate() -> Bytes {
    one(TERMINATE, |_| {})
}

/// RowDescription of text columns (type `text`, OID 25), as the admin console answers.
pub fn put_text_row_description(out: &mut BytesMut, columns: &[&str]) {
    put_msg(out, ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            put_cstr(b, c);
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

/// A RowDescription with a type OID per column (text format), for result sets whose numbers drivers should
/// read as numbers.
pub fn put_typed_row_description(out: &mut BytesMut, columns: &[(&str, u32)]) {
    put_msg(out, ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for (c, oid) in columns {
            put_cstr(b, c);
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(if *oid == 20 { 8 } else { -1 });
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

pub fn put_data_row(out: &mut BytesMut, values: &[Option<&str>]) {
    put_msg(out, DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(s) => {
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn put_command_complete(out: &mut BytesMut, tag: &str) {
    put_msg(out, COMMAND_COMPLETE, |b| put_cstr(b, tag));
}

pub fn put_empty_query(out: &mut BytesMut) {
    put_msg(out, EMPTY_QUERY, |_| {});
}
