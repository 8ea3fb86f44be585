"""Benchmark of cache-worker (``make bench``, ``python -m bench [--quick]``), issue 5.

It starts a private Redis, MariaDB and Postgres (``tests.services``, loopback only), writes
reproducible workloads (``bench.workload``, sized by ``bench.sizes``) and runs the parts
(``bench.mariadb_parts``, ``bench.postgres_parts``, sharing ``bench.run``): throughput of a stock
reader, a naive DEL-per-row loop and the real worker on the same log range
(``bench.mysql_contenders``, ``bench.logical_contenders``, ``bench.notify_contenders`` on
``bench.postgres_common``; the worker process through ``bench.worker_run``), commit -> Redis lag
(``bench.lag`` with ``bench.keyspace_reader``), peak RSS under a backlog (``bench.memory``) and
the Postgres write cost of the notify triggers (``bench.pgbench``). ``bench.report`` formats the
results and ``bench.targets`` judges them against the issue's targets; both, with
``bench.stats``, ``bench.rules`` and the workloads, are pure so unit tests check them without
servers.
"""
