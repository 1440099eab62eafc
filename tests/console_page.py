"""Talking to a real console in tests (HTTP, chunked uploads, its page in headless chromium): shared by
the console's test modules (test modules do not import each other: tests/test_suite_rules.py)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pytest

from tests.helpers import ConsoleProcess, chromium_available, wait_until

TOKEN = "t0ken-for-the-console-tests"
OUT = Path(__file__).resolve().parent.parent / "out" / "console-screenshots"


def need_browser() -> None:
    """Skip without chromium, except in tools/test.sh's browser suite (EDGE_AGENT_REQUIRE_BROWSER=1)."""
    if chromium_available():
        return
    why = "chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("EDGE_AGENT_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _rows(driver) -> Dict[str, str]:
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#fleet tbody tr')]"
        ".map(tr => [tr.dataset.device, tr.dataset.online]))")


def _table(driver, selector: str) -> List[List[str]]:
    return driver.execute_script(
        f"return [...document.querySelectorAll('{selector} tbody tr')]"
        ".map(tr => [...tr.cells].map(td => td.textContent))")


def _columns(driver, selector: str) -> List[Dict[str, str]]:
    """The table's rows as {header text: cell text} (lookups by column name, not position)."""
    return driver.execute_script(
        f"const heads = [...document.querySelectorAll('{selector} thead th')].map(th => th.textContent.trim());"
        f"return [...document.querySelectorAll('{selector} tbody tr')]"
        ".map(tr => Object.fromEntries([...tr.cells].map((td, i) => [heads[i], td.textContent])))")


def _fleet(driver) -> Dict[str, Dict[str, str]]:
    """The fleet table: device -> {column header: cell text}."""
    return {row["device"]: row for row in _columns(driver, "#fleet")}


def _click(driver, selector: str) -> None:
    driver.execute_script(f"document.querySelector('{selector}').click()")


def _check(driver, holder: str, devices: List[str]) -> None:
    wait_until(lambda: driver.execute_script(
        f"return document.querySelectorAll('{holder} input').length") >= len(devices), 10, "device checkboxes")
    for dev in devices:
        driver.execute_script(f"document.querySelector('{holder} input[value=\"{dev}\"]').checked = true")


def _kill_device(driver, rec, proc: subprocess.Popen, device: str, prefix: str = "edge-agent") -> float:
    """Back on the fleet tab, SIGKILL ``device``'s agent; when its Last Will reached ``rec`` (monotonic)."""
    _click(driver, '#tabs button[data-tab="fleet"]')
    proc.send_signal(signal.SIGKILL)
    rec.wait_for(f"{prefix}/{device}/availability", b"offline", timeout=30)
    return time.monotonic()


def _shot(driver, tmp_path: Path, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for folder in (tmp_path, OUT):
        driver.save_screenshot(str(folder / f"{name}.png"))


# -- HTTP ------------------------------------------------------------------------------------------

def _http(url: str, method: str = "GET", body: Optional[bytes] = None,
          headers: Optional[Dict[str, str]] = None) -> tuple:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def _page_token(console: ConsoleProcess) -> str:
    page = _http(console.url)[1].decode()
    return page.split('name="console-token" content="')[1].split('"')[0]


def _port(console: ConsoleProcess) -> int:
    return int(console.url.rstrip("/").rsplit(":", 1)[1])


def _read_response(sock: socket.socket, timeout: float = 30.0) -> Tuple[int, bytes]:
    """Status and body of one HTTP/1.1 answer (Content-Length bodies; enough for JSON errors)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(head.split()[1]), body


def _start_upload(port: int, path: str, token: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Console-Token: {token}\r\n"
                  "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    return sock


def _send_chunks(sock: socket.socket, chunks: Iterable[bytes]) -> int:
    """Send chunks until the server answers (or stops reading); returns the bytes sent."""
    sent = 0
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            return sent  # an early answer: stop, as a browser does
        try:
            sock.sendall(b"%x\r\n" % len(chunk))
            sock.sendall(chunk)
            sock.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            return sent
        sent += len(chunk)
    sock.sendall(b"0\r\n\r\n")
    return sent


def _upload(port: int, path: str, token: str, chunks: Iterable[bytes]) -> Tuple[int, bytes, int]:
    sock = _start_upload(port, path, token)
    try:
        sent = _send_chunks(sock, chunks)
        status, body = _read_response(sock)
        return status, body, sent
    finally:
        sock.close()
