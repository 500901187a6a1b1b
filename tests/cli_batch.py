"""Runs many experiment command lines (``experiments.split_mnist`` by default) in one process (for
tests: bad inputs, fuzz).

    python tests/cli_batch.py jobs.json results.json [module]

``jobs.json`` holds a list of argument lists. Flags are re-parsed for each (absl's
``FLAGS.unparse_flags()`` first); stdout/stderr are captured. Each result holds the exit status
(0, the ``SystemExit`` code, or ``"uncaught"`` with the traceback), the captured output and the
seconds taken. The dataset loader is memoised across command lines (reading 70k decoded images
per command line would dominate the time); everything else runs as in the real command.
"""

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_batch(jobs: list, folder: Path, module: str = "split_mnist") -> list:
  """Runs ``jobs`` (argument lists) through this script in one subprocess (the main of
  ``experiments.<module>``); returns the results.

  Asserts that the batch process itself exits 0 (each job's own status is in its result).
  """
  jobs_path, results_path = folder / "jobs.json", folder / "results.json"
  jobs_path.write_text(json.dumps(jobs))
  proc = subprocess.run([sys.executable, __file__, str(jobs_path), str(results_path), module],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(results_path.read_text())


def main(jobs_path: str, results_path: str, module: str = "split_mnist") -> None:
  import importlib  # pylint: disable=import-outside-toplevel
  with open(jobs_path) as f:
    jobs = json.load(f)
  from absl import flags  # pylint: disable=import-outside-toplevel
  from experiments import cli, data  # pylint: disable=import-outside-toplevel
  script = importlib.import_module(f"experiments.{module}")
  data.load_dataset = functools.lru_cache(maxsize=8)(data.load_dataset)
  results = []
  for argv in jobs:
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        script.main(cli.parse_flags([module, *argv]))
        code = 0
      except SystemExit as e:
        code = e.code
      except BaseException:  # pylint: disable=broad-except
        code = "uncaught"
        err.write(traceback.format_exc())
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(),
                    "stderr": err.getvalue(), "seconds": time.perf_counter() - t0})
    with open(results_path, "w") as f:  # after each job: a crash leaves what was done
      json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
