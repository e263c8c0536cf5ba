"""Every ```python block of README.md and model/README.md runs on its own, as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", "model/README.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for name in READMES:
        for i, match in enumerate(_BLOCK.finditer((ROOT / name).read_text())):
            line = (ROOT / name).read_text()[: match.start()].count("\n") + 1
            blocks.append((f"{name}:{line}", match.group(1)))
    return blocks


def test_the_readmes_have_python_blocks():
    names = {name.split(":")[0] for name, _ in python_blocks()}
    assert names == set(READMES)


@pytest.mark.parametrize("source", [code for _, code in python_blocks()], ids=[name for name, _ in python_blocks()])
def test_readme_block_runs_on_its_own(source, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(source, "<readme block>", "exec"), {"__name__": "__readme__"})


# -- the READMEs' commands -----------------------------------------------------------------------

_COMMAND = re.compile(r"python -m ((?:bench|model)(?:\.[a-z_]+)?)\b")
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


# Named in a sentence, not a command: the model package runs as its modules.
_NOT_COMMANDS = {"model"}


def readme_modules() -> list[str]:
    """Every ``python -m MODULE`` the READMEs name."""
    found = {m for name in READMES for m in _COMMAND.findall((ROOT / name).read_text())}
    return sorted(found - _NOT_COMMANDS)


@pytest.mark.parametrize("module", readme_modules())
def test_every_command_the_readmes_name_answers_help(module, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(ROOT)
    package = importlib.import_module(module)
    main = getattr(package, "main", None) or importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def bench_commands() -> list[list[str]]:
    """The ``python -m bench`` and ``python -m bench.gpu_check`` command lines of the READMEs' bash blocks."""
    commands = []
    for name in READMES:
        for block in _BASH_BLOCK.findall((ROOT / name).read_text()):
            for line in block.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:3] in (["python", "-m", "bench"], ["python", "-m", "bench.gpu_check"]):
                    commands.append(words[2:])
    return commands


def test_the_readmes_bench_commands_parse(monkeypatch):
    from bench import gpu_check
    from bench.__main__ import parse_args

    monkeypatch.chdir(ROOT)
    commands = bench_commands()
    assert commands  # `python -m bench --out bench/out` at least
    for module, *argv in commands:
        args = (parse_args if module == "bench" else gpu_check.parse_args)(argv)
        assert args.out is None or not args.out.is_file()


def test_the_vllm_savings_table_is_what_the_cost_model_gives():
    """README's "What is saved inside vLLM" table is `python -m bench.vllm_serve --saved`, line for line."""
    from bench.vllm_serve import saved_in_vllm, saved_table

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert saved_table(saved_in_vllm()) in text
