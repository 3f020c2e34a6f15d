"""The default worker's handler process: handlers run in a child that the worker watches.

The worker (an RQ SimpleWorker) stays the supervisor: it alone talks to RQ and
Redis (dequeue, started registry, heartbeats from its own thread, done marks,
failure records). The handlers run in one long-lived child, forked from the
worker once the app is loaded, so it starts in milliseconds with every receiver
imported. A job's events go to the child once, over a pipe; the child answers
with one small record per event, on a pipe of its own, as each event ends. The
first event not answered yet is the one running, and the worker knows since
when, so:

- past the event's timeout (the handler's own alarm, in the child) plus
  :data:`HARD_KILL_GRACE`, the worker kills the child with SIGKILL: nothing is
  asked of the handler, so one that holds the GIL in C is stopped too;
- a child that dies (a segfault in a C extension, ``os._exit``, the OOM killer)
  or is killed blames that event alone: it fails that attempt
  (:class:`~signal_queue.exceptions.HandlerCrashed`, or RQ's
  ``JobTimeoutException``) and is retried on its own; the rest of the batch goes
  on in a fresh child, each event exactly once;
- on SIGTERM the child finishes the running event (for at most
  ``SIGNAL_QUEUE_SHUTDOWN_GRACE`` seconds) and starts no other; the rest go back
  to the queue (see :func:`~.run.hand_back`).

The worker's heartbeats never wait for a handler: they come from the worker's
own thread, and the handler holds the child's GIL, not the worker's. It is the
model of Celery's prefork pool and of RQ's work horse, without a fork per job.

Waking a process costs more than a trivial handler, so the worker does not
wait on the answers themselves: the child also writes one byte to a third pipe
after every :data:`WAKE_EVERY` answers, after a failure and at the end of the
job's events, and the worker waits on that one, for at most :data:`_WAIT_AT_MOST`
seconds, before it reads the answers there are. An answer is in the pipe before
the next event starts either way, so what the worker learns after a crash is the same.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from rq.job import get_current_job
from rq.timeouts import JobTimeoutException

from ..exceptions import HandlerCrashed
from .lifeline import die_with_parent, orphaned
from .rq_compat import current_job_stub, set_current_job
from .run import (
    CRASHED,
    FAILED,
    HANDLED,
    REJECTED,
    TIMED_OUT,
    Consumer,
    EventsHere,
    Failure,
    Outcome,
    Unfinished,
    receiver_of,
    use_runner,
)

logger = logging.getLogger("signal_queue")

#: Seconds past an event's timeout before the worker kills the handler process. The handler's
#: own alarm ends a handler that runs Python code at the timeout, with its traceback; this is
#: for one that cannot be interrupted (C code holding the GIL, an alarm caught and ignored).
HARD_KILL_GRACE = 2.0

#: The child wakes the worker after this many answers (and after a failure, and at the end of a job's events):
#: as many as the worker's done marks are saved for at once, so no more finished events than that wait
#: unmarked (see :class:`~.run._DoneMarks`).
WAKE_EVERY = 20

#: Longest the worker waits for a wake before it reads the answers anyway and looks at the clock and the child:
#: the longest an answer waits to be settled (an event's done mark, its log line).
_WAIT_AT_MOST = 0.01

# Exit status of a handler process whose own loop failed (EX_SOFTWARE).
_EX_SOFTWARE = 70


class HandlerProcess:
    """The worker's side of the handler process: starts it, feeds it jobs, watches the clock and its death.

    An :class:`~.run.EventRunner`: the job functions hand it a job's events and
    get one :class:`~.run.Outcome` per event back, in order.
    """

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        #: The handler process's pid, 0 when none runs.
        self.pid = 0
        #: Handler processes this worker forked: 1, plus one per crash or kill.
        self.forks = 0
        self._jobs: Connection | None = None  # to the child: each job's events, pickled once
        self._answers: _Answers | None = None  # from the child: one small record per event, and wakes
        # One byte shared with every child (an anonymous shared mapping survives fork):
        # set, it tells the child to finish the running event and start no other.
        self._stop = mmap.mmap(-1, 1)
        self._stop_at: float | None = None
        self._timeouts: dict[tuple[str, str], int] = {}
        #: A job's events sent before its job function runs (see :meth:`send_early`): the job id,
        #: the events and when they were sent.
        self._early: tuple[str, list[tuple[int, Any]], float] | None = None

    def start(self) -> None:
        """Fork the handler process, if none runs, from this already loaded worker."""
        if self._jobs is not None:
            return
        jobs_in, jobs_out = os.pipe()
        answers_in, answers_out = os.pipe()
        wake_in, wake_out = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(jobs_out)
            os.close(answers_in)
            os.close(wake_in)
            _serve(Connection(jobs_in, writable=False), answers_out, wake_out, self._stop, self.consumer, parent)
        os.close(jobs_in)
        os.close(answers_out)
        os.close(wake_out)
        self.pid = pid
        self._jobs = Connection(jobs_out, readable=False)
        self._answers = _Answers(answers_in, wake_in)
        self.forks += 1

    def request_stop(self) -> None:
        """The worker is stopping: finish the running event, within the grace period, and start no other.

        Called from the worker's SIGTERM handler; the grace period counts from here.
        """
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop[0] = 1

    def close(self, timeout: float = 2.0) -> None:
        """End the handler process: ask it to exit, and kill it if it has not within ``timeout`` seconds."""
        if self._jobs is None or self._answers is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self._jobs.send(None)
            while time.monotonic() < deadline:
                self._answers.take(deadline - time.monotonic())
        except (EOFError, OSError):
            pass  # it exited
        self._end()
        self._forget()

    # -- running events -------------------------------------------------------------

    def send_early(self, job_id: str, origin: str, items: list[tuple[int, Any]], requests: Any) -> bool:
        """Send a job's events now, before RQ's bookkeeping reaches its job function: the job must be
        started in Redis already (its take started it) and have passed the allow-list. The job
        function's :meth:`run` then follows them instead of sending them. False if they were not sent.
        """
        if self._stop[0] or self._early is not None:
            return False
        # Noted before the write: if anything interrupts it, the events may have gone.
        self._early = (job_id, items, time.monotonic())
        try:
            sent_at = self._send((1, items, requests, (job_id, origin)))
        except OSError:
            self._early = None  # the handler process cannot be started or fed now: run() tries again
            return False
        self._early = (job_id, items, sent_at)
        return True

    def holds_early(self) -> bool:
        """True if a job's events were sent early (or may have been) and no job function followed them yet."""
        return self._early is not None

    def drop_early(self) -> None:
        """The job ended without its job function following the events sent early (a bug, or an error
        in RQ's bookkeeping before it): what the handler process does with them is unknown, so it goes."""
        if self._early is None:
            return
        logger.error("signal_queue: job %s was sent to the handler process and never followed; "
                     "the handler process is ended", self._early[0])
        self._early = None
        self._end()
        self._forget()

    def run(
        self,
        consumer: Consumer,
        attempt: int,
        items: Sequence[tuple[int, Any]],
        requests: Any,
        settle: Callable[[Outcome], None],
    ) -> Unfinished | None:
        """Run ``items`` in the handler process, one fresh process after each crash or kill."""
        pending = list(items)
        early, self._early = self._early, None
        try:
            current = get_current_job()
            job = None if current is None else (current.id, current.origin)
            if early is not None and not (job is not None and early[0] == job[0] and _same(early[1], pending)):
                self._early = early
                self.drop_early()
                early = None
            while pending:
                if early is not None:
                    # Sent before this job function ran (send_early): the handler process decides
                    # about a stop itself, before each event.
                    sent_at, early = early[2], None
                else:
                    if self._stop[0]:
                        return Unfinished(pending, cut=False)
                    sent_at = self._send((attempt, pending, requests, job))
                pending, left = self._follow(pending, sent_at, attempt, settle)
                if left is not None:
                    return left if left.items else None
        except BaseException:
            # Interrupted part-way (Redis failed in the bookkeeping, a cold shutdown): what
            # the child is doing is unknown, so it goes; the next job starts a fresh one.
            self._end()
            self._forget()
            raise
        return None

    def _send(self, job: tuple[int, list[tuple[int, Any]], Any, tuple[str, str] | None]) -> float:
        """Hand a job's events to the handler process, a fresh one if it died while idle; when it was sent."""
        if self._exited() is not None:  # the OOM killer, a kill -9 between jobs: no event to blame
            self._forget()
        for tries_left in (1, 0):
            self.start()
            assert self._jobs is not None
            try:
                self._jobs.send(job)
            except OSError:  # it died just now
                self._end()
                self._forget()
                if not tries_left:
                    raise
            else:
                break
        return time.monotonic()

    def _follow(
        self, pending: list[tuple[int, Any]], started: float, attempt: int, settle: Callable[[Outcome], None]
    ) -> tuple[list[tuple[int, Any]], Unfinished | None]:
        """Settle the child's answers for ``pending`` (sent at ``started``) as they come.

        Returns the events to send to a fresh child (after a crash or a kill), or
        the events to give back to the queue (the worker is stopping).
        """
        answers = self._answers
        assert answers is not None
        pid = self.pid
        position = 0
        while position < len(pending):
            index, payload = pending[position]
            timeout = self._timeout_of(payload)
            overrun_at = started + timeout + HARD_KILL_GRACE
            limit = overrun_at
            if self._stop_at is not None:
                limit = min(limit, self._stop_at + self.consumer.shutdown_grace)
            try:
                answer = answers.take(max(limit - time.monotonic(), 0.0))
            except (EOFError, OSError):  # it died: whatever it sent before came first
                status = self._end()
                settle(self._crashed(pid, index, payload, attempt, status, time.monotonic() - started))
                self._forget()
                return pending[position + 1 :], None
            if answer is not None:
                if answer.kind == STOPPED:
                    return [], Unfinished(pending[position:], cut=False)
                settle(answer)
                position += 1
                started = answer.finished_at
                continue
            status = self._exited()
            if status is None and time.monotonic() < limit:
                continue
            # Dead (the pipe held open by a process it forked), past the event's limit, or past
            # the grace period of a stop: it goes. What it answered before it went still counts.
            reason = "died" if status is not None else "overran" if limit == overrun_at else "grace"
            if status is None:
                status = self._end()
            position, started, stopped = self._drain(pending, position, started, settle)
            self._forget()
            if reason == "grace" or stopped:
                cut = not stopped and position < len(pending)
                if cut:
                    logger.warning(
                        "signal_queue: stopping; event %s still ran after the %.3g s grace period and was stopped",
                        _name(pending[position][1]), self.consumer.shutdown_grace,
                    )
                return [], Unfinished(pending[position:], cut=cut)
            if position < len(pending) and pending[position][0] == index:
                seconds = time.monotonic() - started
                if reason == "overran":
                    settle(self._timed_out(pid, index, payload, attempt, timeout, seconds))
                else:
                    settle(self._crashed(pid, index, payload, attempt, status, seconds))
                position += 1
            return pending[position:], None
        return [], None

    def _timeout_of(self, payload: Any) -> int:
        # Looked up once per receiver: this runs for every event the worker runs.
        data = payload if isinstance(payload, dict) else {}
        key = (str(data.get("receiver")), str(data.get("signal")))  # as receiver_of reads them: maybe not text
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = self.consumer.timeout_of(receiver_of(payload))
        return timeout

    def _drain(
        self, pending: list[tuple[int, Any]], position: int, started: float, settle: Callable[[Outcome], None]
    ) -> tuple[int, float, bool]:
        """Settle the answers a child that is gone left in the pipe; True if it had seen the stop flag."""
        answers = self._answers
        assert answers is not None
        try:
            while position < len(pending) and (answer := answers.take(0.0)) is not None:
                if answer.kind == STOPPED:
                    return position, started, True
                settle(answer)
                position += 1
                started = answer.finished_at
        except (EOFError, OSError):
            pass
        return position, started, False

    def _crashed(self, pid: int, index: int, payload: Any, attempt: int, status: int | None, seconds: float) -> Outcome:
        how = _describe(status)
        logger.error(
            "signal_queue: event %s (attempt %d) crashed the handler process %d, which %s; "
            "the event fails this attempt and a new handler process runs the rest",
            _name(payload), attempt, pid, how,
        )
        exc = HandlerCrashed(
            f"the handler process {how} while it ran event {_name(payload)}, attempt {attempt} "
            "(a fault in a C extension, os._exit, the OOM killer...)"
        )
        return Outcome(index, CRASHED, seconds, time.monotonic(), Failure.of(exc), exc)

    def _timed_out(
        self, pid: int, index: int, payload: Any, attempt: int, timeout: int, seconds: float
    ) -> Outcome:
        logger.error(
            "signal_queue: event %s (attempt %d) ran %.1f s, past its timeout of %d s, and did not stop: "
            "its handler process %d was killed",
            _name(payload), attempt, seconds, timeout, pid,
        )
        exc = JobTimeoutException(
            f"Task exceeded maximum timeout value ({timeout} seconds): event {_name(payload)} was still running "
            f"{HARD_KILL_GRACE:g} s later (a handler holding the GIL in C, or catching the alarm), so its "
            "handler process was killed"
        )
        return Outcome(index, TIMED_OUT, seconds, time.monotonic(), Failure.of(exc), exc)

    # -- the child's end ------------------------------------------------------------------

    def _exited(self) -> int | None:
        """The child's wait status if it has exited (it is then reaped), else None."""
        if not self.pid:
            return None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            return None
        self.pid = 0
        return status

    def _end(self) -> int | None:
        """Kill the child (SIGKILL) if it runs and reap it; its wait status."""
        if not self.pid:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = None
        self.pid = 0
        return status

    def _forget(self) -> None:
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self._answers is not None:
            self._answers.close()
            self._answers = None


#: An answer's kind on the wire (the child sends the first three), and the answer to a stop.
_KINDS = (HANDLED, FAILED, REJECTED)
_CODES = {kind: code for code, kind in enumerate(_KINDS)}
STOPPED = "stopped"
_STOPPED_CODE = 255
#: An answer: kind, event index, seconds, time.monotonic() when done, length of the pickled failure after it.
_RECORD = struct.Struct("<BIddI")


class _Answers:
    """The child's answers, read from its pipe in as few system calls as it allows.

    The worker sleeps on the child's wake pipe, not on the answers: when events
    are short, one wake and one read take many answers.
    """

    def __init__(self, fd: int, wake: int) -> None:
        self.fd = fd
        self.wake = wake
        os.set_blocking(fd, False)
        os.set_blocking(wake, False)
        self._buffer = bytearray()
        self._at = 0
        self._poll = select.poll()
        self._poll.register(wake, select.POLLIN)
        self._closed = False

    def take(self, timeout: float) -> Outcome | None:
        """The next answer, waiting up to ``timeout`` seconds, or less (None if none is complete by then).

        Raises EOFError once the child closed its end and every answer was taken.
        """
        waited = False
        while True:
            answer = self._parse()
            if answer is not None:
                return answer
            if self._closed:
                raise EOFError
            if self._fill():
                continue
            if waited:
                return None
            # Woken by the child (a wake byte, or its end), or after a while with nothing new.
            if self._poll.poll(math.ceil(min(timeout, _WAIT_AT_MOST) * 1000)):
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake, 1 << 12)
            waited = True

    def _fill(self) -> bool:
        """Read what the answers pipe holds now; True if it held something, or the child closed it."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        if not data:
            self._closed = True
        self._buffer += data
        return True

    def _parse(self) -> Outcome | None:
        buffer, at = self._buffer, self._at
        if len(buffer) - at < _RECORD.size:
            return None
        code, index, seconds, finished_at, extra = _RECORD.unpack_from(buffer, at)
        end = at + _RECORD.size + extra
        if len(buffer) < end:
            return None
        failure = Failure(*pickle.loads(buffer[at + _RECORD.size : end])) if extra else None
        if end == len(buffer) or end > 1 << 16:  # taken: keep the buffer small
            del buffer[:end]
            end = 0
        self._at = end
        kind = STOPPED if code == _STOPPED_CODE else _KINDS[code]
        return Outcome(index, kind, seconds, finished_at, failure)

    def close(self) -> None:
        self._poll.unregister(self.wake)
        os.close(self.fd)
        os.close(self.wake)


def _answer(fd: int, outcome: Outcome) -> None:
    """Send one answer to the worker (in the child): a fixed record, and the failure pickled after it."""
    failure = outcome.failure
    extra = b"" if failure is None else pickle.dumps((failure.module, failure.qualname, failure.message, failure.text))
    data = _RECORD.pack(_CODES[outcome.kind], outcome.index, outcome.seconds, outcome.finished_at, len(extra)) + extra
    while data:  # a pipe may take a long failure text in parts
        data = data[os.write(fd, data) :]


def _same(sent: list[tuple[int, Any]], items: list[tuple[int, Any]]) -> bool:
    """True if ``items`` are the events ``sent`` (the same indexes and payload objects)."""
    return len(sent) == len(items) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(sent, items, strict=True))


def _name(payload: Any) -> str:
    data = payload if isinstance(payload, dict) else {}
    return f"{data.get('id')} ({data.get('signal')} -> {data.get('receiver')})"


def _describe(status: int | None) -> str:
    if status is None:
        return "ended"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "a signal"
        return f"was killed by {name} (signal {number})"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended (wait status {status})"


def _wake(fd: int) -> None:
    """Wake the worker (in the child): one byte; a full wake pipe has woken it already."""
    with contextlib.suppress(BlockingIOError):
        os.write(fd, b"!")


def _serve(
    jobs: Connection, answers: int, wake: int, stop: mmap.mmap, consumer: Consumer, parent: int
) -> NoReturn:
    """The handler process: run the events of each job the worker sends, answer each one; never returns."""
    code = 0
    try:
        die_with_parent(signal.SIGKILL)
        if orphaned(parent):
            os._exit(0)
        # The worker decides when this process ends. A SIGTERM or Ctrl-C meant for the worker
        # (systemd and terminals signal the whole process group) must not cut a handler short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.set_blocking(wake, False)
        use_runner(None)
        consumer.after_fork()
        connection = consumer.redis.client() if consumer.redis.configured else None
        # What came from the worker (the app, its modules) lives as long as this process: out of the
        # collector's way, it is not walked (and its pages not copied) at every full collection.
        gc.freeze()
        while True:
            try:
                message = jobs.recv()
            except (EOFError, OSError):
                break
            if message is None:
                break
            attempt, items, requests, job = message
            # rq.get_current_job() in a receiver reads the job it runs in, as in RQ's own work horse.
            set_current_job(None if job is None else current_job_stub(job[0], job[1], connection))
            _run_job(consumer, attempt, items, requests, answers, wake, stop)
            _flush_stdio()
    except BaseException:
        code = _EX_SOFTWARE
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        _flush_stdio()
        os._exit(code)


def _run_job(
    consumer: Consumer, attempt: int, items: list[tuple[int, Any]], requests: Any, answers: int, wake: int,
    stop: mmap.mmap,
) -> None:
    """Run a job's events (in the child), answering each one before the next starts."""
    unwoken = 0
    with EventsHere(consumer, requests, attempt) as here:
        for index, payload in items:
            if stop[0]:
                os.write(answers, _RECORD.pack(_STOPPED_CODE, index, 0.0, time.monotonic(), 0))
                break
            started = time.perf_counter()
            try:
                outcome = here.run(index, payload)
            except BaseException as exc:  # a handler's SystemExit fails its event, not this process
                seconds = time.perf_counter() - started
                outcome = Outcome(index, FAILED, seconds, time.monotonic(), Failure.of(exc))
            # What the handler sent reaches Redis before its event counts as done.
            consumer.send_emitted()
            _answer(answers, outcome)
            unwoken += 1
            if unwoken >= WAKE_EVERY or outcome.kind != HANDLED:
                _wake(wake)
                unwoken = 0
    _wake(wake)


def _flush_stdio() -> None:
    # os._exit skips the interpreter's clean-up: what handlers printed must not stay in a buffer.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
