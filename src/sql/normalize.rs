//! A statement's identity for the slow lane's run-time estimates: its text with constants replaced by `?`, comments
//! dropped, blanks collapsed and unquoted words lower-cased, in one pass over the bytes — no parse, so a simple query
//! whose literals change every call costs a scan, not a pg_query parse, each time it is seen.
//!
//! A lexical pass, not a parser: it only has to put the calls of one statement together. What it gets wrong can
//! only merge or split estimates (the lane a statement takes), never change a result. Strings (`'…'`, `E'…'`,
//! `$tag$…$tag$`), quoted identifiers and comments are recognised, so a `/* pgsurge:slow */` inside a string is not
//! a hint.

use std::hash::BuildHasher;

/// The key of a statement's estimate: a hash of its normalised text (a `pgsurge:slow` hint is part of it, so the
/// hinted and unhinted forms of a text are two statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub hash: u64,
    /// A `/* pgsurge:slow */` (or `-- pgsurge:slow`) comment marks it slow up front.
    pub slow_hint: bool,
}

/// The hint is appended to the normalised text as this, so the hash and SHOW SLOW both carry it.
const HINT_MARK: &[u8] = b" /* pgsurge:slow */";

/// Normalises `sql` into `out` (cleared first) and returns its shape.
pub fn shape(sql: &[u8], out: &mut Vec<u8>) -> Shape {
    let slow_hint = normalize(sql, out);
    if slow_hint {
        out.extend_from_slice(HINT_MARK);
    }
    Shape { hash: foldhash::fast::FixedState::with_seed(0x5107_1a7e).hash_one(&out[..]), slow_hint }
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Writes the normalised text of `sql` into `out`; true if a comment says `pgsurge:slow`.
fn normalize(sql: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let n = sql.len();
    let (mut i, mut hint, mut blank) = (0, false, false);
    while i < n {
        let c = sql[i];
        let next = sql.get(i + 1).copied();
        if c.is_ascii_whitespace() {
            blank = true;
            i += 1;
            continue;
        }
        if c == b'-' && next == Some(b'-') {
            let end = sql[i..].iter().position(|&b| b == b'\n').map_or(n, |p| i + p);
            hint |= is_hint(&sql[i + 2..end]);
            (i, blank) = (end, true);
            continue;
        }
        if c == b'/' && next == Some(b'*') {
            let end = block_comment_end(sql, i);
            hint |= is_hint(&sql[i + 2..end.saturating_sub(2).max(i + 2)]);
            (i, blank) = (end, true);
            continue;
        }
        // One blank for any run of them, none inside brackets' edges or around commas (`f( 1 , 2 )` is `f(?,?)`).
        if blank && out.last().is_some_and(|l| !b"([,.".contains(l)) && !b")],;.(".contains(&c) {
            out.push(b' ');
        }
        blank = false;
        match c {
            b'\'' => {
                i = string_end(sql, i + 1, false);
                out.push(b'?');
            }
            b'"' => {
                let end = quoted_end(sql, i + 1, b'"');
                out.extend_from_slice(&sql[i..end]);
                i = end;
            }
            b'$' if next.is_some_and(|d| d.is_ascii_digit()) => {
                i += 1;
                while i < n && sql[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(b'?');
            }
            b'$' => match dollar_string_end(sql, i) {
                Some(end) => {
                    i = end;
                    out.push(b'?');
                }
                None => {
                    out.push(b'$');
                    i += 1;
                }
            },
            b'0'..=b'9' => {
                i = number_end(sql, i);
                out.push(b'?');
            }
            b'.' if next.is_some_and(|d| d.is_ascii_digit()) => {
                i = number_end(sql, i + 1);
                out.push(b'?');
            }
            c if is_word(c) => {
                let start = i;
                while i < n && is_word(sql[i]) {
                    i += 1;
                }
                let word = &sql[start..i];
                // E'…', B'…', X'…', N'…' and U&'…' are strings with a prefix.
                let prefixed = i < n && sql[i] == b'\'' && word.len() == 1 && b"eEbBxXnN".contains(&word[0]);
                if prefixed {
                    i = string_end(sql, i + 1, word[0] == b'e' || word[0] == b'E');
                    out.push(b'?');
                } else if word.eq_ignore_ascii_case(b"u") && sql.get(i..i + 2) == Some(b"&'") {
                    i = string_end(sql, i + 2, false);
                    out.push(b'?');
                } else {
                    out.extend(word.iter().map(u8::to_ascii_lowercase));
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    hint
}

/// A comment's text is the directive `pgsurge:slow` (alone, as the cache's hints are written).
fn is_hint(body: &[u8]) -> bool {
    let body = body.trim_ascii();
    body.len() >= 12 && body[..12].eq_ignore_ascii_case(b"pgsurge:slow") && body.get(12).is_none_or(|c| c.is_ascii_whitespace())
}

/// The end of the `/* … */` comment starting at `at` (nested, as Postgres allows), or the end of the text.
fn block_comment_end(sql: &[u8], at: usize) -> usize {
    let (mut i, mut depth) = (at + 2, 1);
    while i < sql.len() {
        match (sql[i], sql.get(i + 1)) {
            (b'*', Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            (b'/', Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            _ => i += 1,
        }
    }
    sql.len()
}

/// Past the closing quote of a string whose body starts at `from` (`''` escapes a quote; `\` too in an E string).
fn string_end(sql: &[u8], from: usize, backslash: bool) -> usize {
    let mut i = from;
    while i < sql.len() {
        match sql[i] {
            b'\\' if backslash => i += 2,
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    sql.len()
}

/// Past the closing `q` of a quoted identifier whose body starts at `from` (doubled to escape).
fn quoted_end(sql: &[u8], from: usize, q: u8) -> usize {
    let mut i = from;
    while i < sql.len() {
        if sql[i] == q {
            if sql.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    sql.len()
}

/// A dollar-quoted string starting at `at` (`$$…$$`, `$tag$…$tag$`): past its end, or None if `at` does not
/// start one.
fn dollar_string_end(sql: &[u8], at: usize) -> Option<usize> {
    let tag_len = sql[at + 1..].iter().position(|&c| c == b'$')?;
    let tag = &sql[at..at + tag_len + 2];
    if !tag[1..tag.len() - 1].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
        || tag.get(1).is_some_and(u8::is_ascii_digit)
    {
        return None;
    }
    let body = at + tag.len();
    let close = sql[body..].windows(tag.len()).position(|w| w == tag);
    Some(close.map_or(sql.len(), |p| body + p + tag.len()))
}

/// Past a numeric constant's characters (digits, `.`, exponent, hex/binary prefixes and `_` separators).
fn number_end(sql: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < sql.len() && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.' || sql[i] == b'_') {
        let exp = (sql[i] == b'e' || sql[i] == b'E') && matches!(sql.get(i + 1), Some(b'+' | b'-'));
        i += if exp { 2 } else { 1 };
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(sql: &str) -> String {
        let mut out = vec![];
        let s = shape(sql.as_bytes(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(s, shape(text.as_bytes(), &mut vec![]), "normalising is idempotent: {text}");
        text
    }

    #[test]
    fn constants_become_placeholders_and_the_rest_is_kept() {
        assert_eq!(norm("SELECT  pg_sleep(0.1)"), "select pg_sleep(?)");
        assert_eq!(norm("select abalance from pgbench_accounts where aid = 4711;"), "select abalance from pgbench_accounts where aid = ?;");
        assert_eq!(norm("SELECT * FROM t WHERE a = $1 AND b = $12"), "select * from t where a = ? and b = ?");
        assert_eq!(norm("SELECT 'it''s', E'a\\'b', x'1F', 1.5e-3, .5, 0x1F FROM t1"), "select ?,?,?,?,?,? from t1");
        assert_eq!(norm("SELECT \"Mixed Case\", \"a\"\"b\" FROM T"), "select \"Mixed Case\",\"a\"\"b\" from t");
        assert_eq!(norm("SELECT $$a ' b$$, $fn$ x $$ y $fn$, a$b FROM t"), "select ?,?,a$b from t");
    }

    #[test]
    fn calls_that_differ_only_in_constants_case_blanks_and_comments_share_a_shape() {
        let k = |s: &str| shape(s.as_bytes(), &mut vec![]);
        assert_eq!(k("SELECT pg_sleep(0.1)"), k("select   pg_sleep( 2 ) -- why\n"), "{:?}", norm("select   pg_sleep( 2 )"));
        assert_eq!(k("SELECT pg_sleep(0.1)"), k("/* app */ SELECT pg_sleep($1)"));
        assert_ne!(k("SELECT a FROM t"), k("SELECT b FROM t"));
        assert_ne!(k("SELECT \"A\" FROM t"), k("SELECT a FROM t"), "quoted identifiers keep their case");
    }

    #[test]
    fn the_slow_hint_is_a_comment_directive_and_never_inside_a_string() {
        let k = |s: &str| shape(s.as_bytes(), &mut vec![]);
        assert!(k("/* pgsurge:slow */ SELECT report()").slow_hint);
        assert!(k("SELECT report() -- pgsurge:slow").slow_hint);
        assert!(!k("SELECT /* /* nested */ pgsurge:slow */ 1").slow_hint, "not the comment's whole text");
        assert!(!k("SELECT '/* pgsurge:slow */'").slow_hint);
        assert!(!k("SELECT \"-- pgsurge:slow\"").slow_hint);
        assert!(!k("SELECT 1 /* pgsurge:slower */").slow_hint);
        assert_ne!(k("/* pgsurge:slow */ SELECT 1").hash, k("SELECT 1").hash, "a hinted text is its own statement");
        assert_eq!(norm("/* pgsurge:slow */ SELECT 1"), "select ? /* pgsurge:slow */");
        assert_eq!(norm("SELECT a  +  b FROM t WHERE x = 'y' AND z IN ( 1 , 2 )"), "select a + b from t where x = ? and z in(?,?)");
    }

    #[test]
    fn unterminated_input_ends_cleanly() {
        for s in ["SELECT 'abc", "SELECT \"abc", "SELECT $$abc", "SELECT /* abc", "SELECT $", "SELECT E'\\", "-", "$1"] {
            let _ = norm(s);
        }
    }
}
