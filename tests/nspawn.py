"""A real systemd booted with systemd-nspawn, driven from the host; and a system call injector.

``Machine`` boots a throw-away overlay (or copy) of the cached root that tools/systemd-root.sh
builds, runs commands inside with ``nsenter`` into its systemd's namespaces (a clean
environment, as root, like ``machinectl shell``), and powers it off, unmounts and removes
everything on ``close()``. The container shares the host's network: a mosquitto on the host's
loopback is reachable from inside, and pip reaches the package index.

``inject_syscall`` makes a RUNNING process execute one system call of our choosing (ptrace, x86-64):
what its seccomp filter and mount namespace do to that call is what they do to the process
itself, so a sandbox setting can be proven on the live agent rather than on a probe started
beside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import shutil
import signal
import struct
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.helpers import wait_until as wait_for

ROOT_ENV = "EDGE_AGENT_SYSTEMD_ROOT"
DEFAULT_ROOT = Path("/var/tmp/edge-agent-roots/systemd-bookworm")
STAMP = ".edge-agent-systemd-root"
PIP_CACHE = Path("/var/tmp/edge-agent-roots/pip-cache")  # the "device's" pip cache, kept across runs
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cached_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def root_problem() -> Optional[str]:
    """Why a container cannot be booted here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlay mounts, ptrace)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (apt-get install systemd-container; tools/systemd-root.sh does)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    root = cached_root()
    if not (root / STAMP).is_file():
        return f"no systemd root at {root} (run bash tools/systemd-root.sh)"
    return None


def children(pid: int) -> List[int]:
    out: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def host_pid(inner_pid: int, pidns_of: int) -> int:
    """The host pid of the process ``inner_pid`` of the pid namespace of host process ``pidns_of``."""
    target_ns = os.readlink(f"/proc/{pidns_of}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != target_ns:
                continue
            nspid = next(l for l in (entry / "status").read_text().splitlines() if l.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(nspid.split()[-1]) == inner_pid:
            return int(entry.name)
    raise LookupError(f"no process {inner_pid} in the pid namespace of {pidns_of}")


class Machine:
    """One booted container (``boot()``), commands inside (``sh``), cleanup (``close()``)."""

    def __init__(self, workdir: Path, binds: Sequence[str] = (), bind_ro: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.binds, self.bind_ro = list(binds), list(bind_ro)
        self.dir: Optional[Path] = None  # the container's root directory on the host
        self.mode = ""  # "overlay" or "copy"
        self.nspawn: Optional[subprocess.Popen] = None
        self.pid1 = 0  # the container's systemd, as a host pid
        self.console = workdir / "console.log"
        self.timings: Dict[str, float] = {}

    # -- the root ----------------------------------------------------------------------------
    def prepare(self) -> Path:
        """An overlay over the cached root (nothing is written to it), else a copy."""
        lower = cached_root()
        merged, upper, work = (self.workdir / n for n in ("root", "upper", "work"))
        for d in (merged, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                               capture_output=True, text=True)
        if mount.returncode == 0:
            self.mode = "overlay"
        else:  # no overlayfs here: a copy (a reflink where the file system can)
            merged.rmdir()
            subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(merged)], check=True)
            self.mode = "copy"
        self.dir = merged
        self.timings["root"] = time.monotonic() - t0
        return merged

    # -- boot and commands -------------------------------------------------------------------
    def boot(self, name: str = "edge-agent-ci", timeout: float = 90.0) -> None:
        assert self.dir is not None, "prepare() first"
        t0 = time.monotonic()
        cmd = ["systemd-nspawn", "-D", str(self.dir), "--boot", "--register=no", "--keep-unit",
               f"--machine={name}", "--console=read-only"]
        cmd += [f"--bind={b}" for b in self.binds] + [f"--bind-ro={b}" for b in self.bind_ro]
        with open(self.console, "wb") as log:
            self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

        def systemd_pid() -> int:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.nspawn.returncode}):\n{self.console_tail()}")
            for pid in children(self.nspawn.pid):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return pid
                except OSError:
                    pass
            return 0

        self.pid1 = wait_for(systemd_pid, timeout, "the container's systemd")

        def running() -> bool:
            state = self.sh("systemctl", "is-system-running", ok=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                return True
            return False
        wait_for(running, timeout, f"systemctl is-system-running (console:\n{self.console_tail()})", poll_s=0.3)
        self.timings["boot"] = time.monotonic() - t0

    def console_tail(self, chars: int = 3000) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def sh(self, *argv: str, ok: bool = True, timeout: float = 120.0, env: Optional[Dict[str, str]] = None,
           input: Optional[str] = None) -> subprocess.CompletedProcess:
        """``argv`` inside the container as root, in all its namespaces, with a clean environment."""
        base = {"PATH": INNER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                "SYSTEMD_COLORS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        base.update(env or {})
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i",
               *(f"{k}={v}" for k, v in base.items()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                              cwd="/")
        if ok and proc.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(argv)} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        """``systemctl show`` as key -> value (repeated keys joined with newlines)."""
        args = ["systemctl", "show", unit, "--timestamp=us+utc"] + [f"--property={p}" for p in props]
        out: Dict[str, str] = {}
        for line in self.sh(*args).stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = out[key] + "\n" + value if key in out else value
        return out

    def host_pid(self, inner_pid: int) -> int:
        return host_pid(inner_pid, self.pid1)

    def path(self, inside: str) -> Path:
        """A path of the container's file system, as seen from the host."""
        assert self.dir is not None
        return self.dir / inside.lstrip("/")

    # -- cleanup -----------------------------------------------------------------------------
    def poweroff(self, timeout: float = 60.0) -> None:
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        t0 = time.monotonic()
        if self.pid1:
            self.sh("systemctl", "poweroff", "--no-block", ok=False, timeout=20)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self.nspawn.send_signal(signal.SIGKILL)  # our own nspawn, by its pid: takes the container
            self.nspawn.wait(20)
        self.timings["poweroff"] = time.monotonic() - t0

    def close(self) -> None:
        try:
            self.poweroff()
        finally:
            if self.dir is not None and self.mode == "overlay":
                if subprocess.run(["umount", str(self.dir)], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)
            shutil.rmtree(self.workdir, ignore_errors=True)


def parse_us_timestamp(text: str) -> float:
    """'Mon 2026-12-07 18:09:36.947232 UTC' (systemctl --timestamp=us+utc) -> unix seconds."""
    return datetime.strptime(text.strip(), "%a %Y-%m-%d %H:%M:%S.%f UTC").replace(
        tzinfo=timezone.utc).timestamp()


# -- making a running process execute one system call (ptrace, x86-64) ------------------------------

PTRACE_PEEKTEXT, PTRACE_POKEDATA = 1, 5
PTRACE_SINGLESTEP, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 9, 12, 13, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
WAIT_ALL = 0x40000000
REG_NAMES = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
             "fs_base gs_base ds es fs gs").split()
SYS = {"mmap": 9, "mprotect": 10, "munmap": 11, "close": 3, "openat": 257, "unlinkat": 263}
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE_ANON = 0x22
AT_FDCWD = -100


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in REG_NAMES]


def injection_supported() -> Optional[str]:
    if platform.machine() != "x86_64":
        return f"system call injection is written for x86-64, this is {platform.machine()}"
    return None


class Injector:
    """ptrace-attached to one thread of a running process; ``syscall(...)`` runs a call in it.

    The thread is stopped with PTRACE_SEIZE + PTRACE_INTERRUPT (no signal is sent, the other
    threads keep running), its registers are saved, each call is made by pointing the
    instruction pointer at a ``syscall`` instruction with the arguments in the registers and
    single-stepping it, and the saved registers are put back on ``close()``: an interrupted
    system call (the thread usually sleeps in futex/select) is restarted by the kernel as after
    any ptrace stop."""

    def __init__(self, tid: int, attempts: int = 50) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.ptrace.restype = ctypes.c_long
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self.tid = tid
        for _ in range(attempts):
            self._attach()
            self.saved = self._getregs()
            # stopped right after a system call instruction (0f 05), as when sleeping in one
            word = self._peek(self.saved.rip - 2)
            if word & 0xFFFF == 0x050F:
                self.syscall_at = self.saved.rip - 2
                return
            self._detach(self.saved)
            time.sleep(0.05)
        raise AssertionError(f"thread {tid} was never caught in a system call")

    def _ptrace(self, req: int, addr: int = 0, data=None) -> int:
        ctypes.set_errno(0)
        res = self.libc.ptrace(req, self.tid, ctypes.c_void_p(addr), data)
        err = ctypes.get_errno()
        if res == -1 and err:
            raise OSError(err, f"ptrace({req}) on {self.tid}: {os.strerror(err)}")
        return res

    def _wait_stop(self) -> None:
        pid, status = os.waitpid(self.tid, WAIT_ALL)
        if not os.WIFSTOPPED(status):
            raise AssertionError(f"thread {self.tid} did not stop (status {status:#x})")

    def _attach(self) -> None:
        self._ptrace(PTRACE_SEIZE)
        self._ptrace(PTRACE_INTERRUPT)
        self._wait_stop()

    def _detach(self, regs: Regs) -> None:
        self._setregs(regs)
        self._ptrace(PTRACE_DETACH)

    def _getregs(self) -> Regs:
        regs = Regs()
        self._ptrace(PTRACE_GETREGS, 0, ctypes.byref(regs))
        return regs

    def _setregs(self, regs: Regs) -> None:
        self._ptrace(PTRACE_SETREGS, 0, ctypes.byref(regs))

    def _peek(self, addr: int) -> int:
        return self._ptrace(PTRACE_PEEKTEXT, addr) & 0xFFFFFFFFFFFFFFFF

    def write(self, addr: int, data: bytes) -> None:
        data += b"\0" * (-len(data) % 8)
        for off in range(0, len(data), 8):
            (word,) = struct.unpack("<Q", data[off:off + 8])
            self._ptrace(PTRACE_POKEDATA, addr + off, ctypes.c_void_p(word))

    def scratch(self, data: bytes) -> int:
        """``data`` written onto the thread's stack, well below its stack pointer (and the red
        zone): the thread is stopped and its frames above rsp are untouched."""
        addr = (self.saved.rsp - 8192 - len(data)) & ~0xF
        self.write(addr, data)
        return addr

    def syscall(self, name: str, *args: int) -> int:
        """Run system call ``name`` in the thread; returns the raw result (-errno on failure)."""
        regs = Regs.from_buffer_copy(self.saved)
        regs.rax = SYS[name]
        regs.orig_rax = 0xFFFFFFFFFFFFFFFF  # not in a system call: no restart on resume
        for reg, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, value & 0xFFFFFFFFFFFFFFFF)
        regs.rip = self.syscall_at
        self._setregs(regs)
        self._ptrace(PTRACE_SINGLESTEP)
        self._wait_stop()
        result = self._getregs().rax
        return result - (1 << 64) if result >= 1 << 63 else result

    def close(self) -> None:
        self._detach(self.saved)


def errno_name(result: int) -> str:
    return errno.errorcode.get(-result, str(result)) if result < 0 else "ok"
