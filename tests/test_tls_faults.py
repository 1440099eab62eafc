"""Connection faults through the real agent process and a real mosquitto (issue 14 items 9 and 11).

Certificates are generated per session with openssl (tests/broker.py): a wrong CA, a server
certificate for another host name, expired server and client certificates, a missing client
certificate, plain MQTT to a TLS-only port. Each fault gives one diagnosed line per attempt that
names the setting to fix, at the same level every time, retries go on, the agent does not crash
and never switches to MQTT 3.1.1 because of TLS. Hang-ups before CONNACK (``max_connections``)
switch to 3.1.1 only provisionally: MQTT 5 is back after the next reconnect. ``config check``
loads the cert/key pair; the host CLI says which certificate problem stopped it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from edge_agent.cli import main as cli_main
from tests.data import DM05
from tests.broker import Certs, HangUpProxy, make_certs, make_leaf
from tests.helpers import OutputLines, start_agent, wait_until, write_config

pytestmark = pytest.mark.broker

SOURCE = {"kind": "synthetic", "width": 160, "height": 120, "fps": 1.0}
LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The session CA's extra certificates, and a second CA that signed nothing the broker has."""
    certs = make_certs(tmp_path_factory.mktemp("fault-certs"))
    return {
        "certs": certs,
        "other_ca": make_certs(tmp_path_factory.mktemp("other-ca")).ca,
        "wrong_name": make_leaf(certs, "wrong-name", "serverAuth", san="DNS:broker.example"),
        "expired_server": make_leaf(certs, "expired-server", "serverAuth", expired=True),
        "expired_client": make_leaf(certs, "expired-client", "clientAuth", expired=True),
    }


def run_agent(tmp_path: Path, port: int, name: str = "tls-1", **mqtt: Any) -> OutputLines:
    config = write_config(tmp_path / f"{name}.toml", name, port, SOURCE,
                          mqtt={k: str(v) if isinstance(v, Path) else v for k, v in mqtt.items()})
    return OutputLines(start_agent(config))


def logged(agent: OutputLines, text: str, count: int) -> List[str]:
    """The first ``count`` lines with ``text`` at WARNING or ERROR, or [] while fewer."""
    lines = [line for line in agent.matching(text) if LEVEL.search(line).group(1) in ("WARNING", "ERROR")]
    return lines[:count] if len(lines) >= count else []


def client_tls(certs: Certs, cert: Optional[Path] = None, key: Optional[Path] = None) -> Dict[str, Any]:
    return {"tls": True, "ca_file": certs.ca, "cert_file": cert or certs.client_cert, "key_file": key or certs.client_key}


# (scenario, broker: server cert/require_certificate, agent's [mqtt], the diagnosis expected)
CASES = {
    "wrong CA": ("certs", False, lambda f: {"tls": True, "ca_file": f["other_ca"]},
                 "not signed by a CA in mqtt.ca_file"),
    "host name mismatch": ("wrong_name", False, lambda f: {"tls": True, "ca_file": f["certs"].ca},
                           "is not valid for mqtt.host '127.0.0.1'"),
    "expired server certificate": ("expired_server", False, lambda f: {"tls": True, "ca_file": f["certs"].ca},
                                   "the broker's certificate has expired"),
    "expired client certificate": ("certs", True, lambda f: client_tls(f["certs"], *f["expired_client"]),
                                   "the broker rejected our client certificate: it has expired (mqtt.cert_file)"),
    "no client certificate": ("certs", True, lambda f: {"tls": True, "ca_file": f["certs"].ca},
                              "the broker requires a client certificate: set mqtt.cert_file and mqtt.key_file"),
    "plain MQTT to a TLS port": ("certs", False, lambda f: {},
                                 "the port expects TLS: set mqtt.tls = true"),
    "TLS to a plain port": (None, False, lambda f: {"tls": True, "ca_file": f["certs"].ca},
                            "the port does not speak TLS: set mqtt.tls = false"),
}


def broker_certs(faulty: Dict[str, Any], which: Optional[str]) -> Optional[Certs]:
    """The broker's certificates for a case (None: a plain MQTT listener)."""
    if which is None:
        return None
    certs = faulty["certs"]
    if which == "certs":
        return certs
    cert, key = faulty[which]
    return dataclasses.replace(certs, server_cert=cert, server_key=key)


@pytest.mark.parametrize("case", list(CASES))
def test_tls_fault_is_diagnosed_every_attempt_and_retried(case, faulty, mosquitto, tmp_path):
    which, require, mqtt, expected = CASES[case]
    broker = mosquitto(tls=broker_certs(faulty, which), require_certificate=require)
    agent = run_agent(tmp_path, broker.port, **mqtt(faulty))
    try:
        # every attempt is logged at the same level, at most one line per FAILURE_LOG_INTERVAL_S (the
        # attempts in between at DEBUG, this config's log level); the next line counts them
        lines = wait_until(lambda: logged(agent, expected, 2), timeout=40, what=f"two lines with {expected!r}")
        assert agent.proc.poll() is None, "the agent exited"
        assert len({LEVEL.search(line).group(1) for line in lines}) == 1, lines
        assert "retrying" in lines[0] and "similar attempts not logged" in lines[1], lines
    finally:
        out = agent.stop()
    assert "falling back to MQTT 3.1.1" not in out, out[-3000:]
    assert "does not accept MQTT 5" not in out
    assert "MQTT connected" not in out
    assert "Traceback" not in out, out[-3000:]


def test_host_name_mismatch_connects_with_tls_insecure(faulty, mosquitto, tmp_path):
    broker = mosquitto(tls=broker_certs(faulty, "wrong_name"))
    agent = run_agent(tmp_path, broker.port, tls=True, ca_file=faulty["certs"].ca, tls_insecure=True)
    try:
        agent.wait_for("MQTT connected to", timeout=40)
    finally:
        agent.stop()


def test_hang_ups_before_connack_fall_back_only_until_the_next_reconnect(mosquitto, tmp_path):
    """A broker hanging up before CONNACK (restarting, at its connection limit) is not proof that
    it lacks MQTT 5: the agent tries 3.1.1, and MQTT 5 again after the next disconnect."""
    broker = mosquitto()
    proxy = HangUpProxy(broker.port)
    proxy.hang_up.set()
    agent = run_agent(tmp_path, proxy.port)
    try:
        agent.wait_for("falling back to MQTT 3.1.1 (MQTT 5 is tried again after the next disconnect)", timeout=40)
        assert proxy.hung_up >= 2
        proxy.hang_up.clear()
        (line,) = agent.wait_for("MQTT connected to", timeout=30)
        assert "(MQTT 3.1.1, will retry MQTT 5 after the next disconnect)" in line, line
        proxy.drop_all()  # the connection is lost, as in a broker restart
        lines = agent.wait_for("MQTT connected to", count=2, timeout=30)
        assert lines[1].endswith(f"MQTT connected to 127.0.0.1:{proxy.port} (MQTT 5)"), lines
    finally:
        out = agent.stop()
        proxy.close()
    assert "Traceback" not in out


def test_config_check_loads_the_cert_key_pair(faulty, tmp_path, capsys):
    certs = faulty["certs"]
    base = ["config", "check", "--no-model", "--set", "mqtt.tls=true", "--set", f"mqtt.ca_file={certs.ca}",
            "--set", "source.kind=synthetic", "--set", f"model.path={DM05}", "--set", f"agent.state_dir={tmp_path}"]
    assert cli_main([*base, "--set", f"mqtt.cert_file={certs.client_cert}",
                     "--set", f"mqtt.key_file={certs.client_key}"]) == 0
    capsys.readouterr()
    wrong_key = faulty["expired_client"][1]  # a valid key, but not the certificate's
    assert cli_main([*base, "--set", f"mqtt.cert_file={certs.client_cert}", "--set", f"mqtt.key_file={wrong_key}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mqtt.cert_file/mqtt.key_file" in err and "the key does not belong to the certificate" in err, err
    assert len(err.splitlines()) == 1


def test_remote_cli_credentials_flags_env_and_certificate_errors(faulty, mosquitto, tmp_path, capsys, monkeypatch):
    """TLS + password + required client certificate: the agent from its config, the host CLI
    from flags (then environment); a rejected client certificate is named, not "no answer"."""
    certs = faulty["certs"]
    broker = mosquitto(tls=certs, users={"ops": "s3cret"}, require_certificate=True)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    agent = run_agent(tmp_path, broker.port, username="ops", password_file=secret, **client_tls(certs))
    target = ["--host", "127.0.0.1", "--port", str(broker.port), "--discover-s", "2"]
    flags = ["--username", "ops", "--password-file", str(secret), "--ca-file", str(certs.ca)]
    try:
        agent.wait_for("MQTT connected to", timeout=40)
        capsys.readouterr()
        assert cli_main(["remote", "devices", "--json", *target, *flags, "--cert-file", str(certs.client_cert),
                         "--key-file", str(certs.client_key)]) == 0
        assert json.loads(capsys.readouterr().out)["tls-1"]["online"] is True

        for var, value in (("USERNAME", "ops"), ("PASSWORD_FILE", secret), ("TLS", "true"), ("CA_FILE", certs.ca),
                           ("CERT_FILE", certs.client_cert), ("KEY_FILE", certs.client_key)):
            monkeypatch.setenv(f"EDGE_AGENT_MQTT_{var}", str(value))
        assert cli_main(["remote", "devices", "--json", *target]) == 0
        assert "tls-1" in json.loads(capsys.readouterr().out)
        for var in ("CERT_FILE", "KEY_FILE"):
            monkeypatch.delenv(f"EDGE_AGENT_MQTT_{var}")

        expired_cert, expired_key = faulty["expired_client"]
        assert cli_main(["remote", "devices", *target, *flags, "--cert-file", str(expired_cert),
                         "--key-file", str(expired_key)]) == 2
        err = capsys.readouterr().err
        assert "the broker rejected our client certificate: it has expired" in err.splitlines()[-1], err
        assert cli_main(["remote", "bench", "--all", *target, *flags]) == 2
        err = capsys.readouterr().err
        assert "the broker requires a client certificate" in err.splitlines()[-1], err
        assert "no answer" not in err
    finally:
        out = agent.stop()
    assert "Traceback" not in out
