//! Read-only views over message bodies the proxy must look inside; everything else stays opaque bytes.

use super::frame::{get_cstr, get_i32};

/// Fields of an ErrorResponse / NoticeResponse body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorView {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl ErrorView {
    pub fn parse(mut body: &[u8]) -> Option<Self> {
        let mut e = ErrorView::default();
        loop {
            let (&field, rest) = body.split_first()?;
            body = rest;
            if field == 0 {
                return Some(e);
            }
            let v = String::from_utf8_lossy(get_cstr(&mut body)?).into_owned();
            match field {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                _ => {}
            }
        }
    }
}

/// An Authentication ('R') body: the request code and what follows it.
pub fn auth_request(body: &[u8]) -> Option<(i32, &[u8])> {
    let mut b = body;
    let code = get_i32(&mut b)?;
    Some((code, b))
}

/// A ParameterStatus body: name and value.
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut b = body;
    let k = get_cstr(&mut b)?;
    let v = get_cstr(&mut b)?;
    Some((String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()))
}

/// A Query body: the SQL text (without its terminator).
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let mut b = body;
    get_cstr(&mut b)
}

/// A SASLInitialResponse body: mechanism and the client-first-message.
pub fn sasl_initial(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut b = body;
    let mech = get_cstr(&mut b)?;
    let len = get_i32(&mut b)?;
    if len < 0 || len as usize != b.len() {
        return None;
    }
    Some((mech, b))
}

/// A DataRow body as text values (NULL as None); None if malformed.
pub fn data_row_text(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut b = body;
    let n = super::frame::get_i16(&mut b)?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = get_i32(&mut b)?;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = b.get(..len as usize)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        b = &b[len as usize..];
    }
    Some(out)
}

/// A PasswordMessage body holding a NUL-terminated password.
pub fn password(body: &[u8]) -> Option<&[u8]> {
    let mut b = body;
    get_cstr(&mut b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode::{put_error, ErrorFields};
    use bytes::BytesMut;

    #[test]
    fn reads_back_an_error_it_wrote() {
        let mut b = BytesMut::new();
        put_error(&mut b, &ErrorFields { severity: "FATAL", code: "28P01", message: "no", detail: Some("d"), hint: None });
        let e = ErrorView::parse(&b[5..]).unwrap();
        assert_eq!((e.severity.as_str(), e.code.as_str(), e.message.as_str()), ("FATAL", "28P01", "no"));
        assert_eq!(e.detail.as_deref(), Some("d"));
    }

    #[test]
    fn truncated_bodies_are_none_not_panics() {
        assert_eq!(ErrorView::parse(b"Cabc"), None);
        assert_eq!(parameter_status(b"a\0b"), None);
        assert_eq!(sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc"), None);
        assert_eq!(data_row_text(b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff"), Some(vec![Some("ab".into()), None]));
        assert_eq!(data_row_text(b"\0\x01\0\0\0\x09ab"), None, "a length past the end");
    }
}
