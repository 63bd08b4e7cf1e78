#!/usr/bin/env bash
# Make sure a headless Chromium exists for the docs-site browser test (Debian package `chromium`).
set -uo pipefail
for b in chromium chromium-browser google-chrome; do command -v $b >/dev/null 2>&1 && exit 0; done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the docs browser test ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium" >&2
else
  echo "chromium is missing and cannot be installed here (needs root and apt-get); the browser test will say so" >&2
fi
exit 0
