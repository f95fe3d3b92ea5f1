# Deep-Rad: `make help` lists every target.
# Everything runs in a virtual environment of the project's own (.venv), so a stock Debian
# Python (externally managed, PEP 668) works as well as any other; pip's cache is still shared.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP_FLAGS ?=
PYTEST ?= $(PYTHON) -m pytest -p no:cacheprovider
# Every component, editable, in one resolve (so their names resolve to these folders), plus the
# workspace root's development tools.
COMPONENTS := core operator trainer aggregator cli tools/devenv
INSTALL_STAMP := $(VENV)/.deeprad-installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-integration test-e2e lint bench bench-fedavg \
        bench-simulate bench-cluster bench-secagg bench-trainer bench-operator bench-gpu bench-dp \
        bench-seg bench-seg-trainer \
        bench-ddp chaos \
        bench-footprint crds \
        admission dashboards dev-up dev-down clean

include tools/tools.mk

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(PYTHON):
	@$(SYSTEM_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(SYSTEM_PYTHON) -m venv' \
	failed; on Debian/Ubuntu install the venv module first: apt-get install python3-venv" >&2; \
	exit 1; }

$(INSTALL_STAMP): $(PYTHON) pyproject.toml $(addsuffix /pyproject.toml,$(COMPONENTS))
	$(PYTHON) -m pip install $(PIP_FLAGS) $(addprefix -e ,$(COMPONENTS)) -e '.[dev]'
	@touch $@

install: $(INSTALL_STAMP) ## make .venv and install every component and the dev tools (pip cache reused)

demo: install ## run the default local federated study (synthetic phantoms, no cluster)
	$(VENV)/bin/deeprad simulate --output runs/demo --report-json runs/demo/report.json

test: install tools ## install everything, then run every test: unit, integration and e2e
	$(PYTEST) tests

test-unit: install ## run only the unit tests (no services)
	$(PYTEST) -m unit tests

test-integration: install tools ## integration tests: real control planes, node agent, S3, Prometheus
	$(PYTEST) -m integration tests/integration

test-e2e: install tools ## run only the end-to-end studies
	$(PYTEST) -m e2e tests

chaos: install tools ## two hub operators, the leader SIGKILLed 20 times in a 3-round study; prints each failover (~10 min idle)
	DEEPRAD_CHAOS_KILLS=20 $(PYTEST) -s tests/e2e/test_failover.py

lint: install ## ruff, mypy, import contracts, and checks that crds/, admission policies and dashboards match their sources
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(VENV)/bin/lint-imports
	$(PYTHON) -m deeprad.operator.api.crdgen --check
	$(PYTHON) -m deeprad.operator.render.admission --check
	$(PYTHON) -m deeprad.operator.dashboards.gen --check

crds: install ## regenerate crds/ from the typed source (deeprad.operator.api)
	$(PYTHON) -m deeprad.operator.api.crdgen --out crds

admission: install ## regenerate the hub chart's ValidatingAdmissionPolicies (deeprad.operator.render.admission)
	$(PYTHON) -m deeprad.operator.render.admission --out helm/deeprad/files/admission

dashboards: install ## regenerate the hub chart's Grafana dashboards (deeprad.operator.dashboards)
	$(PYTHON) -m deeprad.operator.dashboards.gen --out helm/deeprad/files/dashboards

bench: bench-fedavg bench-simulate bench-cluster bench-secagg bench-trainer bench-operator bench-footprint ## run every CPU benchmark (prints ratios)

bench-fedavg: install ## streaming FedAvg vs a plain torch weighted sum: time and peak memory
	$(PYTHON) benchmarks/bench_fedavg.py

bench-simulate: install ## `deeprad simulate` vs a bare PyTorch loop doing the same training
	$(PYTHON) benchmarks/bench_simulate.py

bench-cluster: install tools ## one cluster's start time and three clusters' memory vs the goals
	$(PYTHON) benchmarks/bench_cluster.py

bench-dp: install ## DP-SGD at ε=8 vs the non-private demo, final AUROC over 5 seeds (~15 min)
	$(PYTHON) benchmarks/bench_dp_utility.py

bench-ddp: install ## distributed DP vs central DP-SGD vs no DP at ε=8, AUROC over 5 seeds, upload bits (10-15 min)
	$(PYTHON) benchmarks/bench_distributed_dp.py

bench-secagg: install ## secure-aggregation CPU time and upload size vs plain updates
	$(PYTHON) benchmarks/bench_secagg.py

bench-trainer: install ## the trainer's step time vs a bare PyTorch loop (CPU)
	$(PYTHON) benchmarks/bench_trainer.py

bench-seg-trainer: install ## the trainer's 3D segmentation epoch vs a bare MONAI loop on the same batches (goal <= 1.10)
	$(PYTHON) benchmarks/bench_seg_trainer.py

bench-seg: install ## the default 3D segmentation study over 5 seeds vs the acceptance (federated vs centralized / local-only, held-out hospital; ~1 h)
	$(PYTHON) benchmarks/bench_seg_study.py

bench-operator: install tools ## the hub operator with 1000 HospitalSites and one round over all (kwok)
	$(PYTHON) benchmarks/bench_operator_scale.py

bench-footprint: install ## each component's installed size and the light commands' start time
	$(PYTHON) benchmarks/bench_footprint.py

bench-gpu: install ## every GPU measurement in one run (needs a GPU; --cpu-smoke is unit-tested)
	$(PYTHON) benchmarks/bench_gpu.py

dev-up: install tools ## hub + 2 hospital clusters, S3 and Prometheus in the background
	$(VENV)/bin/deeprad dev up --detach

dev-down: install ## stop what dev-up started
	$(VENV)/bin/deeprad dev down

clean: ## remove run outputs and caches
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
