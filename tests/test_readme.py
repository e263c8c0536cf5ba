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
