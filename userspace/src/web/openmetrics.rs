//! The OpenMetrics text format, derived from the Prometheus text exposition so that every
//! sample line is the same bytes in both formats (the same series whichever one a scraper
//! negotiates).
//!
//! What differs (OpenMetrics 1.0): a counter family is named without `_total`, which only its
//! samples carry; a counter whose name lacks `_total` cannot be an OpenMetrics counter, so it is
//! typed `unknown` under its own name; and the exposition ends with `# EOF`.

use std::collections::BTreeMap;

use crate::metrics::{Family, Kind};

pub fn from_text(text: &str, families: &[Family]) -> String {
    let kinds: BTreeMap<&str, Kind> = families
        .iter()
        .map(|family| (family.name.as_str(), family.kind))
        .collect();
    let mut open = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        match metadata(line) {
            Some((keyword, name, rest)) if kinds.get(name) == Some(&Kind::Counter) => {
                match (name.strip_suffix("_total"), keyword) {
                    (Some(family), _) => push_line(&mut open, &["# ", keyword, " ", family, rest]),
                    (None, "TYPE") => push_line(&mut open, &["# TYPE ", name, " unknown"]),
                    (None, _) => push_line(&mut open, &[line]),
                }
            }
            _ => push_line(&mut open, &[line]),
        }
    }
    open.push_str("# EOF\n");
    open
}

/// A `# HELP` or `# TYPE` line as (keyword, metric name, the rest from the space after it).
fn metadata(line: &str) -> Option<(&str, &str, &str)> {
    let rest = line.strip_prefix("# ")?;
    let (keyword, rest) = rest.split_once(' ')?;
    if keyword != "HELP" && keyword != "TYPE" {
        return None;
    }
    let end = rest.find(' ').unwrap_or(rest.len());
    Some((keyword, &rest[..end], &rest[end..]))
}

fn push_line(text: &mut String, parts: &[&str]) {
    parts.iter().for_each(|part| text.push_str(part));
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Origin, prometheus_text};

    fn family(name: &str, kind: Kind) -> Family {
        Family {
            name: name.into(),
            help: format!("{name} help, with total in it"),
            kind,
            origin: Origin::Exporter,
            points: Vec::new(),
        }
    }

    #[test]
    fn counters_lose_total_in_their_metadata_only_and_the_exposition_ends_with_eof() {
        let families = [
            family("vsr_operations_total", Kind::Counter),
            family("vsr_odd_counter", Kind::Counter),
            family("vsr_view_number", Kind::Gauge),
        ];
        let text = "# HELP vsr_operations_total Operations.\n\
                    # TYPE vsr_operations_total counter\n\
                    vsr_operations_total{replica_id=\"0\",status=\"success\"} 42\n\
                    # HELP vsr_odd_counter Odd.\n\
                    # TYPE vsr_odd_counter counter\n\
                    vsr_odd_counter 1\n\
                    # HELP vsr_view_number View.\n\
                    # TYPE vsr_view_number gauge\n\
                    vsr_view_number{replica_id=\"0\"} 3\n";
        assert_eq!(
            from_text(text, &families),
            "# HELP vsr_operations Operations.\n\
             # TYPE vsr_operations counter\n\
             vsr_operations_total{replica_id=\"0\",status=\"success\"} 42\n\
             # HELP vsr_odd_counter Odd.\n\
             # TYPE vsr_odd_counter unknown\n\
             vsr_odd_counter 1\n\
             # HELP vsr_view_number View.\n\
             # TYPE vsr_view_number gauge\n\
             vsr_view_number{replica_id=\"0\"} 3\n\
             # EOF\n"
        );
    }

    #[test]
    fn sample_lines_are_those_of_the_text_format() {
        let families = [
            family("vsr_bytes_written_total", Kind::Counter),
            family("vsr_prepare_latency_ms", Kind::Histogram),
        ];
        let text = prometheus_text(&families);
        let open = from_text(&text, &families);
        let samples = |exposition: &str| -> Vec<String> {
            exposition
                .lines()
                .filter(|line| !line.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(samples(&open), samples(&text));
        assert!(
            open.contains("# TYPE vsr_bytes_written counter\n"),
            "{open}"
        );
        assert!(
            open.contains(
                "# HELP vsr_bytes_written vsr_bytes_written_total help, with total in it\n"
            ),
            "{open}"
        );
    }
}
