"""Packaging: the sibling folders ship as subpackages of qwen2_mlx, nothing generic on top."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_packages() -> set[str]:
    """Every package folder in the checkout, named where it lands in site-packages."""
    mapping = {"qwen2_mlx": "qwen2_mlx", "convert": "qwen2_mlx/convert",
               "metal_kernels": "qwen2_mlx/metal_kernels", "cli": "qwen2_mlx/cli"}
    found = set()
    for folder, target in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).as_posix()
            found.add(target if relative == "." else f"{target}/{relative}")
    return found


def test_wheel_maps_sibling_folders_under_qwen2_mlx(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("qwen2_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"qwen2_mlx", wheel.name.split("-py")[0] + ".dist-info"}, top
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert shipped == source_packages(), "pyproject's packages list is out of date"
    for module in ("qwen2_mlx/metal_kernels/emulator/shim/mtl_shim.h",
                   "qwen2_mlx/metal_kernels/emulator/shim/mtl_runtime.cpp",
                   "qwen2_mlx/cli/main.py", "qwen2_mlx/convert/__init__.py",
                   "qwen2_mlx/metal_kernels/attention.py", "qwen2_mlx/model.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "qwen2-mlx = qwen2_mlx.cli.main:cli" in text


def test_console_script_runs():
    script = Path(sys.executable).parent / "qwen2-mlx"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout


def test_plain_install_runs_generate(tmp_path, tiny_checkpoint):
    """`pip install .` (not editable) gives a working `qwen2-mlx generate`."""
    import os

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "-q", "--target", str(target), str(ROOT)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from qwen2_mlx.cli.main import cli; "
         "import qwen2_mlx; assert qwen2_mlx.__file__.startswith(sys.argv[1]); "
         "cli(sys.argv[2:])", str(target), "generate", "--model", str(tiny_checkpoint),
         "--prompt", "hi", "--max-tokens", "8", "--verbose"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Generation: " in out.stderr and "tokens-per-sec" in out.stderr
