"""The consumer: from a job in Redis to the receiver running as it would have inline.

- :mod:`.job`: the job class, an allow-list of what a job in Redis may say;
- :mod:`.run`: the job functions, per-event timeouts, done marks, failures spun off;
- :mod:`.context`: the app and request contexts rebuilt from the snapshot, ``current_event``;
- :mod:`.worker`: the RQ worker, and its survival of Redis going away;
- :mod:`.failures`: failed events in RQ's registries, listed and requeued;
- :mod:`.rq_compat`: every use of RQ's non-public API.
"""
