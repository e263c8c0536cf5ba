"""The README's vLLM example (the ```py block of "Serving in vLLM") runs as written."""

import ast
import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_vllm_example_runs(capsys):
    section = README.read_text().split("### Serving in vLLM", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"^```py\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "<README vLLM example>", "exec"), {"__name__": "__readme__"})
    tokens = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(tokens) == 3 and all(len(t) == 8 for t in tokens)
    assert tokens[1] == tokens[2] != tokens[0]  # a budget of 1.0 is the full plan; skipping a layer changes tokens
