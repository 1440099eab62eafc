"""What a device-side command handler gets, and what it gives back (the dispatch table's contract).

Handlers (``cmd/benchmark``, ``cmd/deploy``/``rollback``/``models``) are listed in ONE explicit
table (:data:`edge_agent.remote.HANDLERS`) handed to the :class:`~edge_agent.daemon.agent.Agent`.
The agent builds each with a narrow :class:`HandlerContext` (config, comms, model manager,
pipeline control, the agent's info), subscribes the :class:`Route` s it returns, merges its ``info`` fields, and
calls ``shutdown`` before its comms stop. A handler never sets attributes on the agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Protocol


@dataclass(frozen=True)
class Route:
    """``cmd/<command>`` (device and fleet topics; ``subtree``: also ``cmd/<command>/#``)."""

    command: str
    callback: Callable[[str, bytes, Dict[str, Any]], None]
    subtree: bool = False


class PipelineControl:
    """Pause/resume and the state of whatever pipeline the agent runs now (it may be replaced)."""

    def __init__(self, get_pipeline: Callable[[], Any]) -> None:
        self._get = get_pipeline

    def pause(self, timeout: float) -> Optional[bool]:
        """None without a pipeline; else whether the interpreter became idle within ``timeout``."""
        pipeline = self._get()
        return None if pipeline is None else pipeline.pause(timeout)

    def resume(self) -> None:
        pipeline = self._get()
        if pipeline is not None:
            pipeline.resume()

    def state(self) -> Dict[str, Any]:
        pipeline = self._get()
        return {"running": pipeline is not None, "fps": None if pipeline is None else round(pipeline.fps, 2)}


@dataclass
class HandlerContext:
    config: Callable[[], Any]  # the agent's current config (a reload replaces it)
    comms: Callable[[], Any]  # the agent's current comms (a reload may replace them)
    models: Any  # the ModelManager
    pipeline: PipelineControl
    info: Callable[[], Dict[str, Any]] = dict  # the agent's info document, as published retained


class CommandHandler(Protocol):
    def routes(self) -> Iterable[Route]: ...

    def info(self, doc: Dict[str, Any]) -> Dict[str, Any]: ...

    def shutdown(self, reason: str) -> None:
        """Stop taking work and get every final answer out (called before the comms stop)."""


class OneCommandHandler:
    """A handler of one command, ``cmd/<command>`` routed to ``on_message``, adding no info fields.

    The class itself is its table factory (``HANDLERS[name] = TheClass``)."""

    command = ""

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx

    def routes(self) -> Iterable[Route]:
        return [Route(self.command, self.on_message)]

    def info(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        return doc

    def on_message(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        raise NotImplementedError


# name -> factory; a factory returns None when the handler cannot run (e.g. no model store)
HandlerTable = Mapping[str, Callable[[HandlerContext], Optional[CommandHandler]]]
