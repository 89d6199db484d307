"""benchmarks/bench_input.py: each worker count reads the whole corpus once, with no bad records."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_worker_count_reads_the_corpus():
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_input.py"), "--preset", "tiny", "--workers", "0,2",
         "--samples", "24", "--batch-size", "4", "--max-len", "160"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert [r["workers"] for r in result["runs"]] == [0, 2]
  for r in result["runs"]:
    assert r["stats"] == {"seen": 24, "bad": {}}
    assert r["samples"] == 20 and r["samples_per_s"] > 0  # the first batch of 4 is not timed
  assert result["views"] == 5 and result["view_px"] == 32
