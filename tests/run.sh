#!/usr/bin/env bash
# Install everything the test suite needs, then run it. README's test command and .ci/run
# both call this file, so a fresh machine and CI run exactly the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages some suites drive for real (a browser, Redis, nginx), installed only
# when missing. Root installs directly; otherwise sudo is tried.
apt_packages=()
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || apt_packages+=(chromium-driver)
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_packages+=(nginx)
if [ "${#apt_packages[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    echo "tests/run.sh: installing ${apt_packages[*]}" >&2
    # A failed install is an error: the tests of what it would have installed fail anyway
    # (with CI=true none of them may skip), and this says why first.
    if ! $sudo apt-get update -qq >/dev/null; then
        echo "tests/run.sh: apt-get update failed; cannot install ${apt_packages[*]}" >&2
        exit 1
    fi
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${apt_packages[@]}" >/dev/null; then
        echo "tests/run.sh: apt-get install ${apt_packages[*]} failed" >&2
        exit 1
    fi
elif [ "${#apt_packages[@]}" -gt 0 ]; then
    echo "tests/run.sh: no apt-get here to install ${apt_packages[*]}" >&2
    exit 1
fi

venv=${WSROUTE_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e '.[test]'
"$venv/bin/python" -m mypy --strict wsroute_sync
exec "$venv/bin/python" -m pytest "$@"
