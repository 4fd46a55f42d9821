//! One measurement's result: named values, printed as `name: key=value …`
//! or as one JSON object per line (`--json`), which `scripts/bench` turns
//! into the tables of BENCHMARKS.md.

use serde_json::{Map, Value};

/// A result: what was measured and the numbers.
#[derive(Debug)]
pub(crate) struct Report {
    bench: String,
    values: Map<String, Value>,
}

impl Report {
    pub(crate) fn new(bench: impl Into<String>) -> Self {
        Self {
            bench: bench.into(),
            values: Map::new(),
        }
    }

    /// Adds a value (numbers are printed as given).
    pub(crate) fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.values.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a float rounded to `digits` decimals.
    pub(crate) fn float(self, key: &str, value: f64, digits: i32) -> Self {
        let scale = 10f64.powi(digits);
        self.set(key, (value * scale).round() / scale)
    }

    /// A number set before, if there is one.
    pub(crate) fn number(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(serde_json::Value::as_f64)
    }

    pub(crate) fn print(&self, json: bool) {
        if json {
            let mut object = Map::new();
            object.insert("bench".into(), Value::String(self.bench.clone()));
            object.extend(self.values.clone());
            println!("{}", Value::Object(object));
        } else {
            let fields: Vec<String> = self
                .values
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect();
            println!("{}: {}", self.bench, fields.join(" "));
        }
    }
}
