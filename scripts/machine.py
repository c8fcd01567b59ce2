"""The machine line every results file written by these scripts starts with."""

import os
import platform
import re
from pathlib import Path

import torch
import torchvision


def machine() -> str:
    """'Machine: <cpu>, <cores> cores, <system>; Python ..., torch ..., torchvision ...'."""
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return (f"Machine: {cpu.group(1) if cpu else platform.machine()}, {os.cpu_count()} cores, {platform.system()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
