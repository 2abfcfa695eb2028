# The two commands of the README: `make demo` (install, then run the paid flow end to end on the
# embedded defaults) and `make test` (install, then run the whole suite).
.PHONY: setup demo test test-fast bench devchain facilitator clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/x402-gateway demo

test: setup
	.venv/bin/python -m pytest -q --durations=15

test-fast: setup
	.venv/bin/python -m pytest -q -m "not e2e"

bench: setup
	.venv/bin/python loadtests/bench_verify.py
	.venv/bin/python loadtests/bench_settle.py
	.venv/bin/python loadtests/bench_gateway.py
	.venv/bin/python loadtests/bench_budgets.py
	.venv/bin/python loadtests/bench_sessions.py

devchain: setup
	.venv/bin/x402-facilitator devchain --out devchain.json

facilitator: setup
	.venv/bin/x402-facilitator serve --devchain devchain.json

clean:
	rm -rf .venv node_modules build .x402-state .pytest_cache
