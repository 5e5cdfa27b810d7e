#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server for tests and local trials of the cluster setup.
#
#   scripts/start_postgres.sh start PORT [PASSWORD]  -> prints DIR, then the URLs (last lines)
#   scripts/start_postgres.sh stop DIR
#   scripts/start_postgres.sh createdb DIR PORT NAME   -> a fresh database NAME owned by `sweep`
#
# Runs initdb + pg_ctl as the `postgres` user (PostgreSQL refuses root) in a fresh folder under
# /tmp, listening on 127.0.0.1:PORT only; creates role `sweep` (password PASSWORD, default
# sweep-test-pw) owning databases `optuna` and `mlflow`. No systemd needed; about 2 s.
set -euo pipefail
cmd="${1:?usage: start PORT [PASSWORD] | stop DIR | createdb DIR PORT NAME}"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -x "$BIN/initdb" ] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 3; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "$cmd" = stop ]; then
  dir="${2:?stop DIR}"
  as_pg "$BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi

if [ "$cmd" = createdb ]; then
  dir="${2:?createdb DIR PORT NAME}" port="${3:?createdb DIR PORT NAME}" name="${4:?createdb DIR PORT NAME}"
  as_pg psql -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE $name OWNER sweep"
  exit 0
fi

port="${2:?start PORT}"
password="${3:-sweep-test-pw}"
dir="$(mktemp -d /tmp/sweep-pg.XXXXXX)"
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
as_pg "$BIN/initdb" --no-sync --auth-local=trust --auth-host=scram-sha-256 -U postgres -D "$dir/data" >"$dir/initdb.log" 2>&1
as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null
psql_() { as_pg psql -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 -q "$@"; }
psql_ -c "CREATE ROLE sweep LOGIN PASSWORD '$password'"
psql_ -c "CREATE DATABASE optuna OWNER sweep"
psql_ -c "CREATE DATABASE mlflow OWNER sweep"
echo "$dir"
echo "postgresql://sweep:$password@127.0.0.1:$port/optuna"
echo "postgresql://sweep:$password@127.0.0.1:$port/mlflow"
