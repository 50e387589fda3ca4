//! Pure byte work for the batcher, no I/O: reading a lookup's Bind, building the merged Bind with one array
//! parameter, and cutting the ordinal column off the merged RowDescription and DataRows.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::codes::*;
use crate::protocol::encode::{put_command_complete, put_msg, put_ready_for_query};

/// The parts of a one-parameter Bind (after portal and statement names) the batcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupBind<'a> {
    /// 0 text, 1 binary.
    pub param_format: i16,
    /// The raw parameter value; `None` is SQL NULL.
    pub param: Option<&'a [u8]>,
    /// The result-format section as sent: count + codes.
    pub result_formats: &'a [u8],
}

/// Reads `bind_rest` (formats, values, result formats); `None` unless it has exactly one parameter and
/// nothing left over. Every count and length is checked against what is there.
pub fn lookup_bind(rest: &[u8]) -> Option<LookupBind<'_>> {
    let mut b = rest;
    let nfmt = take_i16(&mut b)?;
    let param_format = match nfmt {
        0 => 0,
        1 => take_i16(&mut b)?,
        _ => return None,
    };
    if !(0..=1).contains(&param_format) || take_i16(&mut b)? != 1 {
        return None;
    }
    let len = take_i32(&mut b)?;
    let param = match len {
        -1 => None,
        n if n >= 0 && (n as usize) <= b.len() => {
            let (v, tail) = b.split_at(n as usize);
            b = tail;
            Some(v)
        }
        _ => return None,
    };
    let result_formats = b;
    let nres = take_i16(&mut b)?;
    if nres < 0 || b.len() != nres as usize * 2 {
        return None;
    }
    Some(LookupBind { param_format, param, result_formats })
}

/// The result format codes for the merged statement: the lookup's codes spread over its `ncols` columns,
/// then binary for the ordinal. `None` if the lookup's section does not fit `ncols` (Postgres would refuse it:
/// let it do so alone).
pub fn merged_result_formats(section: &[u8], ncols: usize) -> Option<Vec<i16>> {
    let n = i16::from_be_bytes([*section.first()?, *section.get(1)?]) as usize;
    let codes: Vec<i16> = section[2..].chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect();
    let mut out = match n {
        0 => vec![0; ncols],
        1 => vec![codes[0]; ncols],
        n if n == ncols => codes,
        _ => return None,
    };
    out.push(1);
    Some(out)
}

/// A text-format array literal of `keys`: every element double-quoted with `"` and `\` escaped, so the
/// element input function gets exactly the bytes the lookup sent; NULL unquoted.
pub fn text_array(keys: &[Option<Bytes>]) -> BytesMut {
    let mut out = BytesMut::with_capacity(2 + keys.iter().map(|k| k.as_ref().map_or(4, |v| v.len() + 3)).sum::<usize>());
    out.put_u8(b'{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        match k {
            None => out.put_slice(b"NULL"),
            Some(v) => {
                out.put_u8(b'"');
                for &c in v.iter() {
                    if c == b'"' || c == b'\\' {
                        out.put_u8(b'\\');
                    }
                    out.put_u8(c);
                }
                out.put_u8(b'"');
            }
        }
    }
    out.put_u8(b'}');
    out
}

/// A binary-format one-dimensional array of `keys` (each already in the element type's binary form, as the
/// lookup sent it) with element type `elem_oid`.
pub fn binary_array(keys: &[Option<Bytes>], elem_oid: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(20 + keys.iter().map(|k| 4 + k.as_ref().map_or(0, |v| v.len())).sum::<usize>());
    out.put_i32(1);
    out.put_i32(keys.iter().any(Option::is_none) as i32);
    out.put_u32(elem_oid);
    out.put_i32(keys.len() as i32);
    out.put_i32(1);
    for k in keys {
        match k {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
    out
}

/// Bind of the unnamed portal to `statement` with one array parameter and the given result formats.
pub fn put_merged_bind(out: &mut BytesMut, statement: &str, param_format: i16, array: &[u8], result_formats: &[i16]) {
    put_msg(out, BIND, |b| {
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_i16(1);
        b.put_i16(param_format);
        b.put_i16(1);
        b.put_i32(array.len() as i32);
        b.put_slice(array);
        b.put_i16(result_formats.len() as i16);
        for f in result_formats {
            b.put_i16(*f);
        }
    });
}

/// A whole RowDescription frame without its last field (the ordinal). `None` if malformed.
pub fn strip_row_description(frame: &[u8]) -> Option<Bytes> {
    let body = frame.get(5..)?;
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if n < 1 {
        return None;
    }
    let mut at = 2;
    for _ in 0..n - 1 {
        let name_end = body.get(at..)?.iter().position(|&c| c == 0)?;
        at += name_end + 1 + 18;
    }
    if at > body.len() {
        return None;
    }
    let mut out = BytesMut::with_capacity(5 + at);
    put_msg(&mut out, ROW_DESCRIPTION, |b| {
        b.put_i16(n - 1);
        b.put_slice(&body[2..at]);
    });
    Some(out.freeze())
}

/// Appends a DataRow frame without its last column (an 8-byte binary int8 ordinal) to `out`, returning the
/// ordinal. `None` if the frame does not end in one.
pub fn strip_data_row(frame: &[u8], out: &mut BytesMut) -> Option<u64> {
    let body = frame.get(5..)?;
    if body.len() < 14 {
        return None;
    }
    let n = i16::from_be_bytes([body[0], body[1]]);
    let tail = body.len() - 12;
    if n < 1 || body[tail..tail + 4] != [0, 0, 0, 8] {
        return None;
    }
    let ord = u64::from_be_bytes(body[tail + 4..].try_into().ok()?);
    out.reserve(frame.len() - 12);
    out.put_u8(DATA_ROW);
    out.put_i32((4 + tail) as i32);
    out.put_i16(n - 1);
    out.put_slice(&body[2..tail]);
    Some(ord)
}

/// What the batch fetched, shared by its askers: each builds its own reply from it.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The RowDescription of the original columns.
    pub row_description: Bytes,
    /// Per distinct key (array position - 1): its DataRow frames, concatenated, and how many.
    pub rows: Vec<(BytesMut, u64)>,
}

impl Fetched {
    /// Exactly the bytes one lookup would have received alone.
    pub fn reply(&self, key: usize, parse: bool, describe: bool) -> BytesMut {
        let (rows, n) = &self.rows[key];
        let mut out = BytesMut::with_capacity(rows.len() + self.row_description.len() + 40);
        if parse {
            put_msg(&mut out, PARSE_COMPLETE, |_| {});
        }
        put_msg(&mut out, BIND_COMPLETE, |_| {});
        if describe {
            out.put_slice(&self.row_description);
        }
        out.put_slice(rows);
        put_command_complete(&mut out, &format!("SELECT {n}"));
        put_ready_for_query(&mut out, TxStatus::Idle);
        out
    }
}

fn take_i16(b: &mut &[u8]) -> Option<i16> {
    let v = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    *b = &b[2..];
    Some(v)
}

fn take_i32(b: &mut &[u8]) -> Option<i32> {
    let v = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    *b = &b[4..];
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_one_parameter_bind() {
        let rest = b"\0\x01\0\x01\0\x01\0\0\0\x04abcd\0\x02\0\0\0\x01";
        let b = lookup_bind(rest).unwrap();
        assert_eq!((b.param_format, b.param), (1, Some(&b"abcd"[..])));
        assert_eq!(merged_result_formats(b.result_formats, 2), Some(vec![0, 1, 1]));
        assert_eq!(merged_result_formats(b.result_formats, 3), None);
        let null = b"\0\0\0\x01\xff\xff\xff\xff\0\0";
        let b = lookup_bind(null).unwrap();
        assert_eq!((b.param_format, b.param), (0, None));
        assert_eq!(merged_result_formats(b.result_formats, 1), Some(vec![0, 1]));
    }

    #[test]
    fn hostile_binds_are_refused() {
        assert_eq!(lookup_bind(b"\0\0\0\x01\0\0\0\x09abc\0\0"), None); // length past the end
        assert_eq!(lookup_bind(b"\0\0\0\x02\0\0\0\x01a\0\0\0\x01b\0\0"), None); // two parameters
        assert_eq!(lookup_bind(b"\0\0\0\x01\0\0\0\x01a\0\x05\0\0"), None); // 5 result codes, 1 present
        assert_eq!(lookup_bind(b"\0\x01\0\x07\0\x01\0\0\0\x01a\0\0"), None); // format 7
        assert_eq!(lookup_bind(b"\0"), None);
    }

    #[test]
    fn text_arrays_quote_every_element() {
        let keys = vec![Some(Bytes::from_static(b"a\"b\\c")), None, Some(Bytes::from_static(b"NULL")), Some(Bytes::new())];
        assert_eq!(&text_array(&keys)[..], br#"{"a\"b\\c",NULL,"NULL",""}"#);
    }

    #[test]
    fn binary_arrays_have_the_header_postgres_expects() {
        let keys = vec![Some(Bytes::from_static(&[0, 0, 0, 7])), None];
        let a = binary_array(&keys, 23);
        assert_eq!(&a[..20], &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 23, 0, 0, 0, 2, 0, 0, 0, 1]);
        assert_eq!(&a[20..], &[0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn the_ordinal_column_is_cut_off() {
        let mut t = BytesMut::new();
        put_msg(&mut t, ROW_DESCRIPTION, |b| {
            b.put_i16(2);
            for name in ["v", "pgsurge_ord"] {
                b.put_slice(name.as_bytes());
                b.put_u8(0);
                b.put_slice(&[0; 18]);
            }
        });
        let mut want = BytesMut::new();
        put_msg(&mut want, ROW_DESCRIPTION, |b| {
            b.put_i16(1);
            b.put_slice(b"v\0");
            b.put_slice(&[0; 18]);
        });
        assert_eq!(strip_row_description(&t).unwrap(), want.freeze());

        let mut d = BytesMut::new();
        put_msg(&mut d, DATA_ROW, |b| {
            b.put_i16(2);
            b.put_i32(2);
            b.put_slice(b"42");
            b.put_i32(8);
            b.put_u64(3);
        });
        let mut out = BytesMut::new();
        assert_eq!(strip_data_row(&d, &mut out), Some(3));
        let mut want = BytesMut::new();
        put_msg(&mut want, DATA_ROW, |b| {
            b.put_i16(1);
            b.put_i32(2);
            b.put_slice(b"42");
        });
        assert_eq!(out, want);
        assert_eq!(strip_data_row(&d[..10], &mut out), None);
    }
}
