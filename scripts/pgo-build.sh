#!/usr/bin/env bash
# Profile-guided release build of all of keygate's binaries (keygate, noop-authz, keygate-bench,
# demo-upstream), keygate and the no-op alike, into target/pgo/release:
#   1. a release build instrumented to count what runs (target/pgo-instrumented);
#   2. a training run on it: `bench/run.sh --quick --only 1,2,3,4` (Envoy in front of keygate and
#      of the no-op, direct Check and Authorize load, first uses of keys, a wrong-secret flood,
#      revocations between two replicas), each process writing its counts when it exits;
#   3. `llvm-profdata merge` of those counts (target/pgo-profile/merged.profdata);
#   4. the release build again with `-Cprofile-use`, which lays out and inlines by the counts.
# Why: on the per-request path the time goes less to instructions than to fetching code (see
# README, "Profile-guided build"); the counts let the compiler put the code a request runs
# together and move the rest out of its way.
#
# Needs what bench/run.sh needs (envoy, wrk, h2load, valgrind, Postgres; see the README's
# Benchmarks) and an llvm-profdata that reads rustc's profile format (see find_profdata;
# Debian's llvm-19 reads rustc 1.95's and is installed when missing and apt-get can).
#
#   bash scripts/pgo-build.sh    # about 25 minutes on 2 cores: two LTO builds and the training
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE_DIR=$ROOT/target/pgo-profile
log() { echo "[$(date -u +%T)] pgo-build: $*" >&2; }

# LLVM major version of an llvm-profdata binary (0 if it does not say).
profdata_major() {
  "$1" merge --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1 | grep . || echo 0
}
# The toolchain's own llvm-profdata if installed (rustup's llvm-tools: the same LLVM as rustc),
# else the newest of $LLVM_PROFDATA, /usr/lib/llvm-*/bin and PATH. Debian's plain
# `llvm-profdata` may be an old default (bookworm's is LLVM 14, which cannot read rustc
# 1.95's profiles), so versions below 19 do not count.
find_profdata() {
  local host own candidate best="" best_major=0 major
  host=$(rustc -vV | sed -n 's/^host: //p')
  own="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
  if [ -x "$own" ]; then echo "$own"; return; fi
  for candidate in ${LLVM_PROFDATA:-} /usr/lib/llvm-*/bin/llvm-profdata $(command -v llvm-profdata 2>/dev/null); do
    [ -x "$candidate" ] || continue
    major=$(profdata_major "$candidate")
    if [ "$major" -gt "$best_major" ]; then best=$candidate; best_major=$major; fi
  done
  [ "$best_major" -ge 19 ] && echo "$best"
}
PROFDATA=$(find_profdata) || {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "no llvm-profdata of LLVM 19 or later: apt-get install llvm-19"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q llvm-19 >/dev/null
  fi
  PROFDATA=$(find_profdata) || {
    echo "pgo-build: needs llvm-profdata of LLVM 19 or later (apt-get install llvm-19, or rustup component add llvm-tools)" >&2
    exit 1
  }
}
log "llvm-profdata: $PROFDATA (LLVM $(profdata_major "$PROFDATA"); rustc's: $(rustc -vV | sed -n 's/^LLVM version: //p'))"

rm -rf "$PROFILE_DIR"
mkdir -p "$PROFILE_DIR/raw"
log "1/4 instrumented release build (target/pgo-instrumented)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFILE_DIR/raw" \
  cargo build --release --locked --bins --quiet --target-dir target/pgo-instrumented

log "2/4 training: bench/run.sh --quick --only 1,2,3,4 on the instrumented binaries"
bash bench/run.sh --quick --only 1,2,3,4 --bin-dir target/pgo-instrumented/release >"$PROFILE_DIR/training.log" 2>&1 || {
  echo "pgo-build: the training run failed; its output:" >&2
  cat "$PROFILE_DIR/training.log" >&2
  exit 1
}
# Every server must have exited normally (SIGTERM), or its counts are missing.
ls "$PROFILE_DIR"/raw/*.profraw >/dev/null 2>&1 || { echo "pgo-build: the training wrote no profiles" >&2; exit 1; }

log "3/4 merging $(ls "$PROFILE_DIR"/raw/*.profraw | wc -l) profiles"
"$PROFDATA" merge -o "$PROFILE_DIR/merged.profdata" "$PROFILE_DIR"/raw/*.profraw || {
  echo "pgo-build: llvm-profdata could not merge rustc's profiles; it may be older than rustc's LLVM ($(rustc -vV | sed -n 's/^LLVM version: //p'))" >&2
  exit 1
}

log "4/4 release build with the profile (target/pgo/release)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE_DIR/merged.profdata" \
  cargo build --release --locked --bins --quiet --target-dir target/pgo
log "done: target/pgo/release/{keygate,noop-authz,keygate-bench,demo-upstream}"
