#!/usr/bin/env bash
# test-arm64.sh - run the device-side tests on aarch64 under qemu-user emulation, with the real
# aarch64 wheels, in Debian arm64 roots matching Raspberry Pi OS: bookworm (Python 3.11.2,
# glibc 2.36) and trixie (Python 3.13, the current Raspberry Pi OS).
#
#   bash tools/test-arm64.sh [--suite bookworm|trixie|both] [--runtime litert|tflite-runtime|both]
#                            [--keep] [--full] [--self-test-only] [-- PYTEST-ARGS...]
#
#   --suite           which Debian suite(s) (default: both, one after the other, each its own root)
#   --runtime         which runtime venv(s) to test (default: both)
#                       litert          /venv         ai-edge-litert + numpy 2 + opencv 5
#                       tflite-runtime  /venv-tflite  tflite-runtime 2.14 + numpy<2 + opencv<4.11
#                     tflite-runtime has no cp313 wheels (its last release, 2.14, stops at
#                     cp311): on trixie it is skipped with a note (refused if asked for alone)
#   --keep            keep the prepared root and its venvs for the next run (it is always unmounted);
#                     without it the root is deleted and the host changes this run made are undone
#   --full            run every selected test; by default tests that only repeat a code path through
#                     another emulated subprocess (each costs 8-30 s under qemu) are deselected
#   --self-test-only  only the golden-bird check with the raw runtimes, no pytest
#   -- ARGS           replaces the default test selection and deselection (paths, -k, -x ...;
#                     "-m 'not host'" stays)
#
#   env:  ARM64_ROOT  the rootfs directory (default ${XDG_CACHE_HOME:-~/.cache}/edge-agent-arm64/root-SUITE;
#                     with --suite both, ARM64_ROOT-SUITE)
#         ARM64_TESTS the default test selection (space-separated paths)
#         QEMU_CPU    emulated CPU (default cortex-a76 ~ Raspberry Pi 5; cortex-a72 ~ Pi 4)
#         ARM64_PYTEST_TIMEOUT  seconds per pytest run before it is killed (default 1800)
#
# Needs root (chroot, mount, binfmt), the Debian apt mirror and PyPI. Emulation is 40-60x slower
# than native: this proves correctness on aarch64, never speed.
#
# What it does to the host, via ../shared/tools/arm64-chroot.sh (read its header): adds the
# bookworm-backports apt source, installs debootstrap + qemu-user-static, registers the
# qemu-aarch64 binfmt entry, bind-mounts /proc /sys /dev into the root. This script adds read-only
# bind mounts of the checkout (/w/main) and ../shared (/w/shared), so the tests' relative
# ../shared/test_data resolves and nothing in the checkout is written. On exit (also on failure or
# Ctrl-C) it stops processes left inside the root, unmounts everything under it, checks that no
# mount is left, and only then deletes the root (unless --keep). The installed apt packages stay.
#
# Inside the root, tests get: EDGE_AGENT_RUNTIME=<runtime> (the registry's default runtime),
# EDGE_AGENT_EXPECT_MACHINE=aarch64 and EDGE_AGENT_EXPECT_PYTHON=3.11|3.13 (tests/test_arch.py
# asserts both), and a real aarch64 mosquitto in the root (from the suite's arm64 packages) so the unchanged broker fixtures start it on the
# host's loopback (a chroot shares the host's network namespace).
set -euo pipefail

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

SUITE=both RUNTIMES=both KEEP=0 FULL=0 SELF_TEST_ONLY=0 PYTEST_SELECTION=() PASS_ON=()
while [ $# -gt 0 ]; do
  case $1 in
    --suite) [ $# -ge 2 ] || { echo "--suite needs a value" >&2; exit 2; }; SUITE=$2; shift 2; continue ;;
    --suite=*) SUITE=${1#*=}; shift; continue ;;
  esac
  PASS_ON+=("$1")
  case $1 in
    --runtime) [ $# -ge 2 ] || { echo "--runtime needs a value" >&2; exit 2; }; RUNTIMES=$2; PASS_ON+=("$2"); shift 2 ;;
    --runtime=*) RUNTIMES=${1#*=}; shift ;;
    --keep) KEEP=1; shift ;;
    --full) FULL=1; shift ;;
    --self-test-only) SELF_TEST_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PYTEST_SELECTION=("$@"); PASS_ON+=("$@"); break ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $SUITE in
  bookworm) PY_EXPECTED=3.11 ;;
  trixie) PY_EXPECTED=3.13 ;;
  both) ;;
  *) echo "--suite must be bookworm, trixie or both, not '$SUITE'" >&2; exit 2 ;;
esac
TFLITE_NOTE="tflite-runtime: skipped on trixie: no cp313 wheels exist (its last release, 2.14, has cp38-cp311 only)"
case $RUNTIMES in
  both) RUNTIMES="litert tflite-runtime"
        [ "$SUITE" = trixie ] && { echo "$TFLITE_NOTE"; RUNTIMES=litert; } ;;
  litert) ;;
  tflite-runtime) [ "$SUITE" = trixie ] && { echo "$TFLITE_NOTE" >&2; exit 2; } ;;
  *) echo "--runtime must be litert, tflite-runtime or both, not '$RUNTIMES'" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "test-arm64.sh needs root (chroot, mount, binfmt_misc)" >&2; exit 2; }

if [ "$SUITE" = both ]; then  # one suite after the other, each a full run with its own root and cleanup
  SECONDS=0 rc=0 LINES=()
  for suite in bookworm trixie; do
    t0=$SECONDS
    if [ "$suite" = trixie ] && [ "$RUNTIMES" = tflite-runtime ]; then
      LINES+=("trixie: skipped ($TFLITE_NOTE)"); continue
    fi
    printf '\n##### suite %s\n' "$suite"
    # (set -e: a failing suite must not stop the next one)
    st=0; ARM64_ROOT=${ARM64_ROOT:+$ARM64_ROOT-$suite} bash "$0" --suite "$suite" "${PASS_ON[@]}" || st=$?
    [ $st = 0 ] || rc=1
    LINES+=("$suite: exit $st in $((SECONDS - t0))s")
  done
  printf '\n##### aarch64 suites (total %ds)\n' "$SECONDS"
  printf '  %s\n' "${LINES[@]}"
  exit $rc
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(cd "$REPO/../shared" 2>/dev/null && pwd) || { echo "../shared not found beside $REPO" >&2; exit 2; }
CHROOT_SCRIPT=$SHARED/tools/arm64-chroot.sh
[ -r "$CHROOT_SCRIPT" ] || { echo "$CHROOT_SCRIPT not found" >&2; exit 2; }
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent-arm64
R=${ARM64_ROOT:-$CACHE/root-$SUITE}
R=$(realpath -m "$R")
MARKER=$R/.edge-agent-arm64-root   # only a root carrying this file is ever deleted
APT_DIR=$R.apt                     # private apt state for the arm64 mosquitto download
PYTEST_TIMEOUT=${ARM64_PYTEST_TIMEOUT:-1800}
PIP=(--disable-pip-version-check -q)
export QEMU_CPU=${QEMU_CPU:-cortex-a76} PIP_NO_INPUT=1

SECONDS=0
say() { printf '\n=== [t=%ds] %s\n' "$SECONDS" "$*"; }
run_in() { env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u PIP_FIND_LINKS chroot "$R" "$@"; }

venv_of() { [ "$1" = litert ] && echo /venv || echo /venv-tflite; }

# ------------------------------------------------------------------ cleanup (always runs)
BINFMT=/proc/sys/fs/binfmt_misc/qemu-aarch64
BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.list
HAD_BINFMT=0; [ -e "$BINFMT" ] && HAD_BINFMT=1
HAD_BACKPORTS=0; [ -e "$BACKPORTS" ] && HAD_BACKPORTS=1
LOGDIR=$(mktemp -d /tmp/edge-agent-arm64.XXXXXX)

mounts_under() {  # mount points at or below $R, deepest first
  awk -v r="$R" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

stop_processes_in_root() {  # processes whose root is $R were started by this run: end them by pid
  local pid pids=()
  for pid in /proc/[0-9]*; do
    [ "$(readlink "$pid/root" 2>/dev/null)" = "$R" ] && pids+=("${pid#/proc/}")
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  echo "stopping processes left in the root: ${pids[*]}"
  kill "${pids[@]}" 2>/dev/null || true
  sleep 2
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done
  return 0
}

cleanup() {
  local rc=$? m left
  set +e
  trap - EXIT INT TERM
  say "cleanup"
  stop_processes_in_root
  for m in $(mounts_under); do mountpoint -q "$m" && umount -R "$m"; done
  left=$(mounts_under)
  if [ -n "$left" ]; then
    echo "ERROR: still mounted, NOT removing $R:"; echo "$left"
    echo "unmount them by hand (umount -R ...) before deleting $R"
    [ $rc -eq 0 ] && rc=1
  else
    echo "no mounts left under $R"
    if [ $KEEP = 0 ]; then
      if [ -e "$MARKER" ]; then
        rm -rf --one-file-system "$R" "$R.run" "$APT_DIR"
        echo "removed $R"
      elif [ -e "$R" ]; then
        echo "not removing $R: no $(basename "$MARKER") marker (not made by this script)"
      fi
      # undo the host changes this run made (the apt packages it installed stay)
      if [ $HAD_BINFMT = 0 ] && [ -e "$BINFMT" ]; then echo -1 > "$BINFMT" && echo "unregistered binfmt qemu-aarch64"; fi
      if [ $HAD_BACKPORTS = 0 ] && [ -e "$BACKPORTS" ]; then rm -f "$BACKPORTS" && echo "removed $BACKPORTS"; fi
    else
      echo "kept $R (--keep): the next run reuses it; a run without --keep deletes it"
    fi
  fi
  rm -rf "$LOGDIR"
  [ $KEEP = 0 ] && [ ! -e "$R" ] && rm -f "$R.lock" && rmdir "$(dirname "$R")" 2>/dev/null
  say "total ${SECONDS}s, exit $rc"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# one run per root at a time (a second run would unmount under the first one's feet)
mkdir -p "$(dirname "$R")"
exec 9>"$R.lock"
flock -n 9 || { echo "another test-arm64.sh is using $R" >&2; trap - EXIT; exit 2; }

# ------------------------------------------------------------------ 1. the arm64 root
prepare_root() {
  if [ -d "$R" ] && [ ! -e "$MARKER" ] && [ -n "$(ls -A "$R")" ]; then
    echo "$R exists and was not made by this script: choose another ARM64_ROOT" >&2; return 2
  fi
  mkdir -p "$R" && touch "$MARKER"
  say "arm64 root ($SUITE): SUITE=$SUITE $CHROOT_SCRIPT $R"
  # venv A (/venv) is the chroot script's own venv: ai-edge-litert + the device deps + pytest;
  # setuptools>=70.1 (has bdist_wheel) so the checkout installs editable without build isolation
  SUITE=$SUITE ARM_PKGS="numpy ai-edge-litert opencv-python-headless paho-mqtt simplejpeg pytest setuptools>=70.1" \
    bash "$CHROOT_SCRIPT" "$R"
  # the dpkg -x shortcut skips maintainer scripts: no /etc/passwd, which getpass/pwd expect
  [ -e "$R/etc/passwd" ] || cp "$R/usr/share/base-passwd/passwd.master" "$R/etc/passwd"
  [ -e "$R/etc/group" ] || cp "$R/usr/share/base-passwd/group.master" "$R/etc/group"
}

install_mosquitto() {  # Debian's arm64 mosquitto, fetched by the HOST's apt (native speed) with a private state dir
  [ -x "$R/usr/sbin/mosquitto" ] && return 0
  say "arm64 mosquitto from $SUITE into the root (host apt, private state in $APT_DIR)"
  local mirror deb
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
  mirror=${DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial"
  : > "$APT_DIR/status"
  echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SUITE main" \
    > "$APT_DIR/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::State::Status=$APT_DIR/status"
              -o "Dir::Cache=$APT_DIR" -o "Dir::Cache::Archives=$APT_DIR/archives"
              -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" -qq update
  apt-get "${opts[@]}" -qq -y --download-only --no-install-recommends install mosquitto openssl >/dev/null
  for deb in "$APT_DIR"/archives/*.deb; do  # those debootstrap did not already unpack
    [ -e "$R/var/cache/apt/archives/$(basename "$deb")" ] || dpkg -x "$deb" "$R"
  done
  rm -rf "$APT_DIR"
  [ -x "$R/usr/sbin/mosquitto" ] || { echo "mosquitto did not unpack into $R" >&2; return 1; }
  { run_in /usr/sbin/mosquitto -h || true; } | head -1   # -h exits 3
}

make_tflite_venv() {  # venv B: the last tflite-runtime and what it needs (pyproject extra "tflite-runtime")
  say "venv B /venv-tflite: tflite-runtime 2.14, numpy<2, opencv<4.11"
  [ -x "$R/venv-tflite/bin/python" ] || run_in /usr/bin/python3 -m venv /venv-tflite
  run_in /venv-tflite/bin/pip install "${PIP[@]}" "tflite-runtime==2.14.*" "numpy<2" \
    "opencv-python-headless<4.11" "paho-mqtt>=2,<3" "flatbuffers>=2" pytest "setuptools>=70.1"
}

mount_checkout() {  # /w/main and /w/shared, read-only: ../shared resolves, the checkout is never written
  say "bind mounts (read-only): $REPO -> /w/main, $SHARED -> /w/shared"
  local src dst
  for pair in "$REPO:$R/w/main" "$SHARED:$R/w/shared"; do
    src=${pair%%:*} dst=${pair#*:}
    mkdir -p "$dst"
    mountpoint -q "$dst" || { mount --bind "$src" "$dst" && mount -o remount,bind,ro "$dst"; }
  done
}

install_project() {  # editable, no deps (each venv pins its own); metadata is built in /tmp, not the checkout
  local venv stamp
  venv=$(venv_of "$1")
  stamp=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
  if [ "$(cat "$R$venv/.edge-agent-installed" 2>/dev/null)" = "$stamp" ]; then
    say "[$1] edge-agent already installed editable in $venv (pyproject.toml unchanged)"
  else
    say "[$1] pip install --no-deps -e /w/main into $venv"
    run_in "$venv/bin/pip" install "${PIP[@]}" --no-deps --no-build-isolation -e /w/main \
      > "$LOGDIR/pip-$1.log" 2>&1 || { cat "$LOGDIR/pip-$1.log"; return 1; }
    echo "$stamp" > "$R$venv/.edge-agent-installed"
  fi
  run_in "$venv/bin/python" -c "import edge_agent, sys; print('edge_agent', edge_agent.__version__, 'from', edge_agent.__file__)"
  run_in "$venv/bin/pip" list --disable-pip-version-check 2>/dev/null \
    | grep -iE "^(numpy|ai-edge-litert|tflite-runtime|opencv-python-headless|paho-mqtt|simplejpeg|pytest|edge-agent) " \
    | awk '{printf "  %s %s\n", $1, $2}'
}

# ------------------------------------------------------------------ 2. checks
default_selection() {  # the device-side subset: core (golden incl. CLI, letterbox, model contract) + MQTT + allocator
  local f out=()
  if [ -n "${ARM64_TESTS:-}" ]; then echo "$ARM64_TESTS"; return; fi
  for f in tests/test_arch.py tests/test_golden.py tests/test_letterbox.py tests/test_model_contract.py \
           tests/test_inspect_runtimes.py tests/test_cli.py tests/test_mqtt.py tests/test_release_memory.py; do
    [ -e "$REPO/$f" ] && out+=("$f")
  done
  echo "${out[*]}"
}

self_test() {  # raw runtime (only the agreement score is the project's): proves the platform before the project tests
  local venv
  venv=$(venv_of "$1")
  say "[$1] golden self-test (raw runtime, both DeepLab models)"
  run_in env EDGE_AGENT_RUNTIME="$1" "$venv/bin/python" /w/main/tools/arm64/golden_check.py /w/shared/test_data \
    2>&1 | grep -v "^INFO: Created TensorFlow Lite XNNPACK" | tee "$LOGDIR/self-$1.log"
  return "${PIPESTATUS[0]}"
}

# Deselected by default (--full runs them): the same code path again through another emulated
# subprocess (python + numpy + OpenCV + runtime imports cost 8-30 s per process under qemu) or the
# fp16 host reference model (42 s), or nine dm1.0 builds (the trim level; the allocator probes stay).
# One CLI golden run, one CLI refusal pair and one `inspect` stay.
EMULATION_DESELECT="not fp16_513 and not (through_cli and dm10) \
and not truncated_models_never_crash_the_process and not bad_image_is_refused_before_loading_the_model \
and not (refused_through_cli and not classifier and not missing) \
and not test_inspect_float_model_and_all_tensors and not test_inspect_json_and_edgetpu_model \
and not test_inspect_bad_file_is_one_line and not rss_is_back_at_one_level_after_each_dropped_model"

run_pytest() {
  local runtime=$1 venv rc
  venv=$(venv_of "$runtime")
  say "[$runtime] pytest -m 'not host' ${SELECTION[*]}"
  set +e
  # in the background + wait: a TERM/INT to this script runs the cleanup trap at once
  # (bash defers traps while a foreground child runs; the cleanup then ends the root's processes)
  (
    timeout --kill-after=30 "$PYTEST_TIMEOUT" \
      env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u PIP_FIND_LINKS \
          EDGE_AGENT_RUNTIME="$runtime" EDGE_AGENT_EXPECT_MACHINE=aarch64 \
          EDGE_AGENT_EXPECT_PYTHON="$PY_EXPECTED" PYTHONDONTWRITEBYTECODE=1 \
        chroot "$R" /bin/sh -c 'cd /w/main && exec "$@"' sh \
          "$venv/bin/python" -m pytest -p no:cacheprovider --durations=8 -m "not host" "${SELECTION[@]}" 2>&1 \
      | tee "$LOGDIR/pytest-$runtime.log"
    exit "${PIPESTATUS[0]}"
  ) &
  wait $!
  rc=$?
  set -e
  [ "$rc" = 5 ] && { echo "[$runtime] no tests were collected: failing"; rc=1; }
  [ "$rc" = 124 ] && echo "[$runtime] pytest killed after ${PYTEST_TIMEOUT}s"
  return "$rc"
}

pytest_summary() {  # "12 passed, 1 skipped in 80.1s" from pytest's last line
  grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$1" \
    | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//' || true
}

golden_summary() {  # "dm10=0.9576 dm05=0.9271"
  grep -oE 'golden [a-z0-9_]+: agreement [0-9.]+' "$1" \
    | sed 's/golden deeplabv3_mnv2_pascal_quant/dm10/; s/golden deeplabv3_mnv2_dm05_pascal_quant/dm05/; s/: agreement /=/' \
    | tr '\n' ' ' || true
}

# ------------------------------------------------------------------ main
T_PREP=$SECONDS
prepare_root
install_mosquitto
case " $RUNTIMES " in *" tflite-runtime "*) make_tflite_venv ;; esac
mount_checkout
for rt in $RUNTIMES; do install_project "$rt"; done
T_PREP=$((SECONDS - T_PREP))

if [ ${#PYTEST_SELECTION[@]} -gt 0 ]; then SELECTION=("${PYTEST_SELECTION[@]}")
else
  read -r -a SELECTION <<< "$(default_selection)"
  [ $FULL = 1 ] || SELECTION+=(-k "$EMULATION_DESELECT")
fi

FAILED=0 SUMMARY=()
for rt in $RUNTIMES; do
  t0=$SECONDS st=ok py=skipped
  self_test "$rt" || { st=FAIL; FAILED=1; }
  if [ $SELF_TEST_ONLY = 0 ]; then
    if run_pytest "$rt"; then py=ok; else py="FAIL"; FAILED=1; fi
    py="$py: $(pytest_summary "$LOGDIR/pytest-$rt.log")"
  fi
  golden=$(golden_summary "$LOGDIR/self-$rt.log")
  machine=$(grep -oE 'machine=[^ ]+' "$LOGDIR/self-$rt.log" | head -1 || true)
  SUMMARY+=("$rt: $machine, golden [$st] ${golden}| pytest [$py] | $((SECONDS - t0))s")
done

say "summary $SUITE, Python $(run_in /usr/bin/python3 -c 'import sys; print(sys.version.split()[0])') (prepare ${T_PREP}s)"
[ "$SUITE" = trixie ] && echo "  $TFLITE_NOTE"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
