"""Build and install adallava_kernels.

Install torch first and build without isolation (``pip install
--no-build-isolation -e .``): the extension in ``csrc/`` compiles against the
torch that is installed, CPU-only or CUDA.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    """``adallava_kernels._C`` from ``csrc/``: a CUDAExtension where torch has CUDA, else a CppExtension.

    Returns no extension while ``csrc/`` holds no C++ sources.
    """
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "building adallava_kernels._C needs torch in the build environment: install torch first, "
            "then `pip install --no-build-isolation -e .`"
        ) from e

    common = dict(name="adallava_kernels._C", include_dirs=[os.path.join(HERE, "csrc")])
    if torch.version.cuda and CUDA_HOME:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            sources=cpp_sources + cuda_sources,
            define_macros=[("ADALLAVA_WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            **common,
        )
    else:
        ext = CppExtension(sources=cpp_sources, extra_compile_args={"cxx": ["-O3"]}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="adallava-kernels",
    version="0.1.0",
    description="Kernels that turn AdaLLaVA execution plans into wall-clock savings",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adallava_kernels", "adallava_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.46",
        "numpy",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm"],
        "bench": ["matplotlib", "pytest-benchmark", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
