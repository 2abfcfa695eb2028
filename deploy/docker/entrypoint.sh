#!/bin/sh
# The image's entrypoint: the first argument names the service, the rest go to its command.
#   gateway serve --config /etc/x402/gateway.json       -> x402-gateway serve …
#   facilitator serve --config /etc/x402/facilitator.toml -> x402-facilitator serve …
#   budgets …                                            -> x402-budgets …
# Anything else runs as given (e.g. `python -c …` for the helm test pod). `exec` keeps the
# service as PID 1 so it receives SIGTERM and drains (uvicorn's graceful shutdown).
set -eu

case "${1:-}" in
  gateway) shift; exec x402-gateway "$@" ;;
  facilitator) shift; exec x402-facilitator "$@" ;;
  budgets) shift; exec x402-budgets "$@" ;;
  ""|-h|--help)
    echo "usage: (gateway|facilitator|budgets) ARGS… | COMMAND ARGS…" >&2
    echo "  e.g. gateway serve --config /etc/x402/gateway.json" >&2
    exit 64 ;;
  *) exec "$@" ;;
esac
