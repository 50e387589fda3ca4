//! `pgsurge:` directives written in SQL comments (`/* pgsurge:cache ttl=5s */`, `-- pgsurge:nocache`).
//!
//! Comments are found with Postgres' scanner, not a regex, so `'/* pgsurge:cache */'` inside a
//! string literal or a quoted identifier is not mistaken for a directive.

use super::Hints;
use pg_query::protobuf::Token;

/// Reads every directive in the statement's comments. A malformed directive is ignored as a
/// whole (a typo must never turn caching *on*), except that `nocache` always counts.
pub(super) fn parse_hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    let Ok(scan) = pg_query::scan(sql) else {
        return hints;
    };
    for token in &scan.tokens {
        let is_comment = token.token == Token::CComment as i32 || token.token == Token::SqlComment as i32;
        if !is_comment {
            continue;
        }
        let (Ok(start), Ok(end)) = (usize::try_from(token.start), usize::try_from(token.end)) else {
            continue;
        };
        if let Some(text) = sql.get(start..end) {
            apply_comment(comment_body(text), &mut hints);
        }
    }
    hints
}

/// Strips the comment markers: `/* x */` → `x`, `-- x` → `x`.
fn comment_body(text: &str) -> &str {
    let text = text.trim();
    if let Some(inner) = text.strip_prefix("/*") {
        inner.strip_suffix("*/").unwrap_or(inner).trim()
    } else {
        text.strip_prefix("--").unwrap_or(text).trim()
    }
}

/// Applies `pgsurge:nocache` or `pgsurge:cache [ttl=<duration>]`; other comments are ignored.
fn apply_comment(body: &str, hints: &mut Hints) {
    let mut words = body.split_whitespace();
    let Some(directive) = words.next().and_then(|w| w.strip_prefix("pgsurge:")) else {
        return;
    };
    match directive {
        "nocache" => hints.nocache = true,
        "cache" => {
            let mut ttl = None;
            for word in words {
                let parsed = word.strip_prefix("ttl=").and_then(|v| humantime::parse_duration(v).ok());
                match parsed {
                    Some(d) if !d.is_zero() => ttl = Some(d),
                    // Unknown options or a bad ttl: drop the whole directive.
                    _ => return,
                }
            }
            hints.cache = true;
            hints.ttl = ttl.or(hints.ttl);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cache_hint_with_ttl_in_seconds_milliseconds_and_minutes() {
        let h = parse_hints("/* pgsurge:cache ttl=5s */ SELECT 1");
        assert!(h.cache && !h.nocache);
        assert_eq!(h.ttl, Some(Duration::from_secs(5)));
        assert_eq!(parse_hints("SELECT 1 /* pgsurge:cache ttl=250ms */").ttl, Some(Duration::from_millis(250)));
        assert_eq!(parse_hints("SELECT 1 -- pgsurge:cache ttl=2m").ttl, Some(Duration::from_secs(120)));
    }

    #[test]
    fn cache_hint_without_ttl() {
        let h = parse_hints("/*pgsurge:cache*/ SELECT 1");
        assert!(h.cache);
        assert_eq!(h.ttl, None);
    }

    #[test]
    fn nocache_hint() {
        assert!(parse_hints("SELECT /* pgsurge:nocache */ 1").nocache);
        assert!(parse_hints("SELECT 1 -- pgsurge:nocache").nocache);
    }

    #[test]
    fn malformed_cache_hints_are_ignored() {
        assert_eq!(parse_hints("/* pgsurge:cache ttl=soon */ SELECT 1"), Hints::default());
        assert_eq!(parse_hints("/* pgsurge:cache ttl=0s */ SELECT 1"), Hints::default());
        assert_eq!(parse_hints("/* pgsurge:cache forever */ SELECT 1"), Hints::default());
        assert_eq!(parse_hints("/* pgsurge:cachex */ SELECT 1"), Hints::default());
    }

    #[test]
    fn directives_inside_strings_and_identifiers_are_not_comments() {
        assert_eq!(parse_hints("SELECT '/* pgsurge:cache ttl=5s */'"), Hints::default());
        assert_eq!(parse_hints("SELECT 1 AS \"-- pgsurge:nocache\""), Hints::default());
    }

    #[test]
    fn unparsable_sql_still_yields_comment_hints_when_it_scans() {
        assert!(parse_hints("/* pgsurge:nocache */ SELEC 1").nocache);
    }
}
