#!/usr/bin/env bash
# Installs Debian's docker-compose (the Python implementation, 1.29.x), unless it is already
# there, to validate docker-compose.yml offline: `docker-compose config -q` parses the file,
# checks it against the compose schema and interpolates the variables, with no container
# engine. Prints the program's path on stdout; progress goes to stderr. Needs apt-get (as root,
# or through sudo) when docker-compose is missing.
set -euo pipefail

want="${AF_COMPOSE_VALIDATOR_VERSION:-1.29.}"

have_version() {
  local bin="$1"
  [ -x "$bin" ] && "$bin" version --short 2>/dev/null | grep -q "^${want//./\\.}"
}

bin="$(command -v docker-compose || true)"
if [ -n "$bin" ] && have_version "$bin"; then
  echo "$bin"
  exit 0
fi

sudo=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo -n"
  else
    echo "install-compose-validator: docker-compose ${want}x is missing and installing it needs root (apt-get)" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-compose-validator: docker-compose ${want}x is missing and there is no apt-get to install it" >&2
  exit 1
fi
echo "install-compose-validator: installing Debian's docker-compose (${want}x)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends docker-compose >&2; then
  $sudo apt-get update >&2
  $sudo apt-get install -y --no-install-recommends docker-compose >&2
fi
bin="$(command -v docker-compose || true)"
if [ -z "$bin" ] || ! have_version "$bin"; then
  echo "install-compose-validator: the installed docker-compose is not ${want}x: $("${bin:-docker-compose}" version --short 2>&1 || true)" >&2
  exit 1
fi
echo "$bin"
