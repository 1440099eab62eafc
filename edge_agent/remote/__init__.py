"""Device-side command handlers and THE table of them the agent serves (see ``remote/context.py``)."""

from edge_agent.remote.bench import RemoteBench
from edge_agent.remote.context import HandlerTable
from edge_agent.remote.deploy import Deployer
from edge_agent.remote.presence import Presence

HANDLERS: HandlerTable = {
    "benchmark": RemoteBench,
    "deploy": Deployer.create,
    "presence": Presence,
}
