"""Send the article's requests to ``application:app`` with Flask's test client, in this process.

Run as a script (its own process, its own cwd) so the inline and the deferred
versions of the article, which share module names, never meet.
"""

import json
import sys

from application import app

REQUESTS = [
    ("/dashboard?user=alice", {}),
    ("/dashboard", {}),
    ("/dashboard?user=mallory", {"X-Forwarded-For": "6.6.6.6"}),
    ("/compute", {}),
]

if __name__ == "__main__":
    client = app.test_client()
    statuses = [client.get(path, headers=headers).status_code for path, headers in REQUESTS]
    json.dump(statuses, sys.stdout)
