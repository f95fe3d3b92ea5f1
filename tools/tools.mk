# Source-built Kubernetes tools for integration tests and `deeprad dev` (included by Makefile).
# The cache folder is keyed by a hash of the pins; a second `make tools` returns at once.

TOOLS_SCRIPT := tools/build-tools.sh

.PHONY: tools tools-check tools-bin-dir

tools: ## Build pinned kube-apiserver/etcd/kubectl/helm/kwok/S3 gateway + install Prometheus
	@bash $(TOOLS_SCRIPT)

tools-check: ## Exit non-zero unless every tool is built and installed
	@bash $(TOOLS_SCRIPT) --check && echo "tools: complete"

tools-bin-dir: ## Print the folder holding the built tools (for PATH)
	@bash $(TOOLS_SCRIPT) --print-bin-dir
