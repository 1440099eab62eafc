#!/usr/bin/env bash
# Install Home Assistant core into its own venv, for the tests that run a REAL Home Assistant
# against the agent (tests/test_homeassistant_real.py). Idempotent: a venv that already holds the
# wanted version is kept (a stamp file says which).
#
#   bash tools/homeassistant-venv.sh [VENV]     # default $EDGE_AGENT_HA_VENV or /tmp/edge-agent-ha-venv
#
# Home Assistant 2025.4.4 is the newest release that installs on Python 3.13.0 (later ones need
# 3.13.2+); its own package_constraints.txt pins the dependency set it was released with, plus
# pycares<5 (pycares 5 breaks the aiodns it pins). Python: $HA_PYTHON, else python3.13 on PATH, else
# pyenv's 3.13.x. Exit 3 when no suitable interpreter exists (the tests then skip, saying so).
set -euo pipefail
HA_VERSION=${HA_VERSION:-2025.4.4}
VENV=${1:-${EDGE_AGENT_HA_VENV:-/tmp/edge-agent-ha-venv}}
STAMP="$VENV/.edge-agent-ha-version"
RECIPE="$HA_VERSION+frontend+mqtt"  # what the stamp certifies: bump when the package list changes

if [ -x "$VENV/bin/hass" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$RECIPE" ]; then
  echo "Home Assistant $HA_VERSION already in $VENV"; exit 0
fi

find_python() {
  local c
  for c in "${HA_PYTHON:-}" "$(command -v python3.13 || true)" \
           "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python 2>/dev/null | sort -V | tail -1)"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
PY=$(find_python) || { echo "no Python 3.13 found (set HA_PYTHON): cannot install Home Assistant $HA_VERSION" >&2; exit 3; }

start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check uv
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "homeassistant==$HA_VERSION" -d "$work"
"$VENV/bin/python" - "$work" <<'PY'
import glob, sys, zipfile
work = sys.argv[1]
wheel = glob.glob(f"{work}/homeassistant-*.whl")[0]
with zipfile.ZipFile(wheel) as zf:
    constraints = zf.read("homeassistant/package_constraints.txt").decode()
open(f"{work}/constraints.txt", "w").write(constraints + "\npycares<5\n")
PY
# Home Assistant runs with --skip-pip, so the requirements of what it loads are installed now:
# paho-mqtt (MQTT), home-assistant-frontend (a critical integration: without it HA falls into
# recovery mode) and those of the default integrations (backup, person, hardware, network).
# Versions come from the constraints.
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -c "$work/constraints.txt" \
  "$work"/homeassistant-*.whl paho-mqtt home-assistant-frontend cronsim securetar Pillow \
  psutil-home-assistant ifaddr "pycares<5"
echo "$RECIPE" > "$STAMP"
echo "Home Assistant $HA_VERSION installed in $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
