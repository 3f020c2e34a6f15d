"""Run an RQ worker for a Flask app's @deferred receivers: ``python worker.py --app module:app``.

The Redis URL comes from the app's config or ``SIGNAL_QUEUE_REDIS_URL``, so no
password needs to appear on the command line; ``--help`` lists the options.
"""

from signal_queue._cli import worker_main

if __name__ == "__main__":
    worker_main()
