//! StatsD push, from the same metric families `/metrics` serves, so the two can never disagree.
//!
//! Every flush turns the families into StatsD lines:
//! - counters become the increase since the previous flush (`|c`): StatsD servers sum what they
//!   receive, so sending running totals would multiply every count;
//! - gauges are sent as they are (`|g`), quantile gauges included;
//! - a latency histogram becomes counters of the same kind: per-bucket increases
//!   (`<name>.bucket.le_<bound>`, not cumulative), `<name>.sum` and `<name>.count`.
//!
//! Labels become name segments (`vsr_operations_total.replica_id_0.status_success`) or, with
//! DogStatsD tags on, `|#replica_id:0,status:success`. Lines are packed into datagrams of at
//! most [`DATAGRAM_BYTES_MAX`].

use std::collections::HashMap;

use crate::metrics::{Family, Kind, Value};

/// Fits a 1500-byte Ethernet MTU with IPv6 and UDP headers to spare, as StatsD clients do.
pub const DATAGRAM_BYTES_MAX: usize = 1432;

/// Remembers the last totals sent, to send increases.
#[derive(Debug, Default)]
pub struct StatsdEncoder {
    prefix: String,
    tags: bool,
    previous: HashMap<String, f64>,
}

impl StatsdEncoder {
    pub fn new(prefix: &str, tags: bool) -> StatsdEncoder {
        StatsdEncoder {
            prefix: prefix.to_string(),
            tags,
            previous: HashMap::new(),
        }
    }

    /// The datagrams for one flush.
    pub fn datagrams(&mut self, families: &[Family]) -> Vec<String> {
        let mut lines = Vec::new();
        for family in families {
            for point in &family.points {
                let mut labels: Vec<(&str, String)> = Vec::with_capacity(point.labels.len() + 2);
                if let Some(replica) = point.replica {
                    labels.push(("replica_id", replica.to_string()));
                }
                labels.extend(point.labels.iter().cloned());
                let name = family.name.as_str();
                match &point.value {
                    Value::Histogram(histogram) => {
                        let bounds = histogram
                            .bounds_ms
                            .iter()
                            .map(|bound| format!("{bound}"))
                            .chain(["+Inf".to_string()]);
                        for (bound, count) in bounds.zip(&histogram.buckets) {
                            let mut labels = labels.clone();
                            labels.push(("le", bound));
                            lines.extend(self.line(
                                name,
                                "bucket",
                                &labels,
                                Kind::Counter,
                                *count as f64,
                            ));
                        }
                        lines.extend(self.line(
                            name,
                            "sum",
                            &labels,
                            Kind::Counter,
                            histogram.sum_ms,
                        ));
                        lines.extend(self.line(
                            name,
                            "count",
                            &labels,
                            Kind::Counter,
                            histogram.count as f64,
                        ));
                    }
                    Value::Integer(value) => {
                        lines.extend(self.line(name, "", &labels, family.kind, *value as f64))
                    }
                    Value::Real(value) => {
                        lines.extend(self.line(name, "", &labels, family.kind, *value))
                    }
                }
            }
        }
        pack(lines)
    }

    fn line(
        &mut self,
        family: &str,
        part: &str,
        labels: &[(&str, String)],
        kind: Kind,
        value: f64,
    ) -> Option<String> {
        let mut stat = format!("{}{family}", self.prefix);
        if !part.is_empty() {
            stat.push('.');
            stat.push_str(part);
        }
        let mut tags = Vec::new();
        for (key, label) in labels {
            if *key == "le" {
                stat.push_str(&format!(".le_{}", sanitise(label)));
            } else if self.tags {
                tags.push(format!("{key}:{label}"));
            } else {
                stat.push_str(&format!(".{key}_{}", sanitise(label)));
            }
        }
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!("|#{}", tags.join(","))
        };
        let (value, suffix) = if kind == Kind::Gauge {
            (value, "g")
        } else {
            let previous = self.previous.insert(format!("{stat}{tags}"), value);
            let increase = increase(value, previous);
            if increase == 0.0 {
                return None;
            }
            (increase, "c")
        };
        Some(format!("{stat}:{}|{suffix}{tags}", number(value)))
    }
}

/// The increase of a counter since the last flush; a smaller value means it restarted.
fn increase(value: f64, previous: Option<f64>) -> f64 {
    match previous {
        Some(previous) if value >= previous => value - previous,
        _ => value,
    }
}

/// StatsD names allow letters, digits, `_` and `.` as a separator; a bound like `0.5` or
/// `+Inf` becomes `0_5` or `inf`.
fn sanitise(text: &str) -> String {
    text.chars()
        .filter(|c| *c != '+')
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// Lines joined by newlines into datagrams no larger than [`DATAGRAM_BYTES_MAX`].
fn pack(lines: Vec<String>) -> Vec<String> {
    let mut datagrams: Vec<String> = Vec::new();
    for line in lines {
        match datagrams.last_mut() {
            Some(datagram) if datagram.len() + 1 + line.len() <= DATAGRAM_BYTES_MAX => {
                datagram.push('\n');
                datagram.push_str(&line);
            }
            _ => datagrams.push(line),
        }
    }
    datagrams
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{HistogramPoint, Origin, Point};

    fn family(name: &str, kind: Kind, points: Vec<Point>) -> Family {
        Family {
            name: name.into(),
            help: String::new(),
            kind,
            origin: Origin::Exporter,
            points,
        }
    }

    fn point(labels: Vec<(&'static str, String)>, value: Value) -> Point {
        Point {
            replica: Some(0),
            labels,
            value,
        }
    }

    fn families(operations: u64) -> Vec<Family> {
        vec![
            family(
                "vsr_operations_total",
                Kind::Counter,
                vec![point(
                    vec![("status", "success".into())],
                    Value::Integer(operations),
                )],
            ),
            family(
                "vsr_view_number",
                Kind::Gauge,
                vec![point(Vec::new(), Value::Integer(3))],
            ),
            family(
                "vsr_client_latency_ms",
                Kind::Histogram,
                vec![point(
                    Vec::new(),
                    Value::Histogram(HistogramPoint {
                        bounds_ms: vec![0.5, 1.0],
                        buckets: vec![10, 20, 1],
                        sum_ms: 20.5,
                        count: 31,
                    }),
                )],
            ),
        ]
    }

    fn lines(datagrams: &[String]) -> Vec<String> {
        datagrams
            .iter()
            .flat_map(|datagram| datagram.lines().map(str::to_string))
            .collect()
    }

    #[test]
    fn counters_are_sent_as_increases_and_gauges_as_values() {
        let mut encoder = StatsdEncoder::new("", false);
        let first = lines(&encoder.datagrams(&families(100)));
        assert!(first.contains(&"vsr_operations_total.replica_id_0.status_success:100|c".into()));
        assert!(first.contains(&"vsr_view_number.replica_id_0:3|g".into()));
        let second = lines(&encoder.datagrams(&families(130)));
        assert!(second.contains(&"vsr_operations_total.replica_id_0.status_success:30|c".into()));
        assert!(second.contains(&"vsr_view_number.replica_id_0:3|g".into()));
        // Nothing changed since: no counter line at all, the gauge again.
        let third = lines(&encoder.datagrams(&families(130)));
        assert_eq!(third, vec!["vsr_view_number.replica_id_0:3|g".to_string()]);
    }

    #[test]
    fn histogram_buckets_become_per_bucket_counts() {
        let mut encoder = StatsdEncoder::new("vsr.", false);
        let first = lines(&encoder.datagrams(&families(100)));
        for expected in [
            "vsr.vsr_client_latency_ms.bucket.replica_id_0.le_0_5:10|c",
            "vsr.vsr_client_latency_ms.bucket.replica_id_0.le_1:20|c",
            "vsr.vsr_client_latency_ms.bucket.replica_id_0.le_inf:1|c",
            "vsr.vsr_client_latency_ms.sum.replica_id_0:20.5|c",
            "vsr.vsr_client_latency_ms.count.replica_id_0:31|c",
        ] {
            assert!(
                first.contains(&expected.to_string()),
                "{expected} in {first:?}"
            );
        }
    }

    #[test]
    fn dogstatsd_tags_carry_the_labels() {
        let mut encoder = StatsdEncoder::new("", true);
        let first = lines(&encoder.datagrams(&families(100)));
        assert!(
            first.contains(&"vsr_operations_total:100|c|#replica_id:0,status:success".to_string())
        );
    }

    #[test]
    fn datagrams_stay_under_the_mtu() {
        let points = (0..500)
            .map(|replica| Point {
                replica: Some(replica),
                labels: Vec::new(),
                value: Value::Integer(7),
            })
            .collect();
        let datagrams = StatsdEncoder::new("", false).datagrams(&[family(
            "vsr_view_number",
            Kind::Gauge,
            points,
        )]);
        assert!(datagrams.len() > 1);
        assert!(datagrams.iter().all(|d| d.len() <= DATAGRAM_BYTES_MAX));
        assert_eq!(lines(&datagrams).len(), 500);
    }
}
