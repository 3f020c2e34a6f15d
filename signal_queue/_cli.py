"""``flask signal-queue ...`` commands, and ``python worker.py`` (the same worker command)."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click
import redis
from flask import Flask, current_app
from flask.cli import AppGroup, NoAppException
from rq import Worker

from ._state import state_for
from .consumer.failures import failed_events, iter_failed, quarantined_entries, requeue, signal_queues
from .consumer.quarantine import purge_quarantined
from .consumer.rq_compat import taken_count
from .consumer.worker import WORKER_CLASSES, load_app, log_to_stderr, run_worker
from .exceptions import ConfigurationError
from .metrics import prometheus_text, snapshot
from .wire.keys import QUARANTINE_KEY
from .wire.receivers import receivers
from .wire.redis_connect import CLUSTER_UNSUPPORTED, RedisSource, cluster_enabled
from .wire.redis_errors import Fault, classify
from .wire.redis_url import safe_url, url_secrets

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("signal_queue.worker")

signal_queue_cli = AppGroup("signal-queue", help="Run and inspect deferred signal receivers.")


def refused_line(fault: Fault, shown: str) -> str:
    """A command's one line for a fault that needs a fix: the cause and what to fix (``shown``: the masked Redis)."""
    return f"{fault.line(shown, 'this command')}; waiting will not fix this: {fault.fix}"


def redis_failure(exc: BaseException, source: RedisSource) -> click.ClickException | None:
    """A command's one line (exit 1) for a Redis error, secrets masked; None if the error is not Redis's."""
    fault = classify(exc, source.url)
    if fault is None:
        return None
    if fault.permanent:
        return click.ClickException(refused_line(fault, source.shown))
    detail = f"{type(exc).__name__}: {source.hide(str(exc))}"
    return click.ClickException(f"{fault.line(source.shown, 'this command')} ({detail})")


def reports_redis_errors(command: F) -> F:
    """A command that needs Redis ends with one line naming Redis's fault (exit 1), not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            failure = redis_failure(exc, state_for(current_app).redis)
            if failure is None:
                raise
            raise failure from None

    return cast(F, wrapper)


def worker_options(command: F) -> F:
    """The worker's options, for ``flask signal-queue worker`` and ``python worker.py`` alike."""
    options = [
        click.argument("queues", nargs=-1),
        click.option("--url", help="Redis URL (default: the app's SIGNAL_QUEUE_REDIS_URL, which the environment "
                                   "variable of that name sets); one with a password is visible to every user of "
                                   "the host in the process list: use the environment."),
        click.option("--burst", is_flag=True, help="Quit when the queues are empty."),
        click.option("--worker-class", type=click.Choice(sorted(WORKER_CLASSES)), default="simple",
                     show_default=True, help="simple: run jobs in this process; fork: a work horse per job."),
        click.option("--name", help="Worker name shown by rq info."),
        click.option("--max-jobs", type=int, help="Quit after this many jobs."),
        click.option("--logging-level", default="INFO", show_default=True),
        click.option("--no-scheduler", is_flag=True, help="Do not run RQ's scheduler (retry delays)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def start_worker(app: Flask, queues: tuple[str, ...], no_scheduler: bool, logging_level: str, **options: Any) -> None:
    """Run a worker for ``app`` until stopped; a setup error exits 2 with one line on stderr."""
    log_to_stderr(logging_level)
    url = options.get("url")
    if url and url_secrets(url):
        logger.warning(
            "signal_queue: --url %s carries a password, which is visible to every user of this host in the "
            "process list (ps, /proc/<pid>/cmdline); set SIGNAL_QUEUE_REDIS_URL in the worker's environment "
            "(or the app's config) instead",
            safe_url(url),
        )
    try:
        run_worker(
            state_for(app).consumer, queues, logging_level=logging_level, with_scheduler=not no_scheduler, **options
        )
    except ConfigurationError as exc:
        click.echo(f"worker: {exc}", err=True)
        sys.exit(2)


@signal_queue_cli.command("worker")
@worker_options
def worker_command(**options: Any) -> None:
    """Run an RQ worker for this app's @deferred receivers (the same command as python worker.py)."""
    start_worker(current_app._get_current_object(), **options)  # type: ignore[attr-defined]


@click.command("worker.py")
@click.option("--app", "import_path", help="module:app or module:create_app() (default: $SIGNAL_QUEUE_APP, "
                                           "then $FLASK_APP).")
@worker_options
def worker_main(import_path: str | None, **options: Any) -> None:
    """Run an RQ worker for a Flask app's @deferred signal receivers."""
    try:
        app = load_app(import_path)
    except (ConfigurationError, NoAppException) as exc:
        click.echo(f"worker: {exc}", err=True)
        sys.exit(2)
    start_worker(app, **options)


@signal_queue_cli.command("receivers")
def receivers_command() -> None:
    """List the registered @deferred receivers, their signals and queues."""

    default = state_for(current_app).queue_name
    for r in sorted(receivers, key=lambda r: (r.signal_name, r.name)):
        click.echo(f"{r.signal_name:30} {r.name:50} queue={r.queue or default}")


@signal_queue_cli.command("replay")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@reports_redis_errors
def replay_command(as_json: bool) -> None:
    """Send the batches spooled during a Redis outage (the app also does this by itself)."""

    dispatcher = state_for(current_app).dispatcher
    batches, events = dispatcher.spool.depth()
    if not batches:
        click.echo(json.dumps({"spool": dispatcher.spool.path, "replayed": 0, "skipped": 0, "left": 0})
                   if as_json else f"spool {dispatcher.spool.path}: empty")
        return
    if not as_json:
        click.echo(f"spool {dispatcher.spool.path}: {events} event(s) in {batches} batch(es)")
    # This process's own sender may replay too (it starts when it finds a spool): wait
    # until the spool is empty, or has not shrunk for a few seconds.
    left, last_change, deadline = events, time.monotonic(), time.monotonic() + 300
    while left and time.monotonic() - last_change < 5 and time.monotonic() < deadline:
        dispatcher.replay()
        now_left = dispatcher.spool.depth()[1] - dispatcher.sent_not_deleted  # sent rows a full disk keeps
        if now_left < left:
            left, last_change = now_left, time.monotonic()
        elif left:
            time.sleep(0.1)
    replayed, skipped = dispatcher.counters["replayed"], dispatcher.counters["replay_skipped"]
    if not left and dispatcher.healthy:
        dispatcher.publish_counts()  # this host's spooled and lost counts, into Redis's totals
    if as_json:
        click.echo(json.dumps({"spool": dispatcher.spool.path, "replayed": replayed, "skipped": skipped, "left": left}))
    else:
        click.echo(f"replayed {replayed} event(s); {skipped} already in Redis, not sent again; {left} left")
    if left:
        state = state_for(current_app)
        shown = state.redis.shown
        refused = dispatcher.refused
        if refused is not None:
            raise click.ClickException(f"{left} event(s) are still spooled: {refused_line(refused, shown)}")
        raise click.ClickException(f"{left} event(s) are still spooled: Redis at {shown} did not take them")


@signal_queue_cli.command("requeue")
@click.option("--all", "everything", is_flag=True, help="Requeue every failed signal_queue job.")
@click.option("--receiver", help="Only failed events of this receiver (module:qualname).")
@click.option("--id", "ids", multiple=True, help="Only this event or job id (repeatable).")
@click.option("--queue", "queue_names", multiple=True, help="Queues to look in (default: all of the app's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@reports_redis_errors
def requeue_command(
    everything: bool, receiver: str | None, ids: tuple[str, ...], queue_names: tuple[str, ...], as_json: bool
) -> None:
    """Send failed events back to their queue (RQ's failed registry), e.g. after a fix."""

    if not (everything or receiver or ids):
        raise click.UsageError("say what to requeue: --all, --receiver NAME or --id ID")
    state = state_for(current_app)
    found = list(iter_failed(state.connection, queue_names or state.queue_names(), receiver=receiver, ids=set(ids)))
    done: list[str] = []
    with click.progressbar(found, label="requeueing", file=sys.stderr) as jobs:
        for queue, job in jobs:
            requeue(queue, job, state.consumer)
            done.append(job.id)
    if as_json:
        click.echo(json.dumps({"requeued": done}))
    else:
        click.echo(f"requeued {len(done)} job(s)" + (f": {', '.join(done)}" if done else ""))


@signal_queue_cli.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@reports_redis_errors
def info_command(as_json: bool) -> None:
    """Queues, workers, failed events, the outage spool, counts and the registered receivers.

    Works while Redis is down: it says so, and shows the spool and this host's counts.
    """
    state = state_for(current_app)
    shown_url = state.redis.shown
    seen = snapshot(state)
    if seen.refused is not None:
        # A wrong password, an ACL or a certificate needs fixing, not waiting for: a failure, not a report.
        raise click.ClickException(refused_line(seen.refused, shown_url))
    queues = workers = quarantined = None
    if seen.redis_error is None:
        try:
            if cluster_enabled(state.connection):  # it answers, but the app cannot enqueue there
                raise click.ClickException(
                    f"Redis at {shown_url} is a Redis Cluster node (cluster_enabled:1): {CLUSTER_UNSUPPORTED}"
                )
            queues, workers, quarantined = _queues_and_workers()
        except redis.RedisError as exc:
            fault = classify(exc, state.redis.url)
            if fault is None:
                raise
            if fault.permanent:
                raise click.ClickException(refused_line(fault, shown_url)) from None
            seen.redis_error = f"{type(exc).__name__}: {state.redis.hide(str(exc))}"  # gone meanwhile
    spool = state.dispatcher.spool
    data: dict[str, Any] = {
        "redis": shown_url,
        "redis_error": seen.redis_error,
        "counters": seen.shared,
        "queues": queues,
        "workers": workers,
        "quarantined": quarantined,
        "spool": {
            "path": spool.path,
            "batches": seen.spool_batches,
            "events": seen.spool_events,
            "error": seen.spool_error,
            "host_counts": {**seen.host, "not_in_redis_yet": seen.not_in_redis, "file": spool.ledger.path},
        },
        "receivers": [
            {"signal": r.signal_name, "receiver": r.name, "queue": r.queue or state.queue_name}
            for r in sorted(receivers, key=lambda r: (r.signal_name, r.name))
        ],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if seen.redis_error is None:
        click.echo(f"redis {shown_url}")
    else:
        click.echo(f"redis {shown_url}: UNREACHABLE ({seen.redis_error}); queues, workers and the shared counts "
                   "are unknown until it answers")
    if seen.shared is not None:
        click.echo("events: " + ", ".join(f"{count} {name}" for name, count in seen.shared.items()))
    if queues:
        click.echo(f"queues, in the order workers take from them: {', '.join(q['name'] for q in queues)}")
    for q in queues or ():
        click.echo(
            f"queue {q['name']}: {q['jobs_waiting']} job(s) waiting (a job carries up to "
            f"{state.dispatcher.batch_size} events), {q['taken']} taken and not started yet, {q['started']} running, "
            f"{q['scheduled']} scheduled retries, {q['failed']} failed, {q['finished']} finished"
        )
    if quarantined:
        click.echo(f"quarantined: {quarantined} queue entries that are not jobs (flask signal-queue failed)")
    if workers is not None:
        click.echo(f"workers: {len(workers)}" + "".join(f"\n  {w['name']} {w['state']} {','.join(w['queues'])}"
                                                      for w in workers))
    if seen.spool_error is not None:
        click.echo(f"spool UNREADABLE ({seen.spool_error}): {spool.path}")
    else:
        waiting = seen.spool_batches and f"{seen.spool_events} event(s) in {seen.spool_batches} batch(es)"
        click.echo(f"spool {waiting or 'empty'}: {spool.path}")
    host, pending = seen.host, seen.not_in_redis
    click.echo(
        f"this host, every process (count file {spool.ledger.path}): {host['spooled']} spooled, {host['lost']} "
        f"lost, {host['dropped']} dropped; not in Redis's counts yet: {pending['spooled']} spooled, "
        f"{pending['lost']} lost, {pending['dropped']} dropped"
    )
    click.echo(f"receivers: {len(data['receivers'])}")
    for r in data["receivers"]:
        click.echo(f"  {r['signal']:28} {r['receiver']:48} queue={r['queue']}")


def _queues_and_workers() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """What Redis says of the app's queues, the workers on them and the quarantined entries
    (raises if Redis is down)."""
    state = state_for(current_app)
    queues: list[dict[str, Any]] = []
    for priority, name in enumerate(state.queue_names(), 1):
        rq_queue = state.dispatcher.queue(name)  # counts only: RQ's plain Job class will do
        queues.append(
            {
                "name": name,
                "priority": priority,
                "jobs_waiting": rq_queue.count,
                "started": rq_queue.started_job_registry.count,
                "scheduled": rq_queue.scheduled_job_registry.count,
                "failed": rq_queue.failed_job_registry.count,
                "finished": rq_queue.finished_job_registry.count,
                # Taken by a worker and not started yet: counted in none of the above.
                "taken": taken_count(rq_queue),
            }
        )
    names = {q["name"] for q in queues}
    workers = [
        {"name": w.name, "state": w.get_state(), "queues": w.queue_names()}
        for w in Worker.all(connection=state.connection)
        if names & set(w.queue_names())
    ]
    quarantined = len(quarantined_entries(state.connection, names))
    return queues, workers, quarantined


@signal_queue_cli.command("failed")
@click.option("--receiver", help="Only this receiver (module:qualname).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@reports_redis_errors
def failed_command(receiver: str | None, as_json: bool) -> None:
    """Failed events (RQ's failed registry): signal, receiver, request path, user, request id, error."""

    state = state_for(current_app)
    rows = failed_events(state.connection, state.queue_names(), state.codec, receiver=receiver)
    # Entries that are not jobs have no receiver: listed unless the listing is for one.
    stray = [] if receiver else quarantined_entries(state.connection, state.queue_names())
    if as_json:
        click.echo(json.dumps(rows + stray, indent=2))
        return
    if not rows and not stray:
        click.echo("no failed events")
        return
    for row in rows:
        click.echo(
            f"{row['job_id']}  {row['signal']} -> {row['receiver']}  path={row['path']} user={row['user']} "
            f"request_id={row['request_id']}\n    {row['error']}"
        )
    for row in stray:
        click.echo(f"{row['job_id']}  quarantined (not a job)  queue={row['queue']} at={row['ended_at']}\n"
                   f"    {row['error']}")
    click.echo(f"{len(rows)} failed; `flask signal-queue requeue --id ID` or `--receiver NAME` sends them back")
    if stray:
        click.echo(f"{len(stray)} quarantined in {QUARANTINE_KEY}: queue entries no worker could load as a job "
                   "(nothing to requeue); `flask signal-queue purge --failed` deletes them")


@signal_queue_cli.command("metrics")
def metrics_command() -> None:
    """Print the counters in Prometheus' text format (e.g. for node_exporter's textfile collector).

    A Redis that refuses for good is a value here (``signal_queue_redis_refused 1``), not a
    failure: the metrics are printed, the cause goes to stderr in one line, and the exit status is 0.
    """
    state = state_for(current_app)
    seen = snapshot(state)
    click.echo(prometheus_text(current_app._get_current_object(), seen), nl=False)  # type: ignore[attr-defined]
    if seen.refused is not None:
        click.echo(f"metrics: {refused_line(seen.refused, state.redis.shown)}", err=True)


@signal_queue_cli.command("purge")
@click.option("--failed", "what", flag_value="failed",
              help="Delete the failed events (RQ's failed registries) and the quarantined entries.")
@click.option("--queued", "what", flag_value="queued", help="Empty the queues: waiting events are deleted.")
@click.option("--spool", "what", flag_value="spool", help="Delete the outage spool's batches.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@reports_redis_errors
def purge_command(what: str | None, yes: bool) -> None:
    """Delete failed events, waiting events or the spool. Asks first: what is purged is gone."""

    if what is None:
        raise click.UsageError("say what to purge: --failed, --queued or --spool")
    state = state_for(current_app)
    queues = signal_queues(state.connection, state.queue_names())
    if what == "spool":
        count = state.dispatcher.spool.depth()[1]
    elif what == "failed":
        stray = quarantined_entries(state.connection, state.queue_names())
        count = sum(q.failed_job_registry.count for q in queues) + len(stray)
    else:
        count = sum(q.count for q in queues)
    unit = "event(s)" if what != "queued" else "job(s)"
    if count == 0:
        click.echo(f"nothing to purge ({what})")
        return
    if not yes:
        click.confirm(f"Delete {count} {what} {unit} for good?", abort=True)
    if what == "spool":
        state.dispatcher.spool.purge()
    elif what == "queued":
        for q in queues:
            q.empty()  # type: ignore[no-untyped-call]
    else:
        for q in queues:
            ids: list[str] = q.failed_job_registry.get_job_ids()
            with click.progressbar(ids, label=f"purging {q.name}", file=sys.stderr) as progress:
                for job_id in progress:
                    q.failed_job_registry.remove(job_id, delete_job=True)
        purge_quarantined(state.connection, state.queue_names())
    click.echo(f"purged {count} {what} {unit}")
