#!/usr/bin/env bash
# Runs the whole agent-factory stack on this machine: installs nats-server 2.15.x if needed,
# builds the launcher and the CLI (release), and execs the launcher in the foreground so Ctrl-C
# reaches it directly. Data (JetStream store, generated local credentials) goes to ./data unless
# configured otherwise; arguments are passed to the launcher (e.g. --config FILE, --dump-config).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bin="$(ops/scripts/install-nats.sh)"
cargo build --release -p launcher -p cli -p worker
export AF_NATS_SERVER_BIN="$bin"
exec "${CARGO_TARGET_DIR:-target}/release/agent-factory" "$@"
