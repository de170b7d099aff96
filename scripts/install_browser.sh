#!/usr/bin/env bash
# Headless Chromium and its driver for the browser tests (Debian's packages), when absent.
# `make test` runs it; `make run` does not need a browser.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install] the browser tests need chromium and chromedriver on PATH:" \
         "install them with this system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "[install] chromium + chromium-driver (Debian packages) for the browser tests"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
echo "[install] $(chromium --version)"
