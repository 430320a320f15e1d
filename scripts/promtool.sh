#!/usr/bin/env bash
# Checks and unit-tests the Prometheus alerting rules (deploy/prometheus)
# with promtool, Prometheus's own rule checker: `check rules` parses
# every expression and template as Prometheus loads them, `test rules`
# runs wsrelay-alerts.test.yml (docs/metrics.md); the Grafana dashboard's
# queries (deploy/grafana), turned into recording rules by
# scripts/dashrules.go, are parsed the same way.
#
# promtool is the one on PATH, else bin/tools/promtool, else it is taken
# from Debian's prometheus package: downloaded and unpacked, not
# installed, so that no Prometheus service is set up or started.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
	promtool=bin/tools/promtool
	if [ ! -x "$promtool" ]; then
		if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
			echo "promtool.sh: no promtool on PATH and no apt-get to fetch it: install Prometheus's promtool (https://prometheus.io/download/) or put it in bin/tools" >&2
			exit 1
		fi
		tmp=$(mktemp -d)
		trap 'rm -rf "$tmp"' EXIT
		echo "== fetching promtool (Debian's prometheus package, unpacked into bin/tools)"
		if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
			# No package lists yet (a fresh machine): fetch them once.
			$SUDO apt-get update >/dev/null
			(cd "$tmp" && apt-get download prometheus >/dev/null)
		fi
		dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
		mkdir -p bin/tools
		cp "$tmp/x/usr/bin/promtool" "$promtool"
	fi
fi
echo "== promtool check rules, test rules (deploy/prometheus)"
"$promtool" check rules deploy/prometheus/wsrelay-alerts.yml
"$promtool" test rules deploy/prometheus/wsrelay-alerts.test.yml
echo "== promtool check rules (the queries of deploy/grafana/wsrelay-dashboard.json)"
dash=$(mktemp -d)
trap 'rm -rf "$dash" "${tmp:-}"' EXIT
${GO:-go} run scripts/dashrules.go deploy/grafana/wsrelay-dashboard.json > "$dash/dashboard-rules.yml"
"$promtool" check rules "$dash/dashboard-rules.yml"
