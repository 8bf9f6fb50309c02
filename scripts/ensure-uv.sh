#!/bin/sh
# Prints the path of a uv executable, installing uv from PyPI into .tools/ when none is found.
# Works as root and as a normal user, and on Pythons that refuse system-wide pip installs.
set -eu
if command -v uv >/dev/null 2>&1; then
    command -v uv
    exit 0
fi
root=$(cd "$(dirname "$0")/.." && pwd)
local_uv="$root/.tools/uv/bin/uv"
if [ ! -x "$local_uv" ]; then
    python=$(command -v python3 || command -v python || true)
    if [ -z "$python" ]; then
        echo "Python 3.11 or newer is needed: install python3 first." >&2
        exit 1
    fi
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        echo "pip is missing: install it (Debian/Ubuntu: apt-get install python3-pip), or install uv yourself." >&2
        exit 1
    fi
    echo "installing uv into .tools/uv (one time)" >&2
    "$python" -m pip install --quiet --disable-pip-version-check --target "$root/.tools/uv" uv >&2
fi
echo "$local_uv"
