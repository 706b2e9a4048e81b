"""Put this folder on PYTHONPATH with MEGAMORA_TEST_STEP_SLEEP=S and every Python process started
from there (a tool's runs too) sleeps S seconds after each optimizer step (tests/lifecycle_entry.py),
so that a test can stop a run mid-run, not after its last step."""

import importlib.util
import os
import sys
from pathlib import Path

if os.environ.get("MEGAMORA_TEST_STEP_SLEEP"):
    _spec = importlib.util.spec_from_file_location("_lifecycle_entry", Path(__file__).parents[1] / "lifecycle_entry.py")
    _entry = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_entry)
    sys.path.remove(str(_entry.REPO / "launch"))  # the entry's own import path: not this process's
    _entry.slow_steps(float(os.environ["MEGAMORA_TEST_STEP_SLEEP"]))
