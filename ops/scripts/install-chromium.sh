#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its WebDriver (packages `chromium` and
# `chromium-driver`) when /usr/bin/chromium or /usr/bin/chromedriver is missing. The browser test
# of the web console (tests/tests/it/console.rs) drives them. Needs root (CI runs as root on
# Debian) or passwordless sudo; idempotent. apt verifies the packages against Debian's archive
# signatures. The version is Debian's current one for the release (security updates replace it,
# so no exact version is pinned); the script refuses a Chromium older than $min_major.
# Prints two lines on stdout: the browser's path, then the driver's. Progress goes to stderr.
set -euo pipefail

min_major="${AF_CHROMIUM_MIN_MAJOR:-120}"
chromium="/usr/bin/chromium"
driver="/usr/bin/chromedriver"

if [ ! -x "$chromium" ] || [ ! -x "$driver" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: apt-get not found; install chromium and chromium-driver (Debian) by hand" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
      echo "install-chromium: run as root (or with sudo) to install chromium and chromium-driver" >&2
      exit 1
    fi
  fi
  echo "install-chromium: installing chromium and chromium-driver with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >&2
  $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi

for bin in "$chromium" "$driver"; do
  if [ ! -x "$bin" ]; then
    echo "install-chromium: $bin is still missing after the installation" >&2
    exit 1
  fi
done

version="$("$driver" --version 2>/dev/null | awk '{print $2}')"
major="${version%%.*}"
if [ -z "$major" ] || [ "$major" -lt "$min_major" ] 2>/dev/null; then
  echo "install-chromium: chromedriver version '${version}' is older than ${min_major}" >&2
  exit 1
fi
echo "install-chromium: chromedriver ${version}" >&2
echo "$chromium"
echo "$driver"
