#!/usr/bin/env bash
# Install everything the test suite needs, then run it. README's test command and .ci/run
# both call this file, so a fresh machine and CI run exactly the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages some suites drive for real (a browser, Redis, nginx), installed only
# when missing. Root installs directly; otherwise sudo is tried, without a password prompt.
# Every failure here is an error, never a warning: the tests of what was not installed
# would fail anyway (with CI=true none of them may skip), and this says why first.
fail() {
    echo "tests/run.sh: error: $*" >&2
    exit 1
}

# One "program package" pair a line; a program is found on PATH or at the given path.
missing_packages() {
    local program package path
    while read -r program package path; do
        command -v "$program" >/dev/null 2>&1 && continue
        [ -n "$path" ] && [ -x "$path" ] && continue
        echo "$package"
    done <<'PACKAGES'
chromium chromium /usr/bin/chromium
chromedriver chromium-driver /usr/bin/chromedriver
redis-server redis-server
nginx nginx /usr/sbin/nginx
PACKAGES
}

# Plain words, no mapfile or empty arrays, so this reads the same in any bash (macOS: 3.2).
apt_packages=$(missing_packages | tr '\n' ' ')
apt_packages=${apt_packages% }
if [ -n "$apt_packages" ]; then
    command -v apt-get >/dev/null 2>&1 \
        || fail "missing $apt_packages and no apt-get here to install them"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || fail "missing $apt_packages: not root and no sudo to install them"
        sudo="sudo -n"
    fi
    echo "tests/run.sh: installing $apt_packages" >&2
    # $sudo and $apt_packages are split into words on purpose.
    # shellcheck disable=SC2086
    $sudo apt-get update -qq >/dev/null \
        || fail "apt-get update failed (exit $?); cannot install $apt_packages"
    # sudo drops the environment: env carries DEBIAN_FRONTEND past it.
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $apt_packages >/dev/null \
        || fail "apt-get install $apt_packages failed (exit $?)"
    # A package can install and still not provide the program (a snap stub, another path).
    still_missing=$(missing_packages | tr '\n' ' ')
    [ -z "$still_missing" ] \
        || fail "installed, but the programs of ${still_missing% } are still not found"
fi

venv=${WSROUTE_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e '.[test]'
"$venv/bin/python" -m mypy --strict wsroute_sync
exec "$venv/bin/python" -m pytest "$@"
