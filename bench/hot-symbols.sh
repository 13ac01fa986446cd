#!/usr/bin/env bash
# Writes bench/hot-symbols.txt: the functions of the release binaries that a cached allow runs,
# hottest first, which build.rs hands to the linker so that they sit next to each other in
# .text (see build.rs, `hot_symbols`). Profiles keygate and the no-op server under direct Check
# load with one call in flight (perf, cpu-clock) and lists the mangled names sampled in each
# binary: keygate's first, then the no-op's that keygate's list lacks, so both binaries get
# their hot path ordered. Re-run it after a dependency upgrade (the names carry hashes; names
# that no longer exist are skipped at link time, so a stale list costs speed, not the build).
# Needs perf (Debian: linux-perf). Not part of CI.
#
#   bash bench/hot-symbols.sh   # then: cargo build --release --bins
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "hot-symbols.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release --locked --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export KEYGATE_BENCH_PASSWORD="hot-symbols-$RANDOM-$RANDOM"

# profile NAME PID PORT KEY: 4 s of one-call-at-a-time Check load, sampled.
profile() {
  "$BIN/keygate-bench" --threads 1 load --addr "127.0.0.1:$3" --rpc check --key "$4" \
    --connections 1 --concurrency 1 --duration-secs 1 --label warm-up >/dev/null
  perf record -q -e cpu-clock -F 20000 -p "$2" -o "$WORK/$1.data" -- sleep 4 2>/dev/null &
  local recorder=$!
  "$BIN/keygate-bench" --threads 1 load --addr "127.0.0.1:$3" --rpc check --key "$4" \
    --connections 1 --concurrency 1 --duration-secs 4 --label "$1" >&2
  wait "$recorder"
  # Mangled names, by samples, of the binary's own functions only (not libc's or the kernel's).
  perf report -i "$WORK/$1.data" --no-demangle --no-children --sort dso,sym --stdio 2>/dev/null |
    awk -v dso="$1" '$0 !~ /^#/ && $2 == dso && $3 == "[.]" && $4 !~ /^0x/ {print $4}'
}

main=$(free_port); admin=$(free_port); metrics=$(free_port)
KEYGATE_DATABASE_URL="sqlite://$WORK/keygate.db" KEYGATE_LISTEN="127.0.0.1:$main" \
  KEYGATE_ADMIN_LISTEN="127.0.0.1:$admin" KEYGATE_METRICS_LISTEN="127.0.0.1:$metrics" \
  KEYGATE_ADMIN_USER=admin KEYGATE_ADMIN_PASSWORD="$KEYGATE_BENCH_PASSWORD" RUST_LOG=warn \
  "$BIN/keygate" serve 2>"$WORK/keygate.log" &
PIDS+=("$!"); keygate=$!
"$BIN/keygate-bench" wait-serving --addr "127.0.0.1:$main" >/dev/null
key=$("$BIN/keygate-bench" create-key --admin-addr "127.0.0.1:$admin" --name hot-symbols)
noop_port=$(free_port)
"$BIN/noop-authz" --listen "127.0.0.1:$noop_port" 2>"$WORK/noop.log" &
PIDS+=("$!"); noop=$!
"$BIN/keygate-bench" wait-serving --addr "127.0.0.1:$noop_port" >/dev/null

profile keygate "$keygate" "$main" "$key" >"$WORK/keygate.txt"
profile noop-authz "$noop" "$noop_port" "$key" >"$WORK/noop.txt"
[ -s "$WORK/keygate.txt" ] || { echo "hot-symbols.sh: no samples in keygate" >&2; exit 1; }
{ cat "$WORK/keygate.txt"; grep -vxF -f "$WORK/keygate.txt" "$WORK/noop.txt" || true; } >bench/hot-symbols.txt
echo "hot-symbols.sh: bench/hot-symbols.txt: $(wc -l <bench/hot-symbols.txt) functions ($(wc -l <"$WORK/keygate.txt") from keygate)" >&2
