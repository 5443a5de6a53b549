//! mkc's `/metrics` as a test reads it: one GET on loopback and the
//! Prometheus text parsed by `prometheus-parse`, with the series names it
//! exports (histograms as the `_bucket`, `_sum` and `_count` series a
//! query names).

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use super::rt;

/// One GET on loopback: (status, body).
pub fn http_get(url: &str) -> (u16, String) {
    rt().block_on(async {
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let code = response.status().as_u16();
        (code, response.text().await.unwrap_or_default())
    })
}

/// `GET {base}/metrics`, parsed; panics when it does not answer 200 or
/// does not parse.
pub fn scrape(base: &str) -> Scrape {
    let (code, text) = http_get(&format!("{base}/metrics"));
    assert_eq!(code, 200, "GET {base}/metrics: {text}");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{base}/metrics does not parse: {e}\n{text}"))
}

/// The value of the first sample of `name` whose labels include `labels`
/// (counters, gauges and untyped series).
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(scrape, name, labels).next()
}

/// The sum of every sample of `name` whose labels include `labels` (0
/// when there is none): a figure kept in several series, e.g. one per
/// partition.
pub fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(scrape, name, labels).sum()
}

/// The values of the counter, gauge and untyped samples of `name` whose
/// labels include `labels`.
fn samples<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    scrape
        .samples
        .iter()
        .filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The kind of a series, as a query sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// A histogram's `_bucket` series.
    Buckets,
    /// A histogram's `_sum` / `_count`, or a series without a `# TYPE`.
    Untyped,
}

impl Kind {
    /// Whether `rate()` / `increase()` make sense on it (they assume a
    /// value that only grows, and read a drop as a reset).
    pub fn is_cumulative(self) -> bool {
        self != Kind::Gauge
    }
}

/// Every series name of `scrape` that has at least one sample, with its
/// kind. A histogram `X` appears as `X_bucket`, `X_sum` and `X_count`.
pub fn series_names(scrape: &Scrape) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    for s in &scrape.samples {
        let (name, kind) = match s.value {
            Value::Counter(_) => (s.metric.clone(), Kind::Counter),
            Value::Gauge(_) => (s.metric.clone(), Kind::Gauge),
            Value::Histogram(_) => (format!("{}_bucket", s.metric), Kind::Buckets),
            Value::Summary(_) | Value::Untyped(_) => (s.metric.clone(), Kind::Untyped),
        };
        out.insert(name, kind);
    }
    out
}
