#!/usr/bin/env bash
# A Debian 12 (bookworm) root that boots a REAL systemd (252) under systemd-nspawn, for
# tests/test_systemd_real.py: the built wheel, `edge-agent service install` and the hardened unit
# as on a Raspberry Pi OS bookworm device.
#
#   bash tools/systemd-root.sh                        # builds once (~70 s), then reuses (stamp file)
#   EDGE_AGENT_SYSTEMD_ROOT=/some/dir bash tools/systemd-root.sh
#
# The root holds only what a minimal bookworm device has plus Python: systemd, systemd-sysv,
# dbus, python3, python3-venv, ca-certificates (minbase also brings passwd: useradd, userdel).
# Nothing of the agent goes in: the test boots a throw-away overlay (or copy) of this root and
# installs the wheel there as a user would. The host gets debootstrap and systemd-container
# (systemd-nspawn) with apt when they are missing, and mosquitto for the broker the test starts.
#
# The stamp is written last and names the recipe: a root without it (an interrupted build) or
# with another recipe is rebuilt from scratch.
set -euo pipefail

ROOT=${EDGE_AGENT_SYSTEMD_ROOT:-/var/tmp/edge-agent-roots/systemd-bookworm}
STAMP="$ROOT/.edge-agent-systemd-root"
# Bump when the root's contents change.
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates
RECIPE="v1 bookworm minbase $PACKAGES"
SECONDS=0
step() { echo "[systemd-root t=${SECONDS}s] $*"; }

# Host tools: systemd-nspawn, debootstrap, mosquitto (+ mosquitto_passwd).
missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "systemd-root.sh: needs root to apt-get install ${missing[*]}" >&2; exit 1; }
  step "host: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ]; then
  echo "systemd root: $ROOT is ready ($RECIPE)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "systemd-root.sh: needs root (debootstrap)" >&2; exit 1; }

MIRROR=${EDGE_AGENT_DEBIAN_MIRROR:-$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | awk '{print $2}' | grep -v security | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

step "building $ROOT ($RECIPE) from $MIRROR"
# A partial root is never reused: debootstrap starts from an empty directory.
rm -rf "$ROOT"
mkdir -p "$ROOT"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
  || { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
rm -f "$ROOT.debootstrap.log"

# A booted copy needs: a machine id made at first boot (empty file = "uninitialized"), no getty
# on the nspawn console, apt's cache empty (smaller overlay lower dir).
: > "$ROOT/etc/machine-id"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages 2>/dev/null || true
chroot "$ROOT" systemctl mask console-getty.service getty@tty1.service >/dev/null 2>&1 || true

step "check: systemd, python3 -m venv, useradd"
chroot "$ROOT" dpkg-query -W systemd python3 python3-venv passwd dbus
chroot "$ROOT" python3 -c "import venv, ensurepip"
[ -x "$ROOT/usr/sbin/useradd" ] && [ -x "$ROOT/lib/systemd/systemd" ]

echo "$RECIPE" > "$STAMP"
step "done: $ROOT ($(du -sh "$ROOT" | cut -f1))"
