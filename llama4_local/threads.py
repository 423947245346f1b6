"""How many CPU threads the computing commands use (`--threads`; default: the physical cores).

The CPU kernels keep each core's vector units busy (on the 2-core test machine decode is bound by
instructions per weight byte, not by memory); a second hardware thread on the same core shares
those units, so one thread per physical core is the default.
"""

from __future__ import annotations

import os

from .errors import UserError


def physical_cores() -> int:
    """Physical cores this process may run on (Linux: distinct (package, core) pairs among the
    CPUs of its affinity mask); elsewhere the logical CPU count."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    cores, cpu, package = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    package = value
                elif key == "core id" and (allowed is None or cpu in allowed):
                    cores.add((package, value))
    except (OSError, ValueError):
        cores = set()
    if cores:
        return len(cores)
    return len(allowed) if allowed else (os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def set_threads(n: int | None) -> int:
    """Use `n` threads for torch's CPU work (None: the physical cores); returns the count."""
    import torch

    if n is None:
        n = physical_cores()
    if n < 1:
        raise UserError(f"--threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    return n
