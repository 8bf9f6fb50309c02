#!/bin/sh
# Makes sure Debian's Chromium is installed for `make e2e` (Playwright drives it; no browser
# download). Installs it with apt-get when running as root, otherwise says what to install.
set -eu
chromium=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium with apt-get (one time)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
    exit 0
fi
echo "Chromium is needed at $chromium: install it (Debian/Ubuntu: apt-get install chromium)," >&2
echo "or set CHROMIUM to the path of a Chromium or Chrome binary." >&2
exit 1
