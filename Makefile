# wsrelay: build, run, test and package the two functions.
#
# The repository is a Go workspace; `./...` does not cross modules, so every
# module is listed here and each target walks the list.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

GO          ?= go
MODULES     := shared functions/ingress functions/egress e2e bench
FUNCTIONS   := ingress egress
BIN         ?= bin
DIST        ?= dist
TEST_TIMEOUT ?= 20m
# LEAN=1 packages a lean egress (-tags wsrelay_lean: no /metrics, no
# profiling) for one-connection-per-instance deployments (docs/deployment.md).
# It is also built without inlining (LEAN_GCFLAGS): 0.7 MB less binary,
# which is most of such an instance's memory (its pages are resident),
# for calls that cost nothing measurable to one socket's traffic.
LEAN        ?=
LEAN_TAG    := wsrelay_lean
LEAN_GCFLAGS := all=-l
# Build tags of each function's binary. nomsgpack is gin's own tag for
# leaving out its MessagePack binding and rendering, which we do not use:
# 6 MB less binary and about 1 ms less package init. nethttpomithttp2 is
# net/http's own tag for leaving out its bundled HTTP/2: both functions
# serve plain HTTP/1.1 (TLS ends at the gateway, and a WebSocket upgrade is
# HTTP/1.1), so it is never used, and it is 0.35 MB of every binary
# (docs/benchmarks.md).
TAGS_ingress := nomsgpack,nethttpomithttp2
TAGS_egress  := nethttpomithttp2
# The packages a lean build changes; make test and make lint also run them
# with the tag.
LEAN_PKGS   := shared/debugserver functions/egress
FUZZTIME    ?= 3s
# CENTRIFUGO=1 makes `make bench` also run S1–S5 on Centrifugo, built from
# the Go module proxy at this version into bin/bench/, and compare.
CENTRIFUGO  ?=
CENTRIFUGO_MODULE := github.com/centrifugal/centrifugo/v6@v6.9.1
# staticcheck 0.8.x is the first line that understands Go 1.26.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the tests need, as command:package[+package…]: Redis for
# every Redis test, Chromium for the browser test of the demo page, nginx
# for the test of deploy/nginx (e2e/nginx_test.go; Debian puts it in
# /usr/sbin, off an ordinary user's PATH), a C toolchain for go test
# -race (which needs cgo), Node.js for the Node example of
# docs/security.md, and curl and openssl for the shell examples of
# docs/api.md, docs/deployment.md and the quick start
# (e2e/docexamples_test.go, e2e/makerun_test.go), which a minimal Debian
# does not have, nor a container systemd, whose systemd-analyze loads
# deploy/systemd's units (e2e/systemd_test.go).
APT_DEPS    := redis-server:redis-server chromium:chromium nginx:nginx gcc:gcc+libc6-dev node:nodejs curl:curl openssl:openssl systemd-analyze:systemd
# make upgrade-check runs the release at this git ref (a commit, a tag, a
# branch) side by side with the checkout: the commit the checked-out code
# will replace in a deploy (docs/deployment.md, "Upgrading").
BASE        ?= 78974a7
SUDO        := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: build run test bench soak upgrade-check package lint fuzz deps clean help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -e 's/:.*## /\t/' -e 's|$$(DIST)|$(DIST)|g' -e 's|$$(FUZZTIME)|$(FUZZTIME)|g'

build: ## build bin/ingress and bin/egress for this machine
	@mkdir -p $(BIN)
	@$(GO) build -tags="$(TAGS_ingress)" -o $(BIN)/ingress ./functions/ingress
	@$(GO) build -tags="$(TAGS_egress)" -o $(BIN)/egress ./functions/egress
	@echo "built $(addprefix $(BIN)/,$(FUNCTIONS))"

run: ## run both functions locally (throwaway Redis unless REDIS_URL is set)
	@scripts/run.sh

test: deps lint ## lint, race-test every module, then fuzz briefly
	@failed=(); \
	for m in $(MODULES); do \
		echo "== go test $$m"; \
		(cd $$m && $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...) || failed+=("$$m"); \
	done; \
	for p in $(LEAN_PKGS); do \
		echo "== go test -tags $(LEAN_TAG) $$p"; \
		(cd $$p && $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -tags $(LEAN_TAG) .) || failed+=("$$p ($(LEAN_TAG))"); \
	done; \
	if (( $${#failed[@]} )); then echo "FAILED: go test in $${failed[*]}" >&2; exit 1; fi
	@$(MAKE) --no-print-directory fuzz

bench: ## run the benchmark harness (bench/cmd/bench); CENTRIFUGO=1 compares with Centrifugo in the same run
	@if [ -n "$(CENTRIFUGO)" ]; then \
		echo "bench: building $(CENTRIFUGO_MODULE) into bin/bench (minutes the first time)" >&2; \
		GOBIN="$(CURDIR)/bin/bench" $(GO) install $(CENTRIFUGO_MODULE); fi
	@cd bench && $(GO) run ./cmd/bench $(if $(CENTRIFUGO),-centrifugo "$(CURDIR)/bin/bench/centrifugo") $(BENCH_ARGS)

soak: ## a long run under traffic and churn that samples memory, fds, goroutines and Redis keys, then checks delivery and leftovers (bench/cmd/soak; SOAK_ARGS='-duration 12m'); see docs/soak.md
	@cd bench && $(GO) run ./cmd/soak $(SOAK_ARGS)

upgrade-check: ## run BASE's ingress and egress (a git ref; default 78974a7) side by side with the checkout's on one Redis and check that nothing is lost, duplicated or misrouted (bench/cmd/upgrade; docs/deployment.md)
	@tmp=$$(mktemp -d -t wsrelay-upgrade-XXXXXX); \
	cleanup() { git worktree remove --force "$$tmp/base" >/dev/null 2>&1 || true; rm -rf "$$tmp"; }; \
	trap cleanup EXIT; trap 'exit 130' INT TERM; \
	rev=$$(git rev-parse --verify --quiet "$(BASE)^{commit}") || { echo "upgrade-check: BASE=$(BASE) is no commit here" >&2; exit 1; }; \
	echo "upgrade-check: building $(BASE) ($${rev:0:10}) in a temporary worktree with its own make build"; \
	git worktree add --detach --quiet "$$tmp/base" "$$rev"; \
	$(MAKE) --no-print-directory -C "$$tmp/base" build BIN="$$tmp/old" >/dev/null; \
	if [ ! -x "$$tmp/old/ingress" ]; then mkdir -p "$$tmp/old"; cp "$$tmp/base/bin/ingress" "$$tmp/base/bin/egress" "$$tmp/old/"; fi; \
	$(MAKE) --no-print-directory build BIN="$$tmp/new" >/dev/null; \
	cd bench && $(GO) run ./cmd/upgrade -old "$$tmp/old" -new "$$tmp/new" \
		-old-name "$(BASE) ($${rev:0:10})" -new-name "$$(git describe --always --dirty)" $(UPGRADE_ARGS)

package: ## static linux/amd64 builds for SCF: $(DIST)/{ingress,egress}.zip (and unzipped in $(DIST)/{ingress,egress}/); LEAN=1 for a lean egress
	@for f in $(FUNCTIONS); do \
		mkdir -p $(DIST)/$$f; \
		tags="$(TAGS_ingress)"; if [ $$f = egress ]; then tags="$(TAGS_egress)"; fi; gcflags=; \
		if [ -n "$(LEAN)" ] && [ $$f = egress ]; then tags="$${tags:+$$tags,}$(LEAN_TAG)"; gcflags="$(LEAN_GCFLAGS)"; fi; \
		CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -tags="$$tags" -gcflags="$$gcflags" -ldflags='-s -w' -o $(DIST)/$$f/$$f ./functions/$$f; \
		install -m 755 functions/$$f/scf_bootstrap $(DIST)/$$f/scf_bootstrap; \
		$(GO) run scripts/mkzip.go -o $(DIST)/$$f.zip $(DIST)/$$f/$$f $(DIST)/$$f/scf_bootstrap; \
		echo "packaged $(DIST)/$$f.zip$${tags:+ ($$tags)}$${gcflags:+ (-gcflags=$$gcflags)}"; \
	done

lint: ## gofmt check, go.mod tidiness, go vet and staticcheck on every module; promtool on the alerting rules and the Grafana dashboard's queries
	@out=$$(gofmt -l $(MODULES) scripts); \
	if [ -n "$$out" ]; then echo "gofmt needed on:" >&2; echo "$$out" >&2; exit 1; fi
	@for m in $(MODULES); do (cd $$m && $(GO) mod tidy -diff) || { echo "go.mod/go.sum of $$m need 'go mod tidy'" >&2; exit 1; }; done
	@for m in $(MODULES); do echo "== vet $$m"; (cd $$m && $(GO) vet ./...); done
	@for m in $(MODULES); do echo "== staticcheck $$m"; (cd $$m && $(GO) run $(STATICCHECK) ./...); done
	@for p in $(LEAN_PKGS); do echo "== vet, staticcheck -tags $(LEAN_TAG) $$p"; (cd $$p && $(GO) vet -tags $(LEAN_TAG) . && $(GO) run $(STATICCHECK) -tags $(LEAN_TAG) .); done
	@scripts/promtool.sh

fuzz: ## run every Fuzz* target of every module for $(FUZZTIME)
	@FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh $(MODULES)

deps: ## install what the tests need (redis-server, chromium, nginx, node) and download modules
	@missing=(); \
	for d in $(APT_DEPS); do \
		cmd=$${d%%:*}; pkg=$${d##*:}; \
		command -v $$cmd >/dev/null || { [ $$cmd = chromium ] && command -v chromium-browser >/dev/null; } || \
			{ [ $$cmd = nginx ] && [ -x /usr/sbin/nginx ]; } || missing+=($${pkg//+/ }); \
	done; \
	if (( $${#missing[@]} )); then \
		echo "== installing $${missing[*]}"; \
		if ! { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${missing[@]}"; }; then \
			echo "deps: FAILED to install $${missing[*]}; the tests need them (chromium for the browser test, nginx for the nginx test, redis-server for the rest, gcc for -race, node for the Node example of docs/security.md, curl and openssl for the shell examples of the docs, systemd for the units' check)" >&2; \
			exit 1; \
		fi; \
	fi; \
	scripts/redis-version.sh
	@for m in $(MODULES); do (cd $$m && $(GO) mod download); done

clean: ## remove build outputs
	rm -rf $(BIN) $(DIST)
