// Command deeprad-k8s is one binary holding the upstream Kubernetes control plane, kubectl and
// etcd, built from pinned module versions (see go.mod). Linking the shared Kubernetes packages
// once is much faster on a small machine than linking five separate binaries.
//
// It dispatches on the name it was started under (symlinks named kube-apiserver, kubectl, ...)
// or, when started as deeprad-k8s, on its first argument.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// commands maps each tool name to the function that runs it with os.Args already set up as if
// the tool had been started directly.
var commands = map[string]func() int{
	"kube-apiserver":          runAPIServer,
	"kube-controller-manager": runControllerManager,
	"kube-scheduler":          runScheduler,
	"kubectl":                 runKubectl,
	"etcd":                    runEtcd,
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := commands[name]; !ok {
		if len(os.Args) < 2 {
			usage()
			os.Exit(2)
		}
		// Started as the multicall binary: shift the tool name into argv[0].
		os.Args = os.Args[1:]
		name = os.Args[0]
	}
	run, ok := commands[name]
	if !ok {
		usage()
		os.Exit(2)
	}
	os.Exit(run())
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: deeprad-k8s {%s} [args...]\n", strings.Join(names, "|"))
}
