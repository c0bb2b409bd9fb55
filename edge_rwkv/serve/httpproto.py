"""The HTTP/1.1 connection layer: uvicorn's h11 protocol, answering unparsable requests in JSON.

uvicorn answers a request it cannot parse (bad request line, bad header, bad chunked encoding)
with a plain-text 400 before the application sees it; this subclass sends the same status with
the OpenAI-style error body every other bad request gets.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body


class JSONErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(f"malformed HTTP request: {msg}", code="invalid_http")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
