#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests: a fresh initdb in a temp dir, on
# 127.0.0.1 at a free port, trust auth, fsync off, with a database `wham_test`
# owned by the superuser `postgres`.
#
#   scripts/pg-cluster.sh run CMD [ARG...]  start a cluster, run CMD with the
#                                           variables below set, always stop and
#                                           delete the cluster; exits with CMD's code
#   scripts/pg-cluster.sh start             start one and print `export` lines for
#                                           eval (the cluster keeps running)
#   scripts/pg-cluster.sh stop DIR          stop the cluster in DIR (PG_CLUSTER_DIR)
#                                           and delete DIR
#
# Exported to CMD / printed by start:
#   WHAM_TEST_POSTGRES_URL     postgresql+psycopg://postgres@127.0.0.1:PORT/wham_test
#   WHAM_TEST_POSTGRES_BINDIR  the server's bin dir (initdb, pg_ctl, psql, ...)
#   PG_CLUSTER_DIR             the temp dir holding data dir, socket and server log
#
# Needs a PostgreSQL server under /usr/lib/postgresql/*/bin (scripts/setup.sh
# --with-postgres installs it). PostgreSQL refuses to run as root: as root the
# server runs as the `postgres` system user (or a dedicated `openwham-pg` user
# created when there is none).
# Sourcing this file only defines pg_cluster_start / pg_cluster_stop.

# shellcheck source=scripts/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

PG_CLUSTER_DIR=""
PG_CLUSTER_PORT=""
PG_CLUSTER_OS_USER=""
PG_CLUSTER_MARKER=".openwham-pg-cluster"

# Run a PostgreSQL binary as the cluster's OS user, from inside the cluster dir
# (that user may not be able to enter the caller's cwd).
_pg_as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$PG_CLUSTER_DIR" && runuser -u "$PG_CLUSTER_OS_USER" -- "$@")
    else
        (cd "$PG_CLUSTER_DIR" && "$@")
    fi
}

_pg_free_port() {
    local py
    py="$WHAM_VENV/bin/python"
    [ -x "$py" ] || py="$(wham_find_python)" || return 1
    "$py" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# pg_cluster_start: start a cluster and export the variables listed above.
pg_cluster_start() {
    local bindir tmpbase attempt opts
    bindir="$(wham_find_pg_bindir)" ||
        wham_die "no PostgreSQL server in /usr/lib/postgresql (run scripts/setup.sh --with-postgres)"

    if [ "$(id -u)" -eq 0 ]; then
        if id -u postgres >/dev/null 2>&1; then
            PG_CLUSTER_OS_USER=postgres
        else
            id -u openwham-pg >/dev/null 2>&1 ||
                useradd --system --no-create-home --home-dir /nonexistent \
                    --shell /usr/sbin/nologin openwham-pg
            PG_CLUSTER_OS_USER=openwham-pg
        fi
    else
        PG_CLUSTER_OS_USER="$(id -un)"
    fi

    tmpbase="${TMPDIR:-/tmp}"
    case "$tmpbase" in *[[:space:]]*) tmpbase=/tmp ;; esac
    PG_CLUSTER_DIR="$(mktemp -d "$tmpbase/openwham-pg.XXXXXX")"
    touch "$PG_CLUSTER_DIR/$PG_CLUSTER_MARKER"
    if [ "$(id -u)" -eq 0 ]; then
        chown -R "$PG_CLUSTER_OS_USER:" "$PG_CLUSTER_DIR"
        # TMPDIR may be somewhere the server's user cannot reach: use /tmp.
        if ! runuser -u "$PG_CLUSTER_OS_USER" -- test -w "$PG_CLUSTER_DIR"; then
            rm -rf "$PG_CLUSTER_DIR"
            PG_CLUSTER_DIR="$(mktemp -d /tmp/openwham-pg.XXXXXX)"
            touch "$PG_CLUSTER_DIR/$PG_CLUSTER_MARKER"
            chown -R "$PG_CLUSTER_OS_USER:" "$PG_CLUSTER_DIR"
        fi
    fi
    chmod 700 "$PG_CLUSTER_DIR"

    if ! _pg_as_owner "$bindir/initdb" --pgdata="$PG_CLUSTER_DIR/data" --username=postgres \
        --auth=trust --encoding=UTF8 --locale=C --no-sync \
        >"$PG_CLUSTER_DIR/initdb.log" 2>&1; then
        cat "$PG_CLUSTER_DIR/initdb.log" >&2
        wham_die "initdb failed (cluster dir $PG_CLUSTER_DIR)"
    fi

    # Server options; pg_ctl hands them to /bin/sh on one line (no newlines).
    opts="-c listen_addresses=127.0.0.1 -k $PG_CLUSTER_DIR -c fsync=off"
    opts+=" -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"

    # The port is picked free but could be taken before the server binds it:
    # retry a few times.
    for attempt in 1 2 3 4 5; do
        PG_CLUSTER_PORT="$(_pg_free_port)" || wham_die "cannot pick a free port (no python3?)"
        if _pg_as_owner "$bindir/pg_ctl" start --pgdata="$PG_CLUSTER_DIR/data" \
            --log="$PG_CLUSTER_DIR/postgres.log" --wait --timeout=60 --silent \
            -o "$opts -p $PG_CLUSTER_PORT" >/dev/null 2>&1; then
            break
        fi
        if [ "$attempt" = 5 ]; then
            tail -n 30 "$PG_CLUSTER_DIR/postgres.log" >&2 || true
            wham_die "PostgreSQL did not start (cluster dir $PG_CLUSTER_DIR)"
        fi
    done

    if ! "$bindir/createdb" --host=127.0.0.1 --port="$PG_CLUSTER_PORT" --username=postgres \
        --no-password wham_test </dev/null; then
        wham_die "createdb wham_test failed (cluster dir $PG_CLUSTER_DIR)"
    fi

    export PG_CLUSTER_DIR
    export WHAM_TEST_POSTGRES_BINDIR="$bindir"
    export WHAM_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_CLUSTER_PORT/wham_test"
}

# pg_cluster_stop [DIR]: stop the cluster (DIR or the one this shell started)
# and delete its dir. Safe to call more than once and after a failed start.
pg_cluster_stop() {
    local dir="${1:-$PG_CLUSTER_DIR}" bindir pid
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    if [ ! -e "$dir/$PG_CLUSTER_MARKER" ]; then
        wham_log "pg-cluster: $dir is not a cluster dir made by pg-cluster.sh; not touching it"
        return 1
    fi
    PG_CLUSTER_DIR="$dir"
    [ -n "$PG_CLUSTER_OS_USER" ] || PG_CLUSTER_OS_USER="$(stat -c %U "$dir")"
    if [ -f "$dir/data/postmaster.pid" ]; then
        bindir="$(wham_find_pg_bindir || true)"
        if [ -n "$bindir" ]; then
            _pg_as_owner "$bindir/pg_ctl" stop --pgdata="$dir/data" --mode=fast --wait \
                --timeout=30 --silent >/dev/null 2>&1 ||
                _pg_as_owner "$bindir/pg_ctl" stop --pgdata="$dir/data" --mode=immediate \
                    --wait --timeout=30 --silent >/dev/null 2>&1 || true
        fi
        # Last resort: the postmaster's pid is the first line of postmaster.pid.
        pid="$(head -n1 "$dir/data/postmaster.pid" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -rf -- "$dir"
    PG_CLUSTER_DIR=""
}

# --- command line ------------------------------------------------------------
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        start)
            trap 'pg_cluster_stop' EXIT # only if starting fails
            pg_cluster_start
            trap - EXIT
            printf 'export PG_CLUSTER_DIR=%q\n' "$PG_CLUSTER_DIR"
            printf 'export WHAM_TEST_POSTGRES_BINDIR=%q\n' "$WHAM_TEST_POSTGRES_BINDIR"
            printf 'export WHAM_TEST_POSTGRES_URL=%q\n' "$WHAM_TEST_POSTGRES_URL"
            ;;
        stop)
            [ -n "${2:-}" ] || wham_die "usage: $0 stop DIR"
            pg_cluster_stop "$2"
            ;;
        run)
            shift
            [ "$#" -gt 0 ] || wham_die "usage: $0 run CMD [ARG...]"
            trap 'pg_cluster_stop' EXIT
            trap 'exit 130' INT
            trap 'exit 143' TERM
            pg_cluster_start
            rc=0
            "$@" || rc=$?
            exit "$rc"
            ;;
        *)
            sed -n '2,/^# Sourcing/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
            exit 2
            ;;
    esac
fi
