#!/usr/bin/env bash
# Builds .venv-og: OpenGradient's SDK in a virtualenv of its own. Its `og-x402` dependency installs
# a module named `x402` that clashes with the official x402 client in .venv, so the two never
# share an environment. tests/e2e/test_opengradient_sdk.py runs the SDK from here as a subprocess.
# Idempotent: a second run only checks the stamp. Prints the venv's python on success.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENGRADIENT_VERSION="${OPENGRADIENT_VERSION:-1.1.4}"
PYTHON="${PYTHON:-python3}"
VENV="${OG_VENV:-.venv-og}"
stamp="$VENV/.installed-opengradient-$OPENGRADIENT_VERSION"

if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "opengradient==$OPENGRADIENT_VERSION"
  "$VENV/bin/python" -c "import opengradient, x402.http.clients.httpx"
  rm -f "$VENV"/.installed-opengradient-*
  touch "$stamp"
fi
echo "$PWD/$VENV/bin/python"
