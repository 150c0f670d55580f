//! Sending export requests over gRPC or HTTP, with TLS, gzip and bounded retries.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig};

use super::settings::certificates;
use super::{OtlpError, OtlpSettings, Protocol, config};

/// Tries per export; between them the wait doubles from [`RETRY_BACKOFF_INITIAL`].
const ATTEMPTS_MAX: u32 = 4;
const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(250);

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
