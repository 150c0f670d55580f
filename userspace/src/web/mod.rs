//! The HTTP endpoint: `/metrics` in the Prometheus text format or OpenMetrics, a landing page,
//! `/-/healthy` and `/-/ready`, with keep-alive, `HEAD` and gzip; over TLS and with basic
//! authentication when `--web.config.file` asks for them.

mod auth;
mod certificate;
mod config;
mod negotiate;
mod openmetrics;
mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

pub use config::{WebConfig, WebConfigError};
pub use routes::Scrape;

use auth::BasicAuth;

/// A client that opened a connection gets this long to send a complete request head, and to
/// finish the TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait after a failed accept before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a TLS listener answers a plain-HTTP request, the words of Go's servers (exporters
/// built on exporter-toolkit), so an operator who forgot `https://` sees why.
const PLAIN_HTTP_TO_TLS: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

#[derive(Debug)]
pub struct Endpoint<S> {
    source: S,
    ready: AtomicBool,
    auth: Option<BasicAuth>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections refused before TLS was established, for sparse logging.
    handshake_failures: AtomicU64,
}

impl<S: Scrape> Endpoint<S> {
    /// Not ready until `set_ready`.
    pub fn new(source: S, config: WebConfig) -> Endpoint<S> {
        Endpoint {
            source,
            ready: AtomicBool::new(false),
            auth: BasicAuth::new(config.users),
            tls: config.tls,
            handshake_failures: AtomicU64::new(0),
        }
    }

    /// From now on `/-/ready` answers 200 and `/metrics` serves.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Accepts connections until the task is dropped, each served on a task of its own.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: retrying at once would spin until some close.
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            };
            tokio::spawn(self.clone().connection(stream));
        }
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) {
        let Some(tls) = self.tls.clone() else {
            self.http(stream).await;
            return;
        };
        let peer = stream.peer_addr().ok();
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEAD_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
            Ok(Ok(1)) => {
                let _ = stream.write_all(PLAIN_HTTP_TO_TLS).await;
                let _ = stream.shutdown().await;
                self.handshake_failed(peer, "plain HTTP to the TLS listener");
                return;
            }
            _ => return,
        }
        match tokio::time::timeout(HEAD_TIMEOUT, TlsAcceptor::from(tls).accept(stream)).await {
            Ok(Ok(tls)) => self.http(tls).await,
            Ok(Err(error)) => self.handshake_failed(peer, &error.to_string()),
            Err(_) => self.handshake_failed(peer, "timed out"),
        }
    }

    /// Logs a refused connection the 1st, 2nd, 4th, 8th… time: the client reports the failure
    /// too, but the reason (an untrusted or missing client certificate, a protocol version) is
    /// often clearer here; sparse, so a misconfigured scraper cannot flood the log.
    fn handshake_failed(&self, peer: Option<SocketAddr>, reason: &str) {
        let failures = self.handshake_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures.is_power_of_two() {
            let peer = peer.map_or("a client".into(), |peer| peer.to_string());
            eprintln!("vsrscope: TLS handshake with {peer} failed ({failures} so far): {reason}");
        }
    }

    /// HTTP/1.1 on one connection, kept alive between requests.
    async fn http(self: Arc<Self>, io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) {
        let service = service_fn(move |request| {
            let endpoint = self.clone();
            async move { Ok::<_, Infallible>(endpoint.handle(request).await) }
        });
        let _ = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(auth) = &self.auth
            && !auth
                .allows(request.headers().get(http::header::AUTHORIZATION))
                .await
        {
            let mut response = routes::plain(StatusCode::UNAUTHORIZED, "Unauthorized.\n");
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"vsrscope\""),
            );
            return response;
        }
        routes::respond(
            request.method(),
            request.uri().path(),
            request.headers(),
            &self.source,
            self.ready.load(Ordering::Acquire),
        )
    }
}
