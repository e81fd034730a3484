"""The triton backend package: importable without triton, and honest about availability."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import mtcore.kernels.triton_kernels as tk

ROOT = Path(__file__).resolve().parents[2]

NO_TRITON = """
import sys
sys.modules["triton"] = None  # makes `import triton` fail as if it were not installed
import mtcore.kernels.triton_kernels as tk
assert not tk.is_available(), "is_available() must be False without triton"
assert callable(tk.seg_cross_entropy) and callable(tk.minibatch_stddev)
assert not any(m.startswith("mtcore.kernels.triton_kernels.") for m in sys.modules), sorted(sys.modules)
print("ok")
"""


def test_package_imports_and_reports_unavailable_without_triton():
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_is_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tk.is_available() is False
