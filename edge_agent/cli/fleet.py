"""``edge-agent fleet init|add|rotate|revoke|enable|list``: per-device credentials and ACLs on
Mosquitto's dynamic security plugin (the work is :mod:`edge_agent.fleet.security`'s).

The broker options are those of ``remote`` (``--config FILE`` with an ``[mqtt]`` section, the
``EDGE_AGENT_MQTT_*`` variables, ``--host --username --password-file ...``), naming the plugin's
admin. Passwords are printed once on stdout, or written to ``--out FILE`` (mode 0600); never logged.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from typing import Any, Optional, TextIO

from edge_agent.cli.remote import add_broker_arguments, mqtt_from_args
from edge_agent.fleet import security
from edge_agent.fleet.security import DEVICE, OPERATOR, VIEWER, Dynsec, SecurityError
from edge_agent.fleet.table import format_table


def add_parser(subparsers: Any) -> None:
    fleet = subparsers.add_parser(
        "fleet", help="per-device broker credentials and ACLs (Mosquitto dynamic security)",
        description="Set up and manage the fleet's identities on Mosquitto's dynamic security plugin: "
                    "one user and role per device (publish only under <prefix>/<id>/, commands only "
                    "from its own and the fleet topic), operators and viewers for people and tools.")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create the roles and groups (or the plugin's first config file)",
                          description="Without --dynsec-file: create the operator/viewer roles and the "
                                      "groups on a broker running the plugin (idempotent). With "
                                      "--dynsec-file: write the plugin's config file (admin, roles, groups) "
                                      "for a broker that does not run it yet, and the mosquitto.conf lines.")
    init.add_argument("--dynsec-file", metavar="FILE",
                      help=f"write the plugin's config file here (e.g. {security.DEFAULT_CONFIG_FILE}); "
                           "the broker must be restarted with the printed lines")
    init.add_argument("--admin", default="admin", help="the admin user of a new --dynsec-file (default admin)")
    init.add_argument("--admin-out", metavar="FILE", default="fleet-admin.toml",
                      help="with --dynsec-file: write the admin's [mqtt] credentials here, mode 0600 "
                           "(default fleet-admin.toml; use it as --config for the other fleet commands)")
    init.add_argument("--broker-conf", metavar="FILE",
                      help="also write the mosquitto.conf lines to FILE (e.g. /etc/mosquitto/conf.d/"
                           "edge-agent.conf); else they are printed")
    init.add_argument("--plugin", metavar="PATH", help="the plugin's path (default: found under /usr/lib)")
    _homeassistant(init, "the viewer role may also read Home Assistant's discovery prefix and publish "
                         "its status (Home Assistant as a viewer)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    add_broker_arguments(init)
    init.set_defaults(func=cmd_init)

    add = sub.add_parser("add", help="a device (or --operator/--viewer) with a new random password",
                         description="Create a device's user (its id), role and client id edge-agent-<id>; "
                                     "or a person/tool with --operator/--viewer. The password is shown once.")
    add.add_argument("name", metavar="DEVICE", help="device id (as agent.device_id) or user name")
    kind = add.add_mutually_exclusive_group()
    kind.add_argument("--operator", dest="kind", action="store_const", const=OPERATOR,
                      help="NAME is a person/tool: read the fleet, send commands, deploy")
    kind.add_argument("--viewer", dest="kind", action="store_const", const=VIEWER,
                      help="NAME reads only (Home Assistant, a read-only console)")
    add.set_defaults(kind=DEVICE)
    _homeassistant(add, "the device may publish its Home Assistant discovery configs and hear HA's status")
    _output(add)
    add_broker_arguments(add)
    add.set_defaults(func=cmd_add)

    rot = sub.add_parser("rotate", help="a new random password (the old one is refused at once)")
    rot.add_argument("name", metavar="NAME")
    _output(rot)
    add_broker_arguments(rot)
    rot.set_defaults(func=cmd_rotate)

    rev = sub.add_parser("revoke", help="delete a device/user: disconnected now, refused from then on")
    rev.add_argument("name", metavar="NAME")
    rev.add_argument("--disable", action="store_true", help="only disable it (undo: fleet enable NAME)")
    add_broker_arguments(rev)
    rev.set_defaults(func=cmd_revoke)

    ena = sub.add_parser("enable", help="enable a disabled device/user again")
    ena.add_argument("name", metavar="NAME")
    add_broker_arguments(ena)
    ena.set_defaults(func=cmd_enable)

    ls = sub.add_parser("list", help="the devices, operators and viewers on the broker")
    ls.add_argument("--json", action="store_true")
    add_broker_arguments(ls)
    ls.set_defaults(func=cmd_list)


def _homeassistant(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--homeassistant", nargs="?", const="homeassistant", default=None, metavar="PREFIX",
                   help=f"{what} (discovery prefix, default homeassistant)")


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="FILE",
                   help="write the credentials (an agent config fragment) to FILE, mode 0600, instead "
                        "of printing them")
    p.add_argument("--force", action="store_true", help="overwrite --out FILE")
    p.add_argument("--broker", metavar="HOST[:PORT]",
                   help="the broker's address as the device/user will reach it (default: as this "
                        "command reached it)")


def _address(text: Optional[str]) -> tuple:
    if not text:
        return None, None
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and (host.endswith("]") or ":" not in host):
        return host.strip("[]"), int(port)
    return text.strip("[]"), None


def _reserve(args: argparse.Namespace) -> None:
    """Create ``--out`` (empty, 0600) before the broker makes a password only this file will hold:
    a path that cannot be written fails before, not after."""
    if args.out and args.force and os.path.exists(args.out):
        if not os.access(args.out, os.W_OK):
            raise SecurityError(f"{args.out}: cannot write")
    elif args.out:
        security.write_secret(args.out, "")


def _unreserve(args: argparse.Namespace) -> None:
    if args.out:
        try:
            if os.path.getsize(args.out) == 0:
                os.unlink(args.out)
        except OSError:
            pass


def _emit(cred: security.Credential, args: argparse.Namespace, mqtt: Any, out: TextIO) -> None:
    host, port = _address(args.broker)
    text = cred.toml(mqtt, host, port)
    if args.out:
        security.write_secret(args.out, text, force=True)  # the file _reserve made
        how = (f"on the device: sudo edge-agent service install --mqtt-credentials {args.out}"
               if cred.kind == DEVICE else f"edge-agent remote devices --config {args.out}")
        print(f"{cred.username}: credentials written to {args.out} (mode 0600); {how}", file=out)
    else:
        out.write(text)


def cmd_init(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    mqtt = mqtt_from_args(args)
    if args.dynsec_file:
        password = security.new_password()
        doc = security.initial_config(args.admin, password, mqtt.topic_prefix, args.homeassistant)
        security.write_secret(args.dynsec_file, json.dumps(doc, indent=2) + "\n", force=args.force)
        _give_to_mosquitto(args.dynsec_file)
        admin = security.Credential("admin", args.admin, password)
        security.write_secret(args.admin_out, admin.toml(mqtt), force=args.force)
        conf = security.broker_config(args.plugin, os.path.abspath(args.dynsec_file))
        print(f"wrote {args.dynsec_file}: admin {args.admin!r}, roles and groups of {mqtt.topic_prefix}/; "
              f"the admin's credentials: {args.admin_out} (mode 0600)", file=sys.stderr)
        if args.broker_conf:
            _write_public(args.broker_conf, conf, args.force)
            print(f"wrote {args.broker_conf}; restart mosquitto to load the plugin", file=sys.stderr)
        else:
            print("add to mosquitto.conf, then restart mosquitto:", file=sys.stderr)
            out.write(conf)
        return 0
    with Dynsec(mqtt) as ds:
        for line in ds.init(args.homeassistant):
            print(line, file=out)
    return 0


def _give_to_mosquitto(path: str) -> None:
    """The broker saves every change to the file: as root, hand it to the ``mosquitto`` user that
    Debian's broker drops to (mode stays 0600)."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    os.chown(path, user.pw_uid, user.pw_gid)


def _write_public(path: str, text: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise SecurityError(f"{path} exists: not overwritten (--force replaces it)")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def cmd_add(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    if args.kind == DEVICE:
        security.check_device_id(args.name)
    mqtt = mqtt_from_args(args)
    _reserve(args)
    try:
        with Dynsec(mqtt) as ds:
            ds.init(args.homeassistant if args.kind == VIEWER else None)  # shared roles/groups (idempotent)
            if args.kind == DEVICE:
                cred = ds.add_device(args.name, homeassistant=args.homeassistant)
            else:
                cred = ds.add_user(args.name, args.kind)
    except BaseException:
        _unreserve(args)
        raise
    _emit(cred, args, mqtt, out)
    return 0


def cmd_rotate(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    mqtt = mqtt_from_args(args)
    _reserve(args)
    try:
        with Dynsec(mqtt) as ds:
            cred = ds.rotate(args.name)
    except BaseException:
        _unreserve(args)
        raise
    _emit(cred, args, mqtt, out)
    print(f"{args.name}: the old password is refused from now on; a connected client was disconnected",
          file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with Dynsec(mqtt_from_args(args)) as ds:
        print(ds.revoke(args.name, disable_only=args.disable), file=out)
    return 0


def cmd_enable(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with Dynsec(mqtt_from_args(args)) as ds:
        print(ds.enable(args.name), file=out)
    return 0


def cmd_list(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with Dynsec(mqtt_from_args(args)) as ds:
        entries = ds.list()
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=2), file=out)
        return 0
    rows = [{"name": e.username, "kind": e.kind, "client id": e.client_id or "(any)",
             "state": "disabled" if e.disabled else "enabled", "status": "done"} for e in entries]
    print(format_table(rows, ["name", "kind", "client id", "state"]) if rows else "no clients", file=out)
    return 0

