"""Tools for developing signal_queue (tests, benchmarks, the demo); not part of the installed package."""
