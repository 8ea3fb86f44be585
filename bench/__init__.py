"""Throughput benchmark for cache-worker (``make bench``, ``python -m bench [--quick]``).

It starts a private MariaDB and Redis (``tests.services``, loopback only), writes a reproducible
sysbench-like write workload into the binlog, then replays the same binlog range through several
contenders one after another (``bench.contenders``) and reports rows per second for each
(``bench.report``). The pure parts (workload generation, formatting) live in their own modules so
the unit tests can check them without servers.
"""
