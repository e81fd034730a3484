"""The CUDA kernels (csrc/cuda/*.cu) compile with nvcc against torch's headers, even without a GPU.

CI machines have nvcc but no GPU and a CPU-only torch wheel, so the kernels cannot run there; this
check catches compile errors (and warnings in our own files) before a GPU user's lazy build does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CPU_DIR = ROOT / "csrc" / "cpu"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))

# The ops of the kernel contract; each needs a CUDA implementation.
CONTRACT_OPS = {
    "seg_ce_fwd",
    "vae_loss_fwd",
    "adv_loss_fwd",
    "joint_loss_fwd",
    "bias_act",
    "bias_act_grad",
    "mbstd_fwd",
    "mbstd_bwd",
    "bn_act_fwd",
    "bn_act_bwd",
    "pn_act_fwd",
    "pn_act_bwd",
    "upsample_fold",
    "upsample_fold_backward",
}


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/$CUDA_PATH, then PATH, then /usr/local/cuda (None if absent)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_flags() -> list[str]:
    """The flags torch.utils.cpp_extension gives nvcc for an extension, for one architecture."""
    flags = [
        "-std=c++20",  # what cpp_extension passes for this torch (its headers need C++20)
        "-O3",
        "--compiler-options",
        "-fPIC",
        "-gencode=arch=compute_80,code=sm_80",
        "-DTORCH_EXTENSION_NAME=mtcore_cuda_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
    ]
    includes = cpp_extension.include_paths()
    for inc in includes:
        flags += ["-isystem", inc]
    # A CPU-only torch wheel ships c10/cuda/*.h but not the header CMake generates for them
    # (c10/cuda/impl/cuda_cmake_macros.h: only Windows DLL-export macros); this skips it.
    if not any((Path(i) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for i in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


@cache
def compile_all(out_dir: str) -> dict[str, subprocess.CompletedProcess[str]]:
    """Compile every .cu to an object file in out_dir, two at a time; results by file name."""
    nvcc = find_nvcc()
    assert nvcc is not None
    flags = nvcc_flags()

    def one(src: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
        obj = Path(out_dir) / f"{src.stem}.cuda.o"
        cmd = [nvcc, "-c", str(src), "-o", str(obj), *flags]
        return src.name, subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CU_FILES))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH) - cannot compile csrc/cuda")
    return compile_all(str(tmp_path_factory.mktemp("cuda_objs")))


def test_cuda_sources_present() -> None:
    assert (CUDA_DIR / "common.cuh").is_file()
    assert {p.stem for p in CU_FILES} >= {
        "seg_cross_entropy",
        "vae_loss",
        "adversarial",
        "joint_loss",
        "bias_act",
        "minibatch_stddev",
        "batch_norm_act",
        "pixel_norm_act",
        "upsample_fold",
    }


def _impls(text: str) -> set[str]:
    return set(re.findall(r'm\.impl\(\s*"([a-z_]+)"', text))


def test_every_contract_op_has_exactly_one_cuda_impl() -> None:
    """Each op is registered once for CUDA, only via TORCH_LIBRARY_IMPL(mtcore, CUDA, m)."""
    seen: dict[str, str] = {}
    for src in CU_FILES:
        text = src.read_text()
        blocks = re.findall(r"TORCH_LIBRARY\w*\(([^)]*)\)", text)
        assert blocks, f"{src.name} registers nothing"
        for args in blocks:
            assert [a.strip() for a in args.split(",")] == ["mtcore", "CUDA", "m"], (
                f"{src.name}: CUDA files may only use TORCH_LIBRARY_IMPL(mtcore, CUDA, m) "
                f"(schemas are defined by csrc/cpu), found ({args})"
            )
        assert "TORCH_LIBRARY_IMPL" in text and "TORCH_LIBRARY(" not in text
        for op in _impls(text):
            assert op not in seen, f"{op} is registered in both {seen[op]} and {src.name}"
            seen[op] = src.name
    assert set(seen) == CONTRACT_OPS


def test_cuda_impls_match_cpu_schemas() -> None:
    """Every CUDA impl names an op that the CPU files define (a typo would register a dead op)."""
    defined = set()
    for src in CPU_DIR.glob("*.cpp"):
        defined |= set(re.findall(r'm\.def\(\s*"([a-z_]+)\(', src.read_text()))
    if not defined:
        pytest.skip("csrc/cpu defines no schemas yet")
    impls = set().union(*(_impls(p.read_text()) for p in CU_FILES))
    assert impls <= defined, f"CUDA impls without a schema in csrc/cpu: {sorted(impls - defined)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
def test_cu_file_compiles(compiled: dict, name: str) -> None:
    """nvcc compiles the file to an object, with no warning located in our own sources."""
    result = compiled[name]
    assert result.returncode == 0, f"nvcc failed on csrc/cuda/{name}:\n{result.stderr[-20000:]}"
    ours = [
        line
        for line in result.stderr.splitlines()
        if re.search(r"csrc/cuda/[\w.]+[(:]\d+.*warning", line)
    ]
    assert not ours, f"nvcc warnings in csrc/cuda/{name}:\n" + "\n".join(ours)
