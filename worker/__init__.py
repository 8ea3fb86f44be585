"""cache-worker's pure core: change events, rules, cache actions, the run loop, settings and CLI.

Nothing in this package imports a database or Redis driver; adapters live in ``connectors``.
"""

__version__ = "0.1.0"
