"""Builds the optional native CPU kernels (``native/``) with the package; metadata lives in pyproject.toml.

On Linux, ``pip install -e .`` compiles ``mlx_video._native`` (MLX ``Primitive::eval_cpu`` extensions,
CMake + nanobind, the layout of MLX's ``examples/extensions``). Where that cannot work (no compiler or
CMake, macOS, where MLX's Metal kernels already fuse attention, or ``MLX_VIDEO_NATIVE=0``) the package
installs without it and runs the MLX/NumPy path; ``mlx_video.native.describe()`` says which is in use.
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if sys.platform.startswith("linux") and os.environ.get("MLX_VIDEO_NATIVE", "1") not in {"0", "off", "no"}:
    try:
        from mlx import extension
    except ImportError:  # the build environment has no MLX: install without the kernels
        extension = None
    if extension is not None:

        class OptionalCMakeBuild(extension.CMakeBuild):
            """A failed kernel build leaves a working package on the MLX path, with the reason printed."""

            failed = False

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001 - compiler/CMake failures vary
                    self.failed = True
                    print(f"mlx-video: native CPU kernels not built ({exc}); the MLX path will be used",
                          file=sys.stderr)

            def run(self):
                try:
                    super().run()
                except Exception:  # noqa: BLE001 - the in-place copy of a library that was never built
                    if not self.failed:
                        raise

        ext_modules = [extension.CMakeExtension("mlx_video._native", sourcedir="native")]
        cmdclass = {"build_ext": OptionalCMakeBuild}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
