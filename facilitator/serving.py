"""How the facilitator's and the gateway's `serve` commands run their app under uvicorn."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp


def serve(build: Callable[[], ASGIApp], *, factory: str, env_name: str, source: dict[str, Any], workers: int,
          host: str, port: int, log_level: str, shutdown_grace_s: float) -> None:
    """One process runs `build()`; several workers each run `factory` (a "module:function" uvicorn
    imports), which loads the settings itself from `source` (the command's options, passed in
    `env_name`): no resolved secret is ever copied into an environment (/proc/PID/environ)."""
    import uvicorn

    if workers > 1:
        os.environ[env_name] = json.dumps(source)
        uvicorn.run(factory, factory=True, workers=workers, host=host, port=port, loop="uvloop", http="httptools",
                    log_level=log_level, access_log=False, timeout_graceful_shutdown=int(shutdown_grace_s))
    else:
        uvicorn.run(build(), host=host, port=port, loop="uvloop", http="httptools", log_level=log_level,
                    access_log=False, timeout_graceful_shutdown=int(shutdown_grace_s))
