//! What each path answers: `/metrics`, a landing page on `/`, `/-/healthy` and `/-/ready`.

use std::io::Write as _;

use bytes::Bytes;
use http::header::{ACCEPT, ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;

use super::negotiate::{self, Format};
use super::openmetrics;
use crate::metrics::{Family, prometheus_text};

/// Where `/metrics` comes from: one reading of the maps per scrape.
pub trait Scrape: Send + Sync + 'static {
    /// Every family as of now, or `None` when the maps could not be read.
    fn scrape(&self) -> Option<Vec<Family>>;
}

const LANDING_PAGE: &str = "<!DOCTYPE html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><title>vsrscope</title></head>
<body>
<h1>vsrscope</h1>
<p>Metrics of VSR replicas, read through their USDT probes.</p>
<ul>
<li><a href=\"metrics\">/metrics</a>: Prometheus text, or OpenMetrics when asked for</li>
<li><a href=\"-/healthy\">/-/healthy</a> and <a href=\"-/ready\">/-/ready</a></li>
</ul>
</body>
</html>
";

pub(super) fn respond(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    source: &dyn Scrape,
    ready: bool,
) -> Response<Full<Bytes>> {
    if !matches!(path, "/" | "/metrics" | "/-/healthy" | "/-/ready") {
        return plain(
            StatusCode::NOT_FOUND,
            "Not found: see / for what vsrscope serves.\n",
        );
    }
    // HEAD answers as GET does; hyper sends its headers, Content-Length included, without the
    // body.
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "Only GET and HEAD.\n");
        response
            .headers_mut()
            .insert(ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/" => with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(LANDING_PAGE.as_bytes()),
        ),
        "/-/healthy" => plain(StatusCode::OK, "vsrscope is healthy.\n"),
        "/-/ready" if ready => plain(StatusCode::OK, "vsrscope is ready.\n"),
        "/-/ready" => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "vsrscope is not ready: attaching.\n",
        ),
        _ if !ready => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "vsrscope is not ready: attaching.\n",
        ),
        _ => metrics(headers, source),
    }
}

fn metrics(headers: &HeaderMap, source: &dyn Scrape) -> Response<Full<Bytes>> {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let Some(families) = source.scrape() else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Reading the kernel maps failed; see vsrscope's log.\n",
        );
    };
    let format = negotiate::format(header(ACCEPT));
    let text = prometheus_text(&families);
    let body = match format {
        Format::Text => text,
        Format::OpenMetrics(_) => openmetrics::from_text(&text, &families),
    };
    let gzip = negotiate::gzip(header(ACCEPT_ENCODING));
    let body = if gzip {
        compress(body.as_bytes())
    } else {
        Bytes::from(body)
    };
    let mut response = with_type(StatusCode::OK, &format.content_type(), body);
    let response_headers = response.headers_mut();
    response_headers.insert(
        VARY,
        http::HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    if gzip {
        response_headers.insert(CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
    }
    response
}

fn compress(body: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    encoder.write_all(body).unwrap();
    Bytes::from(encoder.finish().unwrap())
}

pub(super) fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn with_type(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::metrics::{Kind, Origin, Point, Value};

    struct Fixed(Option<Vec<Family>>);

    impl Scrape for Fixed {
        fn scrape(&self) -> Option<Vec<Family>> {
            self.0.clone()
        }
    }

    fn source() -> Fixed {
        Fixed(Some(vec![Family {
            name: "vsr_operations_total".into(),
            help: "Operations.".into(),
            kind: Kind::Counter,
            origin: Origin::Exporter,
            points: vec![Point {
                replica: Some(0),
                labels: vec![("status", "success".into())],
                value: Value::Integer(42),
            }],
        }]))
    }

    fn get(
        path: &str,
        headers: &[(&'static str, &'static str)],
        ready: bool,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, http::HeaderValue::from_static(value));
        }
        let response = respond(&Method::GET, path, &map, &source(), ready);
        let (parts, body) = response.into_parts();
        let body = body_bytes(body);
        (parts.status, parts.headers, body)
    }

    fn body_bytes(body: Full<Bytes>) -> Vec<u8> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(body.collect())
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[test]
    fn metrics_negotiate_format_and_compression() {
        let (status, headers, body) = get("/metrics", &[], true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text, prometheus_text(&source().0.unwrap()));

        let (_, headers, body) = get(
            "/metrics",
            &[
                ("accept", "application/openmetrics-text"),
                ("accept-encoding", "gzip"),
            ],
            true,
        );
        assert_eq!(
            headers[CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(headers[CONTENT_ENCODING], "gzip");
        let mut open = String::new();
        flate2::read::GzDecoder::new(body.as_slice())
            .read_to_string(&mut open)
            .unwrap();
        assert!(
            open.starts_with("# HELP vsr_operations Operations.\n"),
            "{open}"
        );
        assert!(
            open.ends_with("vsr_operations_total{replica_id=\"0\",status=\"success\"} 42\n# EOF\n"),
            "{open}"
        );
    }

    #[test]
    fn ready_only_once_attached_and_metrics_wait_for_it() {
        assert_eq!(get("/-/healthy", &[], false).0, StatusCode::OK);
        assert_eq!(
            get("/-/ready", &[], false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            get("/metrics", &[], false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get("/-/ready", &[], true).0, StatusCode::OK);
    }

    #[test]
    fn landing_page_links_to_metrics_and_the_rest_is_not_found() {
        let (status, headers, body) = get("/", &[], true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("<a href=\"metrics\">")
        );
        assert_eq!(get("/nothing", &[], true).0, StatusCode::NOT_FOUND);
        let response = respond(
            &Method::POST,
            "/metrics",
            &HeaderMap::new(),
            &source(),
            true,
        );
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }

    #[test]
    fn a_failed_map_read_is_a_server_error() {
        let response = respond(
            &Method::GET,
            "/metrics",
            &HeaderMap::new(),
            &Fixed(None),
            true,
        );
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
