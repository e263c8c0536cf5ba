"""How the extension is built: the shared C++ runtime, messages without iostreams, and setup.py's choices
for a CUDA build on a machine with no GPU (arch list, CUDA toolkit), against fake environments.
"""

import importlib.util
import os
import re
from pathlib import Path

import pytest
from setuptools import Distribution, Extension
from setuptools.command.build_ext import build_ext

import adallava_kernels._C

from _elf import defined_symbols, needed_libraries

ROOT = Path(__file__).resolve().parents[1]


def load_setup():
    """setup.py as a module: its functions, without running setup()."""
    spec = importlib.util.spec_from_file_location("adallava_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = load_setup()


# --- the built extension -----------------------------------------------------------


def test_the_extension_needs_the_shared_libstdcxx():
    """A static copy of libstdc++ in _C.so crashed formatting a number on the H200 image (csrc/README.md)."""
    assert "libstdc++.so.6" in needed_libraries(adallava_kernels._C.__file__)


# Mangled-name pieces of libstdc++'s iostreams and locales (std::locale, std::ios_base, std::ostream).
IOSTREAM_SYMBOLS = re.compile(r"St6locale|St8ios_base|basic_ostream|basic_ios|^_ZNK?So")


def test_the_extension_defines_no_iostream_or_locale_code():
    defined = sorted(name for name in defined_symbols(adallava_kernels._C.__file__) if IOSTREAM_SYMBOLS.search(name))
    assert defined == []


def test_csrc_builds_no_message_through_iostreams():
    """Messages are made with std::to_string and concatenation (csrc/check.h), never through std::ostream."""
    banned = re.compile(r"c10::str\b|TORCH_CHECK|TORCH_INTERNAL_ASSERT|<iostream>|<sstream>|std::ostream|std::cout"
                        r"|(?<!<)<<(?!<)")  # << but not a kernel launch's <<<
    found = []
    for path in sorted((ROOT / "csrc").glob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            if banned.search(code):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == []


# --- linking the shared runtime ------------------------------------------------------

PROBE = """
#include <stdexcept>
#include <string>
void probe(long n) { throw std::runtime_error("probe " + std::to_string(n)); }
"""


def build_probe(tmp_path, build_class, extra_link_args=()) -> Path:
    """A one-function C++ extension built by ``build_class`` as setuptools builds ours."""
    out = tmp_path / build_class.__name__ / str(len(extra_link_args))
    out.mkdir(parents=True)
    source = out / "probe.cpp"
    source.write_text(PROBE)
    ext = Extension("probe", [str(source)], language="c++", extra_link_args=list(extra_link_args))
    command = build_class(Distribution({"name": "probe", "ext_modules": [ext]}))
    command.build_lib, command.build_temp = str(out / "lib"), str(out / "temp")
    command.ensure_finalized()
    command.run()
    return Path(command.get_ext_fullpath("probe"))


def test_a_static_libstdcxx_flag_in_the_environment_is_dropped_from_the_link(tmp_path, monkeypatch):
    """LDFLAGS (like the interpreter's LDSHARED) reaches setuptools' link command; the build drops it."""
    monkeypatch.setenv("LDFLAGS", "-static-libstdc++ -static-libgcc")
    plain = build_probe(tmp_path, build_ext)
    assert "libstdc++.so.6" not in needed_libraries(plain)  # the flag does link libstdc++ statically here
    assert "libstdc++.so.6" in needed_libraries(build_probe(tmp_path, setup_py.shared_runtime(build_ext)))
    # The shared runtime named by its file (setup.py) is linked even where the flag is kept.
    assert "libstdc++.so.6" in needed_libraries(build_probe(tmp_path, build_ext, setup_py.SHARED_RUNTIME_LINK))


def test_a_toolchain_with_only_the_static_libstdcxx_in_its_path_still_links_the_shared_one(tmp_path):
    """The H200 image: no flag asked for a static libstdc++, but g++'s implicit -lstdc++ found libstdc++.a
    first (no libstdc++.so link in its search path). A folder holding only the archive, searched first,
    makes this machine's toolchain do the same; the build names the shared library by its file."""
    import subprocess

    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.fail(f"g++ does not know where libstdc++.a is ({archive!r}); the test needs it to reproduce the image")
    only_archive = tmp_path / "only-archive"
    only_archive.mkdir()
    (only_archive / "libstdc++.a").symlink_to(archive)
    flags = [f"-L{only_archive}"]
    assert "libstdc++.so.6" not in needed_libraries(build_probe(tmp_path, build_ext, flags))  # the image's case
    assert "libstdc++.so.6" in needed_libraries(build_probe(tmp_path / "fixed", setup_py.shared_runtime(build_ext),
                                                            flags))


def test_without_static_runtime_keeps_every_other_argument():
    command = ["g++", "-shared", "-static-libstdc++", "-O3", "-static-libgcc", "-Wl,-rpath,/x", "-lstdc++"]
    assert setup_py.without_static_runtime(command) == ["g++", "-shared", "-O3", "-Wl,-rpath,/x", "-lstdc++"]


def test_shared_runtime_filters_every_compiler_command_and_the_extensions_link_args():
    class FakeCompiler:
        compiler_cxx = ["g++", "-static-libstdc++"]
        linker_so = ["gcc", "-shared", "-static-libgcc"]
        linker_so_cxx = ["g++", "-shared", "-static-libstdc++", "-L/lib"]
        linker_exe = "cc"  # not a list: left alone

    class FakeBuild:
        def build_extensions(self):
            self.saw = {name: getattr(self.compiler, name) for name in ("compiler_cxx", "linker_so", "linker_so_cxx")}
            self.saw["ext"] = [ext.extra_link_args for ext in self.extensions]

    build = setup_py.shared_runtime(FakeBuild)()
    build.compiler = FakeCompiler()
    build.extensions = [Extension("a", ["a.cpp"], extra_link_args=["-static-libstdc++", "-lstdc++"]),
                        Extension("b", ["b.cpp"])]
    build.build_extensions()
    assert build.saw == {"compiler_cxx": ["g++"], "linker_so": ["gcc", "-shared"],
                         "linker_so_cxx": ["g++", "-shared", "-L/lib"],
                         "ext": [["-lstdc++", *setup_py.SHARED_RUNTIME_LINK], setup_py.SHARED_RUNTIME_LINK]}
    assert build.compiler.linker_exe == "cc"


# --- a CUDA build with no GPU -----------------------------------------------------


@pytest.mark.parametrize(
    "environ, gpus, expected",
    [
        ({}, 0, "8.0;9.0"),
        ({"TORCH_CUDA_ARCH_LIST": ""}, 0, "8.0;9.0"),  # empty is unset to torch too
        ({"TORCH_CUDA_ARCH_LIST": "9.0a"}, 0, None),  # the user's list stands
        ({"TORCH_CUDA_ARCH_LIST": "8.9"}, 1, None),
        ({}, 2, None),  # torch builds for the visible GPUs
    ],
    ids=["unset-no-gpu", "empty-no-gpu", "set-no-gpu", "set-gpu", "unset-gpu"],
)
def test_cuda_arch_list_defaults_only_where_torch_would_fail(environ, gpus, expected):
    assert setup_py.cuda_arch_list(environ, gpus) == expected
    assert setup_py.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0"


def toolkit(root: Path) -> Path:
    """A fake CUDA toolkit at ``root``: bin/nvcc and include/cuda_runtime_api.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("")
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def test_cuda_home_is_the_environments_when_set(tmp_path):
    nvcc = str(toolkit(tmp_path / "cuda") / "bin" / "nvcc")
    has = setup_py.has_cuda_headers
    assert setup_py.cuda_home({"CUDA_HOME": "/opt/mine"}, nvcc, has) == "/opt/mine"
    assert setup_py.cuda_home({"CUDA_PATH": "/opt/path"}, nvcc, has) == "/opt/path"
    assert setup_py.cuda_home({"CUDA_HOME": "/opt/mine", "CUDA_PATH": "/opt/path"}, nvcc, has) == "/opt/mine"


def test_cuda_home_is_nvccs_toolkit(tmp_path):
    root = toolkit(tmp_path / "cuda-13.0")
    assert setup_py.cuda_home({}, str(root / "bin" / "nvcc"), setup_py.has_cuda_headers) == str(root)


def test_cuda_home_follows_a_linked_nvcc_out_of_a_bin_with_no_headers(tmp_path):
    """nvcc linked into /usr/local/bin: torch guesses /usr/local, which has no include/cuda_runtime_api.h."""
    root = toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    link = tmp_path / "usr" / "bin" / "nvcc"
    os.symlink(root / "bin" / "nvcc", link)
    assert setup_py.cuda_home({}, str(link), setup_py.has_cuda_headers) == str(root.resolve())


def test_cuda_home_falls_back_to_usr_local_cuda_for_a_wrapper_script():
    """A wrapper script /usr/local/bin/nvcc (exec /usr/local/cuda-13.0/bin/nvcc) is not a link to follow."""
    headers = {"/usr/local/cuda"}
    assert setup_py.cuda_home({}, "/usr/local/bin/nvcc", headers.__contains__) == "/usr/local/cuda"


def test_cuda_home_is_none_without_a_toolkit():
    assert setup_py.cuda_home({}, None, lambda root: False) is None
    assert setup_py.cuda_home({}, "/usr/local/bin/nvcc", lambda root: False) is None
