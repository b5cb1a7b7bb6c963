#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run):
#   1. installs nats-server 2.15.x into .tools/ (the integration tests start real servers),
#   2. installs openapi-spec-validator into .tools/ (GET /openapi.json is validated with it),
#      Debian's chromium and chromium-driver (the web console's browser test drives them),
#      Node.js and the openclaw npm package into .tools/ (the openclaw engine's end-to-end
#      tests run the real agent), and makes sure cargo-nextest is available,
#   3. validates docker-compose.yml offline (ops/scripts/validate-compose.sh: Debian's
#      docker-compose 1.29 `config -q`, installed with apt-get when missing),
#   4. checks formatting, runs clippy with warnings as errors,
#   5. runs the whole test suite with nextest's `ci` profile (.config/nextest.toml).
# Exits non-zero as soon as a step fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

step "installing nats-server (ops/scripts/install-nats.sh)"
AF_NATS_SERVER_BIN="$(./ops/scripts/install-nats.sh)"
export AF_NATS_SERVER_BIN
echo "nats-server: $AF_NATS_SERVER_BIN" >&2

step "installing the OpenAPI validator (ops/scripts/install-openapi-validator.sh)"
AF_OPENAPI_VALIDATOR_BIN="$(./ops/scripts/install-openapi-validator.sh)"
export AF_OPENAPI_VALIDATOR_BIN

step "installing Chromium and chromedriver (ops/scripts/install-chromium.sh)"
chromium_paths="$(./ops/scripts/install-chromium.sh)"
AF_CHROMIUM_BIN="$(printf '%s\n' "$chromium_paths" | sed -n 1p)"
AF_CHROMEDRIVER_BIN="$(printf '%s\n' "$chromium_paths" | sed -n 2p)"
export AF_CHROMIUM_BIN AF_CHROMEDRIVER_BIN
echo "chromium: $AF_CHROMIUM_BIN, chromedriver: $AF_CHROMEDRIVER_BIN" >&2

step "installing Node.js and OpenClaw (ops/scripts/install-openclaw.sh)"
openclaw_vars="$(./ops/scripts/install-openclaw.sh)"
AF_NODE_BIN="$(printf '%s\n' "$openclaw_vars" | sed -n 's/^AF_NODE_BIN=//p')"
AF_OPENCLAW_ENTRY="$(printf '%s\n' "$openclaw_vars" | sed -n 's/^AF_OPENCLAW_ENTRY=//p')"
export AF_NODE_BIN AF_OPENCLAW_ENTRY
echo "node: $AF_NODE_BIN; openclaw: $AF_OPENCLAW_ENTRY" >&2

step "validating docker-compose.yml (ops/scripts/validate-compose.sh)"
./ops/scripts/validate-compose.sh

step "checking cargo-nextest"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it" >&2
  cargo install cargo-nextest --locked
fi
cargo nextest --version >&2

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo nextest run --workspace --profile ci"
cargo nextest run --workspace --profile ci

step "all checks passed in $((SECONDS - started)) s"
