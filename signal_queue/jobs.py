"""The job functions, at the path the jobs in Redis name (``signal_queue.jobs.run_event(s)``).

Workers never import a job's function by that name (see
:mod:`signal_queue.consumer.job`); the path is kept so that it stays true for
``rq info`` and rq-dashboard, and for jobs queued by earlier releases.
"""

from __future__ import annotations

from .consumer.run import run_event, run_events

__all__ = ["run_event", "run_events"]
