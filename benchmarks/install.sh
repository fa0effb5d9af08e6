#!/usr/bin/env bash
# Install what benchmarks/bench.py needs. Safe to run again: apt is only
# called for what is missing, and pip leaves satisfied requirements alone.
#
#   bash benchmarks/install.sh            # uses python3 from PATH
#   PYTHON=/path/to/python bash benchmarks/install.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

# The load generator and the gorilla server peer (servers/gorilla/main.go) are
# Go with gorilla/websocket, both from Debian; bench.py builds them on first
# use, in GOPATH mode against /usr/share/gocode: no Go module download is
# involved.
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
[ -d /usr/share/gocode/src/github.com/gorilla/websocket ] || missing+=(golang-github-gorilla-websocket-dev)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)   # pinned placement

if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "install.sh: apt-get install ${missing[*]}"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install.sh: Go, gorilla/websocket and taskset already present"
fi

PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt"
echo "install.sh: Python packages ready ($("$python" -m pip --version | cut -d' ' -f1-2))"
