#!/bin/bash
# scripts/engines.sh COMMAND...: run COMMAND with a private PostgreSQL and a private Redis of its own, as the
# scale-out deployment uses them (DATABASE_URL, PORTAL_REDIS_URL set), then stop both and remove their data.
# Both listen on loopback only, on ports of their own (ENGINES_PG_PORT, ENGINES_REDIS_PORT), with a random
# password; the host's own instances, if any, are not touched. Needs root (PostgreSQL runs as `postgres`).
set -euo pipefail

pg_port=${ENGINES_PG_PORT:-55432}
redis_port=${ENGINES_REDIS_PORT:-56379}
say() { printf '[engines] %s\n' "$*"; }

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pg_bin/initdb" ] || { echo "engines.sh: PostgreSQL is not installed (make host-test installs it)" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "engines.sh: redis-server is not installed (make host-test installs it)" >&2; exit 1; }

dir=$(mktemp -d /tmp/portal-engines.XXXXXX)
chmod 755 "$dir"
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
redis_pid=""

stop() {
    [ -z "$redis_pid" ] || kill "$redis_pid" 2>/dev/null || true
    [ -z "$redis_pid" ] || wait "$redis_pid" 2>/dev/null || true
    if [ -f "$dir/pg/postmaster.pid" ]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$dir"
}
trap stop EXIT

install -d -o postgres -g postgres -m 700 "$dir/pg" "$dir/sock" "$dir/log"
printf '%s\n' "$password" >"$dir/pwfile" && chown postgres "$dir/pwfile" && chmod 600 "$dir/pwfile"
runuser -u postgres -- "$pg_bin/initdb" -D "$dir/pg" -U portal --pwfile="$dir/pwfile" --auth=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
rm -f "$dir/pwfile"
# A throwaway cluster: durability off, for speed; the tests need its locking and isolation, not its disks.
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg" -l "$dir/log/postgresql.log" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -p $pg_port -k $dir/sock -c fsync=off -c synchronous_commit=off \
     -c full_page_writes=off -c max_connections=200" >/dev/null \
    || { cat "$dir/log/postgresql.log" >&2; exit 1; }
say "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port"

printf 'bind 127.0.0.1\nport %s\nrequirepass %s\nsave ""\nappendonly no\ndir %s\n' \
    "$redis_port" "$password" "$dir" >"$dir/redis.conf"
redis-server "$dir/redis.conf" >"$dir/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do
    REDISCLI_AUTH="$password" redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
    kill -0 "$redis_pid" 2>/dev/null || { cat "$dir/redis.log" >&2; exit 1; }
    sleep 0.1
done
REDISCLI_AUTH="$password" redis-cli -p "$redis_port" ping | grep -q PONG || { echo "engines.sh: Redis did not answer" >&2; exit 1; }
say "Redis $(redis-server --version | awk '{print $3}' | tr -d 'v=') on 127.0.0.1:$redis_port"

export DATABASE_URL="postgres://portal:$password@127.0.0.1:$pg_port/portal"
export PORTAL_REDIS_URL="redis://:$password@127.0.0.1:$redis_port/0"
"$@"
