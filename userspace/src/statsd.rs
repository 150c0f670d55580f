//! StatsD push, from the same exposition `/metrics` serves, so the two can never disagree.
//!
//! Every flush turns the exposition into StatsD lines:
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

/// Fits a 1500-byte Ethernet MTU with IPv6 and UDP headers to spare, as StatsD clients do.
pub const DATAGRAM_BYTES_MAX: usize = 1432;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

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

    /// The datagrams for one flush of `exposition` (Prometheus text format).
    pub fn datagrams(&mut self, exposition: &str) -> Vec<String> {
        let mut kinds: HashMap<&str, Kind> = HashMap::new();
        let mut lines = Vec::new();
        // Prometheus buckets are cumulative (`le` includes every smaller bucket) and listed in
        // order; StatsD gets each bucket's own count: this one's minus the one before.
        let mut smaller_bucket: Option<(String, f64)> = None;
        for line in exposition.lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let mut words = declaration.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    let kind = if kind == "gauge" {
                        Kind::Gauge
                    } else {
                        Kind::Counter
                    };
                    kinds.insert(name, kind);
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|family| kinds.contains_key(family))
                })
                .unwrap_or(name);
            let kind = kinds.get(family).copied().unwrap_or(Kind::Counter);
            let value = if name.ends_with("_bucket") {
                let group: String = labels
                    .iter()
                    .filter(|(key, _)| key != "le")
                    .map(|(key, label)| format!("{key}={label},"))
                    .collect();
                let group = format!("{name}{{{group}}}");
                let own = match &smaller_bucket {
                    Some((previous_group, cumulative)) if *previous_group == group => {
                        value - cumulative
                    }
                    _ => value,
                };
                smaller_bucket = Some((group, value));
                own
            } else {
                value
            };
            if let Some(line) = self.line(series, name, family, &labels, kind, value) {
                lines.push(line);
            }
        }
        pack(lines)
    }

    fn line(
        &mut self,
        series: &str,
        name: &str,
        family: &str,
        labels: &[(String, String)],
        kind: Kind,
        value: f64,
    ) -> Option<String> {
        let mut stat = format!("{}{family}", self.prefix);
        if let Some(part) = name
            .strip_prefix(family)
            .and_then(|rest| rest.strip_prefix('_'))
        {
            stat.push('.');
            stat.push_str(part);
        }
        let mut tags = Vec::new();
        for (key, label) in labels {
            if key == "le" {
                stat.push_str(&format!(".le_{}", sanitise(label)));
            } else if self.tags {
                tags.push(format!("{key}:{label}"));
            } else {
                stat.push_str(&format!(".{key}_{}", sanitise(label)));
            }
        }
        let (value, suffix) = match kind {
            Kind::Gauge => (value, "g"),
            Kind::Counter => {
                let previous = self.previous.insert(series.to_string(), value);
                let increase = increase(value, previous);
                if increase == 0.0 {
                    return None;
                }
                (increase, "c")
            }
        };
        let tags = if tags.is_empty() {
            String::new()
        } else {
            format!("|#{}", tags.join(","))
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

fn parse_labels(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_string(), value.trim_matches('"').to_string()))
        .collect()
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

    const FIRST: &str = "\
# HELP vsr_operations_total Total operations committed
# TYPE vsr_operations_total counter
vsr_operations_total{replica_id=\"0\",status=\"success\"} 100
# TYPE vsr_view_number gauge
vsr_view_number{replica_id=\"0\"} 3
# TYPE vsr_client_latency_ms histogram
vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"0.5\"} 10
vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"1\"} 30
vsr_client_latency_ms_bucket{replica_id=\"0\",le=\"+Inf\"} 31
vsr_client_latency_ms_sum{replica_id=\"0\"} 20.5
vsr_client_latency_ms_count{replica_id=\"0\"} 31
";

    fn lines(datagrams: &[String]) -> Vec<String> {
        datagrams
            .iter()
            .flat_map(|datagram| datagram.lines().map(str::to_string))
            .collect()
    }

    #[test]
    fn counters_are_sent_as_increases_and_gauges_as_values() {
        let mut encoder = StatsdEncoder::new("", false);
        let first = lines(&encoder.datagrams(FIRST));
        assert!(first.contains(&"vsr_operations_total.replica_id_0.status_success:100|c".into()));
        assert!(first.contains(&"vsr_view_number.replica_id_0:3|g".into()));
        let second = lines(&encoder.datagrams(&FIRST.replace("} 100", "} 130")));
        assert!(second.contains(&"vsr_operations_total.replica_id_0.status_success:30|c".into()));
        assert!(second.contains(&"vsr_view_number.replica_id_0:3|g".into()));
        // Nothing changed since: no counter line at all, the gauge again.
        let third = lines(&encoder.datagrams(&FIRST.replace("} 100", "} 130")));
        assert_eq!(third, vec!["vsr_view_number.replica_id_0:3|g".to_string()]);
    }

    #[test]
    fn histogram_buckets_become_per_bucket_counts() {
        let mut encoder = StatsdEncoder::new("vsr.", false);
        let first = lines(&encoder.datagrams(FIRST));
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
        let first = lines(&encoder.datagrams(FIRST));
        assert!(
            first.contains(&"vsr_operations_total:100|c|#replica_id:0,status:success".to_string())
        );
    }

    #[test]
    fn datagrams_stay_under_the_mtu() {
        let mut exposition = String::from("# TYPE vsr_view_number gauge\n");
        for replica in 0..500 {
            exposition.push_str(&format!("vsr_view_number{{replica_id=\"{replica}\"}} 7\n"));
        }
        let datagrams = StatsdEncoder::new("", false).datagrams(&exposition);
        assert!(datagrams.len() > 1);
        assert!(datagrams.iter().all(|d| d.len() <= DATAGRAM_BYTES_MAX));
        assert_eq!(lines(&datagrams).len(), 500);
    }
}
