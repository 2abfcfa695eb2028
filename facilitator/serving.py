"""How the facilitator's and the gateway's `serve` commands run their app under uvicorn."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class JsonErrorsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with its own refusal of a request it cannot parse (a bad byte
    in a header, a lying Content-Length beside Transfer-Encoding, not HTTP/1.x) in the services'
    JSON shape rather than plain text: every client gets `error` and `message`."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "invalid_request", "message": msg}).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n",
                 b"\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()


def serve(build: Callable[[], ASGIApp], *, factory: str, env_name: str, source: dict[str, Any], workers: int,
          host: str, port: int, log_level: str, shutdown_grace_s: float) -> None:
    """One process runs `build()`; several workers each run `factory` (a "module:function" uvicorn
    imports), which loads the settings itself from `source` (the command's options, passed in
    `env_name`): no resolved secret is ever copied into an environment (/proc/PID/environ)."""
    import uvicorn

    if workers > 1:
        os.environ[env_name] = json.dumps(source)
        uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, loop="uvloop", http=JsonErrorsProtocol,
                    log_level=log_level, access_log=False, timeout_graceful_shutdown=int(shutdown_grace_s))
    else:
        uvicorn.run(build(), host=host, port=port, loop="uvloop", http=JsonErrorsProtocol, log_level=log_level,
                    access_log=False, timeout_graceful_shutdown=int(shutdown_grace_s))
