#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 and that the `postgres` role logs in
# there without a password, i.e. that postgres://postgres@127.0.0.1:5432/postgres works
# (the DATABASE_URL of the test suite). For test and CI machines (Debian, as root):
# installs the server if missing and may add a trust line to pg_hba.conf.
set -euo pipefail

HOST=127.0.0.1
PORT=5432
URL="postgres://postgres@$HOST:$PORT/postgres"

log() { echo "start-postgres: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ready() { pg_isready -q -h "$HOST" -p "$PORT" >/dev/null 2>&1; }
as_postgres() { runuser -u postgres -- "$@"; }

if ! ready; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  fi
  # The newest installed major version, should there be several.
  version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  if ! ready; then # the package may have started it already
    log "starting cluster $version/main"
    # Fails if the cluster is already starting; the wait below decides.
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 60); do
    ready && break
    sleep 0.5
  done
  ready || die "nothing answers on $HOST:$PORT after 30 s; clusters: $(pg_lsclusters 2>&1)"
fi

# Password-less TCP login for the superuser (the sqlx tests create databases).
if ! psql "$URL" -w -Atqc 'select 1' >/dev/null 2>&1; then
  hba=$(as_postgres psql -Atqc 'show hba_file')
  log "adding 'host all postgres $HOST/32 trust' at the top of $hba"
  sed -i "1i host all postgres $HOST/32 trust # added by keygate scripts/start-postgres.sh" "$hba"
  as_postgres psql -Atqc 'select pg_reload_conf()' >/dev/null
  psql "$URL" -w -Atqc 'select 1' >/dev/null || die "cannot log in as $URL"
fi
log "ready: $URL ($(psql "$URL" -w -Atqc 'show server_version'))"
