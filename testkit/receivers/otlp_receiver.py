#!/usr/bin/env python3
"""An OTLP metrics receiver for tests, built on the official OpenTelemetry protobufs.

Serves MetricsService/Export over gRPC and POST /v1/metrics (application/x-protobuf) over HTTP,
decodes every ExportMetricsServiceRequest and appends it to --out as one JSON line:
{"transport": "grpc"|"http", "headers": {...}, "request": <the request as protobuf JSON>}.
--refuse N answers the first N requests with UNAVAILABLE / HTTP 503, to exercise retries.
--tls-cert/--tls-key serve both over TLS instead. --delay-ms N answers every request N ms late
(a slow collector).
Prints "ready" once both ports listen.
"""

import argparse
import gzip
import json
import ssl
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc


class Journal:
    """Appends decoded requests; counts requests to refuse."""

    def __init__(self, path, refuse, delay_ms):
        self.lock = threading.Lock()
        self.file = open(path, "a", encoding="utf-8")
        self.refuse = refuse
        self.delay_ms = delay_ms

    def should_refuse(self):
        time.sleep(self.delay_ms / 1000)
        with self.lock:
            if self.refuse > 0:
                self.refuse -= 1
                return True
            return False

    def record(self, transport, headers, request):
        line = json.dumps(
            {
                "transport": transport,
                "headers": headers,
                "request": MessageToDict(request, preserving_proto_field_name=True),
            }
        )
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, journal):
        self.journal = journal

    def Export(self, request, context):
        if self.journal.should_refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "refusing on purpose (--refuse)")
        headers = {key: value for key, value in context.invocation_metadata()}
        self.journal.record("grpc", headers, request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def http_handler(journal):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/metrics":
                self.send_error(404)
                return
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(415, "expected application/x-protobuf")
                return
            if journal.should_refuse():
                self.send_error(503, "refusing on purpose (--refuse)")
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            try:
                request.ParseFromString(body)
            except Exception as error:  # a malformed body is the sender's bug: say so
                self.send_error(400, f"undecodable ExportMetricsServiceRequest: {error}")
                return
            journal.record("http", {k.lower(): v for k, v in self.headers.items()}, request)
            answer = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--refuse", type=int, default=0)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    arguments = parser.parse_args()
    journal = Journal(arguments.out, arguments.refuse, arguments.delay_ms)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(journal), server)
    http = ThreadingHTTPServer(("127.0.0.1", arguments.http_port), http_handler(journal))
    if arguments.tls_cert:
        with open(arguments.tls_key, "rb") as key, open(arguments.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        server.add_secure_port(f"127.0.0.1:{arguments.grpc_port}", credentials)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(arguments.tls_cert, arguments.tls_key)
        http.socket = context.wrap_socket(http.socket, server_side=True)
    else:
        server.add_insecure_port(f"127.0.0.1:{arguments.grpc_port}")
    server.start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print("ready", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        http.shutdown()
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
