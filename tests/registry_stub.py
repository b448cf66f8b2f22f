"""A stand-in for a Confluent-compatible Schema Registry, on loopback, for tests.

No real registry could be had from the package registries this project reaches (see
tests/unit/test_schema_registry.py): this serves the read side of the Confluent REST API
that the broker uses (``GET /schemas/ids/{id}``, ``GET /subjects/{s}/versions/{v}``,
errors as ``{"error_code", "message"}``), so that the real ``SchemaRegistryClient`` is
tested over real HTTP. It counts requests and can demand basic auth.
"""
from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class RegistryStub:
    def __init__(self, port: int = 0, auth: Optional[tuple[str, str]] = None):
        self.schemas: dict[int, dict] = {}        # id -> {"schema": str, "references": [...]}
        self.versions: dict[tuple[str, int], int] = {}   # (subject, version) -> id
        self.requests: list[str] = []
        self.auth = auth
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append(self.path)
                if stub.auth is not None:
                    want = "Basic " + base64.b64encode(":".join(stub.auth).encode()).decode()
                    if self.headers.get("Authorization") != want:
                        return self._send(401, {"error_code": 40101, "message": "Unauthorized"})
                path = self.path.split("?", 1)[0]
                m = re.fullmatch(r"/schemas/ids/(\d+)", path)
                if m:
                    got = stub.schemas.get(int(m.group(1)))
                    if got is None:
                        return self._send(404, {"error_code": 40403, "message": "Schema not found"})
                    return self._send(200, got)
                m = re.fullmatch(r"/subjects/([^/]+)/versions/(\d+)", path)
                if m:
                    sid = stub.versions.get((m.group(1), int(m.group(2))))
                    if sid is None:
                        return self._send(404, {"error_code": 40402, "message": "Version not found"})
                    return self._send(200, {"subject": m.group(1), "version": int(m.group(2)),
                                            "id": sid, **stub.schemas[sid]})
                return self._send(404, {"error_code": 404, "message": "HTTP 404 Not Found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def register(self, schema_id: int, schema: dict, subject: Optional[str] = None,
                 version: int = 1, references: Optional[list] = None) -> None:
        self.schemas[schema_id] = {"schema": json.dumps(schema), "schemaType": "AVRO",
                                   "references": references or []}
        if subject is not None:
            self.versions[(subject, version)] = schema_id

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
