#!/usr/bin/env bash
# Installs openapi-spec-validator (an OpenAPI 3.1 validator, PyPI) into .tools/openapi, unless
# the pinned version is already there. Prints the validator's path on stdout; progress goes to
# stderr. The test suite validates GET /openapi.json with it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="${AF_OPENAPI_VALIDATOR_VERSION:-0.7.2}"
venv="$root/.tools/openapi"
bin="$venv/bin/openapi-spec-validator"

if [ -x "$bin" ] && "$venv/bin/pip" show openapi-spec-validator 2>/dev/null | grep -q "^Version: ${version}$"; then
  echo "$bin"
  exit 0
fi

python="$(command -v python3 || true)"
if [ -z "$python" ]; then
  echo "install-openapi-validator: python3 is required to install openapi-spec-validator from PyPI" >&2
  exit 1
fi

echo "install-openapi-validator: installing openapi-spec-validator ${version} into ${venv}" >&2
"$python" -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator==${version}" >&2
if [ ! -x "$bin" ]; then
  echo "install-openapi-validator: the package did not provide ${bin}" >&2
  exit 1
fi
echo "$bin"
