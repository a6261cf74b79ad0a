#!/usr/bin/env bash
# Screenshot a headstart report with headless Chromium (Debian: apt-get install -y chromium).
# Usage: scripts/screenshot_report.sh RUN/report.html [OUT.png] [HEIGHT]
set -euo pipefail
html=$(realpath "$1")
out=${2:-${html%.html}.png}
height=${3:-4000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium found: apt-get install -y chromium" >&2
  exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --screenshot="$(realpath -m "$out")" --window-size=1280,"$height" \
  "file://$html" >/dev/null 2>&1
echo "wrote $out"
