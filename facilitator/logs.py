"""Structured JSON logs for both services. Fields come from `extra=`; anything that looks like a
secret, a signature or a prompt is redacted here as the last line of defence."""

from __future__ import annotations

import logging
import sys
import time

import orjson

_REDACT = {"private_key", "signature", "authorization", "payment-signature", "x-payment", "prompt", "messages",
           "auth_value", "signer_keys", "x-api-key"}
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = "[redacted]" if key.lower() in _REDACT else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
