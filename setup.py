"""Build the C kernels and the native engine as the extension module `salomi._kernels`.

Project metadata lives in pyproject.toml; this file only adds the extension. The library
is compiled without -march flags: kernels.c compiles each ISA's functions with
__attribute__((target)) and picks one at run time. salomi/runtime/kernels.py loads the
built file with ctypes.
"""

from setuptools import Extension, setup

CSRC = "salomi/runtime/csrc"

setup(
    ext_modules=[
        Extension(
            "salomi._kernels",
            sources=[f"{CSRC}/kernels.c", f"{CSRC}/lut.c", f"{CSRC}/engine.c", f"{CSRC}/pymodule.c"],
            depends=[f"{CSRC}/kernels.h", f"{CSRC}/kernels_internal.h", f"{CSRC}/engine.h"],
            include_dirs=[CSRC],
            extra_compile_args=["-O3", "-fPIC", "-std=gnu11", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ],
)
