"""Tell the story to ``tests.story_app`` with Flask's test client, in this process; print the statuses.

Run as ``python -m tests.drive_story`` so the inline and the deferred runs are separate processes.
"""

import json
import sys

from tests.story_app import create_app

STORY = [
    ("/register?email=ada@example.com", "10.0.0.1"),
    ("/login/1", "10.0.0.1"),
    ("/rename/1?email=ada@lovelace.org", "10.0.0.2"),
    ("/logout", "10.0.0.2"),
    ("/delete/1", "10.0.0.3"),
]

if __name__ == "__main__":
    app = create_app()
    client = app.test_client()
    statuses = [client.post(path, environ_base={"REMOTE_ADDR": addr}).status_code for path, addr in STORY]
    json.dump(statuses, sys.stdout)
