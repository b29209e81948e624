"""maild's benchmark suite (issue 8): throughput, latency, memory, retention.

Each module runs standalone (``python -m bench.throughput --help``); ``python -m bench.run``
(``make bench``) runs them all and can write docs/BENCHMARKS.md. Everything runs on
loopback, starts what it needs, and stops it again. See docs/BENCHMARKS.md.
"""
