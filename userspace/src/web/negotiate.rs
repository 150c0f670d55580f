//! Content negotiation for `/metrics`: which exposition format (`Accept`) and whether to gzip
//! (`Accept-Encoding`), by the rules of RFC 9110 §12.5 as Prometheus clients use them.

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4, the default.
    Text,
    /// OpenMetrics text, in the version the client named (`1.0.0` or `0.0.1`, the same bytes).
    OpenMetrics(&'static str),
}

impl Format {
    pub fn content_type(self) -> String {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8".into(),
            Format::OpenMetrics(version) => {
                format!("application/openmetrics-text; version={version}; charset=utf-8")
            }
        }
    }
}

/// One element of a comma-separated header: its value and its quality (`q`, 1 when absent).
struct Element<'a> {
    value: &'a str,
    parameters: Vec<(&'a str, &'a str)>,
    quality: f64,
}

fn elements(header: &str) -> impl Iterator<Item = Element<'_>> {
    header.split(',').filter_map(|element| {
        let mut parts = element.split(';').map(str::trim);
        let value = parts.next().filter(|value| !value.is_empty())?;
        let mut quality = 1.0;
        let mut parameters = Vec::new();
        for parameter in parts {
            let Some((name, parameter_value)) = parameter.split_once('=') else {
                continue;
            };
            let (name, parameter_value) = (name.trim(), parameter_value.trim().trim_matches('"'));
            if name.eq_ignore_ascii_case("q") {
                // A malformed quality makes the element unacceptable rather than preferred.
                quality = parameter_value.parse().unwrap_or(0.0);
            } else {
                parameters.push((name, parameter_value));
            }
        }
        Some(Element {
            value,
            parameters,
            quality,
        })
    })
}

/// The format a client prefers: the acceptable media range with the highest quality, the
/// first listed among equals. OpenMetrics only when asked for by name, as `client_golang` does;
/// text for anything else, including no `Accept` at all or only ranges vsrscope cannot serve.
pub fn format(accept: Option<&str>) -> Format {
    let mut best = (0.0, Format::Text);
    for element in elements(accept.unwrap_or("")) {
        let version = element
            .parameters
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("version"))
            .map(|(_, version)| *version);
        let candidate = match element.value.to_ascii_lowercase().as_str() {
            "application/openmetrics-text" => match version {
                None | Some("1.0.0") => Format::OpenMetrics("1.0.0"),
                Some("0.0.1") => Format::OpenMetrics("0.0.1"),
                Some(_) => continue,
            },
            "text/plain" if version.is_none_or(|version| version == "0.0.4") => Format::Text,
            "text/*" | "*/*" => Format::Text,
            _ => continue,
        };
        if element.quality > best.0 {
            best = (element.quality, candidate);
        }
    }
    best.1
}

/// Whether the client accepts a gzip-encoded response: `gzip` (or `x-gzip`) or `*` with a
/// non-zero quality, unless `gzip` itself is refused with `q=0`.
pub fn gzip(accept_encoding: Option<&str>) -> bool {
    let mut named = None;
    let mut wildcard = false;
    for element in elements(accept_encoding.unwrap_or("")) {
        let acceptable = element.quality > 0.0;
        if element.value.eq_ignore_ascii_case("gzip")
            || element.value.eq_ignore_ascii_case("x-gzip")
        {
            named = Some(named.unwrap_or(false) || acceptable);
        } else if element.value == "*" {
            wildcard = acceptable;
        }
    }
    named.unwrap_or(wildcard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_text() {
        // What Prometheus 2.x sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(format(Some(prometheus)), Format::OpenMetrics("1.0.0"));
        assert_eq!(
            format(Some("application/openmetrics-text; version=0.0.1")),
            Format::OpenMetrics("0.0.1")
        );
        assert_eq!(
            format(Some("application/openmetrics-text")),
            Format::OpenMetrics("1.0.0")
        );
        for text in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("application/json"),
            Some("text/plain, application/openmetrics-text"),
            Some("application/openmetrics-text;q=0.5, text/plain"),
            Some("application/openmetrics-text;version=2.0.0, text/plain;q=0.1"),
            Some("application/openmetrics-text;q=0"),
        ] {
            assert_eq!(format(text), Format::Text, "{text:?}");
        }
    }

    #[test]
    fn gzip_only_when_accepted() {
        for yes in [
            "gzip",
            "gzip, deflate, br",
            "br;q=1.0, gzip;q=0.8",
            "*",
            "x-gzip",
        ] {
            assert!(gzip(Some(yes)), "{yes}");
        }
        for no in ["", "identity", "br", "gzip;q=0", "*, gzip;q=0", "deflate"] {
            assert!(!gzip(Some(no)), "{no}");
        }
        assert!(!gzip(None));
    }
}
