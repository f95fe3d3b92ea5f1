# Deep-Rad: `make help` lists every target.
PYTHON ?= python3
PIP_FLAGS ?=
PYTEST ?= $(PYTHON) -m pytest -p no:cacheprovider

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-integration test-e2e lint bench bench-fedavg \
        bench-simulate bench-cluster bench-secagg bench-trainer bench-operator bench-gpu bench-dp crds \
        dashboards dev-up dev-down clean

include tools/tools.mk

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: ## install deeprad and its dev tools into the current Python (pip cache reused)
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[dev,export]'

demo: install ## run the default local federated study (synthetic phantoms, no cluster)
	deeprad simulate --output runs/demo --report-json runs/demo/report.json

test: install tools ## install everything, then run every test: unit, integration and e2e
	$(PYTEST) tests

test-unit: ## run only the unit tests (no services)
	$(PYTEST) -m unit tests

test-integration: tools ## integration tests: real control planes, node agent, S3, Prometheus
	$(PYTEST) -m integration tests/integration

test-e2e: ## run only the end-to-end studies
	$(PYTEST) -m e2e tests

lint: ## ruff, mypy, and checks that crds/ and the chart's dashboards match their sources
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy deeprad operator trainer aggregator
	$(PYTHON) -m deeprad.operator.api.crdgen --check
	$(PYTHON) -m deeprad.operator.dashboards.gen --check

crds: ## regenerate crds/ from the typed source in operator/api
	$(PYTHON) -m deeprad.operator.api.crdgen --out crds

dashboards: ## regenerate the hub chart's Grafana dashboards from operator/dashboards
	$(PYTHON) -m deeprad.operator.dashboards.gen --out helm/deeprad/files/dashboards

bench: bench-fedavg bench-simulate bench-cluster bench-secagg bench-trainer bench-operator ## run every CPU benchmark (prints ratios)

bench-fedavg: ## streaming FedAvg vs a plain torch weighted sum: time and peak memory
	$(PYTHON) benchmarks/bench_fedavg.py

bench-simulate: ## `deeprad simulate` vs a bare PyTorch loop doing the same training
	$(PYTHON) benchmarks/bench_simulate.py

bench-cluster: tools ## one cluster's start time and three clusters' memory vs the goals
	$(PYTHON) benchmarks/bench_cluster.py

bench-dp: ## DP-SGD at ε=8 vs the non-private demo, final AUROC over 5 seeds (~15 min)
	$(PYTHON) benchmarks/bench_dp_utility.py

bench-secagg: ## secure-aggregation CPU time and upload size vs plain updates
	$(PYTHON) benchmarks/bench_secagg.py

bench-trainer: ## the trainer's step time vs a bare PyTorch loop (CPU)
	$(PYTHON) benchmarks/bench_trainer.py

bench-operator: tools ## the hub operator with 1000 HospitalSites and one round over all (kwok)
	$(PYTHON) benchmarks/bench_operator_scale.py

bench-gpu: ## every GPU measurement in one run (needs a GPU; --cpu-smoke is unit-tested)
	$(PYTHON) benchmarks/bench_gpu.py

dev-up: install tools ## hub + 2 hospital clusters, S3 and Prometheus in the background
	deeprad dev up --detach

dev-down: ## stop what dev-up started
	deeprad dev down

clean: ## remove run outputs and caches
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
