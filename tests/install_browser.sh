#!/usr/bin/env bash
# Headless Chromium and ChromeDriver for tests/test_web.py (the web chat page), the same way for README's
# test command and .ci/run: use them if present, else install Debian's `chromium` and `chromium-driver`
# where this is root with apt-get; otherwise say plainly that the web-page test will be skipped.
set -uo pipefail

have() { (command -v chromium || command -v chromium-browser) >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! have; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "browser: installing Debian's chromium and chromium-driver for tests/test_web.py" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "browser: apt-get could not install chromium" >&2
  fi
fi
if have; then
  echo "browser: $( (chromium --version || chromium-browser --version) 2>/dev/null | head -1) for tests/test_web.py" >&2
else
  echo "browser: NO Chromium here: tests/test_web.py will be SKIPPED (as root: apt-get install chromium chromium-driver)" >&2
fi
exit 0  # a machine without a browser still runs every other test
