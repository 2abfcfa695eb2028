"""Stand-in enclaves (devtools/tee_enclave.py) as test processes: HTTPS with a self-signed
certificate, so the readiness poll and the counters are read without verifying it."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from typing import Any

from tests.conftest import ROOT, ServiceProcess

_UNVERIFIED = ssl._create_unverified_context()  # the test's own look at the stand-ins' counters


class Enclave(ServiceProcess):
    crash_on_stop = False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> Enclave:
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        end = time.monotonic() + 15
        while True:
            try:
                stats(self)
                return self
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < end, self.log.read_text()[-3000:]
                time.sleep(0.05)


def stats(enclave: Any) -> dict[str, Any]:
    with urllib.request.urlopen(enclave.url + "/_stats", timeout=2, context=_UNVERIFIED) as r:
        return json.loads(r.read())
