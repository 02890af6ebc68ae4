"""The built wheel: an installed (not editable) copy carries what its commands read from the package."""

from __future__ import annotations

import shutil
import sys
import zipfile

from tests.helpers import ROOT, run


def test_an_installed_wheel_finds_the_demo_recipes_and_checkpoint(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "drope_megatron", src / "drope_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                str(tmp_path / "dist"), str(src)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).extractall(site)
    probe = ("import sys; from pathlib import Path; import drope_megatron; from drope_megatron.config import "
             "load_recipe; from drope_megatron.demo.pipeline import SHIPPED, Demo; d = Demo(Path('w')); "
             "assert Path(drope_megatron.__file__).parent == Path(sys.argv[1]) / 'drope_megatron'; "
             "[load_recipe(r) for r in (d.recipe, d.pretrain_recipe)]; "
             "assert (SHIPPED / 'model.safetensors').is_file(); print('ok')")
    # -P: not the checkout (the working directory) but the unpacked wheel on PYTHONPATH.
    proc = run([sys.executable, "-P", "-c", probe, str(site)], timeout=120, PYTHONPATH=str(site))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
