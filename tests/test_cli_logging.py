"""Logging under journald uses syslog priorities."""

from __future__ import annotations

import logging

from edge_agent.cli import JournalFormatter


def test_journal_priorities():
    fmt = JournalFormatter("%(message)s")
    def line(level):
        return fmt.format(logging.LogRecord("edge_agent.x", level, __file__, 1, "hello", None, None))
    assert line(logging.WARNING) == "<4>edge_agent.x: hello"
    assert line(logging.ERROR) == "<3>edge_agent.x: hello"
    assert line(logging.INFO) == "<6>edge_agent.x: hello"
    assert line(logging.DEBUG) == "<7>edge_agent.x: hello"
