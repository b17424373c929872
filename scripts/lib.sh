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

ensure_build_tools() {  # what building weft/shm/_atomics.c needs: gcc and Python's headers
    ensure_tools "gcc:gcc"
    python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || apt_install python3-dev
}

# ensure_venv [EXTRA]: .venv with weft installed editable (with [EXTRA] when given). A test
# install also serves a plain one. Reinstalls when pyproject.toml or the C extension changed,
# or when weft does not import from outside the checkout.
ensure_venv() {
    local extra=${1:-} hash target=. stamp
    # No .venv, or one without a working pip (its creation was interrupted): make it afresh.
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        log "creating .venv"
        rm -rf .venv
        if ! python3 -m venv .venv >/dev/null 2>&1; then
            # Debian's python3 makes venvs only with python3-venv (it carries ensurepip).
            rm -rf .venv
            apt_install python3-venv
            python3 -m venv .venv
        fi
    fi
    ensure_build_tools
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
