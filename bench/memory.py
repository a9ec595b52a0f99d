"""Peak resident memory of a section of code, on Linux.

``ru_maxrss`` is not enough: it survives fork and exec (a child started from a big
parent reports the parent's peak), so the projection benchmark once read 2.3 GiB for a
call that needs 4 MiB. Instead the kernel's per-process high-water mark is reset by
writing 5 to /proc/self/clear_refs and read back from VmHWM in /proc/self/status.
"""
from __future__ import annotations

import resource


def rss_mib() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak RSS (MiB) since the last :func:`reset_peak` (or since the process started)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.extra_mib``: peak RSS during the block
    minus RSS at its start. ``m.exact`` is False when the peak could not be reset (then
    an earlier, larger peak of this process may show through)."""

    def __enter__(self):
        self.exact = reset_peak()
        self.before = rss_mib()
        return self

    def __exit__(self, *exc):
        self.extra_mib = max(0.0, peak_mib() - self.before)
        return False
