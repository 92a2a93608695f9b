"""`python -m fastformer` run from a folder that holds a folder named `fastformer` (the parent of a clone
named fastformer), with the package installed editable.

An editable install (`pip install -e .`) adds an import hook that Python consults after `sys.path`; the
current folder comes first on `sys.path`, so the clone folder (no `__init__.py`) is imported as an
empty namespace package and the hook only serves its submodules. The child process below rebuilds
exactly that situation, with a hook pointing at this checkout, and runs `fastformer` as `-m` does.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import fastformer

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib.abc, importlib.machinery, runpy, sys
repo, site_packages = sys.argv[1], sys.argv[2]
sys.path.append(site_packages)          # torch and friends, but not the installed fastformer hook


class EditableHook(importlib.abc.MetaPathFinder):
    # what setuptools' editable install adds: after sys.path, maps fastformer[.x] to the checkout
    def find_spec(self, name, path=None, target=None):
        if name != "fastformer" and not name.startswith("fastformer."):
            return None
        parts = name.split(".")
        return importlib.machinery.PathFinder.find_spec(name, ["/".join([repo, *parts[:-1]])])


sys.meta_path.append(EditableHook())
sys.argv = ["fastformer", "--version"]
runpy.run_module("fastformer", run_name="__main__", alter_sys=True)
"""


def test_python_m_fastformer_beside_a_folder_named_fastformer(tmp_path):
    (tmp_path / "fastformer").mkdir()  # the clone folder, as seen from its parent
    (tmp_path / "fastformer" / "README.md").write_text("not a package")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-S", "-c", CHILD, str(REPO), sysconfig.get_paths()["purelib"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"fastformer {fastformer.__version__}"
