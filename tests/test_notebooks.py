"""Every notebook under notebooks/ runs top to bottom on this interpreter's kernel, and its committed outputs are fresh.

Notebooks are committed executed (with outputs: a visitor sees the plots). Each test runs its notebook
once in a fresh ipykernel started from `sys.executable` (a kernelspec written to a temporary
JUPYTER_PATH, so whatever python3 kernel the machine has installed is not used), with the repository
on PYTHONPATH and the notebook's folder as working directory, and then compares the re-executed
notebook with the committed one, cell by cell: the committed outputs must come from one clean run
(execution counts 1, 2, 3, ...), contain no error, and have outputs and figures (`image/png`) exactly
where the re-executed notebook has them. Text is not compared (numbers, versions may differ).

To refresh the committed outputs (re-execute and write the notebooks, volatile metadata stripped):

    python -m tests.test_notebooks --refresh [NAME ...]
"""

import contextlib
import copy
import json
import os
import pathlib
import sys
import tempfile

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
REFRESH = "python -m tests.test_notebooks --refresh"


@contextlib.contextmanager
def kernel_env(path):
  """A python3 kernelspec for this interpreter under `path`, first on JUPYTER_PATH while inside."""
  spec = pathlib.Path(path) / "kernels" / "python3"
  spec.mkdir(parents=True, exist_ok=True)
  env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
         "MPLBACKEND": "module://matplotlib_inline.backend_inline", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)", "language": "python", "env": env}))
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = os.pathsep.join([str(path)] + ([old] if old else []))
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old


def execute(path, committed):
  """A copy of `committed` (the notebook read from `path`) executed top to bottom, volatile metadata stripped.

  Raises nbclient's CellExecutionError (with the traceback) on any error."""
  nb = copy.deepcopy(committed)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                                   coalesce_streams=True, resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  nb.metadata = copy.deepcopy(committed.metadata)  # not the kernel's language_info (python version etc.)
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
  return nb


def _images(cell):
  return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def stale(committed, fresh):
  """Why `committed`'s outputs are not those of a clean run that gave `fresh` (empty list: they are)."""
  code = lambda nb: [c for c in nb.cells if c.cell_type == "code"]
  old, new = code(committed), code(fresh)
  if len(old) != len(new):
    return [f"{len(old)} code cells committed, {len(new)} executed"]
  problems = []
  for n, (a, b) in enumerate(zip(old, new)):
    where = f"code cell {n} ({a.source.strip().splitlines()[0][:50] if a.source.strip() else 'empty'!r})"
    if any(o.output_type == "error" for o in a.outputs):
      problems.append(f"{where}: an error is committed")
    if a.execution_count != b.execution_count:
      problems.append(f"{where}: execution_count {a.execution_count}, a clean run gives {b.execution_count}")
    if bool(a.outputs) != bool(b.outputs):
      problems.append(f"{where}: {'has' if a.outputs else 'no'} outputs committed, "
                      f"a clean run gives {'some' if b.outputs else 'none'}")
    if _images(a) != _images(b):
      problems.append(f"{where}: {_images(a)} figures committed, a clean run gives {_images(b)}")
  return problems


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
  with kernel_env(tmp_path_factory.mktemp("jupyter")):
    yield


def test_notebooks_exist():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "serving_loop.ipynb", "benchmarks.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_outputs_are_fresh(path, kernel):
  committed = nbformat.read(path, as_version=4)
  fresh = execute(path, committed)  # raises CellExecutionError (with the traceback) on any error
  assert not [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  problems = stale(committed, fresh)
  if problems:
    pytest.fail(f"notebooks/{path.name}: the committed outputs are not those of a clean run:\n  "
                + "\n  ".join(problems) + f"\nrefresh them (and commit the notebook) with: {REFRESH} {path.stem}",
                pytrace=False)


def refresh(names=()):
  """Re-execute the notebooks (all, or those named by stem or file name) and write them with their outputs."""
  paths = [p for p in NOTEBOOKS if not names or p.stem in names or p.name in names]
  unknown = set(names) - {p.stem for p in paths} - {p.name for p in paths}
  if unknown:
    raise SystemExit(f"no such notebook: {', '.join(sorted(unknown))} (have {', '.join(p.stem for p in NOTEBOOKS)})")
  with tempfile.TemporaryDirectory() as tmp, kernel_env(tmp):
    for path in paths:
      nb = execute(path, nbformat.read(path, as_version=4))
      nbformat.write(nb, path)
      print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1e3:.0f} kB, "
            f"{sum(_images(c) for c in nb.cells if c.cell_type == 'code')} figures)")


if __name__ == "__main__":
  if sys.argv[1:2] != ["--refresh"]:
    raise SystemExit(f"usage: {REFRESH} [NAME ...]   (re-executes notebooks/*.ipynb and writes their outputs)")
  refresh(sys.argv[2:])
