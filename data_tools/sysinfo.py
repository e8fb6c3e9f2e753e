"""Process memory readings shared by the data tools, the trainer and the benchmarks (Linux).

The bottom layer holds it, so data_tools need not import megatron_ext."""
from __future__ import annotations


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Unlike ``ru_maxrss`` it does not carry the
    peak of a parent that forked this process before exec."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> int:
    """Reset the peak RSS (clear_refs) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")
