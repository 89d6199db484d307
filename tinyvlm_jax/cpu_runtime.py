"""Process settings for CPU inference (keep freed memory mapped, huge pages) and memory measurement.

XLA and PyTorch allocate each run's large buffers with malloc. glibc serves blocks above
32 MB with a fresh mmap and unmaps them when freed, so every call (an image encoding, a
prefill) faults all of its buffers in again, page by page. Measured here (a sandboxed VM where
a page fault is slow): x + 1 over a 42 MB array took 112 ms per call with glibc's defaults and
7.6 ms with mmap switched off, i.e. freed memory kept for the next call. The price is RSS: the
process keeps its peak heap.

`MALLOC_ENV` (for a child process) also asks glibc to back its heap with transparent huge pages
(`glibc.malloc.hugetlb=1`, glibc >= 2.35; a no-op elsewhere). Decoding streams every weight once
per token, and with 2 MB pages the TLB misses of that stream go: measured here, a full-size int8
decode ran at 33.5-34.2 tokens/s with them and 28.5-30.3 without, and a 2-thread read of 1 GiB
at 23 GB/s instead of 21. glibc reads this only at start-up, so `keep_freed_memory` cannot set it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def _tunables() -> str:
  """GLIBC_TUNABLES with huge-page malloc added to whatever the environment already sets."""
  have = os.environ.get("GLIBC_TUNABLES", "")
  return have if "glibc.malloc.hugetlb" in have else ":".join(filter(None, [have, "glibc.malloc.hugetlb=1"]))


# The same settings as environment variables, plus huge pages, for a child process (glibc reads
# them at start-up).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "GLIBC_TUNABLES": _tunables()}

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Tells glibc to serve every allocation from the heap and never give freed memory back.

  Call before the model's first run; later allocations follow it. Returns False where the C
  library is not glibc (the setting is then skipped).
  """
  if os.name != "posix":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_cleared_peak = 0  # bytes: the largest VmHWM that PeakRss cleared, for lifetime_peak_rss


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except (OSError, ValueError, IndexError):
    pass
  return None


class PeakRss:
  """Peak resident memory of this process while the `with` block runs, in bytes (`.peak`).

  On Linux, the kernel's own high-water mark: entering resets it (writing 5 to
  /proc/self/clear_refs) and leaving reads VmHWM, which costs nothing in between. Elsewhere, a
  thread samples psutil every 10 ms. A sampling thread is not free on a loaded 2-core machine:
  its wake-ups delay one of XLA's two worker threads, and every op waits for its slowest one.
  Measured here with full-size int4 generation, two runs each: vision 5.59-6.22 s and decode
  36.7-40.0 tokens/s with the sampler, 5.07-5.17 s and 40.8-42.1 without.

  `lifetime_peak_rss()` is the peak over the process's whole life instead.
  """

  def __init__(self, interval_s: float = 0.01):
    self.peak, self._interval, self._thread = 0, interval_s, None

  def _run(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      self._stop.wait(self._interval)

  def __enter__(self) -> "PeakRss":
    global _cleared_peak
    before = (_status_kib("VmHWM") or 0) * 1024
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      _cleared_peak = max(_cleared_peak, before)
      return self
    except OSError:
      pass
    import threading  # pylint: disable=g-import-not-at-top
    import psutil  # pylint: disable=g-import-not-at-top
    self._proc, self._stop = psutil.Process(), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._thread is None:
      self.peak = (_status_kib("VmHWM") or 0) * 1024
      return
    self._stop.set()
    self._thread.join()


def lifetime_peak_rss() -> int:
  """Bytes: the largest resident set this process has had (Linux reports ru_maxrss in KiB),
  counting the peaks that PeakRss cleared."""
  import resource  # pylint: disable=g-import-not-at-top
  return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _cleared_peak)
