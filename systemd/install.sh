#!/bin/sh
# Install (or uninstall) edge-agent as a systemd service from this checkout.
#   sudo systemd/install.sh [--prefix /opt/edge-agent] [--dry-run] [--no-start] ...
#   sudo systemd/install.sh uninstall [--purge]
# A thin wrapper: the steps live in edge_agent/provision/service.py (stdlib only, so the system python3
# runs it before any venv exists); `--help` lists every option.
set -eu
cd "$(dirname "$0")/.."
action=install
if [ "${1:-}" = install ] || [ "${1:-}" = uninstall ]; then
    action=$1
    shift
fi
exec "${PYTHON:-python3}" -m edge_agent.cli.service "$action" "$@"
