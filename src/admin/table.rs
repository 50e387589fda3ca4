//! A console result set: text columns and rows, encoded as RowDescription, DataRows and `SHOW`.

use bytes::BytesMut;

use crate::protocol::encode;

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn new(columns: &[&'static str]) -> Table {
        Table { columns: columns.to_vec(), rows: vec![] }
    }

    /// Appends a row; every value is shown as text, as PgBouncer's console does for its clients.
    pub fn row(&mut self, values: Vec<Value>) {
        debug_assert_eq!(values.len(), self.columns.len());
        self.rows.push(values.into_iter().map(|v| v.0).collect());
    }

    pub fn encode(&self, out: &mut BytesMut, tag: &str) {
        // A column whose every value is an integer is int8, as PgBouncer's console types its counters, so
        // drivers read numbers; the rest is text.
        let typed: Vec<(&str, u32)> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ints = !self.rows.is_empty()
                    && self.rows.iter().all(|r| r[i].as_deref().is_none_or(|v| v.parse::<i64>().is_ok()))
                    && self.rows.iter().any(|r| r[i].is_some());
                (*c, if ints { 20 } else { 25 })
            })
            .collect();
        encode::put_typed_row_description(out, &typed);
        for r in &self.rows {
            let vals: Vec<Option<&str>> = r.iter().map(|v| v.as_deref()).collect();
            encode::put_data_row(out, &vals);
        }
        encode::put_command_complete(out, tag);
    }
}

/// One cell: text or NULL.
pub struct Value(pub Option<String>);

impl<T: ToString> From<T> for Value {
    fn from(v: T) -> Value {
        Value(Some(v.to_string()))
    }
}

pub fn null() -> Value {
    Value(None)
}

/// A row from heterogeneous values: `row![a, b, c]`.
#[macro_export]
macro_rules! row {
    ($($v:expr),* $(,)?) => { vec![$($crate::admin::table::Value::from($v)),*] };
}
