"""The peak memory of one call, measured in a fresh Python process with Linux's VmHWM, for the tests that show
memory bounded by a chunk whatever the number of points or copies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

needs_vmhwm = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                 reason="measures the peak with Linux's VmHWM")

_MEASURE = """
import json, re

def _status(field):  # kB
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

{setup}
# The peak is measured from here: Linux resets VmHWM to the current RSS when "5" is written to clear_refs.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = _status("VmRSS")
{call}
print(json.dumps((_status("VmHWM") - before) / 1024))
"""


def added_peak_mib(setup: str, call: str) -> float:
    """How many MiB the peak RSS of a fresh process rises during `call`, a statement run after `setup` (code that
    loads the model and makes one plain pass, so the model and the allocator's steady state are not counted)."""
    script = _MEASURE.format(setup=textwrap.dedent(setup), call=call)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])
