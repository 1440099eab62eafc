"""Developer and host-side tooling for edge-agent (not needed on the device)."""
