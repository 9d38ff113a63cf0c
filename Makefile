# Shortcuts for dev.py, which needs nothing but Python 3.11+.
.PHONY: help demo test run lint bench lock

help: ## Show the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: ## Run the worker with the demo (embedded PostgreSQL unless OUTBOX_DATABASE_URL is set)
	python3 dev.py demo

test: ## Run the whole test suite (pytest)
	python3 dev.py test

run: ## Run the worker
	python3 dev.py run

lint: ## ruff and mypy
	python3 dev.py lint

bench: ## Run the benchmarks (bench/README.md)
	python3 dev.py bench

lock: ## Write requirements.lock: the runtime dependencies' versions, resolved afresh
	python3 dev.py lock
