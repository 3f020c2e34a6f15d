"""``flask signal-queue ...`` commands."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from .worker import WORKER_CLASSES, run_worker

signal_queue_cli = AppGroup("signal-queue", help="Run and inspect deferred signal receivers.")


@signal_queue_cli.command("worker")
@click.argument("queues", nargs=-1)
@click.option("--url", help="Redis URL (default: SIGNAL_QUEUE_REDIS_URL).")
@click.option("--burst", is_flag=True, help="Quit when the queues are empty.")
@click.option("--worker-class", type=click.Choice(sorted(WORKER_CLASSES)), default="simple", show_default=True)
@click.option("--name", help="Worker name shown by rq info.")
@click.option("--max-jobs", type=int, help="Quit after this many jobs.")
@click.option("--logging-level", default="INFO", show_default=True)
@click.option("--no-scheduler", is_flag=True, help="Do not run RQ's scheduler (retry delays).")
def worker_command(
    queues: tuple[str, ...],
    url: str | None,
    burst: bool,
    worker_class: str,
    name: str | None,
    max_jobs: int | None,
    logging_level: str,
    no_scheduler: bool,
) -> None:
    """Run an RQ worker for this app's @deferred receivers (same as python worker.py)."""
    run_worker(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        queues,
        burst=burst,
        url=url,
        worker_class=worker_class,
        name=name,
        logging_level=logging_level,
        max_jobs=max_jobs,
        with_scheduler=not no_scheduler,
    )


@signal_queue_cli.command("receivers")
def receivers_command() -> None:
    """List the registered @deferred receivers, their signals and queues."""
    from .emit import state_for
    from .registry import receivers

    default = state_for(current_app).queue_name
    for r in sorted(receivers, key=lambda r: (r.signal_name, r.name)):
        click.echo(f"{r.signal_name:30} {r.name:50} queue={r.queue or default}")
