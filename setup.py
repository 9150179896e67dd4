"""Build: the Python package, plus dtq_kernels._C from csrc/ through CMake + Ninja when nvcc is available.

Without nvcc (looked up as $CUDACXX, $CUDA_HOME/bin/nvcc, then PATH), or with DTQ_SKIP_CUDA=1, the
install still succeeds and says plainly that _C was not built; the Triton and reference backends work
without it. If nvcc is there and the build fails, the install fails: a broken kernel must not pass silently.

    pip install --no-build-isolation --no-deps -e .     # editable: _C*.so lands in dtq_kernels/

Build tree: build/cmake-py3XY/. Parallel jobs: $CMAKE_BUILD_PARALLEL_LEVEL, default 2 (CI has 2 cores).
CUTLASS headers: from the nvidia-cutlass wheel in this environment (requirements-dev.txt), or the
directory in $DTQ_CUTLASS_INCLUDE_DIR (the one holding cutlass/ and cute/).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = (os.environ.get("CUDACXX"),
                  os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None,
                  shutil.which("nvcc"),
                  "/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tool(name: str) -> str | None:
    """The tool beside this interpreter (a venv's pip-installed cmake/ninja), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def skip_reason() -> str | None:
    if os.environ.get("DTQ_SKIP_CUDA") == "1":
        return "DTQ_SKIP_CUDA=1 is set"
    if find_nvcc() is None:
        return "nvcc not found (looked at $CUDACXX, $CUDA_HOME/bin/nvcc and PATH)"
    if find_tool("cmake") is None:
        return "cmake not found"
    return None


class CMakeBuild(build_ext):
    def finalize_options(self):
        super().finalize_options()
        self.skip_reason = skip_reason()
        if self.skip_reason:
            self.extensions = []  # nothing to build, so nothing for setuptools to copy into the tree

    def run(self):
        if self.skip_reason:
            # pip shows a build's output only with -v; ops.cuda.unavailable_reason() says it at runtime too
            print(f"dtq_kernels: CUDA extension _C not built: {self.skip_reason}; "
                  "the Triton and reference backends still work", file=sys.stderr, flush=True)
        super().run()

    def build_extension(self, ext):
        import pybind11  # a build requirement; with --no-build-isolation it must be in the environment

        nvcc, cmake, ninja = find_nvcc(), find_tool("cmake"), find_tool("ninja")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir),
                     f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython_EXECUTABLE={sys.executable}",
                     f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"]
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.environ.get("DTQ_CUTLASS_INCLUDE_DIR"):  # else CMake asks this interpreter for nvidia-cutlass's
            configure.append(f"-DDTQ_CUTLASS_INCLUDE_DIR={os.environ['DTQ_CUTLASS_INCLUDE_DIR']}")
        # A cached configure made with another nvcc, interpreter or generator is discarded whole: CMake's
        # own reaction to a changed compiler (wipe the cache, re-run) drops the other -D settings.
        key = build_dir / "dtq_configure.txt"
        toolchain = "\n".join(a for a in configure if "LIBRARY_OUTPUT" not in a)  # that dir is temporary
        if build_dir.exists() and (not key.exists() or key.read_text() != toolchain):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        key.write_text(toolchain)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        start = time.perf_counter()
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])
        print(f"dtq_kernels: built CUDA extension _C in {time.perf_counter() - start:.1f} s -> {out_dir}",
              file=sys.stderr, flush=True)


setup(ext_modules=[Extension("dtq_kernels._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
