#!/usr/bin/env bash
# A Debian 13 (trixie) root with REAL libcamera 0.7.1 (trixie-backports) and picamera2 from PyPI,
# for tests/test_picamera2_real.py: the agent's picamera2 source on libcamera's virtual camera.
#
#   bash tools/picamera2-root.sh                 # builds once, then reuses (stamp file)
#   EDGE_AGENT_PICAMERA2_ROOT=/some/dir bash tools/picamera2-root.sh
#   ARCH=arm64 ...                               # an aarch64 root (needs qemu-user-static binfmt;
#                                                # ~8 min under qemu; optional, not used by CI)
#
# Why trixie-backports: trixie main has libcamera 0.4.0, whose virtual camera never completes a
# request for picamera2 (fixed upstream in 0.5.0); backports has 0.7.1 with the `virtual` pipeline
# handler on amd64 and arm64. picamera2 is not in Debian: pip in a venv with
# --system-site-packages (apt's python3-libcamera and numpy), python3-prctl for it, gcc and
# python3-dev to build PiDNG. The agent's own dependencies (opencv-python-headless, paho-mqtt,
# flatbuffers, ai-edge-litert) are installed here too, so the test only installs the agent's
# wheel (--no-deps). Nothing site-specific of the test (pykms stub, memfd allocator, Raw-role
# fallback, virtual.yaml) is put in the root: tests/picamera2_virtual/ brings those per run.
#
# Root only (debootstrap, chroot, mounts). Bind mounts of /proc, /sys, /dev exist only inside a
# private mount namespace (unshare) and are undone on exit either way. Follows the recipe of
# ../shared/tools/libcamera-virtual/recipe.sh (measured there: ~80 s from scratch on amd64).
set -euo pipefail

ROOT=${EDGE_AGENT_PICAMERA2_ROOT:-/var/tmp/edge-agent-roots/picamera2-trixie}
ARCH=${ARCH:-amd64}
STAMP="$ROOT/.edge-agent-picamera2-root"
# Bump when the root's contents change: a root with another stamp is brought up to date.
RECIPE="v1 arch=$ARCH libcamera=trixie-backports picamera2=0.3.38"
PICAMERA2_PIN=${EDGE_AGENT_PICAMERA2_VERSION:-picamera2==0.3.38}
AGENT_DEPS=("opencv-python-headless>=4.5" "paho-mqtt>=2.0,<3" "flatbuffers>=2.0" "ai-edge-litert>=1.2")

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ]; then
  echo "picamera2 root: $ROOT is ready ($RECIPE)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "picamera2-root.sh: needs root (debootstrap, chroot, mount)" >&2; exit 1; }

# Mounts made below live in a private mount namespace: gone when this script exits, however.
if [ -z "${_EDGE_AGENT_UNSHARED:-}" ]; then
  exec env _EDGE_AGENT_UNSHARED=1 unshare --mount --propagation private bash "$0" "$@"
fi

MIRROR=${EDGE_AGENT_DEBIAN_MIRROR:-$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | awk '{print $2}' | grep -v security | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECONDS=0
step() { echo "[picamera2-root t=${SECONDS}s] $*"; }
# A clean environment inside the root: none of the host's pip settings (find-links, indexes).
in_root() { chroot "$ROOT" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
  PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt "$@"; }

MOUNTED=()
cleanup() {
  local i
  for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -f "$STAMP"
step "building $ROOT ($RECIPE) from $MIRROR"
if ! command -v debootstrap >/dev/null; then
  step "host: apt-get install debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi
mkdir -p "$ROOT"
if [ ! -x "$ROOT/usr/bin/apt-get" ] || [ ! -f "$ROOT/.debootstrap-done" ]; then
  step "debootstrap trixie ($ARCH, minbase)"
  rm -rf "${ROOT:?}"/* 2>/dev/null || true
  debootstrap --arch="$ARCH" --variant=minbase --include=ca-certificates trixie "$ROOT" "$MIRROR" >/dev/null
  touch "$ROOT/.debootstrap-done"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's CA bundle (a TLS-inspecting proxy's CA, if any, is in it): pip inside the root uses it.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
echo "deb $MIRROR trixie-backports main" > "$ROOT/etc/apt/sources.list.d/backports.list"
for d in proc sys dev dev/pts; do
  mount --bind "/$d" "$ROOT/$d" && MOUNTED+=("$ROOT/$d")
done

step "apt: python3-libcamera (libcamera 0.7.1, trixie-backports) + python build deps"
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends -t trixie-backports python3-libcamera >/dev/null
in_root apt-get install -y -qq --no-install-recommends \
  python3-venv python3-pip python3-numpy python3-prctl gcc python3-dev >/dev/null
in_root apt-get clean

step "venv (--system-site-packages) + pip: $PICAMERA2_PIN and the agent's dependencies"
[ -x "$ROOT/venv/bin/python" ] || in_root python3 -m venv --system-site-packages /venv
# Keep apt's numpy (python3-libcamera and picamera2 run on it): only add what is missing.
in_root /venv/bin/pip install -q "$PICAMERA2_PIN" "${AGENT_DEPS[@]}"

step "check: libcamera has the virtual pipeline, picamera2 and the agent's deps import"
in_root dpkg-query -W python3-libcamera 'libcamera0.*' python3 python3-numpy
grep -q "virtual" "$ROOT"/usr/lib/*/libcamera.so.0.* || { echo "libcamera has no virtual pipeline handler" >&2; exit 1; }
in_root /venv/bin/python -c "import libcamera, numpy, cv2, paho.mqtt, ai_edge_litert; \
import importlib.metadata as m; print('picamera2', m.version('picamera2'), 'numpy', numpy.__version__, 'cv2', cv2.__version__)"

echo "$RECIPE" > "$STAMP"
step "done: $ROOT"
