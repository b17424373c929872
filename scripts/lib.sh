# shellcheck shell=bash
# Shared set-up steps of scripts/test, scripts/demo and scripts/bench (sourced, not run).
# The sourcing script defines log() first and sets ROOT to the repository root.

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {  # apt_install PKG...: quiet, non-interactive, one `apt-get update` per run
    log "installing with apt: $*"
    if [[ -z $apt_updated ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_tools() {  # ensure_tools CMD:PKG...: install the packages whose command is missing
    local missing=() entry
    for entry in "$@"; do
        command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
    done
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
}

# The interpreter .venv is made from: $WEFT_PYTHON when set, else the distribution's
# /usr/bin/python3 when it is 3.11 or newer (what a systemd deployment on the host runs), else
# python3 from PATH. Which build matters for speed: Debian's CPython is built with PGO and LTO
# and links libpython statically into the interpreter; pyenv's default build has neither
# (--enable-shared, no --enable-optimizations). weft's CPU per proxied 1 KiB request measured
# with scripts/bench, same commit, same machine: 454 µs on Debian's 3.11.2, 587 µs on pyenv's
# 3.11.7.
pick_python() {
    if [[ -n ${WEFT_PYTHON:-} ]]; then
        echo "$WEFT_PYTHON"
    elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo /usr/bin/python3
    else
        command -v python3
    fi
}

ensure_build_tools() {  # what building weft/shm/_atomics.c needs: gcc and Python's headers
    ensure_tools "gcc:gcc"
    "$1" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || apt_install python3-dev
}

# ensure_venv [EXTRA]: .venv with weft installed editable (with [EXTRA] when given). A test
# install also serves a plain one. Reinstalls when pyproject.toml or the C extension changed,
# or when weft does not import from outside the checkout.
ensure_venv() {
    local extra=${1:-} hash target=. stamp python
    python=$(pick_python)
    # No .venv, one without a working pip (its creation was interrupted), or one made from
    # another interpreter: make it afresh.
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1 \
        || [[ $(cat .venv/.weft-python 2>/dev/null) != "$python" ]]; then
        log "creating .venv with $python ($("$python" --version 2>&1))"
        rm -rf .venv
        if ! "$python" -m venv .venv >/dev/null 2>&1; then
            # Debian's python3 makes venvs only with python3-venv (it carries ensurepip).
            rm -rf .venv
            apt_install python3-venv
            "$python" -m venv .venv
        fi
        echo "$python" >.venv/.weft-python
    fi
    ensure_build_tools "$python"
    hash=$(cat pyproject.toml weft/shm/_atomics.c | sha256sum | cut -c1-16)
    stamp=".venv/.weft-installed-${extra:-base}"
    if [[ -n $extra ]]; then target=".[$extra]"; fi
    if [[ $(cat "$stamp" 2>/dev/null) == "$hash" \
          || ( -z $extra && $(cat .venv/.weft-installed-test 2>/dev/null) == "$hash" ) ]] \
        && (cd / && "$ROOT/.venv/bin/python" -c 'import weft.shm.atomics') >/dev/null 2>&1; then
        return 0
    fi
    log "installing weft (pip install -e '$target')"
    # pip -q still lets the build backend's warnings through: keep them for a failure.
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" \
        >.venv/pip-install.log 2>&1; then
        cat .venv/pip-install.log >&2
        log "pip install failed"
        exit 1
    fi
    echo "$hash" >"$stamp"
}
