#!/usr/bin/env bash
# One command on a fresh machine: set up the device venv and run the agent on sample images
# against an embedded broker (mosquitto if installed or installable, else the pure-Python amqtt).
#   bash tools/demo.sh [edge-agent demo options, e.g. --images DIR --model NAME --out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null) \
      || echo "mosquitto not installable: the demo will use amqtt"
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The device install only (numpy, OpenCV, paho-mqtt, LiteRT): the demo needs no test tools. amqtt
# only when there is no mosquitto to start.
.venv/bin/pip install -q --disable-pip-version-check -e .
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  .venv/bin/pip install -q --disable-pip-version-check "amqtt>=0.11"
fi
exec .venv/bin/edge-agent demo "$@"
