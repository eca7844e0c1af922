# shellcheck shell=bash disable=SC2034  # variables are for the sourcing scripts
# Shared helpers for openwham's plumbing scripts (scripts/setup.sh, ./wham,
# scripts/test, scripts/pg-cluster.sh). Source it; it defines functions and a
# few variables and changes nothing else (no shell options, no cd).

# Repository root (this file lives in <root>/scripts/).
WHAM_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"

# uv: the version installed when none (or too old a one) is on PATH, and the
# oldest one accepted from PATH. uv.lock is written by uv 0.13.x.
WHAM_UV_VERSION="${WHAM_UV_VERSION:-0.13.8}"
WHAM_UV_MIN_VERSION="0.13.0"

# The project's virtualenv (uv's default location unless UV_PROJECT_ENVIRONMENT).
case "${UV_PROJECT_ENVIRONMENT:-.venv}" in
    /*) WHAM_VENV="$UV_PROJECT_ENVIRONMENT" ;;
    *) WHAM_VENV="$WHAM_ROOT/${UV_PROJECT_ENVIRONMENT:-.venv}" ;;
esac

# Where setup.sh keeps tools it installs itself (uv's venv; bin/ goes on PATH).
WHAM_TOOLS_DIR="${XDG_DATA_HOME:-${HOME:-/root}/.local/share}/openwham/tools"

# uv must never try to download a Python interpreter (it can't reach the host).
export UV_PYTHON_DOWNLOADS=never

wham_log() { printf '%s\n' "$*" >&2; }
wham_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Put the tools dir on PATH (idempotent). Call this before looking for uv.
wham_path_setup() {
    case ":$PATH:" in
        *":$WHAM_TOOLS_DIR/bin:"*) ;;
        *) PATH="$WHAM_TOOLS_DIR/bin:$PATH" ;;
    esac
    export PATH
    # A virtualenv activated in the caller's shell is not ours; uv would only
    # warn about it, but keep the scripts' output clean.
    unset VIRTUAL_ENV
}

# version_ge A B: true when dotted version A >= B.
wham_version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# Print the path of a usable uv (>= WHAM_UV_MIN_VERSION) or fail.
wham_find_uv() {
    local cand ver
    for cand in "$WHAM_TOOLS_DIR/bin/uv" "$(command -v uv 2>/dev/null || true)"; do
        if [ -z "$cand" ] || [ ! -x "$cand" ]; then continue; fi
        ver="$("$cand" --version 2>/dev/null | awk '{print $2}')" || continue
        if [ -z "$ver" ] || ! wham_version_ge "$ver" "$WHAM_UV_MIN_VERSION"; then continue; fi
        printf '%s\n' "$cand"
        return 0
    done
    return 1
}

# Print the real path of a Python >= 3.11 interpreter (not a pyenv shim) or fail.
# WHAM_PYTHON overrides the search.
wham_find_python() {
    local cand exe
    for cand in ${WHAM_PYTHON:+"$WHAM_PYTHON"} python3 python3.13 python3.12 python3.11 \
        /usr/bin/python3 /usr/local/bin/python3; do
        command -v "$cand" >/dev/null 2>&1 || continue
        exe="$("$cand" -c 'import sys
if sys.version_info >= (3, 11): print(sys.executable)' 2>/dev/null)" || continue
        if [ -n "$exe" ] && [ -x "$exe" ]; then
            printf '%s\n' "$exe"
            return 0
        fi
    done
    return 1
}

# Print the bin dir of the newest installed PostgreSQL server or fail.
wham_find_pg_bindir() {
    local initdb
    initdb="$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)"
    [ -x "$initdb" ] || return 1
    dirname -- "$initdb"
}
