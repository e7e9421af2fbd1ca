"""Build of vgcore's compiled kernels.

One build_ext subclass sets per-compiler flags and probes for OpenMP; set
VGCORE_NO_OPENMP=1 to build without it (serial kernels, same results), and
VGCORE_DEBUG=1 for bounds-checked Cython with -O0 -g.  BLAS comes from
scipy.linalg.cython_blas at run time, so nothing links BLAS here.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

DEBUG = os.environ.get("VGCORE_DEBUG", "") not in ("", "0")
NO_OPENMP = os.environ.get("VGCORE_NO_OPENMP", "") not in ("", "0")

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _openmp_flags(compiler) -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP, or empty lists when the compiler lacks it."""
    if NO_OPENMP:
        return [], []
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    flags = ["-fopenmp"]
    tmp = tempfile.mkdtemp()
    try:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as handle:
            handle.write(OPENMP_PROBE)
        objects = compiler.compile([source], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
        subprocess.run([os.path.join(tmp, "probe")], check=True, capture_output=True)
        return flags, flags
    except Exception as error:  # any failure of the probe means: build serial
        warnings.warn(
            f"OpenMP is not available ({error.__class__.__name__}); building vgcore's kernels "
            "single-threaded. Results are the same, only slower.",
            stacklevel=1,
        )
        return [], []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Adds optimisation and OpenMP flags that suit the compiler in use."""

    def build_extensions(self):
        compile_openmp, link_openmp = _openmp_flags(self.compiler)
        if self.compiler.compiler_type == "msvc":
            base = ["/O2"]
        else:
            base = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
            base += ["-Wno-unused-function", "-Wno-maybe-uninitialized"]
        for extension in self.extensions:
            extension.extra_compile_args = base + compile_openmp
            extension.extra_link_args = link_openmp
        super().build_extensions()


class BuildPy(build_py):
    """Ships csrc's headers and CUDA source as vgcore/_csrc: the CuPy backend compiles them at run time."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "vgcore", "_csrc")
        self.mkpath(target)
        for name in sorted(os.listdir("csrc")):
            if name.endswith((".h", ".cu")):
                self.copy_file(os.path.join("csrc", name), os.path.join(target, name))


HEADERS = sorted(os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".h"))


def _extension(name: str) -> Extension:
    """A module of the compiled tier, vgcore/_ext: the csrc headers and the shared .pxd files."""
    return Extension(
        f"vgcore._ext.{name}",
        [f"vgcore/_ext/{name}.pyx"],
        include_dirs=["csrc", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[*HEADERS, *(os.path.join("vgcore", "_ext", f) for f in os.listdir("vgcore/_ext")
                             if f.endswith(".pxd"))],
    )


#: The compiled tier (vgcore/_ext); a new kernel module is one more name here.
EXTENSION_MODULES = ["_kernels", "_spectra", "_sweep", "_recurrent", "_batchnorm"]
extensions = [_extension(name) for name in EXTENSION_MODULES]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "nonecheck": False,
        },
        quiet=True,
    ),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
if __name__ == "__main__" and len(sys.argv) == 1:
    print(__doc__)
