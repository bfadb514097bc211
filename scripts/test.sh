#!/usr/bin/env bash
# The whole test suite. Installs what the tests need outside Python first:
# Debian's prometheus (a real server and promtool) and chromium (report screenshots).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "scripts/test.sh: please install Debian packages: ${need[*]}" >&2
    exit 1
  fi
fi
# the layer contract (pyproject.toml [tool.importlinter]), the type checker, then the tests
lint-imports
python3 -m mypy -p hansgate
exec python3 -m pytest "$@"
