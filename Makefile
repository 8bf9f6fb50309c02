# Two commands matter: `make run` and `make test`. Everything else is what they build on.
.DEFAULT_GOAL := help
SHELL := /bin/sh

VENV := .venv
BIN := $(VENV)/bin
STACK := $(BIN)/python -m scripts.stack
CLUSTER := $(BIN)/python -m scripts.cluster
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: help install run stop test lint format db-up db-down db-reset fakepay-up fakepay-down seed serve bench postman e2e clean api-key api-key-revoke api-keys \
	migration migrations-check test-mysql8 cluster-up cluster-down cluster-status test-cluster bench-cluster

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

install: $(VENV)/.synced ## bootstrap uv if missing, then create .venv from uv.lock

$(VENV)/.synced: pyproject.toml uv.lock
	@UV=$$(sh scripts/ensure-uv.sh) && "$$UV" sync --frozen
	@touch $@

run: install db-up fakepay-up ## serve the API on http://127.0.0.1:8000 with live reload
	$(BIN)/uvicorn main:app --loop uvloop --http httptools --reload --host $(HOST) --port $(PORT)

stop: ## stop FakePay and the private database servers (data kept)
	-@[ -x $(BIN)/python ] && $(STACK) fakepay-down
	-@[ -x $(BIN)/python ] && $(STACK) db-down
	-@[ -x $(BIN)/python ] && $(MYSQL8_LIKE) $(STACK) db-down

WORKERS ?= 2
# prometheus-client's multiprocess mode: the workers write their metrics here, and a scrape of
# /metrics from any of them sums them all. Emptied at each start, so no old run adds to it.
METRICS_DIR := $(CURDIR)/.data/metrics
serve: install db-up ## production mode: N uvicorn workers (WORKERS=2), no reload, JSON logs, /metrics of all
	@$(STACK) serve-guard $(HOST)
	@rm -rf "$(METRICS_DIR)" && mkdir -p "$(METRICS_DIR)"
	PROMETHEUS_MULTIPROC_DIR="$(METRICS_DIR)" LOG_JSON=true $(BIN)/uvicorn main:app --loop uvloop --http httptools --host $(HOST) --port $(PORT) --workers $(WORKERS) --no-access-log

test: install db-up ## run the test suite (its own database, its own FakePay)
	$(BIN)/pytest

lint: install ## ruff, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: install ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

db-up: install ## start the private database server if needed; bring the schema to head in place
	@$(STACK) db-up

db-down: install ## stop the private database server (data kept in .data/)
	@$(STACK) db-down

db-reset: install ## DROP every table and row, then sql/up.sql: a fresh seeded database in DB_URL
	@$(STACK) db-reset

MESSAGE ?=
migration: install db-up ## a new revision from what models.py changed (MESSAGE="add a column")
	@[ -n "$(MESSAGE)" ] || { echo 'usage: make migration MESSAGE="add a column"'; exit 2; }
	$(BIN)/alembic revision --autogenerate -m "$(MESSAGE)" \
		--rev-id $$(printf '%04d' $$(( $$(ls migrations/versions/[0-9]*.py | wc -l) + 1 )))

migrations-check: install db-up ## alembic check: models.py and the head revision agree
	$(BIN)/alembic check

# A server as MySQL 8 sets itself up: binary logging on, the schema installed by an owner
# without SUPER, the app connected as a user that may only read and write rows.
MYSQL8_LIKE := DB_URL=127.0.0.1:3308/invoice_management
test-mysql8: install ## the test suite on a MySQL-8-like server (binary log on, least privilege)
	$(MYSQL8_LIKE) DB_BINLOG=on $(STACK) db-up
	env $$($(MYSQL8_LIKE) $(STACK) least-privilege) $(MYSQL8_LIKE) $(BIN)/pytest

fakepay-up: install ## start fake_pay.py in the background unless its port answers
	@$(STACK) fakepay-up

fakepay-down: install ## stop the FakePay started by fakepay-up
	@$(STACK) fakepay-down

N ?= 1000000
seed: install db-up ## add N realistic invoices to the database in DB_URL (default 1000000)
	$(BIN)/python -m scripts.seed $(N)

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed: install Node.js (Debian/Ubuntu: apt-get install nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund
	@touch $@

NEWMAN = node_modules/.bin/newman run postman/invoice-api.postman_collection.json \
	-e postman/local.postman_environment.json --env-var baseUrl=$$APP_URL
postman: install db-up fakepay-up node_modules/.installed ## run the Postman collection with newman, AUTH off then on
	AUTH=off $(STACK) with-app sh -c '$(NEWMAN)'
	API_KEY=$$($(BIN)/python -m scripts.api_keys create postman-$$(date +%s%N) write | tail -n 1) && \
		export API_KEY && AUTH=on $(STACK) with-app sh -c '$(NEWMAN) --env-var apiKey=$$API_KEY' 

e2e: install db-up fakepay-up ## headless Chromium: Try it out in Swagger UI, AUTH off then on with Authorize
	@sh scripts/ensure-chromium.sh
	AUTH=off $(STACK) with-app $(BIN)/python e2e/swagger_try_it_out.py
	API_KEY=$$($(BIN)/python -m scripts.api_keys create e2e-$$(date +%s%N) write | tail -n 1) && \
		export API_KEY && AUTH=on $(STACK) with-app $(BIN)/python e2e/swagger_try_it_out.py

NAME ?=
SCOPE ?= read
api-key: install db-up ## make an API key (NAME=... SCOPE=read|write|admin); its secret is the last line
	@[ -n "$(NAME)" ] || { echo "usage: make api-key NAME=<name> SCOPE=read|write|admin"; exit 2; }
	@$(BIN)/python -m scripts.api_keys create "$(NAME)" "$(SCOPE)"

api-key-revoke: install db-up ## revoke an API key (NAME=...); it stops working within 5 s
	@[ -n "$(NAME)" ] || { echo "usage: make api-key-revoke NAME=<name>"; exit 2; }
	@$(BIN)/python -m scripts.api_keys revoke "$(NAME)"

api-keys: install db-up ## list API keys: name, scope, prefix, created, last used, revoked
	@$(BIN)/python -m scripts.api_keys list

ROWS ?= 200000
bench: install db-up ## benchmark against a minimal baseline (ROWS=200000); see BENCHMARKS.md
	$(BIN)/python -m bench.run --rows $(ROWS)

cluster-up: install ## three Galera nodes (127.0.0.1:3311-3313) behind HAProxy on 127.0.0.1:3310; starts what is down
	@$(CLUSTER) up

cluster-down: install ## stop HAProxy, the health check and the three nodes (data kept in .data/cluster)
	@$(CLUSTER) down

cluster-status: install ## each node's state and the cluster size, HAProxy's view and the writer
	@$(CLUSTER) status

test-cluster: install cluster-up ## the cluster tests: formation, failover, rejoin, several writers
	$(BIN)/pytest tests_cluster

CLUSTER_ROWS ?= 20000
bench-cluster: install db-up cluster-up ## the app on the cluster beside the single server (CLUSTER_ROWS=20000)
	$(BIN)/python -m bench.cluster --rows $(CLUSTER_ROWS)

clean: stop ## stop everything and delete .venv, .data and caches
	-@[ -x $(BIN)/python ] && $(CLUSTER) down
	rm -rf $(VENV) .data .tools node_modules artifacts .pytest_cache .mypy_cache .ruff_cache
