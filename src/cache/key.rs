//! Cache keys, written into a buffer the session reuses (no allocation per request) and looked up as bytes.
//!
//! A key is exact (correctness.md): the pool (database and user), the output-changing settings including the
//! role (as the number `state::settings::Outputs` gives them), and either the full statement text (simple
//! protocol) or the statement's registry id — which stands for its full text and parameter type OIDs, and is
//! never reused — with whether the request had a Parse and a Describe, and the Bind's parameter formats, values
//! and result formats as sent. Also the canonical key values row-precise invalidation compares (`row_keys`).

use crate::protocol::message::bind_param;
#[cfg(test)]
use crate::protocol::message::param_type;
use crate::sql::pins::{canonical_binary, canonical_text, KeyRef};

/// The key of a simple Query.
pub fn simple<'a>(buf: &'a mut Vec<u8>, pool: u32, output: u64, sql: &[u8]) -> &'a [u8] {
    buf.clear();
    buf.push(b'Q');
    buf.extend_from_slice(&pool.to_le_bytes());
    buf.extend_from_slice(&output.to_le_bytes());
    buf.extend_from_slice(sql);
    buf
}

/// The key of an extended-protocol lookup of statement `statement`.
pub fn extended<'a>(buf: &'a mut Vec<u8>, pool: u32, output: u64, statement: u64, parse: bool, describe: bool, bind: &[u8]) -> &'a [u8] {
    buf.clear();
    buf.push(b'E');
    buf.extend_from_slice(&pool.to_le_bytes());
    buf.extend_from_slice(&output.to_le_bytes());
    buf.extend_from_slice(&statement.to_le_bytes());
    buf.push(u8::from(parse) | u8::from(describe) << 1);
    buf.extend_from_slice(bind);
    buf
}

/// The canonical values of a pinned statement's keys (`sql::pins`), from its literals and, for `$n`, the Bind
/// (`bind`: the body after the statement name) with the statement's parameter types (`oid`, for binary values).
/// `None` unless every key has a strict form: then the statement is not row-precise.
pub fn row_keys(keys: &[KeyRef], bind: Option<&[u8]>, oid: impl Fn(usize) -> u32) -> Option<Vec<String>> {
    keys.iter()
        .map(|k| match k {
            KeyRef::Literal(text) => canonical_text(text.as_bytes()),
            KeyRef::Param(i) => match bind_param(bind?, *i)? {
                (0, Some(v)) => canonical_text(v),
                (1, Some(v)) => canonical_binary(v, oid(*i)),
                _ => None,
            },
        })
        .collect()
}

/// No parameter types known (a simple Query has no parameters).
pub fn no_types(_: usize) -> u32 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_come_from_literals_and_parameters_in_strict_forms_only() {
        let bind = b"\0\x02\0\0\0\x01\0\x02\0\0\0\x0242\0\0\0\x04\0\0\0\x07\0\0";
        let types = [0, 2, 0, 0, 0, 0, 0, 0, 0, 23];
        let keys = [KeyRef::Param(0), KeyRef::Param(1), KeyRef::Literal("9".into())];
        let declared = |i| param_type(&types, i);
        assert_eq!(row_keys(&keys, Some(bind), declared), Some(vec!["42".into(), "7".into(), "9".into()]));
        assert_eq!(row_keys(&keys, Some(bind), no_types), None, "binary of an unknown type");
        assert_eq!(row_keys(&[KeyRef::Literal("007".into())], None, no_types), None);
        assert_eq!(row_keys(&[KeyRef::Param(0)], None, no_types), None);
    }

    #[test]
    fn everything_that_changes_a_result_changes_the_key() {
        let mut a = vec![];
        let mut b = vec![];
        let base = extended(&mut a, 1, 1, 7, true, true, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec();
        for other in [
            extended(&mut b, 2, 1, 7, true, true, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec(),
            extended(&mut b, 1, 2, 7, true, true, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec(),
            extended(&mut b, 1, 1, 8, true, true, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec(),
            extended(&mut b, 1, 1, 7, false, true, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec(),
            extended(&mut b, 1, 1, 7, true, false, b"\0\0\0\x01\0\0\0\x017\0\0").to_vec(),
            extended(&mut b, 1, 1, 7, true, true, b"\0\0\0\x01\0\0\0\x018\0\0").to_vec(),
            extended(&mut b, 1, 1, 7, true, true, b"\0\0\0\x01\0\0\0\x017\0\x01\0\x01").to_vec(),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(simple(&mut a, 1, 1, b"SELECT 1").to_vec(), simple(&mut b, 1, 1, b"SELECT 2").to_vec());
    }
}
