//! Figures collected by a bench: kept in insertion order, printed as JSON or a table.

use serde_json::{Map, Value};

/// An ordered set of named figures. Names carry their unit (`_us`, `_per_s`, `_ratio`).
#[derive(Debug, Default)]
pub struct Figures {
    values: Map<String, Value>,
}

impl Figures {
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.values.insert(key.into(), value.into());
    }

    /// A float rounded to 3 decimals (figures, not noise).
    pub fn set_f64(&mut self, key: impl Into<String>, value: f64) {
        let rounded = (value * 1000.0).round() / 1000.0;
        self.values.insert(key.into(), serde_json::Number::from_f64(rounded).map_or(Value::Null, Value::Number));
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.values.clone()).to_string()
    }
}

/// Percentile of an HDR histogram in microseconds (recorded in nanoseconds).
pub fn percentile_us(histogram: &hdrhistogram::Histogram<u64>, percentile: f64) -> f64 {
    histogram.value_at_quantile(percentile / 100.0) as f64 / 1000.0
}
