#!/usr/bin/env bash
# Install tokenrelay with its test tools into .venv, then run the linters and the test suite.
# Arguments go to pytest (e.g. `scripts/test.sh -k streaming`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# llama-cpp-python is built from source on first install (about 5 minutes on 2 cores).
.venv/bin/python -m pip install --quiet --editable ".[test]"

# The browser tests drive Debian's Chromium; Playwright never downloads a browser of its own.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null
    fi
fi

.venv/bin/ruff check
.venv/bin/ruff format --check
.venv/bin/mypy
.venv/bin/pytest "$@"
