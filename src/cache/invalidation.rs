//! What a write voids, and how instances tell each other: a NOTIFY payload in JSON, written by pgsurge for the
//! writes it forwards and by the triggers `pgsurge install-triggers` installs for the others:
//! `{"from": "<instance>", "void": ["*" | {"table": t} | {"table": t, "column": c, "keys": [k, …]}, …]}`.

use std::borrow::Cow;

use serde::Deserialize;

/// Postgres refuses a NOTIFY payload of 8,000 bytes or more; room is kept for the statement around it.
pub const MAX_PAYLOAD: usize = 7_900;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// DDL, privileges, roles, or anything pgsurge cannot see into: everything.
    Flush,
    /// Writes to these tables that do not pin their rows.
    Tables(Vec<String>),
    /// A write to the rows of `table` whose `column` is one of `keys` (canonical forms).
    Rows { table: String, column: String, keys: Vec<String> },
}

/// `s` as a JSON string.
fn push_json(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// The payload of `items` (`keys`: with the keys of row invalidations, else their whole tables).
fn render(from: &str, items: &[Invalidation], keys: bool) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("{\"from\":");
    push_json(&mut out, from);
    out.push_str(",\"void\":[");
    let mut first = true;
    let mut table = |out: &mut String, t: &str| {
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        out.push_str("{\"table\":");
        push_json(out, t);
    };
    for i in items {
        match i {
            Invalidation::Flush => {}
            Invalidation::Tables(ts) => {
                for t in ts {
                    table(&mut out, t);
                    out.push('}');
                }
            }
            Invalidation::Rows { table: t, column, keys: ks } => {
                table(&mut out, t);
                if keys {
                    out.push_str(",\"column\":");
                    push_json(&mut out, column);
                    out.push_str(",\"keys\":[");
                    for (n, k) in ks.iter().enumerate() {
                        if n > 0 {
                            out.push(',');
                        }
                        push_json(&mut out, k);
                    }
                    out.push(']');
                }
                out.push('}');
            }
        }
    }
    out.push_str("]}");
    out
}

/// The payload announcing `items`, from instance `from`, within `MAX_PAYLOAD` bytes: keys are dropped (whole
/// tables) when they do not fit, and everything (`*`) when the tables do not either.
pub fn encode(from: &str, items: &[Invalidation]) -> String {
    let everything = || {
        let mut out = String::from("{\"from\":");
        push_json(&mut out, from);
        out.push_str(",\"void\":[\"*\"]}");
        out
    };
    if items.contains(&Invalidation::Flush) {
        return everything();
    }
    let precise = render(from, items, true);
    if precise.len() <= MAX_PAYLOAD {
        return precise;
    }
    let coarse = render(from, items, false);
    if coarse.len() <= MAX_PAYLOAD {
        return coarse;
    }
    everything()
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    void: Vec<Item<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Item<'a> {
    Target {
        #[serde(borrow)]
        table: Cow<'a, str>,
        #[serde(borrow, default)]
        column: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        keys: Option<Vec<Cow<'a, str>>>,
    },
    Other(serde::de::IgnoredAny),
}

/// The sender and the invalidations of a payload. One that does not parse, or names something other than a
/// table, means everything.
pub fn decode(payload: &str) -> (Option<String>, Vec<Invalidation>) {
    let Ok(p) = serde_json::from_str::<Payload>(payload) else { return (None, vec![Invalidation::Flush]) };
    let from = p.from.map(Cow::into_owned);
    let mut out = Vec::with_capacity(p.void.len());
    for item in p.void {
        match item {
            Item::Target { table, column: Some(column), keys: Some(keys) } => out.push(Invalidation::Rows {
                table: table.into_owned(),
                column: column.into_owned(),
                keys: keys.into_iter().map(Cow::into_owned).collect(),
            }),
            Item::Target { table, .. } => out.push(Invalidation::Tables(vec![table.into_owned()])),
            Item::Other(_) => return (from, vec![Invalidation::Flush]),
        }
    }
    (from, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_shrink_to_fit() {
        let items = vec![
            Invalidation::Rows { table: "kv".into(), column: "k".into(), keys: vec!["7".into(), "8".into()] },
            Invalidation::Tables(vec!["a".into(), "s.b".into()]),
        ];
        let p = encode("i1", &items);
        let (from, back) = decode(&p);
        assert_eq!(from.as_deref(), Some("i1"));
        assert_eq!(back[0], items[0]);
        assert_eq!(back[1..], [Invalidation::Tables(vec!["a".into()]), Invalidation::Tables(vec!["s.b".into()])]);

        let many = vec![Invalidation::Rows { table: "kv".into(), column: "k".into(), keys: (0..5000).map(|k| k.to_string()).collect() }];
        let p = encode("i1", &many);
        assert!(p.len() <= MAX_PAYLOAD);
        assert_eq!(decode(&p).1, vec![Invalidation::Tables(vec!["kv".into()])], "keys dropped to fit");
        assert_eq!(decode(&encode("i1", &[Invalidation::Flush, many[0].clone()])).1, vec![Invalidation::Flush]);
    }

    #[test]
    fn names_with_quotes_and_control_characters_survive() {
        let odd = Invalidation::Rows { table: "a\"b\\c".into(), column: "d\ne".into(), keys: vec!["\u{1}é".into()] };
        let p = encode("i\"1", std::slice::from_ref(&odd));
        assert!(serde_json::from_str::<serde_json::Value>(&p).is_ok(), "{p}");
        assert_eq!(decode(&p), (Some("i\"1".into()), vec![odd]));
        assert_eq!(decode(&encode("i1", &[Invalidation::Flush])).1, vec![Invalidation::Flush]);
    }

    #[test]
    fn what_does_not_parse_voids_everything() {
        assert_eq!(decode("kv").1, vec![Invalidation::Flush]);
        assert_eq!(decode(r#"{"void": [{"table": "kv"}]}"#), (None, vec![Invalidation::Tables(vec!["kv".into()])]), "a trigger's");
        assert_eq!(decode(r#"{"void": [42]}"#).1, vec![Invalidation::Flush]);
        assert_eq!(decode(r#"{"void": ["*"]}"#).1, vec![Invalidation::Flush]);
        assert_eq!(decode(r#"{"void": [{"table": "kv", "keys": [1]}]}"#).1, vec![Invalidation::Flush], "keys not strings");
    }
}
