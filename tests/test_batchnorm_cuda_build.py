"""The batch-norm CUDA kernels (csrc/vg_batchnorm_kernels.cu) build without a GPU, as in test_cuda_build.py.

nvcc compiles the file as is and with every kernel vgcore/backends/cuda_batchnorm.py
launches instantiated in both types; NVRTC compiles it exactly as CuPy's
RawModule does at run time, where libnvrtc is found.  The module's kernel
lists are read from its source with ``ast`` (it cannot be imported without CuPy).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from test_cuda_build import CSRC, find_nvrtc, nvcc_compile, nvrtc_compile, requires_nvcc

MODULE = Path(__file__).resolve().parent.parent / "vgcore" / "backends" / "cuda_batchnorm.py"


def _constants() -> dict:
    constants = {}
    for node in ast.parse(MODULE.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    constants[name] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return constants


CONSTANTS = _constants()


def _names() -> list[str]:
    return [f"{name}<{ctype}>" for name in CONSTANTS["TEMPLATE_KERNELS"]
            for ctype in CONSTANTS["KERNEL_TYPES"].values()]


def test_kernel_lists_match_the_kernel_file():
    source = (CSRC / CONSTANTS["KERNEL_FILE"]).read_text()
    assert set(re.findall(r"template <typename T>\s*__global__ void (\w+)\(", source)) \
        == set(CONSTANTS["TEMPLATE_KERNELS"])
    assert set(re.findall(r'extern "C" __global__ void (\w+)\(', source)) == set(CONSTANTS["PLAIN_KERNELS"])
    reached, pending = set(), re.findall(r'#include "([^"]+)"', source)
    while pending:
        header = pending.pop()
        if header not in reached:
            reached.add(header)
            pending += re.findall(r'#include "([^"]+)"', (CSRC / header).read_text())
    assert reached == set(CONSTANTS["KERNEL_HEADERS"])  # every file reached keys CuPy's kernel cache
    assert "#include <" not in source


@requires_nvcc
def test_every_launched_kernel_compiles_in_both_types(tmp_path):
    kernels = [f"(void *)&{name}" for name in _names()]
    kernels += [f"(void *)&{name}" for name in CONSTANTS["PLAIN_KERNELS"]]
    nvcc_compile(tmp_path, "every_batchnorm_kernel.cu",
                 f'#include "{CONSTANTS["KERNEL_FILE"]}"\n'
                 "void *vg_every_batchnorm_kernel[] = {\n    " + ",\n    ".join(kernels) + "\n};\n")


def test_kernel_file_compiles_with_nvrtc_as_cupy_builds_it():
    library = find_nvrtc()
    if library is None:
        pytest.skip("libnvrtc not found (install nvidia-cuda-nvrtc or set VGCORE_NVRTC)")
    status, log, lowered = nvrtc_compile(library, (CSRC / CONSTANTS["KERNEL_FILE"]).read_text(),
                                         [f"-I{CSRC}", *CONSTANTS["NVRTC_OPTIONS"]], _names(),
                                         program=CONSTANTS["KERNEL_FILE"])
    assert status == 0, f"NVRTC failed:\n{log}"
    assert set(lowered) == set(_names())
