#!/usr/bin/env bash
# Install Debian's Chromium + ChromeDriver for the MLflow UI test (tests/tracking/test_mlflow_ui.py), if missing.
# Needs root and Debian's package archive; the test skips itself (with this hint) where they are absent.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then exit 0; fi
if [[ $(id -u) != 0 ]]; then
  echo "[genattr-browser] must run as root to install chromium and chromium-driver" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "[genattr-browser] $(/usr/bin/chromium --version)" >&2
