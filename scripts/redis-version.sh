#!/usr/bin/env bash
# Fails, saying why, when the redis-server on PATH is older than 7.0: the
# egress needs sharded Pub/Sub (SSUBSCRIBE, Redis 7.0+), and an older one
# would make the tests and `make run` fail later and less clearly.
set -euo pipefail
v=$(redis-server --version | sed -n 's/.* v=\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')
read -r major minor <<<"${v:-0 0}"
if (( major < 7 )); then
	echo "redis-server ${major}.${minor} is on PATH ($(command -v redis-server)); wsrelay needs Redis 7.0 or newer (sharded Pub/Sub). Install a newer one (e.g. from packages.redis.io) or put it first on PATH." >&2
	exit 1
fi
