"""The two ends of a decode step (adallava_kernels/ops/decode_io.py): each against the torch ops it replaces."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from adallava_kernels.ops import decode_io
from adallava_kernels.ops.rope import rotary_tables
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE

# Vocabularies around the greedy kernel's block of 4096: one short block, several blocks, a ragged last one.
VOCABS = [1, 37, 4096, 5003]


def _logits(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, vocab, dtype=torch.float32).to(dtype).to(DEVICE)


def _greedy_both(logits, live, lengths):
    """(outputs of greedy_, outputs of the reference): logits copy, next tokens, tokens, lengths, each
    poisoned or set to a value neither writes before the call."""
    rows = logits.shape[0]
    results = []
    for run in (decode_io.greedy_, decode_io.greedy_reference_):
        out = poisoned(*logits.shape, dtype=logits.dtype, device=DEVICE)
        next_tokens = torch.full((rows,), -7, dtype=torch.int64, device=DEVICE)
        tokens = torch.full((rows,), -9, dtype=torch.int64, device=DEVICE)
        after = lengths.clone()
        run(logits, live, out, next_tokens, tokens, after)
        results.append((out, next_tokens, tokens, after))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_is_the_argmax_the_copy_and_the_lengths_the_torch_ops_give(dtype, vocab):
    rows = 3
    logits = _logits(rows, vocab, dtype)
    live = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([5, 9, 700], dtype=torch.int32, device=DEVICE)
    (out, next_tokens, tokens, after), (ref_out, ref_next, ref_tokens, ref_after) = _greedy_both(logits, live, lengths)
    assert torch.equal(out, ref_out)  # a copy, bit for bit (every poisoned element written)
    assert torch.equal(next_tokens, ref_next) and torch.equal(tokens, ref_tokens)
    assert torch.equal(after, ref_after) and after.tolist() == [6, 9, 701]


def test_greedy_breaks_ties_and_meets_nan_and_infinities_as_torch_argmax():
    vocab = 5003
    logits = _logits(6, vocab, torch.bfloat16)
    top = logits.max() + 1
    logits[0, 11], logits[0, 4999] = top, top  # a tie across blocks: the first
    logits[1, 4100], logits[1, 4200] = top, top  # a tie inside the last block
    logits[2, 300], logits[2, 4097] = float("nan"), float("nan")  # NaN wins, the first one
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")  # nothing above -inf: column 0
    logits[4, 4500], logits[4, 4600] = float("inf"), float("inf")
    logits[5, vocab - 1] = top  # the very last column
    live = torch.ones(6, dtype=torch.int32, device=DEVICE)
    lengths = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    (out, next_tokens, tokens, _), (_, ref_next, _, _) = _greedy_both(logits, live, lengths)
    assert next_tokens.tolist() == ref_next.tolist() == [11, 4100, 300, 0, 4500, vocab - 1]
    assert torch.equal(tokens, next_tokens)
    assert torch.equal(out.isnan(), logits.isnan()) and torch.equal(out.nan_to_num(), logits.nan_to_num())


def test_greedy_with_no_rows_writes_nothing():
    logits = torch.empty(0, 10, device=DEVICE)
    empty64, empty32 = torch.empty(0, dtype=torch.int64, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE)
    decode_io.greedy_(logits, empty32, torch.empty_like(logits), empty64, empty64.clone(), empty32.clone())


def _tables(positions: int, head_dim: int, dtype: torch.dtype, rope_type: str = "default"):
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, "factor": 2.0})
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    return rotary, rotary_tables(rotary, positions, torch.empty(1, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 128])
def test_step_inputs_read_the_rotary_rows_of_each_position_and_add_one(dtype, head_dim):
    positions = 300
    rotary, (cos_table, sin_table) = _tables(positions, head_dim, dtype)
    # Live rows (positions 0, 3, the last), then free slots' states outside the table on either side.
    lengths = torch.tensor([0, 5, 310, 17, 400], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 2, 11, 20, 3], dtype=torch.int32, device=DEVICE)
    cos, sin, after = decode_io.step_inputs(lengths, starts, cos_table, sin_table)
    ref_cos, ref_sin, ref_after = decode_io.step_inputs_reference(lengths, starts, cos_table, sin_table)
    assert cos.shape == sin.shape == (5, 1, head_dim) and cos.dtype == dtype
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and torch.equal(after, ref_after)
    assert after.dtype == torch.int32 and after.tolist() == [1, 6, 311, 18, 401]
    # The live rows' angles are what the module gives a step at a time: bit for bit on a CPU; on a GPU the
    # module's batched product may take another matmul kernel than the table's, so within the dtype's tolerance.
    live = (lengths - starts)[:3].long()
    module_cos, module_sin = rotary(torch.empty(3, 1, 1, dtype=dtype, device=DEVICE), live[:, None])
    assert_close(cos[:3], module_cos.double())
    assert_close(sin[:3], module_sin.double())
    if DEVICE.type == "cpu":
        assert torch.equal(cos[:3], module_cos) and torch.equal(sin[:3], module_sin)


def test_rotary_tables_refuse_a_rope_that_rescales_with_the_length():
    _, tables = _tables(64, 16, torch.float32, rope_type="dynamic")
    assert tables is None
    _, tables = _tables(64, 16, torch.float32, rope_type="linear")
    assert tables is not None and tables[0].shape == (64, 16)


def test_the_ends_of_a_step_name_the_argument_they_refuse():
    cos_table = torch.zeros(8, 16, device=DEVICE)
    i32 = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="lengths"):
        decode_io.step_inputs(i32.long(), i32, cos_table, cos_table)
    with pytest.raises(ValueError, match="starts must have the shape of lengths"):
        decode_io.step_inputs(i32, i32[:1], cos_table, cos_table)
    with pytest.raises(ValueError, match="cos_table and sin_table"):
        decode_io.step_inputs(i32, i32, cos_table, cos_table[:4])
    with pytest.raises(ValueError, match="sin_table must be row-major"):
        decode_io.step_inputs(i32, i32, cos_table, torch.zeros(16, 8, device=DEVICE).t())
    logits = torch.zeros(2, 10, device=DEVICE)
    i64 = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="logits_out"):
        decode_io.greedy_(logits, i32, logits[:, :5], i64, i64, i32)
    with pytest.raises(ValueError, match="next_tokens"):
        decode_io.greedy_(logits, i32, logits.clone(), i32, i64, i32)
    with pytest.raises(ValueError, match=r"tokens must be \[2\]"):
        decode_io.greedy_(logits, i32, logits.clone(), i64, i64[:1], i32)
    with pytest.raises(ValueError, match="logits must have unit stride"):
        decode_io.greedy_(torch.zeros(10, 2, device=DEVICE).t(), i32, logits.clone(), i64, i64, i32)
