#!/usr/bin/env bash
# Runs every Fuzz* target of the given modules for $FUZZTIME (default 3s).
# Go fuzzes one target of one package per run, so the targets are listed
# with `go test -list` in each package that declares one.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-3s}
count=0
failed=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# fuzz_one fuzzes target $2 of package dir $1. A real finding writes a
# reproducer ("Failing input written to testdata/fuzz/…") and fails. The Go
# fuzzer also fails now and then without a finding when -fuzztime ends
# while a worker is busy (golang/go#51484; frequent on a loaded 2-core
# machine): that gets one more run, and fails only if it happens again.
fuzz_one() {
	local try
	for try in 1 2; do
		if (cd "$1" && "$GO" test -run '^$' -fuzz "^$2\$" -fuzztime "$FUZZTIME" .) 2>&1 | tee "$log"; then
			return 0
		fi
		if grep -q 'Failing input written to' "$log"; then return 1; fi
		[[ $try == 1 ]] && echo "== fuzz $1 $2: failed without a failing input (fuzzer deadline flake?); once more"
	done
	return 1
}
for m in "$@"; do
	# Only packages with a Fuzz function in a _test.go file: listing every
	# package would compile every test binary once more.
	mapfile -t dirs < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Z0-9_]' "$m" | xargs -r -n1 dirname | sort -u)
	for d in "${dirs[@]}"; do
		# Listed apart from the grep: a package that does not build lists
		# nothing, and its targets would be left out with a pass.
		if ! list=$(cd "$d" && "$GO" test -list '^Fuzz' .); then
			printf '%s\n' "$list"
			echo "== fuzz $d: go test -list failed (above)"
			failed+=("$d (go test -list)")
			continue
		fi
		mapfile -t targets < <(grep '^Fuzz' <<<"$list" || true)
		for f in "${targets[@]}"; do
			echo "== fuzz $d $f ($FUZZTIME)"
			fuzz_one "$d" "$f" || failed+=("$d $f")
			count=$((count + 1))
		done
	done
done
echo "fuzz: $count targets run"
if ((${#failed[@]})); then
	# A failing input is saved under the package's testdata/fuzz/; plain
	# `go test` replays it from then on.
	printf 'FAILED: fuzz %s\n' "${failed[@]}" >&2
	exit 1
fi
