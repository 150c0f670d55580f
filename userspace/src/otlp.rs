//! OTLP push to an OpenTelemetry Collector (gRPC or HTTP/protobuf), from the same metric
//! families `/metrics` serves.
//!
//! Mapping: latency histograms become explicit-bucket histograms with the configured bounds;
//! counters become cumulative monotonic sums whose start time is when their counting began
//! (vsrscope's start for kernel-map counters, the replica process's start for the tallies in its
//! snapshot); gauges become gauges with the values of the moment. Every export carries running
//! totals, so an export that never arrives loses nothing: the next one supersedes it. That is
//! also why nothing is queued: memory stays bounded however long a collector is down.
//!
//! Each replica is its own resource (`service.name`, `service.instance.id`, `host.name`,
//! `process.pid`); vsrscope's self-metrics are a resource of their own (`service.name` =
//! `vsrscope`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thiserror::Error;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::metrics::{Family, Kind, Origin, Point, Value};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SERVICE_NAME: &str = "vsr-replica";
const HTTP_METRICS_PATH: &str = "/v1/metrics";
/// Tries per export; between them the wait doubles from [`RETRY_BACKOFF_INITIAL`].
const ATTEMPTS_MAX: u32 = 4;
const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum OtlpError {
    #[error("{0}")]
    Config(String),
    #[error("OTLP export to {endpoint} failed after {attempts} attempt(s): {reason}")]
    Export {
        endpoint: String,
        attempts: u32,
        reason: String,
    },
    #[error("OTLP receiver at {endpoint} rejected {points} data point(s): {message}")]
    Rejected {
        endpoint: String,
        points: i64,
        message: String,
    },
}

fn config(message: impl Into<String>) -> OtlpError {
    OtlpError::Config(message.into())
}

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

/// A traced replica process, for its resource and the start of its own tallies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaProcess {
    pub pid: u32,
    pub started_unix_ns: u64,
}

/// Builds export requests from families.
#[derive(Debug, Clone)]
pub struct OtlpEncoder {
    resource: Vec<(String, String)>,
    host_name: String,
    exporter_pid: u32,
    exporter_started_unix_ns: u64,
}

impl OtlpEncoder {
    pub fn new(
        resource: Vec<(String, String)>,
        host_name: String,
        exporter_pid: u32,
        exporter_started_unix_ns: u64,
    ) -> OtlpEncoder {
        OtlpEncoder {
            resource,
            host_name,
            exporter_pid,
            exporter_started_unix_ns,
        }
    }

    pub fn request(
        &self,
        families: &[Family],
        replicas: &BTreeMap<u32, ReplicaProcess>,
        now_unix_ns: u64,
    ) -> ExportMetricsServiceRequest {
        let owners: BTreeSet<Option<u32>> = families
            .iter()
            .flat_map(|family| family.points.iter().map(|point| point.replica))
            .collect();
        let resource_metrics = owners
            .into_iter()
            .map(|owner| {
                let process = owner.and_then(|replica| replicas.get(&replica));
                let metrics = families
                    .iter()
                    .filter_map(|family| {
                        let points: Vec<&Point> = family
                            .points
                            .iter()
                            .filter(|point| point.replica == owner)
                            .collect();
                        let start_unix_ns = match family.origin {
                            Origin::Exporter => self.exporter_started_unix_ns,
                            Origin::ReplicaProcess => process
                                .map_or(self.exporter_started_unix_ns, |process| {
                                    process.started_unix_ns
                                }),
                        };
                        (!points.is_empty())
                            .then(|| metric(family, &points, start_unix_ns, now_unix_ns))
                    })
                    .collect();
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: self.resource_attributes(owner, process),
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "vsrscope".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        metrics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    fn resource_attributes(
        &self,
        replica: Option<u32>,
        process: Option<&ReplicaProcess>,
    ) -> Vec<KeyValue> {
        let mut attributes: Vec<(String, String)> = Vec::new();
        let service = match replica {
            Some(_) => self.resource[0].1.clone(),
            None => "vsrscope".to_string(),
        };
        attributes.push(("service.name".into(), service));
        // One instance per replica (and one for vsrscope): a user-given `service.instance.id` or
        // `host.name` would merge them, so vsrscope's own win.
        attributes.extend(
            self.resource[1..]
                .iter()
                .filter(|(key, _)| {
                    !matches!(
                        key.as_str(),
                        "service.instance.id" | "host.name" | "process.pid"
                    )
                })
                .cloned(),
        );
        let instance = match replica {
            Some(replica) => format!("{}/replica-{replica}", self.host_name),
            None => format!("{}/vsrscope-{}", self.host_name, self.exporter_pid),
        };
        attributes.push(("service.instance.id".into(), instance));
        attributes.push(("host.name".into(), self.host_name.clone()));
        let mut values: Vec<KeyValue> = attributes
            .into_iter()
            .map(|(key, value)| string_attribute(key, value))
            .collect();
        let pid = match replica {
            Some(_) => process.map(|process| process.pid),
            None => Some(self.exporter_pid),
        };
        if let Some(pid) = pid {
            values.push(KeyValue {
                key: "process.pid".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(i64::from(pid))),
                }),
                ..Default::default()
            });
        }
        values
    }
}

fn string_attribute(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// UCUM units, from the unit suffix every seed name carries.
fn unit(name: &str) -> &'static str {
    let name = name.strip_suffix("_total").unwrap_or(name);
    let units = [
        ("_ms", "ms"),
        ("_seconds", "s"),
        ("_bytes_per_sec", "By/s"),
        ("_bytes", "By"),
        ("_percent", "%"),
        ("_iops", "{operation}/s"),
    ];
    units
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix) || name.contains(&format!("{suffix}_p")))
        .map_or("1", |(_, unit)| unit)
}

fn metric(family: &Family, points: &[&Point], start_unix_ns: u64, now_unix_ns: u64) -> Metric {
    let attributes = |point: &Point| -> Vec<KeyValue> {
        point
            .replica
            .map(|replica| string_attribute("replica_id", replica.to_string()))
            .into_iter()
            .chain(
                point
                    .labels
                    .iter()
                    .map(|(key, value)| string_attribute(*key, value.clone())),
            )
            .collect()
    };
    let number = |point: &Point, start_time_unix_nano: u64| NumberDataPoint {
        attributes: attributes(point),
        start_time_unix_nano,
        time_unix_nano: now_unix_ns,
        value: match &point.value {
            Value::Integer(value) => Some(number_data_point::Value::AsInt(
                i64::try_from(*value).unwrap_or(i64::MAX),
            )),
            Value::Real(value) => Some(number_data_point::Value::AsDouble(*value)),
            Value::Histogram(_) => None,
        },
        ..Default::default()
    };
    let data = match family.kind {
        Kind::Counter => metric::Data::Sum(Sum {
            data_points: points
                .iter()
                .map(|point| number(point, start_unix_ns))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        Kind::Gauge => metric::Data::Gauge(Gauge {
            data_points: points.iter().map(|point| number(point, 0)).collect(),
        }),
        Kind::Histogram => metric::Data::Histogram(Histogram {
            data_points: points
                .iter()
                .filter_map(|point| match &point.value {
                    Value::Histogram(histogram) => Some(HistogramDataPoint {
                        attributes: attributes(point),
                        start_time_unix_nano: start_unix_ns,
                        time_unix_nano: now_unix_ns,
                        count: histogram.count,
                        sum: Some(histogram.sum_ms),
                        bucket_counts: histogram.buckets.clone(),
                        explicit_bounds: histogram.bounds_ms.clone(),
                        ..Default::default()
                    }),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
    };
    Metric {
        name: family.name.clone(),
        description: family.help.clone(),
        unit: unit(&family.name).into(),
        data: Some(data),
        ..Default::default()
    }
}

enum Transport {
    Grpc(MetricsServiceClient<Channel>),
    Http(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

/// Sends export requests, retrying what a receiver may accept later.
pub struct OtlpExporter {
    endpoint: String,
    headers: HeaderMap,
    gzip: bool,
    timeout: Duration,
    transport: Transport,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("OtlpExporter")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed, and whether trying again could help.
struct AttemptError {
    reason: String,
    retryable: bool,
}

impl OtlpExporter {
    /// Connects lazily: a collector that is down at start is retried at every export. Needs a
    /// tokio runtime.
    pub fn new(settings: &OtlpSettings) -> Result<OtlpExporter, OtlpError> {
        let extra_roots = &settings.extra_roots_pem;
        let transport = match settings.protocol {
            Protocol::Grpc => {
                let mut endpoint = Channel::from_shared(settings.endpoint.clone())
                    .map_err(|error| {
                        config(format!("OTLP endpoint {}: {error}", settings.endpoint))
                    })?
                    .connect_timeout(settings.timeout)
                    .timeout(settings.timeout);
                if settings.endpoint.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = extra_roots {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(tls).map_err(|error| {
                        config(format!("OTLP TLS for {}: {error}", settings.endpoint))
                    })?;
                }
                let mut client = MetricsServiceClient::new(endpoint.connect_lazy());
                if settings.gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Transport::Grpc(client)
            }
            Protocol::HttpProtobuf => {
                let mut roots = rustls::RootCertStore::empty();
                // Unreadable system certificates are skipped, as curl does.
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if let Some(pem) = extra_roots {
                    for certificate in certificates(pem, Path::new("(CA file)"))? {
                        roots.add(certificate).map_err(|error| {
                            config(format!("OTLP CA file: a certificate is unusable: {error}"))
                        })?;
                    }
                }
                let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|error| config(format!("OTLP TLS: {error}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let connector = HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .build();
                Transport::Http(Client::builder(TokioExecutor::new()).build(connector))
            }
        };
        let mut headers = settings.headers.clone();
        if settings.gzip && settings.protocol == Protocol::HttpProtobuf {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        Ok(OtlpExporter {
            endpoint: settings.endpoint.clone(),
            headers,
            gzip: settings.gzip,
            timeout: settings.timeout,
            transport,
        })
    }

    /// Exports `request`, retrying with doubling backoff while the failure is transient, at most
    /// [`ATTEMPTS_MAX`] times and never past `give_up_at` (when the next export, with newer
    /// totals, is due).
    pub async fn export(
        &mut self,
        request: &ExportMetricsServiceRequest,
        give_up_at: Instant,
    ) -> Result<(), OtlpError> {
        let mut backoff = RETRY_BACKOFF_INITIAL;
        let mut attempts = 0;
        // HTTP bodies are encoded once per export; gRPC encodes (and compresses) per call.
        let http_body = matches!(self.transport, Transport::Http(_))
            .then(|| http_body(request, self.gzip))
            .transpose()?;
        loop {
            attempts += 1;
            let outcome = match &mut self.transport {
                Transport::Grpc(client) => {
                    grpc_attempt(client, request, &self.headers, self.timeout).await
                }
                Transport::Http(client) => {
                    let body = http_body.clone().unwrap_or_default();
                    http_attempt(client, &self.endpoint, body, &self.headers, self.timeout).await
                }
            };
            let error = match outcome {
                Ok(None) => return Ok(()),
                Ok(Some(partial)) => {
                    return Err(OtlpError::Rejected {
                        endpoint: self.endpoint.clone(),
                        points: partial.rejected_data_points,
                        message: partial.error_message,
                    });
                }
                Err(error) => error,
            };
            let out_of_time = Instant::now() + backoff >= give_up_at;
            if !error.retryable || attempts >= ATTEMPTS_MAX || out_of_time {
                return Err(OtlpError::Export {
                    endpoint: self.endpoint.clone(),
                    attempts,
                    reason: error.reason,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

/// An error and every cause beneath it: transport errors say what went wrong (an untrusted
/// certificate, a refused connection) only in their sources.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// The certificates of a PEM CA file; an error unless it holds at least one.
fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, OtlpError> {
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

/// A receiver that took only part of a request says so in `partial_success`.
fn rejected(response: ExportMetricsServiceResponse) -> Option<ExportMetricsPartialSuccess> {
    response
        .partial_success
        .filter(|partial| partial.rejected_data_points > 0)
}

async fn grpc_attempt(
    client: &mut MetricsServiceClient<Channel>,
    request: &ExportMetricsServiceRequest,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<Option<ExportMetricsPartialSuccess>, AttemptError> {
    let mut call = tonic::Request::new(request.clone());
    *call.metadata_mut() = MetadataMap::from_headers(headers.clone());
    call.set_timeout(timeout);
    match client.export(call).await {
        Ok(response) => Ok(rejected(response.into_inner())),
        Err(status) => {
            use tonic::Code;
            // The codes the OTLP specification names as retryable.
            let retryable = matches!(
                status.code(),
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::OutOfRange
                    | Code::Unavailable
                    | Code::DataLoss
            );
            Err(AttemptError {
                reason: format!("gRPC status {:?}: {}", status.code(), with_causes(&status)),
                retryable,
            })
        }
    }
}

/// The protobuf body of an HTTP export, gzip-compressed if asked.
fn http_body(request: &ExportMetricsServiceRequest, gzip: bool) -> Result<Bytes, OtlpError> {
    let encoded = request.encode_to_vec();
    if !gzip {
        return Ok(Bytes::from(encoded));
    }
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(encoded.len() / 4),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut encoder, &encoded)
        .and_then(|()| encoder.finish())
        .map(Bytes::from)
        .map_err(|error| config(format!("gzip: {error}")))
}

async fn http_attempt(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: &str,
    body: Bytes,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<Option<ExportMetricsPartialSuccess>, AttemptError> {
    let mut builder = http::Request::post(endpoint).header(CONTENT_TYPE, "application/x-protobuf");
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let call = builder
        .body(Full::new(body))
        .map_err(|error| AttemptError {
            reason: format!("building the request: {error}"),
            retryable: false,
        })?;
    let exchange = async {
        let response = client.request(call).await.map_err(|error| AttemptError {
            reason: format!("HTTP: {}", with_causes(&error)),
            retryable: true,
        })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| AttemptError {
                reason: format!("HTTP {status}: reading the body: {error}"),
                retryable: true,
            })?
            .to_bytes();
        if status.is_success() {
            // An empty body is a full success.
            let response = ExportMetricsServiceResponse::decode(body).unwrap_or_default();
            return Ok(rejected(response));
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        Err(AttemptError {
            reason: format!("HTTP {status}: {text}"),
            // The statuses the OTLP specification names as retryable.
            retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AttemptError {
                reason: format!("no answer within {timeout:?}"),
                retryable: true,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::HistogramPoint;

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

    fn families() -> Vec<Family> {
        let family = |name: &str, kind, origin, points| Family {
            name: name.into(),
            help: "help".into(),
            kind,
            origin,
            points,
        };
        vec![
            family(
                "vsr_client_latency_ms",
                Kind::Histogram,
                Origin::Exporter,
                vec![Point {
                    replica: Some(1),
                    labels: Vec::new(),
                    value: Value::Histogram(HistogramPoint {
                        bounds_ms: vec![0.5, 1.0],
                        buckets: vec![3, 4, 1],
                        sum_ms: 6.25,
                        count: 8,
                    }),
                }],
            ),
            family(
                "vsr_messages_sent_total",
                Kind::Counter,
                Origin::ReplicaProcess,
                vec![Point {
                    replica: Some(1),
                    labels: vec![("message_type", "prepare".into())],
                    value: Value::Integer(42),
                }],
            ),
            family(
                "vsr_view_number",
                Kind::Gauge,
                Origin::Exporter,
                vec![Point {
                    replica: Some(2),
                    labels: Vec::new(),
                    value: Value::Integer(7),
                }],
            ),
            family(
                "vsrscope_attached_sites",
                Kind::Gauge,
                Origin::Exporter,
                vec![Point {
                    replica: None,
                    labels: Vec::new(),
                    value: Value::Integer(30),
                }],
            ),
        ]
    }

    fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.as_ref())
            .and_then(|value| value.value.as_ref())
    }

    #[test]
    fn each_replica_is_a_resource_and_values_keep_their_meaning() {
        let encoder = OtlpEncoder::new(
            vec![("service.name".into(), "vsr-replica".into())],
            "host-a".into(),
            999,
            1_000,
        );
        let replicas = BTreeMap::from([(
            1,
            ReplicaProcess {
                pid: 4321,
                started_unix_ns: 500,
            },
        )]);
        let request = encoder.request(&families(), &replicas, 9_000);
        assert_eq!(
            request.resource_metrics.len(),
            3,
            "replicas 1, 2 and vsrscope"
        );
        let replica = &request.resource_metrics[1];
        let resource = &replica.resource.as_ref().unwrap().attributes;
        assert_eq!(
            attribute(resource, "service.instance.id"),
            Some(&any_value::Value::StringValue("host-a/replica-1".into()))
        );
        assert_eq!(
            attribute(resource, "process.pid"),
            Some(&any_value::Value::IntValue(4321))
        );
        let metrics = &replica.scope_metrics[0].metrics;
        let Some(metric::Data::Histogram(histogram)) = &metrics[0].data else {
            panic!("a histogram: {:?}", metrics[0]);
        };
        assert_eq!(metrics[0].unit, "ms");
        let point = &histogram.data_points[0];
        assert_eq!(
            histogram.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!((point.count, point.sum), (8, Some(6.25)));
        assert_eq!(point.bucket_counts, vec![3, 4, 1]);
        assert_eq!(point.explicit_bounds, vec![0.5, 1.0]);
        assert_eq!(
            point.start_time_unix_nano, 1_000,
            "kernel maps count from vsrscope's start"
        );
        let Some(metric::Data::Sum(sum)) = &metrics[1].data else {
            panic!("a sum: {:?}", metrics[1]);
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.data_points[0].start_time_unix_nano, 500,
            "the process's own tally"
        );
        assert_eq!(
            attribute(&sum.data_points[0].attributes, "message_type"),
            Some(&any_value::Value::StringValue("prepare".into()))
        );
        let own = &request.resource_metrics[0];
        assert_eq!(
            attribute(&own.resource.as_ref().unwrap().attributes, "service.name"),
            Some(&any_value::Value::StringValue("vsrscope".into()))
        );
        let Some(metric::Data::Gauge(gauge)) =
            &request.resource_metrics[2].scope_metrics[0].metrics[0].data
        else {
            panic!("a gauge");
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsInt(7))
        );
    }
}
