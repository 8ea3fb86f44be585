"""Benchmark of cache-worker (``make bench``, ``python -m bench [--quick]``), issue 5.

It starts a private Redis, MariaDB and Postgres (``tests.services``, loopback only), writes
reproducible workloads (``bench.workload``, sized by ``bench.sizes``) and measures: throughput
of stock readers, a naive DEL-per-row loop and the real worker on the same log range
(``bench.mysql_contenders``, ``bench.postgres_contenders``, ``bench.worker_run``), commit ->
Redis lag (``bench.lag``), peak RSS under a backlog (``bench.memory``) and the Postgres write
cost of the notify triggers (``bench.pgbench``). ``bench.report`` formats the results,
``bench.targets`` judges them against the issue's targets; both, and ``bench.stats``, are pure
so the unit tests check them without servers.
"""
