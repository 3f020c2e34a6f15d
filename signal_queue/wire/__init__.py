"""The wire format: what crosses Redis between an app and its workers, and nothing that runs either.

- :mod:`.event`: the event and request snapshot as JSON, the format version, ids;
- :mod:`.codec`: JSON encoding of kwargs, senders and exceptions;
- :mod:`.keys`: the job function names, Redis keys and fields the bridge writes;
- :mod:`.receivers`: the ``@deferred`` receivers by name, the only ones a job may name;
- :mod:`.redis_url`: Redis URLs as messages may show them, passwords masked;
- :mod:`.redis_errors`: which Redis errors pass by themselves and which need a fix, for both sides;
- :mod:`.redis_connect`: the one place a Redis client is made: from a URL (Sentinel too) or
  the app's factory; Redis Cluster refused;
- :mod:`.redis_identity`: Redis's run id and the marker key, read alike by both sides to tell
  a Redis that came back without its data.
"""
