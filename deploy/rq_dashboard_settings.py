"""rq-dashboard settings for signal_queue: read jobs and workers with RQ's JSON serializer.

Give it to rq-dashboard with ``RQ_DASHBOARD_SETTINGS=/path/to/rq_dashboard_settings.py``
(``docker-compose.yml`` mounts it into the dashboard service). rq-dashboard runs this file
once, at start-up, as its settings file (``app.config.from_envvar``).

Why it is needed, up to rq-dashboard 0.9.0 (the latest release when this was written): the
dashboard reads jobs with the serializer that ``--json`` (``RQ_DASHBOARD_JSON``) chooses, but it
lists workers with ``Worker.all(connection=...)``, which reads each busy worker's current job with
RQ's default serializer, pickle. Its Workers page (``/<instance>/data/workers.json``) then fails
with HTTP 500 while any signal_queue worker runs a job, whose data is JSON; and it unpickles what
a job hash in Redis holds. The fix rq-dashboard needs is to pass ``serializer=config.serializer``
to ``Worker.all`` in ``list_workers`` and ``workers_overview`` (``rq_dashboard/web.py``). Until
then, this file swaps in a ``Worker`` class that does so. It also turns the JSON serializer on
for jobs, however the dashboard was started (``--json``, ``RQ_DASHBOARD_JSON``,
``RQ_DASHBOARD_JSON_SERIALIZER`` or none), since every job signal_queue writes is JSON.
Do not use it for a dashboard that also shows jobs written with pickle.

The job page of rq-dashboard 0.9.0 puts a job's description, metadata and traceback into the
page as HTML, unescaped; a handler's exception message that quotes what a client sent would run
as script in the browser of whoever opens the page. This file HTML-escapes those fields in the
data the job page loads (``/<instance>/data/job/<id>.json``), so they show as the text they are.
"""

import html
import json
from typing import Any

import rq_dashboard.web as _web
from flask import Response, request
from rq import Worker
from rq.serializers import JSONSerializer


class _WorkerReadWithTheDashboardSerializer(Worker):
    """RQ's Worker, whose ``all()`` reads workers' current jobs with the dashboard's serializer."""

    @classmethod
    def all(cls, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("serializer", _web.config.serializer)
        return super().all(*args, **kwargs)


_web.config.serializer = JSONSerializer
if _web.Worker is Worker:  # rq_dashboard.web's own `from rq import Worker`, not replaced yet
    _web.Worker = _WorkerReadWithTheDashboardSerializer


#: The fields of the job page's data that its template inserts as HTML.
_INSERTED_AS_HTML = ("description", "metadata", "exc_info", "origin", "status", "result")


def _escape_job_page_data(response: Response) -> Response:
    if request.endpoint != f"{_web.blueprint.name}.job_info" or not response.is_json:
        return response
    data = response.get_json()
    for name in _INSERTED_AS_HTML:
        if isinstance(data.get(name), str):
            data[name] = html.escape(data[name])
    response.set_data(json.dumps(data))
    return response


if _escape_job_page_data.__name__ not in {f.__name__ for f in _web.blueprint.after_request_funcs.get(None, [])}:
    _web.blueprint.after_request(_escape_job_page_data)
