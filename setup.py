"""Build: the Python package, plus dtq_kernels._C from csrc/ through CMake when nvcc is available.

Without nvcc (or with DTQ_SKIP_CUDA=1) the install still succeeds and says plainly that _C was not
built; the Triton and reference backends work without it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"),
                      os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                      shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        nvcc = find_nvcc()
        reason = ("DTQ_SKIP_CUDA=1 is set" if os.environ.get("DTQ_SKIP_CUDA") == "1"
                  else None if nvcc else "nvcc not found (set CUDACXX or CUDA_HOME)")
        if reason:
            print(f"dtq_kernels: CUDA extension _C not built: {reason}; "
                  "the Triton and reference backends still work", file=sys.stderr)
            return
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.check_call([cmake, str(ROOT), *generator, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                               f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"], cwd=build_dir)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)])


setup(ext_modules=[Extension("dtq_kernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
