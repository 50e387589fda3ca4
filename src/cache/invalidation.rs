//! What a write voids, and how instances tell each other: a NOTIFY payload in JSON, written by pgsurge for the
//! writes it forwards and by the triggers `pgsurge install-triggers` installs for the others:
//! `{"from": "<instance>", "void": ["*" | {"table": t} | {"table": t, "column": c, "keys": [k, …]}, …]}`.

use serde_json::{json, Value};

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

impl Invalidation {
    fn to_json(&self) -> Value {
        match self {
            Invalidation::Flush => json!("*"),
            Invalidation::Tables(t) => Value::Array(t.iter().map(|t| json!({ "table": t })).collect()),
            Invalidation::Rows { table, column, keys } => json!({ "table": table, "column": column, "keys": keys }),
        }
    }

    /// The same, without its keys.
    fn coarse(&self) -> Invalidation {
        match self {
            Invalidation::Rows { table, .. } => Invalidation::Tables(vec![table.clone()]),
            other => other.clone(),
        }
    }
}

/// The payload announcing `items`, from instance `from`, within `MAX_PAYLOAD` bytes: keys are dropped (whole
/// tables) when they do not fit, and everything (`*`) when the tables do not either.
pub fn encode(from: &str, items: &[Invalidation]) -> String {
    let render = |items: &mut dyn Iterator<Item = Value>| {
        let mut list = vec![];
        for v in items {
            match v {
                Value::Array(a) => list.extend(a),
                v => list.push(v),
            }
        }
        json!({ "from": from, "void": list }).to_string()
    };
    if items.contains(&Invalidation::Flush) {
        return render(&mut std::iter::once(json!("*")));
    }
    let precise = render(&mut items.iter().map(Invalidation::to_json));
    if precise.len() <= MAX_PAYLOAD {
        return precise;
    }
    let coarse = render(&mut items.iter().map(|i| i.coarse().to_json()));
    if coarse.len() <= MAX_PAYLOAD {
        return coarse;
    }
    render(&mut std::iter::once(json!("*")))
}

/// The sender and the invalidations of a payload. One that does not parse means everything.
pub fn decode(payload: &str) -> (Option<String>, Vec<Invalidation>) {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(payload) else { return (None, vec![Invalidation::Flush]) };
    let from = o.get("from").and_then(Value::as_str).map(str::to_string);
    let Some(Value::Array(items)) = o.get("void") else { return (from, vec![Invalidation::Flush]) };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let invalidations = items
        .iter()
        .map(|item| match item {
            Value::Object(i) => match (text(i.get("table")), text(i.get("column")), i.get("keys").and_then(Value::as_array)) {
                (Some(table), Some(column), Some(keys)) => match keys.iter().map(|k| text(Some(k))).collect::<Option<Vec<_>>>() {
                    Some(keys) => Invalidation::Rows { table, column, keys },
                    None => Invalidation::Tables(vec![table]),
                },
                (Some(table), _, _) => Invalidation::Tables(vec![table]),
                _ => Invalidation::Flush,
            },
            _ => Invalidation::Flush,
        })
        .collect();
    (from, invalidations)
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
    fn what_does_not_parse_voids_everything() {
        assert_eq!(decode("kv").1, vec![Invalidation::Flush]);
        assert_eq!(decode(r#"{"void": [{"table": "kv"}]}"#), (None, vec![Invalidation::Tables(vec!["kv".into()])]), "a trigger's");
        assert_eq!(decode(r#"{"void": [42]}"#).1, vec![Invalidation::Flush]);
    }
}
