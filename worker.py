"""Run an RQ worker for a Flask app's @deferred receivers: ``python worker.py --app module:app``."""

import sys

from signal_queue.worker import main

if __name__ == "__main__":
    sys.exit(main())
