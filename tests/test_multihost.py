"""Sharded kNN, memory and save/load across 2 processes, as on a TPU pod slice's hosts.

Each process runs tests/multihost_check.py after `jax.distributed.initialize` on a
local coordinator; together they hold 4 CPU devices, 2 of them out of each one's reach.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

SCRIPT = pathlib.Path(__file__).with_name("multihost_check.py")
N_PROCESSES = 2
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_search_predict_save_and_load_like_one_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  port = str(_free_port())
  logs = [tmp_path / f"process{i}.log" for i in range(N_PROCESSES)]
  shared = tmp_path / "shared"
  shared.mkdir()
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, str(SCRIPT), str(i), str(N_PROCESSES), port, str(shared)],
          env=env, stdout=out, stderr=subprocess.STDOUT, cwd=SCRIPT.parent.parent))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    # One process failing leaves the others waiting at a barrier: stop them all then.
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [log.read_text() for log in logs]
  report = "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{text[-4000:]}"
                     for i, (p, text) in enumerate(zip(procs, outputs)))
  assert all(p.returncode == 0 for p in procs), report
  for i, text in enumerate(outputs):
    assert f"MULTIHOST OK {i}" in text, report
