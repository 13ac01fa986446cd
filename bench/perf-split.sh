#!/usr/bin/env bash
# Where the servers' CPU time goes during scenario 1's unloaded runs: samples by library (kernel,
# libc, the server's own binary) and, within the binary, by crate, for keygate and the two
# no-op servers side by side. A diagnostic beside bench/run.sh, not one of its results.
#
#   bash bench/perf-split.sh        # runs `bench/run.sh --quick --only 1 --no-build` meanwhile
#
# Needs: what bench/run.sh needs, a release build (bench/run.sh makes one), and perf (Debian
# package linux-perf); cpu-clock sampling, so it works without hardware counters. All three
# servers serve the same requests (the probe alternates between their Envoys), so their sample
# counts compare directly.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf-split.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }

OUT=$(mktemp -d "${TMPDIR:-/tmp}/keygate-perf.XXXXXX")
SAMPLE_SECS=${PERF_SAMPLE_SECS:-20}

sample() {
  local i pid kg noop mimic
  # Wait (at most 5 minutes) for the block-alternating probe: the servers are up and loaded.
  for i in $(seq 1 1500); do
    pgrep -f "keygate-bench alternate .*--block 50" >/dev/null && break
    sleep 0.2
  done
  # The newest of each: scenario 1 starts its own set of servers (bench/run.sh start_chains)
  # after the ones the other scenarios use. The newest plain no-op is the twin, which serves
  # as many of the probe's requests as the no-op.
  kg=$(pgrep -nf "target/release/keygate serve")
  mimic=$(pgrep -nf "noop-authz --listen .*--answer keygate")
  noop=$(pgrep -f "noop-authz --listen" | grep -vx "$mimic" | sort -n | tail -1)
  for pid in "kg:$kg" "noop:$noop" "mimic:$mimic"; do
    perf record -q -e cpu-clock -F 10000 -p "${pid#*:}" -o "$OUT/${pid%%:*}.data" \
      -- sleep "$SAMPLE_SECS" 2>>"$OUT/perf.log" &
  done
  wait
}

sample &
SAMPLER=$!
bash bench/run.sh --quick --only 1 --no-build >"$OUT/run.log" 2>&1
wait "$SAMPLER"

report() {
  local name=$1 binary=$2
  echo "== $name"
  perf report -i "$OUT/$name.data" --no-children --sort dso -n -q 2>/dev/null |
    awk 'NF >= 3 { printf "   %-20s %7s samples\n", $3, $2 }' | head -5
  perf report -i "$OUT/$name.data" --no-children --dsos "$binary" --sort sym -n -q 2>/dev/null |
    python3 -c '
import collections, re, sys
crates = collections.Counter()
for line in sys.stdin:
    fields = line.split(None, 3)
    if len(fields) < 4 or not fields[1].isdigit():
        continue
    crate = re.match(r"[<&\s]*([A-Za-z_0-9]+)", fields[3])
    crates[crate.group(1) if crate else "?"] += int(fields[1])
print("   in the binary, by crate:", ", ".join(f"{c} {n}" for c, n in crates.most_common(10)))
'
}
report kg keygate
report noop noop-authz
report mimic noop-authz
echo "(perf data and the bench log: $OUT)"
