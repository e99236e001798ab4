"""Build torch_elastic_kv: setuptools drives CMake + ninja for the C++ core.

CMake puts `_C` next to the package's Python files and the fake CUDA driver (a test aid)
in `torch_elastic_kv/_testing/`, in the build tree for `pip install .` and in the source
tree for `pip install -e .` / `python setup.py build_ext --inplace`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The package lives under src/ so that running from the repository root can never import a
# source folder without the compiled core in place of the installed package.
PACKAGE_DIR = ROOT / "src" / "torch_elastic_kv"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _tool(name: str) -> str:
    """Path of cmake/ninja: the pip-installed build dependency if present, else PATH."""
    try:
        module = __import__(name)
        bin_dir = getattr(module, "BIN_DIR", None)
        if bin_dir:
            candidate = Path(bin_dir) / name
            if candidate.exists():
                return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is needed to build torch_elastic_kv: pip install {name}")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            _tool("cmake"),
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DEKV_OUTPUT_DIR={out_dir}",
            f"-DEKV_TESTING_OUTPUT_DIR={out_dir / '_testing'}",
        ]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([_tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True)

    def copy_extensions_to_source(self) -> None:
        # --inplace and editable installs build in build_lib and copy the libraries back into
        # the source tree. Copy to a temporary name and rename over the old file: overwriting a
        # shared library in place corrupts it under every process that has it loaded.
        # The fake driver is not an Extension setuptools knows about, so it is copied too.
        built_pkg = Path(self.build_lib).resolve() / "torch_elastic_kv"
        pairs = []
        for ext in self.extensions:
            name = Path(self.get_ext_filename(ext.name)).name
            pairs.append((built_pkg / name, PACKAGE_DIR / name))
        for lib in (built_pkg / "_testing").glob("*.so"):
            pairs.append((lib, PACKAGE_DIR / "_testing" / lib.name))
        for src, dst in pairs:
            dst.parent.mkdir(exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            shutil.copymode(src, tmp)
            os.replace(tmp, dst)


setup(
    ext_modules=[CMakeExtension("torch_elastic_kv._C")],
    cmdclass={"build_ext": CMakeBuild},
)
