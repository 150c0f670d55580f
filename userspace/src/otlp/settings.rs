//! Where, how and how often to export: flags first, then the standard `OTEL_*` environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{OtlpError, config};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SERVICE_NAME: &str = "vsr-replica";
const HTTP_METRICS_PATH: &str = "/v1/metrics";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(text: &str) -> Result<Protocol, OtlpError> {
        match text.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            other => Err(config(format!(
                "OTLP protocol {other:?}: vsrscope speaks grpc and http/protobuf"
            ))),
        }
    }
}

/// What the command line says; whatever it leaves unset comes from the standard `OTEL_*`
/// environment variables, then from the defaults.
#[derive(Debug, Clone, Default)]
pub struct OtlpFlags {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    /// `K=V` each.
    pub headers: Vec<String>,
    pub interval: Option<Duration>,
    /// `none` or `gzip`.
    pub compression: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// Where, how and how often to export, and the resource attributes every replica carries.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    pub endpoint: String,
    pub protocol: Protocol,
    /// Send request bodies gzip-compressed.
    pub gzip: bool,
    pub headers: HeaderMap,
    pub interval: Duration,
    pub timeout: Duration,
    /// For `https://` endpoints: certificates trusted besides the system's roots, read from
    /// the CA file (PEM) and checked when the settings are resolved.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// `service.name` first, then `OTEL_RESOURCE_ATTRIBUTES` in order.
    pub resource: Vec<(String, String)>,
}

impl OtlpSettings {
    /// `None` when neither a flag nor the environment names an endpoint: OTLP stays off.
    pub fn resolve(
        flags: &OtlpFlags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpSettings>, OtlpError> {
        let var = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let protocol = match flags
            .protocol
            .clone()
            .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"))
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            Some(text) => Protocol::parse(&text)?,
            None => Protocol::Grpc,
        };
        let gzip = match flags
            .compression
            .clone()
            .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION"))
            .or_else(|| var("OTEL_EXPORTER_OTLP_COMPRESSION"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => {
                return Err(config(format!(
                    "OTLP compression {other:?}: vsrscope sends gzip or none"
                )));
            }
        };
        let endpoint = if let Some(endpoint) = &flags.endpoint {
            given_endpoint(endpoint, protocol)?
        } else if let Some(endpoint) = var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            checked_url(&endpoint)?
        } else if let Some(base) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            let base = checked_url(&base)?;
            match protocol {
                Protocol::Grpc => base,
                Protocol::HttpProtobuf => {
                    format!("{}{HTTP_METRICS_PATH}", base.trim_end_matches('/'))
                }
            }
        } else {
            return Ok(None);
        };

        let mut headers = HeaderMap::new();
        let environment_headers = var("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
            .or_else(|| var("OTEL_EXPORTER_OTLP_HEADERS"))
            .unwrap_or_default();
        let pairs = key_value_list(&environment_headers, "OTEL_EXPORTER_OTLP_HEADERS")?
            .into_iter()
            .chain(
                flags
                    .headers
                    .iter()
                    .map(|flag| {
                        flag.split_once('=')
                            .map(|(key, value)| (key.trim().to_string(), value.to_string()))
                            .ok_or_else(|| config(format!("--otlp-header {flag:?}: expected K=V")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            );
        for (key, value) in pairs {
            let name =
                HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    config(format!(
                        "OTLP header name {key:?} is not a valid header name"
                    ))
                })?;
            let value = HeaderValue::from_str(&value).map_err(|_| {
                config(format!(
                    "OTLP header {key}: the value is not valid in a header"
                ))
            })?;
            headers.insert(name, value);
        }

        let milliseconds = |name: &str| -> Result<Option<Duration>, OtlpError> {
            var(name)
                .map(|text| match text.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                    _ => Err(config(format!(
                        "{name}={text:?}: expected a positive number of milliseconds"
                    ))),
                })
                .transpose()
        };
        let interval = match flags.interval {
            Some(interval) => interval,
            None => milliseconds("OTEL_METRIC_EXPORT_INTERVAL")?.unwrap_or(DEFAULT_INTERVAL),
        };
        let timeout = match milliseconds("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")? {
            Some(timeout) => timeout,
            None => milliseconds("OTEL_EXPORTER_OTLP_TIMEOUT")?.unwrap_or(DEFAULT_TIMEOUT),
        };

        let ca_file = flags
            .ca_file
            .clone()
            .or_else(|| var("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE").map(PathBuf::from))
            .or_else(|| var("OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from));
        let extra_roots_pem = match ca_file {
            Some(path) => {
                let pem = std::fs::read(&path)
                    .map_err(|error| config(format!("OTLP CA file {}: {error}", path.display())))?;
                certificates(&pem, &path)?;
                Some(pem)
            }
            None => None,
        };
        for variable in [
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
        ] {
            if var(variable).is_some() {
                return Err(config(format!(
                    "{variable} is set, but vsrscope does not present client certificates (mTLS)"
                )));
            }
        }

        let attributes = key_value_list(
            &var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default(),
            "OTEL_RESOURCE_ATTRIBUTES",
        )?;
        let service_name = var("OTEL_SERVICE_NAME")
            .or_else(|| {
                attributes
                    .iter()
                    .find(|(key, _)| key == "service.name")
                    .map(|(_, value)| value.clone())
            })
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
        let mut resource = vec![("service.name".to_string(), service_name)];
        resource.extend(
            attributes
                .into_iter()
                .filter(|(key, _)| key != "service.name"),
        );

        Ok(Some(OtlpSettings {
            endpoint,
            protocol,
            gzip,
            headers,
            interval,
            timeout,
            extra_roots_pem,
            resource,
        }))
    }
}

/// `--otlp-endpoint`: for HTTP, a URL without a path gets the standard `/v1/metrics`.
fn given_endpoint(text: &str, protocol: Protocol) -> Result<String, OtlpError> {
    let url = checked_url(text)?;
    let uri: http::Uri = url
        .parse()
        .map_err(|_| config(format!("OTLP endpoint {text:?} is not a URL")))?;
    let bare = matches!(uri.path(), "" | "/");
    Ok(match protocol {
        Protocol::HttpProtobuf if bare => {
            format!("{}{HTTP_METRICS_PATH}", url.trim_end_matches('/'))
        }
        _ => url,
    })
}

fn checked_url(text: &str) -> Result<String, OtlpError> {
    let text = text.trim();
    let uri: http::Uri = text
        .parse()
        .map_err(|_| config(format!("OTLP endpoint {text:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(text.to_string()),
        _ => Err(config(format!(
            "OTLP endpoint {text:?}: expected http[s]://HOST:PORT[/PATH]"
        ))),
    }
}

/// The W3C-baggage-like lists of the OTel environment: `k1=v1,k2=v2`, values percent-encoded.
fn key_value_list(text: &str, variable: &str) -> Result<Vec<(String, String)>, OtlpError> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (key, value) = entry
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| config(format!("{variable}: {entry:?} is not KEY=VALUE")))?;
            Ok((
                percent_decoded(key.trim(), variable)?,
                percent_decoded(value.trim(), variable)?,
            ))
        })
        .collect()
}

fn percent_decoded(text: &str, variable: &str) -> Result<String, OtlpError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| config(format!("{variable}: bad percent-escape in {text:?}")))?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| config(format!("{variable}: {text:?} is not UTF-8")))
}

/// The certificates of a PEM CA file; an error unless it holds at least one.
pub(super) fn certificates(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, OtlpError> {
    let path = path.display();
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| config(format!("OTLP CA file {path}: {error}")))?;
    if certificates.is_empty() {
        return Err(config(format!(
            "OTLP CA file {path}: no PEM certificate in it"
        )));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        assert!(
            OtlpSettings::resolve(&OtlpFlags::default(), env(&[]))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn flags_win_over_the_environment_and_http_gets_the_metrics_path() {
        let flags = OtlpFlags {
            endpoint: Some("http://collector:4318".into()),
            protocol: Some("http/protobuf".into()),
            headers: vec!["Authorization=Bearer abc".into()],
            interval: Some(Duration::from_secs(2)),
            compression: None,
            ca_file: None,
        };
        let settings = OtlpSettings::resolve(
            &flags,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=old,x-team=db%20ops",
                ),
                ("OTEL_METRIC_EXPORT_INTERVAL", "60000"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(settings.endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(settings.protocol, Protocol::HttpProtobuf);
        assert_eq!(settings.headers["authorization"], "Bearer abc");
        assert_eq!(settings.headers["x-team"], "db ops");
        assert_eq!(settings.interval, Duration::from_secs(2));
    }

    #[test]
    fn the_environment_alone_configures_an_export() {
        let settings = OtlpSettings::resolve(
            &OtlpFlags::default(),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/base/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_METRIC_EXPORT_INTERVAL", "1500"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,service.name=ledger",
                ),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(settings.endpoint, "http://collector:4318/base/v1/metrics");
        assert_eq!(settings.interval, Duration::from_millis(1500));
        assert_eq!(settings.timeout, Duration::from_millis(2500));
        assert_eq!(
            settings.resource,
            vec![
                ("service.name".to_string(), "ledger".to_string()),
                ("deployment.environment".to_string(), "prod".to_string()),
            ]
        );
        let signal = OtlpSettings::resolve(
            &OtlpFlags::default(),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                (
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                    "http://metrics:9000/custom",
                ),
                ("OTEL_SERVICE_NAME", "payments"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(signal.endpoint, "http://metrics:9000/custom");
        assert_eq!(signal.protocol, Protocol::Grpc);
        assert_eq!(signal.resource[0].1, "payments");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let refused = |flags: OtlpFlags, pairs: &[(&str, &str)]| {
            OtlpSettings::resolve(&flags, env(pairs))
                .unwrap_err()
                .to_string()
        };
        let endpoint = |url: &str| OtlpFlags {
            endpoint: Some(url.into()),
            ..OtlpFlags::default()
        };
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case; 10] = [
            ("collector:4317", &[], "expected http[s]://"),
            ("ftp://collector:4317", &[], "expected http[s]://"),
            (
                "https://c:4317",
                &[("OTEL_EXPORTER_OTLP_CLIENT_KEY", "key.pem")],
                "mTLS",
            ),
            (
                "http://c:4317",
                &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
                "gzip or none",
            ),
            (
                "https://c:4317",
                &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")],
                "/nonexistent/ca.pem",
            ),
            (
                "https://c:4317",
                &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/proc/version")],
                "no PEM certificate",
            ),
            (
                "http://c:4317",
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "http/json",
            ),
            (
                "http://c:4317",
                &[("OTEL_METRIC_EXPORT_INTERVAL", "soon")],
                "milliseconds",
            ),
            (
                "http://c:4317",
                &[("OTEL_RESOURCE_ATTRIBUTES", "novalue")],
                "KEY=VALUE",
            ),
            (
                "http://c:4317",
                &[("OTEL_EXPORTER_OTLP_HEADERS", "a=%zz")],
                "percent",
            ),
        ];
        for (url, pairs, reason) in cases {
            let message = refused(endpoint(url), pairs);
            assert!(message.contains(reason), "{url} {pairs:?}: {message}");
        }
        let header = OtlpFlags {
            headers: vec!["bad header=1".into()],
            ..endpoint("http://c:4317")
        };
        assert!(refused(header, &[]).contains("not a valid header name"));
    }
}
