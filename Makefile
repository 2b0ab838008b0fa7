# The two commands of the README: `make dev` and `make test`. Everything they need is installed
# and started from here, on a fresh machine as on a developer's.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NOVA_HOME ?= $(CURDIR)/.nova
export DAGSTER_HOME ?= $(NOVA_HOME)/dagster

.PHONY: dev test test-fast install instance services services-down seed lint alerts browser screenshots bench clean dashboard

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev]'
	touch $@

install: $(BIN)/.installed

# The Dagster instance lives under .nova/ so run history survives restarts; its config is
# the top-level dagster.yaml with the run limit of MAX_CONCURRENT_JOBS.
instance: install
	$(BIN)/nova-assets instance --home $(DAGSTER_HOME)

services: install
	$(BIN)/nova-assets services up

services-down: install
	$(BIN)/nova-assets services down

seed: install
	$(BIN)/nova-assets seed --if-empty

# Run from DAGSTER_HOME so Dagster reads the instance config written there, not the template.
dev: services seed instance
	cd $(DAGSTER_HOME) && $(CURDIR)/$(BIN)/dagster dev -w $(CURDIR)/workspace.yaml \
		--host 127.0.0.1 --port 3000

# The lint also fails when ops/grafana/nova_assets.json is not what its generator writes.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python ops/grafana/dashboard.py --check

# Regenerate the Grafana dashboard (ops/grafana/dashboard.py) after changing it.
dashboard: install
	$(BIN)/python ops/grafana/dashboard.py

# The alert rules and their unit tests (promtool comes with the stack's apt packages).
alerts: services
	promtool check rules ops/prometheus/alerts.yml
	promtool check config ops/prometheus/prometheus.yml
	promtool test rules ops/prometheus/alerts_test.yml

# Debian's Chromium for the browser test (Playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Two workers: the end-to-end tests spend most of their time waiting for the daemon's ticks and
# for Redis' retries, so they overlap well with each other and with the rest; every test isolates
# its own keys, topics, ports and homes. The end-to-end tests start first, each long one paired
# with a short one (conftest.py), so the workers finish together.
test: services lint alerts browser
	$(BIN)/pytest -n 2 --dist load --maxschedchunk 1 --durations=15

# The fast lane: every test that needs no service (the embedded engine is in-process), with no
# root and no network; markers come from the fixtures a test uses (see nova_assets_tests/conftest.py).
# Two workers: the longest tests wait on subprocesses and overlap well.
test-fast: install lint
	$(BIN)/pytest -n 2 -m "not services" --durations=10

# Refresh the README's screenshots from a real browser run against `dagster dev`.
screenshots: services browser
	$(BIN)/pytest -q nova_assets_tests/test_e2e.py -k browser
	mkdir -p docs/screenshots
	cp test-artifacts/asset-graph.png test-artifacts/finished-run.png docs/screenshots/

bench: services
	$(BIN)/python bench/run.py

clean: services-down
	rm -rf $(NOVA_HOME) $(VENV)
