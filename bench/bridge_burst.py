#!/usr/bin/env python3
"""A fleet-wide answer burst across a Mosquitto bridge over a slow link: does the bridge drop?

    .venv/bin/python bench/bridge_burst.py [--devices 1000] [--rtt-ms 300] [--site-set LINE ...]

Simulated devices (bench/fleet_sim.py) on a site mosquitto, the fleet client on a central one
bridged to it (tests/broker.py ``bridged_mosquittos``: ``topic edge-agent/# both 1``); the bridge
connects through a TCP proxy that delays every byte by half the round-trip time each way (a WAN).
One ``benchmark`` to the whole fleet; prints the answers and the site broker's own count of
dropped publishes ($SYS). The bridge is a QoS 1 client of the site broker: at most
``max_inflight_messages`` (20) unacknowledged, ``max_queued_messages`` (1,000) waiting, the rest
dropped. Results: docs/brokers.md ("Bridges at scale").
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fleet_sim import Costs, FleetSim  # noqa: E402
from bench.fleet_sim_scale import SysDropped, wait_bridge  # noqa: E402
from edge_agent.comms.broker import free_port  # noqa: E402
from edge_agent.config import MqttConfig  # noqa: E402
from edge_agent.fleet.bench import command_params  # noqa: E402
from edge_agent.fleet.client import FleetClient  # noqa: E402
from tests.broker import bridged_mosquittos  # noqa: E402


def delay_proxy(listen: int, target: int, one_way_s: float) -> None:
    """``--proxy``: forward 127.0.0.1:listen to 127.0.0.1:target, every chunk ``one_way_s`` late
    (order kept: latency, not a bandwidth limit)."""
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                data = await r.read(65536)
                await q.put((loop.time() + one_way_s, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await q.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    w.close()
                    return
                w.write(data)
                await w.drain()
        await asyncio.gather(read(), write())

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            tr, tw = await asyncio.open_connection("127.0.0.1", target)
            await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        print("ready", flush=True)
        await server.serve_forever()
    asyncio.run(main())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rtt-ms", type=float, default=300.0)
    ap.add_argument("--site-set", action="append", default=[], metavar="LINE", help="a site broker config line")
    ap.add_argument("--proxy", nargs=3, type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.proxy:
        delay_proxy(int(args.proxy[0]), int(args.proxy[1]), args.proxy[2])
        return 0
    work = Path(tempfile.mkdtemp(prefix="edge-agent-bridge-burst-"))
    proxy: List[subprocess.Popen] = []

    def through_proxy(site) -> str:
        port = free_port()
        proxy.append(subprocess.Popen([sys.executable, __file__, "--proxy", str(port), str(site.port),
                                       str(args.rtt_ms / 2000)], stdout=subprocess.PIPE, text=True))
        assert proxy[0].stdout is not None and proxy[0].stdout.readline().strip() == "ready"
        return f"127.0.0.1:{port}"

    site, central = bridged_mosquittos(work / "bridge", qos=1, site_conf=["sys_interval 1", *args.site_set],
                                       address=through_proxy)
    drops = SysDropped(site.port)
    sim = FleetSim(args.devices, work / "sim", port=site.port, costs=Costs(fps=0.2))
    client = FleetClient(MqttConfig(host="127.0.0.1", port=central.port))
    try:
        print(f"bridge up in {wait_bridge(site.port, central.port):.2f} s through a {args.rtt_ms:.0f} ms "
              f"round trip; site broker {args.site_set or 'defaults'}", flush=True)
        sim.start()
        n = sim.wait_connected(300)
        client.connect()
        online = sum(1 for d in client.discover(5.0).values() if d.online)
        t = time.monotonic()
        answers = client.request("benchmark", command_params(runs=3, warmup=1), fleet=True, timeout=60)
        wall = time.monotonic() - t
        statuses = Counter(a.status for a in answers.values())
        dropped = drops.wait()
        print(f"{n} connected, {online} discovered; benchmark to the fleet: {dict(statuses)} in {wall:.1f} s; "
              f"the site broker dropped {dropped} publishes ($SYS)", flush=True)
        return 0 if statuses.get("done") == args.devices and dropped == 0 else 1
    finally:
        client.close()
        drops.close()
        sim.stop()
        central.close()
        site.close()
        for p in proxy:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    sys.exit(main())
