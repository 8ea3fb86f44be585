"""The run command's garbage-collector tuning, in a fresh interpreter (it changes process state)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc, weakref
from worker.cli import _GC_YOUNG_THRESHOLD, _tune_gc
before = gc.get_freeze_count()
_tune_gc()
assert before == 0 and gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold()[0] == _GC_YOUNG_THRESHOLD
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
gc.collect()
assert alive() is None, "a cycle made after the tuning must still be collected"
print("ok")
"""


def test_tuning_freezes_startup_objects_and_still_collects_new_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
