//! Cache keys, written into a buffer the session reuses (no allocation per request) and looked up as bytes.
//!
//! A key is exact (correctness.md): the pool (database and user), the output-changing settings including the
//! role (as the number `state::settings::Outputs` gives them), and either the full statement text (simple
//! protocol) or the statement's registry id — which stands for its full text and parameter type OIDs, and is
//! never reused — with whether the request had a Parse and a Describe, and the Bind's parameter formats, values
//! and result formats as sent.

/// The key of a simple Query.
pub fn simple<'a>(buf: &'a mut Vec<u8>, pool: u32, output: u32, sql: &[u8]) -> &'a [u8] {
    buf.clear();
    buf.push(b'Q');
    buf.extend_from_slice(&pool.to_le_bytes());
    buf.extend_from_slice(&output.to_le_bytes());
    buf.extend_from_slice(sql);
    buf
}

/// The key of an extended-protocol lookup of statement `statement`.
pub fn extended<'a>(buf: &'a mut Vec<u8>, pool: u32, output: u32, statement: u64, parse: bool, describe: bool, bind: &[u8]) -> &'a [u8] {
    buf.clear();
    buf.push(b'E');
    buf.extend_from_slice(&pool.to_le_bytes());
    buf.extend_from_slice(&output.to_le_bytes());
    buf.extend_from_slice(&statement.to_le_bytes());
    buf.push(u8::from(parse) | u8::from(describe) << 1);
    buf.extend_from_slice(bind);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

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
