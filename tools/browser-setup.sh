#!/usr/bin/env bash
# Install what tests/test_browser.py needs, idempotently (a second run takes about a second):
#   - Debian's `chromium` package (/usr/bin/chromium). Playwright's own browser download is not used: it needs
#     hosts this machine cannot reach, and Debian's build is the one CI gets too.
#   - the Python `playwright` package in .venv (only its driver; `playwright install` is never run).
# Usage: bash tools/browser-setup.sh        (tools/test.sh runs it before pytest when it is executable)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PLAYWRIGHT_REQ="playwright==1.65.2"

if [[ ! -x $PY ]]; then echo "browser-setup: $PY is missing; run 'make setup' first" >&2; exit 1; fi

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=()
    if [[ $(id -u) != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
            echo "browser-setup: chromium is missing and installing it needs root (apt-get install chromium)" >&2; exit 1
        fi
    fi
    echo "browser-setup: installing Debian's chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! $PY -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "browser-setup: installing $PLAYWRIGHT_REQ into .venv"
    $PY -m pip install --quiet --disable-pip-version-check "$PLAYWRIGHT_REQ"
fi

echo "browser-setup: $(command -v chromium) ($(chromium --version 2>/dev/null | head -1)), playwright $($PY -c 'from importlib.metadata import version; print(version("playwright"))')"
