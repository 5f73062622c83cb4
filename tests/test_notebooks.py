"""Every notebook under notebooks/ runs top to bottom on this interpreter's kernel without an error.

Each runs in a fresh ipykernel started from `sys.executable` (a kernelspec written to a temporary
JUPYTER_PATH, so whatever python3 kernel the machine has installed is not used), with the repository
on PYTHONPATH and the notebook's folder as working directory. Notebooks are committed without outputs.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A python3 kernelspec for this interpreter, first on JUPYTER_PATH."""
  path = tmp_path_factory.mktemp("jupyter")
  spec = path / "kernels" / "python3"
  spec.mkdir(parents=True)
  env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
         "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)", "language": "python", "env": env}))
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = os.pathsep.join([str(path)] + ([old] if old else []))
  yield
  if old is None:
    os.environ.pop("JUPYTER_PATH", None)
  else:
    os.environ["JUPYTER_PATH"] = old


def test_notebooks_exist():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "serving_loop.ipynb", "benchmarks.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError (with the traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
