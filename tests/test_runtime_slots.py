"""BatchSlots.refresh against a plain re-implementation of what the kernels must read, unit by unit.

Random plans (some layers skipped by every row, some kept whole by every row, the rest mixed), rows that
join and leave, and a refresh over a bucket larger than the live rows: every derived buffer is checked
against loops over the definitions in slots.py's docstring, so the vectorised derivation cannot drift.
"""

import pytest
import torch

from adallava_kernels.runtime.rows import RowPlan
from adallava_kernels.runtime.slots import BatchSlots
from adallava_kernels.shape import ModelShape

SHAPE = ModelShape(hidden_size=48, intermediate_size=40, num_layers=5, num_heads=6, num_kv_heads=3, head_dim=8,
                   vocab_size=11)
WIDTH, SCRATCH = 3, 99


def random_row(g: torch.Generator) -> RowPlan:
    L, H, I = SHAPE.num_layers, SHAPE.num_heads, SHAPE.intermediate_size
    units = torch.rand(L, H + I, generator=g) < 0.5
    units[0] = False  # a layer every row skips
    units[1] = True  # a layer every row keeps whole
    return RowPlan(units, H)


def expected(slots: BatchSlots, rows: int) -> dict:
    """The derived buffers by their definitions: loops over layers, units and rows."""
    L, H, KVH, I, d = (SHAPE.num_layers, SHAPE.num_heads, SHAPE.num_kv_heads, SHAPE.intermediate_size,
                       SHAPE.head_dim)
    per = H // KVH
    own = slots.own[:rows]
    out = {"qkv_heads": torch.full((L, H + 2 * KVH), -1, dtype=torch.int32),
           "o_cols": torch.full((L, H * d), -1, dtype=torch.int32), "o_count": torch.zeros(L, 1, dtype=torch.int32),
           "neurons": torch.full((L, I), -1, dtype=torch.int32), "n_count": torch.zeros(L, 1, dtype=torch.int32),
           "kv_map": torch.full((rows, L, H), -1, dtype=torch.int32),
           "tables": torch.full((rows, L, KVH, WIDTH), SCRATCH, dtype=torch.int32),
           "n_mask": torch.zeros(rows, L, I)}
    counts = []
    for layer in range(L):
        heads = [h for h in range(H) if bool(own[:, layer, h].any())]
        groups = sorted({h // per for h in heads})
        neurons = [n for n in range(I) if bool(own[:, layer, H + n].any())]
        counts.append((len(heads), len(groups), len(neurons)))
        for s, h in enumerate(heads):
            out["qkv_heads"][layer, s] = h
            out["o_cols"][layer, s * d:(s + 1) * d] = torch.arange(h * d, (h + 1) * d)
            for r in range(rows):
                if own[r, layer, h]:
                    out["kv_map"][r, layer, s] = groups.index(h // per)
        for s, g in enumerate(groups):
            out["qkv_heads"][layer, H + s] = H + g
            out["qkv_heads"][layer, H + KVH + s] = H + KVH + g
            for r in range(rows):
                out["tables"][r, layer, s] = slots.model_tables[r, layer, g]
        for s, n in enumerate(neurons):
            out["neurons"][layer, s] = n
            for r in range(rows):
                out["n_mask"][r, layer, s] = float(own[r, layer, H + n])
        out["o_count"][layer, 0] = len(heads) * d
        out["n_count"][layer, 0] = len(neurons)
    out["counts"] = counts
    return out


def check(slots: BatchSlots, rows: int) -> None:
    want = expected(slots, rows)
    got = {"qkv_heads": slots.qkv_heads, "o_cols": slots.o_cols, "o_count": slots.o_count,
           "neurons": slots.neurons, "n_count": slots.n_count, "kv_map": slots.kv_map[:rows],
           "tables": slots.tables[:rows], "n_mask": slots.n_mask[:rows]}
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name
    assert slots.counts == want["counts"]
    if slots.index is not None:  # the torch backend's gathers: the same lists, free slots reading unit 0
        index = slots.index
        assert torch.equal(index.neurons, slots.neurons.clamp(min=0).long())
        assert torch.equal(index.o_cols, slots.o_cols.clamp(min=0).long())
        assert torch.equal(index.kv_map[:rows], slots.kv_map[:rows].clamp(min=0).long())
        rows_of = slots.qkv_heads.clamp(min=0).long()[:, :, None] * SHAPE.head_dim + torch.arange(SHAPE.head_dim)
        assert torch.equal(index.qkv_rows, rows_of)


@pytest.mark.parametrize("torch_index", [False, True], ids=["kernels", "torch-gathers"])
def test_refresh_derives_the_union_and_each_rows_view_as_defined(torch_index):
    g = torch.Generator().manual_seed(0)
    slots = BatchSlots(SHAPE, capacity=8, width=WIDTH, scratch_page=SCRATCH, dtype=torch.float32,
                       device=torch.device("cpu"), torch_index=torch_index)
    live = 0
    start = torch.zeros(1, dtype=torch.int32)
    for event in range(12):
        if live < 6 and (live < 2 or event % 3 != 2):
            tables = torch.randint(0, 50, (SHAPE.num_layers, SHAPE.num_kv_heads, WIDTH), generator=g,
                                   dtype=torch.int32)
            slots.join(live, random_row(g), tables, 4, start, None)
            live += 1
        else:
            slots.leave(int(torch.randint(live, (1,), generator=g)), live - 1)
            live -= 1
        bucket = live + 1 if event % 2 else live  # a bucket with a cleared slot past the live rows, or none
        slots.refresh(bucket, host_counts=True)
        check(slots, bucket)


def test_a_cleared_batch_refreshes_to_an_empty_union():
    slots = BatchSlots(SHAPE, capacity=4, width=WIDTH, scratch_page=SCRATCH, dtype=torch.float32,
                       device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    slots.join(0, random_row(g), torch.zeros(SHAPE.num_layers, SHAPE.num_kv_heads, WIDTH, dtype=torch.int32), 2,
               torch.zeros(1, dtype=torch.int32), None)
    slots.clear()
    slots.refresh(1, host_counts=True)
    assert slots.counts == [(0, 0, 0)] * SHAPE.num_layers
    assert (slots.qkv_heads == -1).all() and (slots.neurons == -1).all() and (slots.kv_map[:1] == -1).all()
    assert (slots.tables[:1] == SCRATCH).all() and not slots.n_mask[:1].any()
