#!/usr/bin/env bash
# A headless browser for the MLflow UI test (Debian package chromium). Does nothing when one is there; the test
# skips, saying so, when none can be installed.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Chromium for the MLflow UI test (apt-get install chromium)"
    apt-get install -y -q chromium >/dev/null 2>&1 || \
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "Chromium not found: the MLflow UI test will skip (sudo apt-get install chromium)" >&2
    exit 1
fi
