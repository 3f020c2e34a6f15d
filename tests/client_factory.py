"""A SIGNAL_QUEUE_REDIS_CLIENT factory for the tests: what a URL cannot say (a credential provider that
reads the password from a file), and a record of the options each part of signal_queue asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import redis


def make_client(**options: Any) -> redis.Redis:
    """A client of 127.0.0.1:$SQ_TEST_REDIS_PORT, its password read from $SQ_TEST_PASSWORD_FILE."""
    password = Path(os.environ["SQ_TEST_PASSWORD_FILE"]).read_text().strip()
    log = os.environ.get("SQ_TEST_FACTORY_LOG")
    if log:
        with open(log, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "options": sorted(options)}) + "\n")
    return redis.Redis(
        port=int(os.environ["SQ_TEST_REDIS_PORT"]),
        credential_provider=redis.UsernamePasswordCredentialProvider("default", password),
        **options,
    )


def not_a_client(**options: Any) -> object:
    """A wrong factory: it returns no redis.Redis."""
    return "redis://127.0.0.1:6379/0"


def no_options() -> redis.Redis:
    """A wrong factory: it takes no keyword options."""
    return redis.Redis()
