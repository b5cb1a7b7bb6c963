#!/usr/bin/env bash
# Validates docker-compose.yml offline, as test.sh does: `docker-compose config -q` (Debian's
# docker-compose 1.29, installed by install-compose-validator.sh) with placeholder credentials,
# once plain and once with every profile. No container engine is needed. Checking that every
# file the compose file mounts or builds from exists is a test in the suite
# (tests/tests/it/compose.rs).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
compose="${AF_COMPOSE_BIN:-$(./ops/scripts/install-compose-validator.sh)}"

# Placeholders for the variables the file requires (never used to run anything), in an empty
# env file so a developer's .env does not change the outcome.
empty_env="$(mktemp)"
trap 'rm -f "$empty_env"' EXIT
placeholders=(
  AF_ADMIN_TOKEN=placeholder-admin-token-0000
  AF_APP_TOKEN=placeholder-app-token-00000
  AF_WORKER_TOKEN_KEY=placeholder-worker-token-key-0000000000
  AF_SECRETS_KEY=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
  AF_NATS_PASSWORD=00000000000000000000000000000000
  AF_NATS_STORE_KEY=00000000000000000000000000000000
)
for service in INGRESS QUEUE_MANAGER HYDRATION SCHEDULER PUSH_DISPATCHER CLEANUP; do
  placeholders+=("AF_NATS_PASSWORD_$service=00000000000000000000000000000000")
done
for profile in "" demo worker; do
  args=(-f docker-compose.yml --env-file "$empty_env")
  [ -n "$profile" ] && args+=(--profile "$profile")
  env "${placeholders[@]}" "$compose" "${args[@]}" config -q
  echo "validate-compose: docker-compose.yml is valid${profile:+ (profile $profile)}" >&2
done
