#!/usr/bin/env bash
# Builds the pinned upstream binaries the integration tests and `deeprad dev` run, from the Go
# module proxy, into a cache folder keyed by a hash of every pin and of this recipe:
#   ${DEEPRAD_TOOLS_DIR:-$HOME/.cache/deeprad/tools/<pin-hash>}/bin
# A second run finds every binary in place and returns at once. Prometheus and promtool come from
# Debian's prometheus package, installed only when missing.
#
# Usage: tools/build-tools.sh            build what is missing
#        tools/build-tools.sh --print-bin-dir   print the bin folder and exit (builds nothing)
#        tools/build-tools.sh --check    exit 0 only if everything is built
#
# Environment: DEEPRAD_TOOLS_DIR (cache folder), DEEPRAD_SKIP_APT=1 (never run apt-get),
#              GO (the go command, default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
modules="$here/k8s"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

# Versions stamped into the binaries, so `kubectl version`, /version and Helm's kubeVersion
# checks see the real release rather than v0.0.0-master.
k8s_version="v1.37.2"
k8s_build_date="2026-10-28T00:00:00Z"
helm_version="v3.22.0"
kwok_version="v0.8.0"
kueue_version="v0.17.0"

k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$k8s_build_date"
done
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=37"
done
kwok_ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v}"
kwok_ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${k8s_version#v}"
s3_ldflags="-s -w"
kueue_ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version"

# The cache key: every file that decides what gets built, the recipe above and the toolchain.
pin_hash() {
  {
    (cd "$modules" && find . -name go.mod -o -name go.sum -o -name '*.go' | LC_ALL=C sort |
      while read -r f; do echo "== $f"; cat "$f"; done)
    echo "$k8s_ldflags|$helm_ldflags|$kwok_ldflags|$s3_ldflags|$kueue_ldflags"
    "$GO" env GOVERSION GOOS GOARCH
  } | sha256sum | cut -c1-16
}

tools_dir="${DEEPRAD_TOOLS_DIR:-$HOME/.cache/deeprad/tools/$(pin_hash)}"
bin="$tools_dir/bin"

# name | module folder | package | ldflags variable
builds=(
  "deeprad-k8s|.|.|k8s_ldflags"
  "helm|.|helm.sh/helm/v3/cmd/helm|helm_ldflags"
  "kwok|kwok|sigs.k8s.io/kwok/cmd/kwok|kwok_ldflags"
  "versitygw|s3|github.com/versity/versitygw/cmd/versitygw|s3_ldflags"
  "kueue|kueue|sigs.k8s.io/kueue/cmd/kueue|kueue_ldflags"
)
k8s_links=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
# kwok ships no default lifecycle; its own module carries the upstream Stage manifests
# (fast node initialisation, lease heartbeat, pod ready/complete/delete) - installed beside it.
kwok_stages="$tools_dir/share/kwok-stages"
kwok_stage_files=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
# Kueue's CRDs as its release applies them, from its own module (tests install them into the
# hospital clusters that run a Kueue controller).
kueue_crds="$tools_dir/share/kueue-crds"

all_built() {
  local entry name
  for entry in "${builds[@]}"; do
    name="${entry%%|*}"
    [[ -x "$bin/$name" ]] || return 1
  done
  for name in "${k8s_links[@]}"; do [[ -x "$bin/$name" ]] || return 1; done
  [[ -f "$kwok_stages/.complete" ]] || return 1
  [[ -f "$kueue_crds/.complete" ]] || return 1
  command -v prometheus >/dev/null && command -v promtool >/dev/null
}

case "${1:-}" in
  --print-bin-dir) echo "$bin"; exit 0 ;;
  --check) all_built; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--print-bin-dir|--check]" >&2; exit 2 ;;
esac

if all_built; then
  echo "tools: up to date in $bin"
  exit 0
fi

mkdir -p "$bin"
times_file="$tools_dir/build-times.txt"

# Two builds into one cache folder (parallel CI jobs) wait for each other.
exec 9>"$tools_dir/.lock"
flock 9
if all_built; then
  echo "tools: built by a concurrent run in $bin"
  exit 0
fi

# Go builds of Kubernetes take a long time; keep them polite to whatever else runs on the box.
goflags="${GOFLAGS:-}"
[[ "$goflags" == *-p=* ]] || goflags+=" -p=2"
export GOFLAGS="$goflags -mod=readonly"

for entry in "${builds[@]}"; do
  IFS='|' read -r name dir pkg flags_var <<<"$entry"
  if [[ -x "$bin/$name" ]]; then continue; fi
  echo "tools: building $name ($pkg) ..."
  start=$(date +%s)
  (cd "$modules/$dir" && nice -n 15 "$GO" build -ldflags "${!flags_var}" -o "$bin/.$name.tmp" "$pkg")
  mv -f "$bin/.$name.tmp" "$bin/$name"
  echo "$name $(( $(date +%s) - start ))s $(date -u +%FT%TZ)" | tee -a "$times_file"
done

for name in "${k8s_links[@]}"; do
  ln -sfn deeprad-k8s "$bin/$name"
done

if [[ ! -f "$kwok_stages/.complete" ]]; then
  kwok_src="$(cd "$modules/kwok" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  mkdir -p "$kwok_stages"
  for f in "${kwok_stage_files[@]}"; do
    install -m 0644 "$kwok_src/kustomize/stage/$f" "$kwok_stages/$(basename "$f")"
  done
  touch "$kwok_stages/.complete"
fi

if [[ ! -f "$kueue_crds/.complete" ]]; then
  kueue_src="$(cd "$modules/kueue" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  mkdir -p "$kueue_crds"
  install -m 0644 "$kueue_src"/config/components/crd/bases/*.yaml "$kueue_crds/"
  touch "$kueue_crds/.complete"
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [[ "${DEEPRAD_SKIP_APT:-0}" == 1 ]]; then
    echo "tools: prometheus/promtool missing and DEEPRAD_SKIP_APT=1" >&2
    exit 1
  fi
  echo "tools: installing Debian prometheus package ..."
  sudo_cmd=()
  if [[ $(id -u) != 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y --no-install-recommends prometheus
  # The package enables a system service; the tests start their own instances.
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    "${sudo_cmd[@]}" systemctl disable --now prometheus prometheus-node-exporter 2>/dev/null || true
  fi
fi

all_built
echo "tools: ready in $bin"
