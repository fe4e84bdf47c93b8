#!/usr/bin/env bash
# Install Chromium from the distribution's packages for the browser test (tests/test_browser.py).
#   bash scripts/setup-browser.sh
# Playwright drives this system browser (its own browser download is not used). Where apt-get is
# missing, or neither root nor sudo can run it, this prints why and exits 0: the browser test then skips
# with the same reason, except under REFUSAL_REQUIRE_BROWSER=1 (set by .ci/run), where it fails.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: apt-get is not available; install Chromium at $CHROMIUM to run the browser test." >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup-browser: installing Chromium needs root (apt-get install -y chromium); the browser test will skip." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists; an existing one is refreshed only when chromium is unknown.
if ! apt-cache show chromium >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -qq
fi
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --version
