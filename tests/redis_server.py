"""The private redis-server the test session uses (see signal_queue.redis_process)."""

from signal_queue.redis_process import RedisProcess as RedisServer
from signal_queue.redis_process import free_port

__all__ = ["RedisServer", "free_port"]
