"""The import names: the repository's top-level ``kernels/`` folder is ``sftkey.kernels`` (in a
wheel, in an editable install, in a copy of the tree) and never the top-level ``kernels``, which
is Hugging Face's distribution (``transformers`` imports it). Run from the repository's root,
as ``python -m pytest`` is, where the working directory comes first on ``sys.path``."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_at(cwd: Path, code: str) -> str:
    """``python -c code`` in ``cwd`` (first on ``sys.path``, as under ``python -m``); its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_kernels_folder_is_no_top_level_package():
    assert (ROOT / "kernels" / "rows.py").exists()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"
    origin = run_at(ROOT, "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s and s.origin else '')")
    assert not origin.startswith(str(ROOT / "kernels")), origin


def test_hugging_face_kernels_and_transformers_import_from_the_root():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    code = "from transformers import Trainer; import importlib.util as u; s = u.find_spec('kernels'); " \
           "print(s.origin if s and s.origin else '')"
    origin = run_at(ROOT, code)
    if origin:  # Hugging Face's kernels is installed (transformers >= 5.25 requires it)
        assert "site-packages" in origin or "dist-packages" in origin, origin


def test_sftkey_kernels_from_a_copy_of_the_tree(tmp_path):
    """A second worktree (or any copy of the tree) imports its own kernels as ``sftkey.kernels``."""
    for name in ("sftkey", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    path = run_at(tmp_path, "import sftkey.kernels.rows as r; print(r.__file__)")
    assert Path(path).resolve() == (tmp_path / "kernels" / "rows.py").resolve()


def test_wheel_ships_kernels_as_sftkey_kernels(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # pyproject.toml's build requirement
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(proc.stderr)
    wheel, = tmp_path.glob("sftkey-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".py", ".json"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("sftkey/kernels/")) == kernels
    assert "verified.json" in kernels  # the GPU records backend="auto" reads
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package in the wheel"
