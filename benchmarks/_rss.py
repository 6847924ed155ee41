"""This process's resident memory (``/proc/self/statm``), and its peak sampled by a thread: the
memory figures of ``loss_memory.py``, ``real_model_profile.py`` and ``fsdp_memory.py``."""

from __future__ import annotations

import os
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size now, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Peak RSS (bytes) seen since the last :meth:`reset`, sampled every ``interval`` seconds until
    ``stop`` is set. A daemon thread: ``start()`` it once."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss()
        self.stop = False

    def run(self) -> None:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            while not self.stop:
                now = int(os.pread(fd, 128, 0).split()[1]) * PAGE
                if now > self.peak:
                    self.peak = now
                time.sleep(self.interval)
        finally:
            os.close(fd)

    def reset(self) -> int:
        """Start a new peak from the RSS now; returns it."""
        self.peak = rss()
        return self.peak
