"""Putting the agent on a device: the systemd service (install, uninstall)."""
