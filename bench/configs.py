"""The candidate configs of the library's tuned Triton kernels: each kernel's own lists, then the candidates
only the sweep tries. ``bench.tune`` times them; ``bench.static`` compiles every one a launch may take."""

from __future__ import annotations

from adallava_kernels.ops import flash_attention, gathered_linear, head_projection, phased_attention, phased_mlp
from adallava_kernels.ops.common import INTERPRETING
from adallava_kernels.ops.triton_utils import config

# Candidates the sweep times beside each kernel's own list (the autotuners never see them), by kernel and
# regime; a winner among them is used through the table like any other, and the static check holds them to
# bandwidth's properties as it holds the lists.
EXTRA: dict = {
    # q|k|v in decode: the list's two configs keep 16 KiB of weight in flight a program (BLOCK_K 128 at 4
    # stages, 256 at 3), where gate|up keeps 32; on the H200 sweep of 2026-12-04 they took 1.16-1.18 times
    # the model's time, the chosen gate|up configs 0.98-1.03. This one keeps 24 KiB, 72 an SM at 3 programs
    # an SM (one wave at 7B shapes; with the norm's tiles staged beside the weight's, deeper or wider ones
    # fit 2 an SM: 1.45 waves). Whether more in flight is what q|k|v lacks is for the sweep to say.
    "_head_proj_kernel": {"decode": [config(4, 5, BLOCK_M=16, BLOCK_K=128)]},
}
KERNEL_TABLES = {
    "_row_gather_kernel": (gathered_linear.ROW_CONFIGS, gathered_linear.INTERPRETER_CONFIGS),
    "_col_gather_kernel": (gathered_linear.COL_CONFIGS, gathered_linear.INTERPRETER_CONFIGS),
    "_head_proj_kernel": (head_projection.CONFIGS, head_projection.INTERPRETER_CONFIGS),
    "_flash_attn_kernel": (flash_attention.CONFIGS, flash_attention.INTERPRETER_CONFIGS),
    # Never autotuned at run time: a launch takes the table's config or the list's first (tuning.launch_fixed).
    "_phased_mlp_kernel": (phased_mlp.CONFIGS, phased_mlp.INTERPRETER_CONFIGS),
    "_phased_attention_kernel": (phased_attention.CONFIGS, phased_attention.INTERPRETER_CONFIGS),
}


def candidates(kernel: str, regime: str) -> list:
    """What a launch of ``kernel`` in ``regime`` may run: its list (the interpreter's one config under
    TRITON_INTERPRET=1), then the sweep's extra candidates."""
    tuned, interpreter = KERNEL_TABLES[kernel]
    if INTERPRETING:
        return list(interpreter)
    return list(tuned[regime]) + EXTRA.get(kernel, {}).get(regime, [])
