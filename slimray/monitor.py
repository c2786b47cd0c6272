"""``slimray monitor ingest|report``: the sentiment monitor's batch commands (``jobs.monitoring``)."""

from __future__ import annotations

from slimray.cli import dispatch

COMMANDS = {
    "ingest": ("jobs.monitoring:ingest_cli", "Score a file of texts with the sentiment model and store them."),
    "report": ("jobs.monitoring:report_cli", "Draw each topic's sentiment trend with its alerts; list the alerts."),
}


def cli(argv: list[str]) -> None:
    dispatch("slimray monitor", COMMANDS, argv)
