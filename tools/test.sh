#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian/Ubuntu machine, then run every test suite.
#
#   bash tools/test.sh            # all suites
#   SUITES="device" bash tools/test.sh   # a subset: device brokers tflite host installed homeassistant browser
#                                        # picamera2 systemd
#
# Suites (each in its own venv, as users install them):
#   device  .venv         the agent with its default runtime (ai-edge-litert), real mosquitto
#   brokers .venv         the broker matrix (tests marked ``brokers``): mosquitto 2, amqtt, RabbitMQ
#                         3.10's MQTT plugin (own node, ~35 s to start), two bridged mosquittos (~3 min)
#   tflite  .venv-tflite  the inference tests again under tflite-runtime 2.14 + numpy<2
#   host    .venv-host    host model tools (TensorFlow 2.21, tf-keras, tfmot)
#   homeassistant  .venv + a Home Assistant 2025.4.4 venv ($EDGE_AGENT_HA_VENV, default
#                  /tmp/edge-agent-ha-venv, cached; tools/homeassistant-venv.sh, ~1-2 min the
#                  first time): the agent against a real Home Assistant
#   browser .venv         `edge-agent console` in Debian's headless chromium (Selenium + chromium-driver)
#                         against real agents and mosquitto (tests marked browser)
#   installed .venv drives tests/test_installed.py: the wheel in clean venvs outside the checkout
#                  (Python 3.11 and 3.13), used as a user would, down to `service install --root` and
#                  the staged agent publishing masks; needs Python 3.13 (pyenv) besides the system 3.11
#   picamera2 .venv drives tests/test_picamera2_real.py: the agent's picamera2 source and the real
#                  daemon in a trixie root with libcamera 0.7.1 (trixie-backports) and picamera2 from
#                  PyPI on libcamera's virtual camera (tools/picamera2-root.sh builds the root, cached)
#   systemd   .venv drives tests/test_systemd_real.py: the built wheel, `service install` and the
#                  hardened unit under a real systemd booted with systemd-nspawn (tools/systemd-root.sh)
# Exit 0 only when every selected suite ran tests and they passed (pytest's exit 5, "no tests
# collected", counts as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SUITES=${SUITES:-"device brokers tflite host installed homeassistant browser picamera2 systemd"}
PIP_FLAGS=(-q --disable-pip-version-check)
export PIP_NO_INPUT=1

say() { printf '\n=== %s\n' "$*"; }

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_system_packages() {
  local missing=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v mosquitto_passwd >/dev/null 2>&1 || [ -x /usr/bin/mosquitto_passwd ] || missing+=(mosquitto)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # a real RTSP camera for tests/test_cameras.py: GStreamer's RTSP server (tests/rtsp_server.py, system python3)
  /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" >/dev/null 2>&1 \
    || missing+=(gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base)
  dpkg -s gstreamer1.0-plugins-good >/dev/null 2>&1 || missing+=(gstreamer1.0-plugins-good)
  dpkg -s gstreamer1.0-plugins-ugly >/dev/null 2>&1 || missing+=(gstreamer1.0-plugins-ugly)  # x264enc
  if [[ " $SUITES " == *" browser "* ]]; then
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
  fi
  case " $SUITES " in
    *" brokers "*) [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server) ;;
  esac
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    sudo_if_needed apt-get update -qq
    DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

make_venv() {  # make_venv DIR PIP-ARGS...
  local dir=$1; shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/pip" install "${PIP_FLAGS[@]}" --upgrade pip >/dev/null 2>&1 || true
  "$dir/bin/pip" install "${PIP_FLAGS[@]}" "$@"
}

run_pytest() {  # run_pytest NAME VENV ARGS...
  local name=$1 venv=$2; shift 2
  say "pytest [$name] $*"
  "$venv/bin/python" -m pytest "$@"
  local rc=$?
  SECONDS_SUITE=$((SECONDS - T_SUITE))
  if [ $rc -eq 5 ]; then echo "[$name] no tests were collected: failing"; rc=1; fi
  RESULTS+=("$name=$rc (${SECONDS_SUITE:-?}s)")
  [ $rc -eq 0 ] || FAILED=1
}

RESULTS=(); FAILED=0
install_system_packages || { echo "cannot install system packages"; exit 1; }

for suite in $SUITES; do
  T_SUITE=$SECONDS
  case $suite in
    device)
      say "venv .venv (device: ai-edge-litert)"
      make_venv .venv -e ".[dev]" || { RESULTS+=("device=setup-failed"); FAILED=1; continue; }
      run_pytest device .venv -m "not host and not homeassistant and not browser and not brokers and not installed and not picamera2 and not systemd" tests --ignore=tests/host
      ;;
    brokers)
      say "venv .venv (device), the broker matrix"
      make_venv .venv -e ".[dev]" || { RESULTS+=("brokers=setup-failed"); FAILED=1; continue; }
      run_pytest brokers .venv -m brokers tests --ignore=tests/host
      ;;
    homeassistant)
      say "venv for Home Assistant (tools/homeassistant-venv.sh)"
      make_venv .venv -e ".[dev]" && bash tools/homeassistant-venv.sh \
        || { RESULTS+=("homeassistant=setup-failed"); FAILED=1; continue; }
      # Installed above: a test that cannot install Home Assistant fails here instead of skipping.
      EDGE_AGENT_HA_REQUIRED=1 run_pytest homeassistant .venv -m homeassistant tests --ignore=tests/host
      ;;
    browser)
      say "venv .venv (browser: chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'))"
      make_venv .venv -e ".[dev]" || { RESULTS+=("browser=setup-failed"); FAILED=1; continue; }
      EDGE_AGENT_REQUIRE_BROWSER=1 run_pytest browser .venv -m browser tests --ignore=tests/host
      ;;
    tflite)
      say "venv .venv-tflite (tflite-runtime 2.14, numpy<2)"
      make_venv .venv-tflite "tflite-runtime==2.14.*" "numpy<2" "opencv-python-headless<4.11" \
          "paho-mqtt>=2,<3" "flatbuffers>=2" pytest \
        && .venv-tflite/bin/pip install "${PIP_FLAGS[@]}" --no-deps -e . \
        || { RESULTS+=("tflite=setup-failed"); FAILED=1; continue; }
      EDGE_AGENT_RUNTIME=tflite-runtime run_pytest tflite .venv-tflite -m "not host" \
          tests/test_golden.py tests/test_letterbox.py tests/test_model_contract.py \
          tests/test_inspect_runtimes.py
      ;;
    host)
      say "venv .venv-host (TensorFlow host tools)"
      make_venv .venv-host -e ".[host,dev]" || { RESULTS+=("host=setup-failed"); FAILED=1; continue; }
      if [ -d tests/host ]; then
        # TensorFlow's own CPU kernels, as on every CPU without AVX-512 VNNI/BF16 or AMX (where TF
        # leaves oneDNN off): the host tools must not depend on oneDNN, whatever this CPU has.
        TF_ENABLE_ONEDNN_OPTS=0 run_pytest host .venv-host -m host tests/host
        # oneDNN on: the dilated depthwise layer against the native dilated op (only oneDNN has
        # its kernel) and the conversions again (~1 min).
        T_SUITE=$SECONDS
        TF_ENABLE_ONEDNN_OPTS=1 run_pytest host-onednn .venv-host -m host tests/host/test_dilation.py
      else
        echo "[host] tests/host missing"; RESULTS+=("host=missing"); FAILED=1
      fi
      ;;
    installed)
      say "venv .venv drives the installed-wheel stage"
      make_venv .venv -e ".[dev]" || { RESULTS+=("installed=setup-failed"); FAILED=1; continue; }
      run_pytest installed .venv -m installed tests/test_installed.py --durations=0
      ;;
    picamera2)
      say "picamera2: real picamera2 + libcamera's virtual camera in a trixie root (tools/picamera2-root.sh)"
      make_venv .venv -e ".[dev]" && bash tools/picamera2-root.sh \
        || { RESULTS+=("picamera2=setup-failed"); FAILED=1; continue; }
      EDGE_AGENT_PICAMERA2_REQUIRED=1 run_pytest picamera2 .venv -m picamera2 tests/test_picamera2_real.py
      ;;
    systemd)
      say "systemd: the installed service under a real systemd (systemd-nspawn, tools/systemd-root.sh)"
      make_venv .venv -e ".[dev]" && bash tools/systemd-root.sh \
        || { RESULTS+=("systemd=setup-failed"); FAILED=1; continue; }
      EDGE_AGENT_SYSTEMD_REQUIRED=1 run_pytest systemd .venv -m systemd tests/test_systemd_real.py
      ;;
    *) echo "unknown suite $suite"; FAILED=1 ;;
  esac
done

say "summary (total ${SECONDS}s): ${RESULTS[*]}"
exit $FAILED
