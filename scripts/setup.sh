#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine: the Python virtualenv with the project's
# packages, OpenGradient's SDK in .venv-og (scripts/og-venv.sh), the npm packages for the dev chain
# (anvil, Permit2's runtime, solc-js, OpenZeppelin), and redis-server, chromium and chromium-driver when missing.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -U pip
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# OpenGradient's SDK in a virtualenv of its own (tests/e2e/test_opengradient_sdk.py); that test
# skips when it cannot be built, so neither does this step stop the setup.
bash scripts/og-venv.sh >/dev/null || echo "setup: .venv-og (OpenGradient's SDK) could not be built; its test will skip" >&2

nstamp=node_modules/.installed-$(sha256sum package.json | cut -c1-16)
if [ ! -f "$nstamp" ]; then
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
  npm install --no-audit --no-fund --loglevel=error
  rm -f node_modules/.installed-*
  touch "$nstamp"
fi

# redis-server for the tests' real Redis; Debian's chromium + chromium-driver for the console's
# browser tests (tests/e2e/test_console_browser.py: Selenium drives /usr/bin/chromedriver).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing+=(chromium chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
