"""Runs an sm_90 compile check module in a fresh process, where Triton is not interpreting.

Under pytest on a CPU machine TRITON_INTERPRET=1 is set before triton is imported (conftest.py), and
`triton.jit` then makes interpreter functions that `triton.compile` cannot take: the compile checks
therefore run as `python -m <module>` without that variable, in a fresh Triton cache.
"""

import os
import subprocess
import sys


def run_compile_check(module: str, cache_dir, timeout: int = 900) -> str:
  """Runs `python -m module`; asserts it exits 0 and prints "0 failures"; returns its stdout."""
  env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
  env["TRITON_CACHE_DIR"] = str(cache_dir)  # a fresh cache: really compile
  env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "0 failures" in proc.stdout, proc.stdout[-4000:]
  return proc.stdout
