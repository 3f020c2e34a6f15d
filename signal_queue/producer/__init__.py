"""The producer: from a signal's emit in the app to a job in Redis.

- :mod:`.capture`: what is taken at emit time, on the request thread;
- :mod:`.emit`: the forwarding receivers' body and the app's :class:`~.emit.Producer`;
- :mod:`.outbox`: delivery modes and the background sender thread;
- :mod:`.dispatcher`: batched RQ jobs in one pipeline, the circuit breaker;
- :mod:`.spool`: the outage spool on the app's disk;
- :mod:`.ledger`: the host's counts of spooled, lost and dropped events, next to the spool.
"""
