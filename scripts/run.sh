#!/usr/bin/env bash
# `make run`: both functions on this machine, ready for the demo page.
#
# Without REDIS_URL it starts a throwaway redis-server (installed with apt
# if missing) on a free port, without persistence, in a temp dir. Ingress
# listens on $INGRESS_PORT (8080), egress on $EGRESS_PORT (8081). Anonymous
# access is on: this is for trying it out, not for production. Ctrl-C or
# a SIGTERM stops everything this script started, the build included.
set -euo pipefail
cd "$(dirname "$0")/.."

INGRESS_PORT=${INGRESS_PORT:-8080}
EGRESS_PORT=${EGRESS_PORT:-8081}
GO=${GO:-go}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/wsrelay-run.XXXXXX")
pids=()
build="" # the build's process group while it runs
cleanup() {
	trap - INT TERM EXIT
	if [[ -n $build ]]; then
		kill -TERM -- "-$build" 2>/dev/null || true
		kill -CONT -- "-$build" 2>/dev/null || true # should it have been stopped
		wait "$build" 2>/dev/null || true # make, once go has stopped writing to $tmp
	fi
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo; echo "stopping…"; exit 0' INT TERM

# port_open reports whether something accepts TCP on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for waits up to 15 s for $2 (a command) to succeed, naming $1, and
# gives up at once when a process started here has exited: a function
# that refused its configuration has printed why above.
wait_for() {
	local what=$1 pid
	shift
	for _ in $(seq 150); do
		if "$@"; then return 0; fi
		for pid in "${pids[@]}"; do
			if ! kill -0 "$pid" 2>/dev/null; then
				echo "run: $what did not come up: a process exited (its error is above)" >&2
				exit 1
			fi
		done
		sleep 0.1
	done
	echo "run: $what did not come up within 15 s" >&2
	exit 1
}

for p in "$INGRESS_PORT" "$EGRESS_PORT"; do
	if port_open "$p"; then
		echo "run: port $p is taken; set INGRESS_PORT / EGRESS_PORT" >&2
		exit 1
	fi
done

if [[ -z "${REDIS_URL:-}" ]]; then
	if ! command -v redis-server >/dev/null; then
		echo "== installing redis-server"
		sudo=""
		[[ $(id -u) -ne 0 ]] && sudo=sudo
		if ! { $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }; then
			echo "run: could not install redis-server (apt-get failed, above); install Redis 7 or later yourself, or set REDIS_URL to one that runs" >&2
			exit 1
		fi
	fi
	"$(dirname "$0")/redis-version.sh"
	# A port below the kernel's ephemeral range (32768 up by default),
	# which outgoing connections take: one of those could be taken
	# between the check and redis-server's bind.
	eph_low=32768
	if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
		read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range
	fi
	lo=20000 span=12000
	if ((eph_low - 1024 >= 2000)); then
		lo=$((eph_low - 12000 > 1024 ? eph_low - 12000 : 1024))
		span=$((eph_low - lo))
	fi
	# Up to three ports: another program can bind the one picked between
	# the check and redis-server's own bind. Ready means this redis-server
	# said so in its log while still running, not that the port answers,
	# which a foreign server on it would too.
	redis_port=""
	for _ in 1 2 3; do
		p=""
		for _ in $(seq 50); do
			p=$((lo + RANDOM % span))
			if ! port_open "$p"; then break; fi
			p=""
		done
		[[ -n "$p" ]] || { echo "run: no free port for Redis" >&2; exit 1; }
		redis-server --bind 127.0.0.1 --port "$p" --save '' --appendonly no \
			--dir "$tmp" --daemonize no >"$tmp/redis.log" 2>&1 &
		redis_pid=$!
		pids=("$redis_pid") # the first process started here
		for _ in $(seq 150); do
			if ! kill -0 "$redis_pid" 2>/dev/null; then break; fi
			if grep -q 'Ready to accept connections' "$tmp/redis.log"; then redis_port=$p; break; fi
			sleep 0.1
		done
		if [[ -n "$redis_port" ]]; then break; fi
		kill "$redis_pid" 2>/dev/null || true
		wait "$redis_pid" 2>/dev/null || true
		pids=()
		if ! grep -q 'Address already in use' "$tmp/redis.log"; then
			echo "run: redis-server did not start within 15 s; its log ends:" >&2
			tail -n 20 "$tmp/redis.log" >&2 || true
			exit 1
		fi
	done
	[[ -n "$redis_port" ]] || { echo "run: redis-server found its port taken three times; its log ends:" >&2; tail -n 20 "$tmp/redis.log" >&2 || true; exit 1; }
	export REDIS_URL="redis://127.0.0.1:$redis_port/0"
	echo "== throwaway Redis at $REDIS_URL (no persistence)"
else
	echo "== using REDIS_URL from the environment"
fi

echo "== building"
# The way make build builds them (with each function's build tags). In
# the background, waited for, so that a SIGTERM to this script (or to
# make, which passes it on) is acted on at once: bash runs a trap only
# when the command in the foreground has ended, and a first build takes
# minutes on a cold cache. In a process group of its own (set -m), which
# cleanup ends whole, go's compilers included, on SIGTERM and on Ctrl-C
# alike (the terminal's SIGINT does not reach that group). That group
# never touches the terminal, which would stop it (SIGTTIN, and SIGTTOU
# under `stty tostop`): no stdin, and its errors (and go's "downloading"
# lines) reach the terminal through a cat of this script's own group.
exec 3> >(trap '' INT; exec cat >&2)
set -m
make --no-print-directory build BIN="$tmp/bin" GO="$GO" </dev/null >/dev/null 2>&3 &
build=$!
set +m
exec 3>&-
wait "$build"
build=""

export ALLOW_ANONYMOUS=${ALLOW_ANONYMOUS:-true}
export LOG_FORMAT=${LOG_FORMAT:-text}
export ALLOWED_ORIGINS=${ALLOWED_ORIGINS:-http://localhost:$EGRESS_PORT,http://127.0.0.1:$EGRESS_PORT}
export INGRESS_URL=${INGRESS_URL:-http://localhost:$INGRESS_PORT}

# The sed that prefixes each function's lines ignores Ctrl-C and ends when
# the function closes its output: killed with the rest of the terminal's
# process group, it would take the function's last log lines with it, and
# the function's next write would kill it (SIGPIPE) in the middle of its
# graceful stop.
PORT=$INGRESS_PORT "$tmp/bin/ingress" > >(trap '' INT; exec sed -u 's/^/[ingress] /') 2>&1 &
pids+=($!)
PORT=$EGRESS_PORT "$tmp/bin/egress" > >(trap '' INT; exec sed -u 's/^/[egress]  /') 2>&1 &
pids+=($!)
wait_for "ingress" port_open "$INGRESS_PORT"
wait_for "egress" port_open "$EGRESS_PORT"

# The one-liner runs in the demo page, so it takes the egress's address
# from the page: the one the browser uses, which is not localhost for a
# browser on another machine (ALLOWED_ORIGINS and INGRESS_URL exported).
cat <<MSG

wsrelay is running (Ctrl-C stops it).

  ingress  http://localhost:$INGRESS_PORT   (publish: POST /v1/channels/{channel}/messages)
  egress   ws://localhost:$EGRESS_PORT/ws   (WebSocket)
  demo     http://localhost:$EGRESS_PORT/   (open in a browser: subscribe, publish, watch)

Subscribe from a browser console on the demo page:

  ws = new WebSocket("ws://" + location.host + "/ws"); ws.onmessage = e => console.log(e.data); ws.onopen = () => ws.send(JSON.stringify({type: "subscribe", channel: "demo"}))

Publish from a shell:

  curl -sS -X POST http://localhost:$INGRESS_PORT/v1/channels/demo/messages -H 'Content-Type: application/json' -d '{"data": {"text": "hello"}}'

MSG
# The commands above are for anonymous mode, make run's default; the
# functions read the variable with Go's strconv.ParseBool.
case $ALLOW_ANONYMOUS in
1 | t | T | true | TRUE | True) ;;
*)
  cat <<MSG
ALLOW_ANONYMOUS=$ALLOW_ANONYMOUS in your environment: the two commands above need a
credential. Add -H 'Authorization: Bearer <API key or token>' to the curl and
?token=<token> to the WebSocket URL (docs/security.md).

MSG
  ;;
esac

# Stop everything as soon as either function exits: cleanly (status 0)
# after a signal, or on an error (its log is above).
status=0
wait -n "${pids[@]}" || status=$?
if ((status != 0)); then echo "run: a process exited with status $status; stopping" >&2; fi
exit "$status"
