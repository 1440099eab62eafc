"""Host-side client that talks to devices through the broker (``edge-agent remote ...``).

:mod:`edge_agent.fleet.client` is the generic part (connect, discover devices, send a command to
one device or the fleet, collect one final answer per device with a timeout); :mod:`.bench` and
:mod:`.deploy` build the benchmark and deployment requests and read their answers. The command
line lives in :mod:`edge_agent.cli.remote`; the browser console (:mod:`edge_agent.console`) runs the
same functions (``bench.run``, ``deploy.deploy/rollback/list_models``) and watches devices through
:meth:`.client.FleetClient.listen`.
"""
