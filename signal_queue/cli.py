"""``flask signal-queue ...`` commands."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from .worker import main as worker_main

signal_queue_cli = AppGroup("signal-queue", help="Run and inspect deferred signal receivers.")


@signal_queue_cli.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker_command(args: tuple[str, ...]) -> None:
    """Run an RQ worker for this app's @deferred receivers; same options as python worker.py (--help)."""
    raise SystemExit(worker_main(list(args), app=current_app._get_current_object()))  # type: ignore[attr-defined]


@signal_queue_cli.command("receivers")
def receivers_command() -> None:
    """List the registered @deferred receivers, their signals and queues."""
    from .emit import state_for
    from .registry import receivers

    default = state_for(current_app).queue_name
    for r in sorted(receivers, key=lambda r: (r.signal_name, r.name)):
        click.echo(f"{r.signal_name:30} {r.name:50} queue={r.queue or default}")
