"""vLLM's default engine: the engine core in its own process, which loads the plug-in through its entry
point (nothing registered by hand) and keeps the rows where the model runs."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm")

SCRIPT = textwrap.dedent('''
    import sys, tempfile
    sys.path.insert(0, {here!r})

    def main():
        import _engine as E
        from vllm import SamplingParams
        from adallava_kernels import ExecutionPlan
        directory = tempfile.mkdtemp()
        model = E.save_tiny_llama(directory)
        llm = E.engine(directory)
        plan = ExecutionPlan.from_layer_mask([1, 1, 0, 1], E.shape())
        prompt = [5, 6, 7, 8, 9]
        params = [SamplingParams(max_tokens=8, temperature=0.0, extra_args={{"adallava_plan": plan.to_json()}}),
                  SamplingParams(max_tokens=8, temperature=0.0)]
        outs = llm.generate([{{"prompt_token_ids": prompt}}] * 2, params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        expected = [E.reference_tokens(model, prompt, plan, 8), E.reference_tokens(model, prompt, None, 8)]
        print("SAME" if got == expected else f"DIFFERENT {{got}} {{expected}}")

    if __name__ == "__main__":
        main()
''')


def test_a_multiprocess_engine_serves_the_plans(tmp_path):
    here = str(Path(__file__).resolve().parent)
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT.format(here=here))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("SAME", "DIFFERENT"))]
    assert verdicts == ["SAME"], result.stdout[-2000:]
    assert "EngineCore" in result.stdout + result.stderr  # the model ran in the engine core's own process
