#!/usr/bin/env bash
# openwham setup: installs whatever is missing to run (and, with flags, to test)
# openwham on a Debian 12 machine, and does nothing when everything is there.
#
#   scripts/setup.sh [--with-postgres] [--quiet]
#
#   (no flag)        system packages git, ca-certificates, bubblewrap, libseccomp2, curl,
#                    iproute2, util-linux (setpriv, unshare, prlimit, mount),
#                    python3 (>= 3.11) + python3-venv if needed,
#                    npm for the pinned Codex CLI; uv; the project's .venv
#                    (`uv sync --frozen`, dev tools included)
#   --with-postgres  also a PostgreSQL server (Debian's `postgresql`) unless
#                    /usr/lib/postgresql/*/bin/initdb already exists, and
#                    Codex CLI 0.151.0 for the compatibility tests
#                    (tools/codex-cloud/package-lock.json), and Debian's
#                    `chromium` for the web UI's browser tests, `tmux`
#                    for the Codex TUI's tests, and `wrk` for bench/load;
#                    scripts/test uses it
#   --quiet          no progress lines (errors are still reported)
#
# Idempotent and fast when nothing is missing (it then prints nothing).
# Progress goes to stderr; the output of apt-get/pip/uv goes to
# $WHAM_TOOLS_DIR/setup.log and its tail is shown if a step fails.
# Tools it installs itself (uv) live in
# ${XDG_DATA_HOME:-$HOME/.local/share}/openwham/tools/bin; the other scripts
# put that on PATH through wham_path_setup in scripts/lib.sh.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

WITH_POSTGRES=0
QUIET=0
for arg in "$@"; do
    case "$arg" in
        --with-postgres) WITH_POSTGRES=1 ;;
        --quiet | -q) QUIET=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) wham_die "setup.sh: unknown option: $arg (see --help)" ;;
    esac
done

cd "$WHAM_ROOT"
wham_path_setup

SETUP_LOG="$WHAM_TOOLS_DIR/setup.log"
LOG_STARTED=0

progress() {
    [ "$QUIET" = 1 ] || wham_log "setup: $*"
}

# Run a command with its output appended to the setup log; on failure show the
# log's tail and stop.
run_logged() {
    if [ "$LOG_STARTED" = 0 ]; then
        mkdir -p "$WHAM_TOOLS_DIR"
        : >"$SETUP_LOG"
        LOG_STARTED=1
    fi
    printf '\n+ %s\n' "$*" >>"$SETUP_LOG"
    if ! "$@" </dev/null >>"$SETUP_LOG" 2>&1; then
        tail -n 40 "$SETUP_LOG" >&2 || true
        wham_die "setup: command failed: $* (full log: $SETUP_LOG)"
    fi
}

# ---------------------------------------------------------------------------
# System packages (Debian's apt)
# ---------------------------------------------------------------------------
APT_UPDATED=0
SUDO=()

apt_pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# ensure_apt_packages PKG...: install those of the named Debian packages that
# are not installed yet (one `apt-get update` per run, only if needed).
ensure_apt_packages() {
    local missing=() pkg
    command -v dpkg-query >/dev/null 2>&1 ||
        wham_die "setup: missing system packages ($*) and no apt/dpkg here: install them by hand"
    for pkg in "$@"; do
        apt_pkg_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            wham_die "setup: missing system packages: ${missing[*]} (run as root, or install them: apt-get install ${missing[*]})"
        fi
    fi
    local apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
        -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    if [ "$APT_UPDATED" = 0 ]; then
        progress "apt-get update"
        run_logged "${apt[@]}" update
        APT_UPDATED=1
    fi
    progress "installing system packages: ${missing[*]}"
    run_logged "${apt[@]}" install --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}

WANTED_PKGS=()
# want_cmd CMD PKG...: want the packages when command CMD is not on PATH.
want_cmd() {
    local cmd="$1"
    shift
    command -v "$cmd" >/dev/null 2>&1 || WANTED_PKGS+=("$@")
}

VENV_PY="$WHAM_VENV/bin/python"
SYNC_STAMP="$WHAM_VENV/.openwham-sync-stamp"
NEED_SYNC=0
if [ ! -x "$VENV_PY" ] || [ ! -e "$SYNC_STAMP" ] ||
    [ uv.lock -nt "$SYNC_STAMP" ] || [ pyproject.toml -nt "$SYNC_STAMP" ]; then
    NEED_SYNC=1
fi
UV_BIN="$(wham_find_uv || true)"

want_cmd git git
[ -s /etc/ssl/certs/ca-certificates.crt ] || WANTED_PKGS+=(ca-certificates)
# A system Python >= 3.11 is only needed to build the venv or to install uv.
if { [ "$NEED_SYNC" = 1 ] || [ -z "$UV_BIN" ]; } && ! wham_find_python >/dev/null; then
    WANTED_PKGS+=(python3 python3-venv)
fi
if [ "$WITH_POSTGRES" = 1 ] && ! wham_find_pg_bindir >/dev/null; then
    WANTED_PKGS+=(postgresql)
fi
# The sandbox every agent command runs in.
want_cmd bwrap bubblewrap
# setpriv, unshare, prlimit, mount: how the server starts git and bubblewrap so that they
# die with it (openwham.lifeline; util-linux is essential on Debian, so normally present).
for tool in setpriv unshare prlimit mount; do
    want_cmd "$tool" util-linux
done
# libseccomp builds the sandboxes' seccomp filter (loaded by pyseccomp through ctypes).
apt_pkg_installed libseccomp2 || WANTED_PKGS+=(libseccomp2)
# Tools setup scripts and agents expect in the sandbox (it sees the host's /usr).
want_cmd curl curl
# The in-sandbox forwarders (model gateway, egress proxy) run with the system Python.
[ -x /usr/bin/python3 ] || WANTED_PKGS+=(python3)
# The test suite's outside host lives in a network namespace (ip netns, veth).
want_cmd ip iproute2
# npm installs the pinned Codex CLI (tools/codex/package-lock.json).
CODEX_DIR="$WHAM_ROOT/tools/codex"
CODEX_STAMP="$CODEX_DIR/node_modules/.openwham-stamp"
NEED_CODEX=0
if [ ! -e "$CODEX_STAMP" ] || [ "$CODEX_DIR/package-lock.json" -nt "$CODEX_STAMP" ]; then
    NEED_CODEX=1
    want_cmd npm nodejs npm
fi
# Test-only: Codex CLI 0.151.0, whose `codex cloud` still accepts a custom
# CODEX_CLOUD_TASKS_BASE_URL (tools/codex-cloud/package-lock.json).
CLOUD_CLI_DIR="$WHAM_ROOT/tools/codex-cloud"
CLOUD_CLI_STAMP="$CLOUD_CLI_DIR/node_modules/.openwham-stamp"
NEED_CLOUD_CLI=0
if [ "$WITH_POSTGRES" = 1 ] && { [ ! -e "$CLOUD_CLI_STAMP" ] ||
    [ "$CLOUD_CLI_DIR/package-lock.json" -nt "$CLOUD_CLI_STAMP" ]; }; then
    NEED_CLOUD_CLI=1
    want_cmd npm nodejs npm
fi

# ---------------------------------------------------------------------------
# EXTENSION POINT: further requirements go here. Keep each check cheap
# (command -v / file tests) so that setup stays fast when nothing is missing,
# and gate test-only ones behind a flag like --with-postgres. Planned:
#   - sandbox:  want_cmd bwrap bubblewrap
#   - runtime:  want_cmd npm nodejs npm, then a pinned Codex CLI installed with
#               npm into "$WHAM_TOOLS_DIR" (ensure_codex_cli, after
#               ensure_apt_packages below), its bin linked into
#               "$WHAM_TOOLS_DIR/bin"
#   - UI tests: want_cmd chromium chromium chromium-driver
# ---------------------------------------------------------------------------
# Test-only: the web UI's browser tests drive Debian's Chromium with Playwright
# (tests/support/browser.py; Playwright's own browser download cannot be used).
if [ "$WITH_POSTGRES" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    WANTED_PKGS+=(chromium)
fi
# Test-only: the compatibility tests drive `codex cloud`'s interactive TUI in tmux.
if [ "$WITH_POSTGRES" = 1 ]; then
    want_cmd tmux tmux
fi
# Test-only: private remotes over SSH are tested against OpenSSH's sshd on loopback
# (tests/support/git_servers.py); the ssh client comes with it.
if [ "$WITH_POSTGRES" = 1 ] && [ ! -x /usr/sbin/sshd ]; then
    WANTED_PKGS+=(openssh-server openssh-client)
fi
# Benchmark-only: bench/load drives the API with wrk (loopback).
if [ "$WITH_POSTGRES" = 1 ]; then
    want_cmd wrk wrk
fi

if [ "${#WANTED_PKGS[@]}" -gt 0 ]; then
    ensure_apt_packages "${WANTED_PKGS[@]}"
fi

# ---------------------------------------------------------------------------
# uv
# ---------------------------------------------------------------------------
install_uv() {
    local py venv="$WHAM_TOOLS_DIR/venv" uv_path=""
    py="$(wham_find_python)" || wham_die "setup: no python3 >= 3.11 found (set WHAM_PYTHON)"
    progress "installing uv $WHAM_UV_VERSION into $WHAM_TOOLS_DIR"
    mkdir -p "$WHAM_TOOLS_DIR/bin"
    # A private venv keeps uv off the system Python. Debian ships venv's
    # ensurepip separately (python3-venv); without it fall back to pip.
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        rm -rf "$venv"
        if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            case "$py" in
                /usr/bin/*) ensure_apt_packages python3-venv ;;
            esac
            "$py" -m venv "$venv" >/dev/null 2>&1 || rm -rf "$venv"
        fi
    fi
    if [ -x "$venv/bin/python" ]; then
        run_logged "$venv/bin/python" -m pip install --disable-pip-version-check -q \
            "uv==$WHAM_UV_VERSION"
        uv_path="$venv/bin/uv"
    else
        # No venv possible: the interpreter's own pip (refused by Debian's
        # externally-managed Python, which the venv route covers).
        run_logged "$py" -m pip install --disable-pip-version-check -q "uv==$WHAM_UV_VERSION"
        uv_path="$("$py" -c 'import uv; print(uv.find_uv_bin())')"
    fi
    ln -sfn "$uv_path" "$WHAM_TOOLS_DIR/bin/uv"
    UV_BIN="$(wham_find_uv)" || wham_die "setup: uv was installed but does not run: $uv_path"
}

[ -n "$UV_BIN" ] || install_uv

# ---------------------------------------------------------------------------
# The pinned Codex CLI (npm ci from the committed lockfile)
# ---------------------------------------------------------------------------
if [ "$NEED_CODEX" = 1 ]; then
    progress "installing the pinned Codex CLI into $CODEX_DIR/node_modules"
    run_logged npm ci --prefix "$CODEX_DIR" --no-audit --no-fund --loglevel=error
    "$CODEX_DIR/node_modules/.bin/codex" --version >/dev/null 2>&1 ||
        wham_die "setup: the Codex CLI was installed but does not run"
    touch "$CODEX_STAMP"
fi
if [ "$NEED_CLOUD_CLI" = 1 ]; then
    progress "installing Codex CLI 0.151.0 (compatibility tests) into $CLOUD_CLI_DIR/node_modules"
    run_logged npm ci --prefix "$CLOUD_CLI_DIR" --no-audit --no-fund --loglevel=error
    "$CLOUD_CLI_DIR/node_modules/.bin/codex" --version >/dev/null 2>&1 ||
        wham_die "setup: Codex CLI 0.151.0 was installed but does not run"
    touch "$CLOUD_CLI_STAMP"
fi

# ---------------------------------------------------------------------------
# The project's virtualenv (.venv), from uv.lock exactly
# ---------------------------------------------------------------------------
if [ "$NEED_SYNC" = 1 ]; then
    sync_args=(sync --frozen)
    # Reuse a working venv as is; otherwise build it on a system Python
    # (uv cannot download one here: UV_PYTHON_DOWNLOADS=never).
    if ! "$VENV_PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        py="$(wham_find_python)" || wham_die "setup: no python3 >= 3.11 found (set WHAM_PYTHON)"
        sync_args+=(--python "$py")
    fi
    progress "syncing the Python environment ($WHAM_VENV) from uv.lock"
    run_logged "$UV_BIN" "${sync_args[@]}"
    touch "$SYNC_STAMP"
fi
