"""The package's shape: layers without cycles, no private names of Flask, apps that let go, old jobs that still run."""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from devtools import import_graph
from signal_queue import SignalQueue
from signal_queue.wire.keys import RUN_EVENTS
from tests.conftest import ROOT, queued_events, run_worker, wait_until
from tests.misc_app import create_app, misc
from tests.recording import records

PACKAGE = ROOT / "signal_queue"


def sender_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "signal_queue-sender" and t.is_alive()}


def test_no_import_cycle_and_no_import_against_the_layers() -> None:
    """wire <- producer | consumer <- Flask glue: each imports only what is below it, and no cycle."""
    modules = import_graph.read(ROOT)
    assert len(modules) > 20, "the graph read the package"
    assert import_graph.cycles(modules) == []
    assert import_graph.layer_breaks(modules) == []
    inside = [(m.name, line, target) for m in modules.values() for line, target in m.in_functions]
    assert inside == [], "an import inside a function is there to dodge a cycle"


def test_the_graph_script_sees_a_cycle_and_a_layer_break(tmp_path: Path) -> None:
    """The checker above can fail: a package with a cycle and an upward import is reported."""
    pkg = tmp_path / "signal_queue"
    (pkg / "wire").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "wire" / "__init__.py").write_text("")
    (pkg / "wire" / "a.py").write_text("from .. import glue\n")
    (pkg / "glue.py").write_text("def f():\n    from .wire import a\n")
    modules = import_graph.read(tmp_path)
    assert import_graph.cycles(modules) == [["signal_queue.glue", "signal_queue.wire.a"]]
    assert import_graph.layer_breaks(modules) == ["signal_queue.wire.a (signal_queue.wire) -> signal_queue.glue (glue)"]
    assert modules["signal_queue.glue"].in_functions == [(2, "signal_queue.wire.a")]


def test_no_private_name_of_flask_werkzeug_or_rq_outside_rq_compat() -> None:
    """Flask's next release removes _cv_app and _cv_request; RQ's internals stay behind rq_compat."""
    flask_private = re.compile(r"_cv_(app|request)|_AppCtxGlobals|from (flask|werkzeug)[\w.]* import _\w")
    rq_private = re.compile(r"from rq\.utils|from rq\.results|\b_(func_name|deserialize_data|stop_requested)\b")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not flask_private.search(text), f"{path} uses a private name of Flask or Werkzeug"
        if path.name != "rq_compat.py":
            assert not rq_private.search(text), f"{path} uses RQ's private API outside consumer/rq_compat.py"


def test_close_stops_the_sender_of_each_app_a_factory_made(conn: redis.Redis) -> None:
    """50 apps from a factory, each emitting, then closed: their events are sent and no sender is left."""
    before = sender_threads()
    apps = [create_app() for _ in range(50)]
    for i, app in enumerate(apps):
        with app.app_context():
            misc.send("factory", value=f"v{i}")
    started = sender_threads() - before
    assert len(started) == 50, "each app's first emit started its sender"
    for app in apps:
        SignalQueue.close(app)
    assert not any(t.is_alive() for t in started)
    assert queued_events(conn) == 50, "close() sent what was pending"

    with apps[0].app_context():
        misc.send("factory", value="after-close")  # sent on this thread: nothing is lost
    assert not (sender_threads() - before), "no sender started again"
    assert queued_events(conn) == 51


def test_an_app_dropped_without_close_takes_its_sender_with_it(conn: redis.Redis) -> None:
    """The sender holds its app weakly: when the app is garbage, the thread ends by itself."""
    before = sender_threads()
    app = create_app()
    with app.app_context():
        misc.send("dropped", value="x")
    app.extensions["signal_queue"].outbox.flush()
    [thread] = sender_threads() - before
    del app
    gc.collect()
    wait_until("the sender of a dropped app to stop", lambda: not thread.is_alive(), 10)


@pytest.mark.parametrize("function", [RUN_EVENTS, "signal_queue.jobs.run_event"])
def test_jobs_queued_by_the_first_layout_run_on_the_new_worker(
    conn: redis.Redis, redis_url: str, function: str
) -> None:
    """A job written as 0.1.0 wrote it (its function name; a batch's snapshots keyed by X-Request-ID) still runs."""
    snapshot = {
        "method": "GET", "scheme": "http", "host": "localhost", "root_path": "", "path": "/emit/old",
        "query_string": "", "url": "http://localhost/emit/old", "endpoint": "emit", "view_args": {"value": "old"},
        "headers": [["Host", "localhost"], ["X-Request-ID", "client-rid"]], "remote_addr": "10.1.1.1",
        "client_ip": "10.1.1.1", "request_id": "client-rid",
    }
    event = {
        "v": 1, "id": "0123456789abcdef00000001", "signal": "misc", "receiver": "tests.misc_app:on_misc",
        "emitted_at": "2026-11-01T10:00:00+00:00", "sender": "view", "kwargs": {"value": "old"}, "g": {},
    }
    if function == RUN_EVENTS:
        batch = [dict(event, request={"ref": "client-rid", "user": None})]
        args: tuple[object, ...] = (batch, {"client-rid": snapshot})
    else:
        args = (dict(event, request=dict(snapshot, user=None)),)
    queue = Queue("signals", connection=conn, serializer=JSONSerializer)
    queue.enqueue_call(function, args=args, timeout=240 if function == RUN_EVENTS else 180, result_ttl=500,
                       failure_ttl=365 * 24 * 3600)

    run_worker("tests.misc_app:create_app()", redis_url)

    [rec] = records(conn)
    assert (rec["kwargs"]["value"], rec["request"]["path"], rec["request"]["remote_addr"]) == (
        "old", "/emit/old", "10.1.1.1"
    )
    assert rec["request"]["request_id"] == "client-rid"
    assert conn.zcard("rq:failed:signals") == 0
