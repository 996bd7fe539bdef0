#!/usr/bin/env bash
# The Debian packages bundlerec's tests use beside the Python environment (`make setup` runs this):
#   chromium    headless browser tests (the MLflow report, the bundle explorer, the Ray dashboard)
#   postgresql  the production-shaped tracking database of tests/test_backends.py
# Installs the missing ones with apt-get where this user may (root, or sudo without a password);
# otherwise prints one line that says what to run. Never fails `make setup`: the demo needs neither.
set -uo pipefail
need=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
fi
if command -v apt-get >/dev/null 2>&1 && [ "$sudo" != none ]; then
  echo "installing Debian packages: ${need[*]} (about a minute)"
  if $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; then
    exit 0
  fi
fi
echo "bundlerec setup: missing system packages ${need[*]}; install them (Debian/Ubuntu: sudo apt-get install ${need[*]}) and rerun make test; the tests that need them are skipped until then (and fail under CI=true)" >&2
exit 0
