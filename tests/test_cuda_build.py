"""The CUDA sources build without a GPU, so that a change that breaks the GPU build fails CI here.

- the activation header, both twins of every activation, inside a __global__
  kernel, with nvcc;
- csrc/vg_cuda_kernels.cu with every kernel vgcore/backends/cuda_stack.py instantiates
  (float and double), with nvcc;
- the same file exactly as CuPy's RawModule builds it at run time: NVRTC, with
  cuda_stack.py's options and name expressions.  NVRTC is stricter than nvcc (it
  refuses host functions), so this is the check that matters most; it runs
  where libnvrtc is found (a CUDA toolkit, the ``nvidia-cuda-nvrtc`` wheel, or
  the path in VGCORE_NVRTC) and skips elsewhere.

vgcore.backends.cuda_stack cannot be imported without CuPy, so its kernel list and options
are read from its source with ``ast`` (they are literals for that reason).
Each nvcc run takes a second or two.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vgcore._activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_MODULE = ROOT / "vgcore" / "backends" / "cuda_stack.py"
NVCC = shutil.which("nvcc")

requires_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def cuda_constants() -> dict:
    """The module-level literal assignments of vgcore/backends/cuda_stack.py (names in capitals)."""
    constants = {}
    for node in ast.parse(CUDA_MODULE.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    constants[name] = ast.literal_eval(node.value)
                except ValueError:
                    continue  # not a literal
    return constants


CONSTANTS = cuda_constants()


def nvcc_compile(tmp_path: Path, name: str, source: str) -> None:
    """nvcc -c of ``source`` with csrc/ on the include path, into tmp_path; fails with nvcc's output."""
    path = tmp_path / name
    path.write_text(source)
    result = subprocess.run([NVCC, "-c", f"-I{CSRC}", str(path), "-o", str(path.with_suffix(".o"))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stdout}\n{result.stderr}"


def instantiations() -> str:
    """A translation unit that includes the kernel file and takes the address of every kernel.

    Taking the address of a template kernel instantiates it, so nvcc compiles
    every kernel that vgcore.backends.cuda_stack launches, in each type it launches it.
    """
    kernels = [f"(void *)&{name}<{ctype}>" for name in CONSTANTS["TEMPLATE_KERNELS"]
               for ctype in CONSTANTS["KERNEL_TYPES"].values()]
    kernels += [f"(void *)&{name}" for name in CONSTANTS["PLAIN_KERNELS"]]
    return (f'#include "{CONSTANTS["KERNEL_FILE"]}"\n'
            "void *vg_every_kernel[] = {\n    " + ",\n    ".join(kernels) + "\n};\n")


def test_kernel_lists_match_the_kernel_file():
    """Every kernel of the .cu is listed in vgcore/backends/cuda_stack.py, with its linkage, and back."""
    source = (CSRC / CONSTANTS["KERNEL_FILE"]).read_text()
    templates = set(re.findall(r"template <typename T>\s*__global__ void (\w+)\(", source))
    plain = set(re.findall(r'extern "C" __global__ void (\w+)\(', source))
    assert templates == set(CONSTANTS["TEMPLATE_KERNELS"])
    assert plain == set(CONSTANTS["PLAIN_KERNELS"])
    included = set(re.findall(r'#include "([^"]+)"', source))
    assert included <= set(CONSTANTS["KERNEL_HEADERS"])
    # every header the kernel file reaches, directly or not, keys CuPy's kernel cache
    reached = set()
    pending = list(included)
    while pending:
        header = pending.pop()
        if header not in reached:
            reached.add(header)
            pending += re.findall(r'#include "([^"]+)"', (CSRC / header).read_text())
    assert reached == set(CONSTANTS["KERNEL_HEADERS"])
    assert "#include <" not in source  # NVRTC has no system headers


@requires_nvcc
def test_activation_header_compiles_for_the_device(tmp_path):
    calls = "\n".join(
        f"    pd = vg_activation_d(VG_{name.upper()}, hd[i]); vd[i] += pd.value; dd[i] += pd.derivative;\n"
        f"    pf = vg_activation_f(VG_{name.upper()}, hf[i]); vf[i] += pf.value; df[i] += pf.derivative;"
        for name in ACTIVATIONS
    )
    source = (
        '#include "vg_activations.h"\n'
        "__global__ void vg_every_activation(const double *hd, double *vd, double *dd,\n"
        "                                    const float *hf, float *vf, float *df)\n"
        "{\n"
        "    const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "    vg_pair_d pd;\n"
        "    vg_pair_f pf;\n"
        f"{calls}\n"
        "}\n"
    )
    nvcc_compile(tmp_path, "every_activation.cu", source)


@requires_nvcc
def test_kernel_file_compiles_as_is(tmp_path):
    nvcc_compile(tmp_path, CONSTANTS["KERNEL_FILE"], (CSRC / CONSTANTS["KERNEL_FILE"]).read_text())


@requires_nvcc
def test_every_launched_kernel_compiles_in_both_types(tmp_path):
    nvcc_compile(tmp_path, "every_kernel.cu", instantiations())


def find_nvrtc() -> Path | None:
    """libnvrtc: VGCORE_NVRTC, a pip wheel (nvidia/*/lib), the CUDA toolkit, or the loader's path."""
    candidates = []
    if os.environ.get("VGCORE_NVRTC"):
        candidates.append(Path(os.environ["VGCORE_NVRTC"]))
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates += sorted(Path(root).glob("*/lib/libnvrtc.so*"))
    for toolkit in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if toolkit:
            candidates += sorted(Path(toolkit, "lib64").glob("libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(Path(found))
    return next((path for path in candidates if path.name.startswith("libnvrtc.so")), None)


def nvrtc_compile(library: Path, source: str, options: list[str], names: list[str],
                  program: str = "vg_cuda_kernels.cu") -> tuple[int, str, dict]:
    """(status, log, lowered names) of NVRTC compiling ``source``, named ``program``, with ``names``."""
    # libnvrtc loads its builtins by name at compile time; make the ones beside it visible first
    for builtins in sorted(library.parent.glob("libnvrtc-builtins.so*")):
        if ".alt." not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            break
    nvrtc = ctypes.CDLL(str(library))
    handle = ctypes.c_void_p()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(handle), source.encode(), program.encode(), 0, None, None)
    assert status == 0, f"nvrtcCreateProgram: {status}"
    try:
        for name in names:
            assert nvrtc.nvrtcAddNameExpression(handle, name.encode()) == 0
        encoded = (ctypes.c_char_p * len(options))(*[option.encode() for option in options])
        status = nvrtc.nvrtcCompileProgram(handle, len(options), encoded)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(handle, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(size.value, 1))
        nvrtc.nvrtcGetProgramLog(handle, log)
        lowered = {}
        if status == 0:
            for name in names:
                pointer = ctypes.c_char_p()
                assert nvrtc.nvrtcGetLoweredName(handle, name.encode(), ctypes.byref(pointer)) == 0
                lowered[name] = pointer.value.decode()
        return status, log.value.decode(errors="replace"), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(handle))


def test_kernel_file_compiles_with_nvrtc_as_cupy_builds_it():
    library = find_nvrtc()
    if library is None:
        pytest.skip("libnvrtc not found (install nvidia-cuda-nvrtc or set VGCORE_NVRTC)")
    names = [f"{name}<{ctype}>" for name in CONSTANTS["TEMPLATE_KERNELS"]
             for ctype in CONSTANTS["KERNEL_TYPES"].values()]
    options = [f"-I{CSRC}", *CONSTANTS["NVRTC_OPTIONS"]]
    source = (CSRC / CONSTANTS["KERNEL_FILE"]).read_text()
    status, log, lowered = nvrtc_compile(library, source, options, names)
    assert status == 0, f"NVRTC failed:\n{log}"
    assert set(lowered) == set(names)
    assert all(symbol.startswith("_Z") for symbol in lowered.values())


def test_the_installed_package_carries_the_cuda_sources():
    """The CuPy backend compiles csrc at run time, so an installed vgcore must ship it as vgcore/_csrc."""
    import vgcore

    package = Path(vgcore.__file__).parent
    if (package.parent / "setup.py").exists():
        pytest.skip("running from a development checkout, which reads csrc/ directly")
    for name in ("vg_activations.h", "vg_activation_body.h", "vg_stack.h", "vg_cuda_kernels.cu"):
        assert (package / "_csrc" / name).is_file(), name


# ---------------------------------------------------------------------------
# The recurrent models' kernels: csrc/vg_cuda_recurrent.cu, launched by vgcore/backends/cuda_recurrent.py
# ---------------------------------------------------------------------------

RECURRENT_MODULE = ROOT / "vgcore" / "backends" / "cuda_recurrent.py"


def recurrent_constants() -> dict:
    """The capitalised literal assignments of vgcore/backends/cuda_recurrent.py."""
    constants = {}
    for node in ast.parse(RECURRENT_MODULE.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id.isupper():
                try:
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return constants


RECURRENT = recurrent_constants()


def test_recurrent_kernel_lists_match_the_kernel_file():
    source = (CSRC / RECURRENT["KERNEL_FILE"]).read_text()
    assert set(re.findall(r"template <typename T>\s*__global__ void (\w+)\(", source)) == \
        set(RECURRENT["TEMPLATE_KERNELS"])
    assert set(re.findall(r'extern "C" __global__ void (\w+)\(', source)) == set(RECURRENT["PLAIN_KERNELS"])
    reached, pending = set(), re.findall(r'#include "([^"]+)"', source)
    while pending:
        header = pending.pop()
        if header not in reached:
            reached.add(header)
            pending += re.findall(r'#include "([^"]+)"', (CSRC / header).read_text())
    assert reached == set(RECURRENT["KERNEL_HEADERS"])
    assert "#include <" not in source
    assert RECURRENT["NVRTC_OPTIONS"] == CONSTANTS["NVRTC_OPTIONS"]


@requires_nvcc
def test_every_recurrent_kernel_compiles_in_both_types(tmp_path):
    kernels = [f"(void *)&{name}<{ctype}>" for name in RECURRENT["TEMPLATE_KERNELS"]
               for ctype in RECURRENT["KERNEL_TYPES"].values()]
    source = (f'#include "{RECURRENT["KERNEL_FILE"]}"\n'
              "void *vg_every_recurrent_kernel[] = {\n    " + ",\n    ".join(kernels) + "\n};\n")
    nvcc_compile(tmp_path, "every_recurrent_kernel.cu", source)


def test_recurrent_kernel_file_compiles_with_nvrtc_as_cupy_builds_it():
    library = find_nvrtc()
    if library is None:
        pytest.skip("libnvrtc not found (install nvidia-cuda-nvrtc or set VGCORE_NVRTC)")
    names = [f"{name}<{ctype}>" for name in RECURRENT["TEMPLATE_KERNELS"]
             for ctype in RECURRENT["KERNEL_TYPES"].values()]
    options = [f"-I{CSRC}", *RECURRENT["NVRTC_OPTIONS"]]
    source = (CSRC / RECURRENT["KERNEL_FILE"]).read_text()
    status, log, lowered = nvrtc_compile(library, source, options, names)
    assert status == 0, f"NVRTC failed:\n{log}"
    assert set(lowered) == set(names)
