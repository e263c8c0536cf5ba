"""``python -m bench.tune``: time every candidate config of the library's Triton kernels, keep the fastest.

For each kernel, regime and shape bucket a LLaVA-1.5 decode step or prefill
launches (decode at batch 1, then 16; then a prefill of ``--tokens``), each
candidate config (the kernel's own list, then :data:`.configs.EXTRA` candidates that
only the sweep tries) is forced in turn through the library's own launchers
(:func:`adallava_kernels.ops.tuning.forcing`) and timed as a decode step
runs it: captured in a CUDA graph, over enough copies of its weights that
they come from memory rather than L2 (:func:`time_calls`). Per bucket, the
candidate with the least time summed over the bucket's cases
(:func:`bucket_winners`) goes into ``tuned_configs.json`` in
``--out``, in the format of the committed table
(``adallava_kernels/ops/tuned_configs.json``: ``--install`` merges it there),
keyed by the device's name; ``results.json`` holds every time. Both are
rewritten after each case, so a sweep cut short keeps what it finished, and
no case starts after ``--budget-s``.

Compiling is most of a sweep: before timing, ``--jobs`` child processes
launch every candidate once each (``--compile-only``), so the timing
process finds each kernel in Triton's on-disk cache.

On a CPU there is nothing to tune: under ``TRITON_INTERPRET=1`` (and with
``--quick``) the sweep runs its own code path at ``tiny`` shapes over the
interpreter's one config, so that it is tested; without the interpreter it
writes an empty table and says why.

``--predict FILE`` (no GPU, TRITON_INTERPRET unset) writes instead what the
static latency model (``bench/static.py``) predicts for every case and
candidate, from their compiled sm_90 code; ``--against FILE`` then sets a
GPU sweep's times beside those predictions: the model's error per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from adallava_kernels import get_shape
from adallava_kernels.ops import flash_attention, gathered_linear, head_projection, phased_attention, phased_mlp, tuning
from adallava_kernels.ops.common import INTERPRETING
from adallava_kernels.ops.layout import prepare_column_gather
from adallava_kernels.ops.paged_attention import paged_decode_splits
from adallava_kernels.plan import neuron_groups

from . import timing
from ._common import checked_device, device_name, metadata
from .configs import EXTRA, KERNEL_TABLES, candidates  # noqa: F401 - EXTRA and KERNEL_TABLES: the sweep's lists

DEFAULT_OUT = Path("bench/out/tune")
DEFAULT_BUDGET_S = 150
DECODE_BATCHES = (1, 16)
PREFILL_TOKENS = 700
# The positions a phased attention block's rows attend over, as a decode step after a 700-token prompt.
CONTEXT = 700
# Bytes a round of a case's calls reads: past several times any GPU's L2 (60 MB on an H200).
ROTATE_BYTES = 256 * 2**20

@dataclass
class Case:
    """One launch the sweep times: ``kernel`` in ``regime``; each ``make()`` allocates a fresh set of its
    tensors and returns a no-argument call over them; ``weight_bytes``: what one call must read."""

    name: str
    kernel: str
    regime: str
    make: Callable[[], Callable[[], object]]
    weight_bytes: int = 0

    def calls(self, device: torch.device) -> list[Callable[[], object]]:
        """Calls over enough sets of tensors that one round of them reads :data:`ROTATE_BYTES`: a timed
        call finds its weights out of the L2 cache, as a decode step does (its other layers pass between)."""
        copies = 1 if device.type != "cuda" else max(1, min(8, -(-ROTATE_BYTES // max(self.weight_bytes, 1))))
        return [self.make() for _ in range(copies)]


def _every_other_group(size: int, groups: int) -> torch.Tensor:
    """Half a layer's units, every other group, as the -H plans keep them: the partial widths' bucket."""
    kept = [n for g in neuron_groups(size, groups)[::2] for n in g]
    return torch.tensor(kept, dtype=torch.int32)


def _kv_heads(kept: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """The KV heads the query heads ``kept`` read, sorted."""
    return torch.unique(kept // (nq // nkv))


def _union_head_slots(kept: torch.Tensor, nq: int, nkv: int, head_dim: int):
    """A union of the query heads ``kept`` (sorted) laid out in slots as a decode step reads it: the q|k|v heads
    (``[nq + 2 nkv]``, -1 in free slots), each query slot's KV slot (``[nq]``), the ``o_proj`` columns
    (``[nq x head_dim]``) and the number of live KV slots (the KV heads of the kept query heads)."""
    kv_heads = _kv_heads(kept, nq, nkv)
    live = kv_heads.numel()
    heads = torch.full((nq + 2 * nkv,), -1, dtype=torch.int32)
    heads[:kept.numel()] = kept
    heads[nq:nq + live] = kv_heads + nq
    heads[nq + nkv:nq + nkv + live] = kv_heads + nq + nkv
    slot_of = torch.full((nkv,), -1, dtype=torch.int32)
    slot_of[kv_heads] = torch.arange(live, dtype=torch.int32)
    kv_map = torch.full((nq,), -1, dtype=torch.int32)
    kv_map[:kept.numel()] = slot_of[kept // (nq // nkv)]
    cols = torch.full((nq * head_dim,), -1, dtype=torch.int32)
    cols[:kept.numel() * head_dim] = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return heads, kv_map, cols, live


def _block_bytes(kept: torch.Tensor, shape, batch: int, element: int) -> int:
    """What a phased attention block of the query heads ``kept`` must read: their q, K and V rows and
    ``o_proj`` columns, and each row's K and V of the :data:`CONTEXT` positions before it and its own."""
    hidden, d, nq, nkv = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    live = _kv_heads(kept, nq, nkv).numel()
    return element * ((kept.numel() + 2 * live) * d * hidden + hidden * kept.numel() * d
                      + 2 * batch * live * (CONTEXT + 1) * d)


def cases(shape, dtype: torch.dtype, device: torch.device, tokens: int, batches=DECODE_BATCHES) -> list[Case]:
    """Decode at each batch (full and half widths; the bound step's count-and-mask form), then a prefill."""
    hidden, inter, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    nq, nkv = shape.num_heads, shape.num_kv_heads
    out = []

    def rand(*size, scale=1.0):
        return (torch.randn(*size, device=device) * scale).to(dtype)

    def mlp_weights():
        return rand(inter, hidden, scale=hidden**-0.5), rand(inter, hidden, scale=hidden**-0.5)

    full_neurons = torch.arange(inter, dtype=torch.int32)
    half_neurons = _every_other_group(inter, nq)
    full_o = torch.arange(nq * d, dtype=torch.int32)
    half_o = (torch.arange(0, nq, 2)[:, None] * d + torch.arange(d)).flatten().to(torch.int32)
    all_heads, half_heads = torch.arange(nq), torch.arange(0, nq, 2)

    def swiglu(m, rows):
        def make():
            x, (wg, wu), r = rand(m, hidden), mlp_weights(), rows.to(device)
            return lambda: gathered_linear.swiglu_gathered(x, wg, wu, r)
        return make

    def col(m, cols, capacity, k_full, bound):
        def make():
            w = prepare_column_gather(rand(hidden, k_full, scale=k_full**-0.5))
            width = capacity if bound else cols.numel()
            x, residual = rand(m, width), rand(m, hidden)
            index = torch.full((width,), -1, dtype=torch.int32)
            index[:cols.numel()] = cols
            index = index.to(device)
            if not bound:
                return lambda: gathered_linear.col_gathered_linear(x, w, index, residual=residual)
            count = torch.tensor([cols.numel()], dtype=torch.int32, device=device)
            mask = torch.ones(m, width, dtype=dtype, device=device)
            return lambda: gathered_linear.col_gathered_linear(x, w, index, count=count, x_mask=mask,
                                                               residual=residual)
        return make

    def qkv_paged(batch):
        def make():
            slots = nq + 2 * nkv
            w, x = rand(slots * d, hidden, scale=hidden**-0.5), rand(batch, 1, hidden)
            heads = torch.arange(slots, dtype=torch.int32, device=device)
            cos, sin = rand(batch, 1, d), rand(batch, 1, d)
            pages = 4 * batch * nkv + 1
            k_pages, v_pages = rand(pages, 16, d), rand(pages, 16, d)
            tables = torch.arange(batch * nkv * 4, dtype=torch.int32, device=device).view(batch, nkv, 4)
            positions = torch.full((batch,), 40, dtype=torch.int32, device=device)
            out_q = torch.empty(batch, 1, nq, d, dtype=dtype, device=device)
            paged = head_projection.PagedKV(k_pages, v_pages, tables, positions)
            return lambda: head_projection.head_projection(x, w, heads, d, cos, sin, out_q, rope_slots=nq + nkv,
                                                           paged=paged)
        return make

    def qkv_prefill(m):
        def make():
            slots = nq + 2 * nkv
            w, x = rand(slots * d, hidden, scale=hidden**-0.5), rand(1, m, hidden)
            heads = torch.arange(slots, dtype=torch.int32, device=device)
            cos, sin = rand(1, m, d), rand(1, m, d)
            out_qkv = torch.empty(1, m, slots, d, dtype=dtype, device=device)
            return lambda: head_projection.head_projection(x, w, heads, d, cos, sin, out_qkv, rope_slots=nq + nkv)
        return make

    def flash(m, heads):
        def make():
            q, k, v = rand(1, m, heads, d), rand(1, nkv, m, d), rand(1, nkv, m, d)
            head_to_kv = (torch.arange(heads) // max(1, heads // nkv)).clamp(max=nkv - 1).to(torch.int32).to(device)
            out_ = torch.empty_like(q)
            return lambda: flash_attention.flash_attention(q, k, v, head_to_kv, None, out_, d**-0.5)
        return make

    def dense(m, k_full, residual):
        def make():
            w, x = rand(hidden, k_full, scale=k_full**-0.5), rand(m, k_full)
            rows, res = torch.arange(hidden, dtype=torch.int32, device=device), rand(m, hidden) if residual else None
            return lambda: gathered_linear.row_gathered_linear(x, w, rows, residual=res)
        return make

    def lm_head(m):
        def make():
            w, x = rand(shape.vocab_size, hidden, scale=hidden**-0.5), rand(m, hidden)
            rows, norm = torch.arange(shape.vocab_size, dtype=torch.int32, device=device), 1 + rand(hidden, scale=0.1)
            return lambda: gathered_linear.row_gathered_linear(x, w, rows, norm_weight=norm, eps=1e-5)
        return make

    def mlp_phased(m, neurons):
        """A layer's phased MLP as the bound step launches it, the residual added, a row mask: every neuron
        counted and ``w_down`` row-major (``dense``) in a whole layer; in a partial one ``neurons`` counted of
        every slot, ``w_down`` gathered by columns (its row-major copy beside it)."""
        def make():
            (wg, wu), h, norm = mlp_weights(), rand(m, hidden), 1 + rand(hidden, scale=0.1)
            w_down = rand(hidden, inter, scale=inter**-0.5)
            rows = torch.full((inter,), -1, dtype=torch.int32)
            rows[:neurons.numel()] = neurons
            rows, count = rows.to(device), torch.tensor([neurons.numel()], dtype=torch.int32, device=device)
            mask, out_ = torch.ones(m, inter, dtype=dtype, device=device), torch.empty_like(h)
            if neurons.numel() == inter:
                return lambda: phased_mlp.swiglu_mlp_phased(h, wg, wu, rows, norm, 1e-5, w_down, count, mask, True,
                                                            out=out_)
            columns = prepare_column_gather(w_down)
            return lambda: phased_mlp.swiglu_mlp_phased(h, wg, wu, rows, norm, 1e-5, columns, count, mask, False,
                                                        w_down, out=out_)
        return make

    def block_phased(batch, kept):
        """A layer's phased attention block as the bound step launches it, each row at position :data:`CONTEXT`
        of its pages, ``kept`` the union's query heads: q|k|v with the norm, the append, the attention and
        o_proj, the residual added. In a whole layer (every head kept) ``o_proj`` is row-major (``dense``); in a
        partial one the free head slots are -1 (their KV slots write to a scratch page), and ``o_proj`` is
        gathered by columns (its row-major copy beside it), as :class:`~adallava_kernels.runtime.slots.BatchSlots`
        lays a union out."""
        def make():
            page, whole = 16, kept.numel() == nq
            width = -(-(CONTEXT + 1) // page)
            h, norm = rand(batch, hidden), 1 + rand(hidden, scale=0.1)
            w_qkv, w_o = rand((nq + 2 * nkv) * d, hidden, scale=hidden**-0.5), rand(hidden, nq * d, scale=(nq * d)**-0.5)
            heads, kv_map, cols, kv_live = _union_head_slots(kept, nq, nkv, d)
            heads, cols = heads.to(device), cols.to(device)
            kv_map = kv_map.to(device).repeat(batch, 1)
            # One page past the rows' own: where a free KV slot's append goes.
            scratch = batch * nkv * width
            pages = rand(2, scratch + 1, page, d)
            tables = torch.arange(scratch, dtype=torch.int32, device=device).view(batch, nkv, width)
            tables[:, kv_live:] = scratch
            positions = torch.full((batch,), CONTEXT, dtype=torch.int32, device=device)
            cos, sin = rand(batch, 1, d), rand(batch, 1, d)
            count = torch.tensor([kept.numel() * d], dtype=torch.int32, device=device)
            split = paged_decode_splits(batch, nq, width * page, device)
            starts, lengths, out_ = torch.zeros_like(positions), positions + 1, torch.empty_like(h)
            o_weight, dense_weight = (w_o, None) if whole else (prepare_column_gather(w_o), w_o)
            return lambda: phased_attention.attention_block_phased(
                h, w_qkv, heads, cos, sin, norm, 1e-5, pages, tables, positions, kv_map, lengths, starts, d**-0.5,
                split, o_weight, cols, count, whole, dense_weight, out=out_)
        return make

    e = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    qkv_bytes, half_inter = (nq + 2 * nkv) * d * hidden * e, half_neurons.numel()
    for b in batches:
        out += [
            Case(f"gate|up b{b} full", "_row_gather_kernel", "decode", swiglu(b, full_neurons), 2 * inter * hidden * e),
            Case(f"gate|up b{b} half", "_row_gather_kernel", "decode", swiglu(b, half_neurons),
                 2 * half_inter * hidden * e),
            Case(f"q|k|v paged b{b}", "_head_proj_kernel", "decode", qkv_paged(b), qkv_bytes),
            Case(f"o_proj dense b{b}", "_row_gather_kernel", "decode", dense(b, nq * d, False), hidden * nq * d * e),
            Case(f"down dense b{b}", "_row_gather_kernel", "decode", dense(b, inter, True), hidden * inter * e),
            Case(f"down bound b{b}", "_col_gather_kernel", "decode", col(b, full_neurons, inter, inter, True),
                 hidden * inter * e),
            Case(f"down half b{b}", "_col_gather_kernel", "decode", col(b, half_neurons, inter, inter, False),
                 hidden * half_inter * e),
            Case(f"o_proj bound b{b}", "_col_gather_kernel", "decode", col(b, full_o, nq * d, nq * d, True),
                 hidden * nq * d * e),
            Case(f"o_proj half b{b}", "_col_gather_kernel", "decode", col(b, half_o, nq * d, nq * d, False),
                 hidden * nq * d * e // 2),
            # The step's lm_head, its final norm inside: a row gather of every row of the vocabulary.
            Case(f"lm_head b{b}", "_row_gather_kernel", "decode", lm_head(b), shape.vocab_size * hidden * e),
            # The phased forms of a whole layer (ADALLAVA_PHASED_MLP=1, ADALLAVA_PHASED_ATTENTION=qkv), one launch
            # each. A partial layer's launch is in the same bucket (its slots are the full width's): each half case
            # shares its whole one's, so the config the two cost least in together is kept.
            Case(f"mlp phased b{b} full", "_phased_mlp_kernel", "decode", mlp_phased(b, full_neurons),
                 3 * inter * hidden * e),
            Case(f"mlp phased b{b} half", "_phased_mlp_kernel", "decode", mlp_phased(b, half_neurons),
                 3 * half_inter * hidden * e),
            Case(f"attention block phased b{b} full", "_phased_attention_kernel", "decode",
                 block_phased(b, all_heads), _block_bytes(all_heads, shape, b, e)),
            Case(f"attention block phased b{b} half", "_phased_attention_kernel", "decode",
                 block_phased(b, half_heads), _block_bytes(half_heads, shape, b, e)),
        ]
    out += [
        Case(f"gate|up prefill {tokens} full", "_row_gather_kernel", "prefill", swiglu(tokens, full_neurons),
             2 * inter * hidden * e),
        Case(f"gate|up prefill {tokens} half", "_row_gather_kernel", "prefill", swiglu(tokens, half_neurons),
             2 * half_inter * hidden * e),
        Case(f"q|k|v prefill {tokens}", "_head_proj_kernel", "prefill", qkv_prefill(tokens), qkv_bytes),
        Case(f"attention prefill {tokens}", "_flash_attn_kernel", "prefill", flash(tokens, nq),
             3 * tokens * nq * d * e),
        Case(f"down prefill {tokens} full", "_col_gather_kernel", "prefill",
             col(tokens, full_neurons, inter, inter, False), hidden * inter * e),
        Case(f"down prefill {tokens} half", "_col_gather_kernel", "prefill",
             col(tokens, half_neurons, inter, inter, False), hidden * half_inter * e),
        Case(f"o_proj prefill {tokens} half", "_col_gather_kernel", "prefill",
             col(tokens, half_o, nq * d, nq * d, False), hidden * nq * d * e // 2),
    ]
    return out


def bucket_of_case(case: Case, call: Callable[[], object]) -> tuple[str, str]:
    """``(kernel/regime, bucket)`` the call's launch of ``case.kernel`` looks up, recorded from the launch."""
    with tuning.recording() as seen, tuning.forcing(case.kernel, case.regime, candidates(case.kernel, case.regime)[0]):
        call()
    mine = [(k, b) for k, b in seen if k == f"{case.kernel}/{case.regime}"]
    if not mine:
        raise RuntimeError(f"case {case.name!r} launched no {case.kernel} in regime {case.regime}")
    return mine[0]


def time_calls(calls: list[Callable[[], object]], device: torch.device, quick: bool) -> float:
    """Seconds one call takes. On CUDA: the calls (each over its own tensors, so the weights come from
    memory, not L2) captured back to back in a CUDA graph, the graph replayed and timed with events: the
    time a kernel takes inside a captured decode step, host launch costs excluded; the median replay
    over the calls it holds. Elsewhere one wall-clock call (a smoke run)."""
    if device.type != "cuda":
        start = time.perf_counter()
        calls[0]()
        return time.perf_counter() - start
    for call in calls:  # compiles, and sizes the split workspace outside the capture
        call()
    rounds = max(1, -(-8 // len(calls)))
    return timing.graph_replay_seconds(calls, rounds, 5 if quick else 20) / len(calls)


def sweep(case_list: list[Case], device: torch.device, out: Path, deadline: float, quick: bool,
          compile_only: bool = False) -> dict:
    """Every case's candidates timed (or only compiled); the tables written after each case."""
    rows = []
    results = {"meta": metadata(device, torch.bfloat16, "bench.tune"), "device": device_name(device), "cases": rows}
    for case in case_list:
        if time.monotonic() > deadline:
            results.setdefault("skipped", []).append(case.name)
            continue
        calls = [case.make()] if compile_only else case.calls(device)
        key, bucket = bucket_of_case(case, calls[0])
        row = {"case": case.name, "kernel": key, "bucket": bucket, "weight_bytes": case.weight_bytes,
               "copies": len(calls), "candidates": []}
        for candidate in candidates(case.kernel, case.regime):
            entry = tuning.config_to_json(candidate)
            try:
                with tuning.forcing(case.kernel, case.regime, candidate):
                    if compile_only or device.type == "cuda":  # elsewhere the one timed call is the first
                        calls[0]()  # compiles
                    if not compile_only:
                        entry["seconds"] = time_calls(calls, device, quick)
            except Exception as error:  # noqa: BLE001 - a config that cannot run here is recorded, not fatal
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            row["candidates"].append(entry)
        timed = [c for c in row["candidates"] if "seconds" in c]
        if timed:
            row["best"] = min(timed, key=lambda c: c["seconds"])
            row["default_seconds"] = row["candidates"][0].get("seconds")
        rows.append(row)
        del calls
        if not compile_only:
            write(out, results, bucket_winners(rows), device)
    return results


def bucket_winners(rows: list[dict]) -> dict:
    """The tuned table from a sweep's rows: per kernel/regime and bucket, the candidate whose times summed over
    every case of that bucket are least (the config that costs a step launching each of those cases once the
    least), among the candidates that ran in all of them. A bucket whose cases share no such candidate gets no
    entry: the launch keeps its list's first config rather than one never timed on a case it serves."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("best"):
            grouped.setdefault((row["kernel"], row["bucket"]), []).append(row)
    table: dict = {}
    for (key, bucket), members in grouped.items():
        timed = [{_candidate_key(c): c for c in row["candidates"] if "seconds" in c} for row in members]
        everywhere = set(timed[0]).intersection(*timed[1:])
        totals = {name: sum(row[name]["seconds"] for row in timed) for name in everywhere}
        if not totals:
            continue
        best = min(sorted(totals), key=totals.__getitem__)
        entry = {k: timed[0][best][k] for k in ("kwargs", "num_warps", "num_stages")}
        entry["seconds"] = totals[best]
        entry["cases"] = [row["case"] for row in members]
        table.setdefault(key, {})[bucket] = entry
    return table


def write(out: Path, results: dict, table: dict, device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    document = {
        "about": "Kernel configs chosen by python -m bench.tune: per device name, kernel/regime and shape bucket "
                 "(sizes rounded up to a power of two), the candidate fastest over the bucket's cases: its config, "
                 "its median seconds summed over those cases, and their names.",
        "runs": {results["device"]: {k: meta[k] for k in ("date", "commit", "command", "torch", "triton")}},
        "configs": {results["device"]: table} if table else {},
    }
    for name, payload in (("tuned_configs.json", document), ("results.json", results)):
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, out / name)


def install(path: Path, into: Path = tuning.TABLE) -> dict:
    """Merge a sweep's ``tuned_configs.json`` into the committed table (its device's entries replaced)."""
    new = json.loads(path.read_text())
    old = json.loads(into.read_text()) if into.exists() else {"about": new["about"], "runs": {}, "configs": {}}
    old["about"] = new["about"]
    for device, run in new["runs"].items():
        old["runs"][device] = run
        old["configs"][device] = new["configs"].get(device, {})
    into.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    return old


def compile_in_children(argv: list[str], jobs: int, deadline: float) -> None:
    """``jobs`` children each compile every ``jobs``-th case's candidates into Triton's on-disk cache."""
    children = [subprocess.Popen([sys.executable, "-m", "bench.tune", *argv, "--compile-only", "--shard",
                                  f"{i}/{jobs}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for i in range(jobs)]
    for child in children:
        try:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def _config_key(kwargs: dict, warps: int, stages: int) -> str:
    return json.dumps([sorted(kwargs.items()), warps, stages])


def _candidate_key(candidate: dict) -> str:
    return _config_key(candidate["kwargs"], candidate["num_warps"], candidate["num_stages"])


def predict(path: Path, shape, tokens: int) -> dict:
    """The static model's price terms (``static.price_terms``: priced at any copy rate by ``static.seconds_at``)
    for every decode case and candidate config, from their compiled sm_90 code (a prefill's tiles are
    compute-bound, and a phased kernel's phase boundaries unknown: the model prices neither)."""
    from adallava_kernels.ops import common

    from . import static

    out = {}
    for case in cases(shape, torch.bfloat16, torch.device("cpu"), tokens):
        if case.regime != "decode" or case.kernel not in static.KERNELS:  # the phased kernels: not priced
            continue
        with static.capturing() as variants, static._triton_on_cpu(common):
            variants.site["name"], variants.site["extra"] = case.name, {"context": tokens}
            case.make()()
        mine = [v for v in variants if v.kernel == case.kernel]
        out[case.name] = {_config_key({k: v.args[k] for k in _kwargs_of(case) if k in v.args}, v.num_warps,
                                      v.num_stages):
                          static.price_terms(v) for v in mine}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def _kwargs_of(case: Case) -> set[str]:
    return set(candidates(case.kernel, case.regime)[0].kwargs)


def model_errors(predicted: dict, sweep: dict, copy_rate: float | None = None) -> dict:
    """Each swept candidate's measured time beside the model's at ``copy_rate`` (default the model's own) and the
    model's error (predicted / measured - 1); per kernel the median and the worst, over every candidate and over
    each case's chosen (fastest measured) config alone, which is what a step runs. ``predicted``: :func:`predict`'s
    terms, or seconds (files written before it kept terms, priced at the model's own rate)."""
    from . import static

    rate = static.COPY_RATE if copy_rate is None else copy_rate
    rows = []
    for row in sweep["cases"]:
        model = predicted.get(row["case"], {})
        timed = [c for c in row["candidates"] if "seconds" in c]
        fastest = min(timed, key=lambda c: c["seconds"], default=None)
        for c in timed:
            p = model.get(_candidate_key(c))
            if p is None:  # a prefill (compute-bound: not the model's), or a config the model did not see
                continue
            if not isinstance(p, (int, float)):
                p = static.seconds_at(p, rate)
            elif rate != static.COPY_RATE:
                raise ValueError(f"the predicted times of {row['case']!r} are seconds at the model's own copy rate, "
                                 f"not terms to price at {rate:.4g} B/s: write them again with --predict")
            config = ",".join(f"{k}={v}" for k, v in c["kwargs"].items()) + f" w{c['num_warps']} s{c['num_stages']}"
            rows.append({"case": row["case"], "kernel": row["kernel"], "config": config, "chosen": c is fastest,
                         "measured_s": c["seconds"], "predicted_s": p, "error": p / c["seconds"] - 1})
    kernels = {}
    for kernel in sorted({r["kernel"] for r in rows}):
        summary = {}
        for which, mine in (("candidates", [r for r in rows if r["kernel"] == kernel]),
                            ("chosen", [r for r in rows if r["kernel"] == kernel and r["chosen"]])):
            errors = sorted(r["error"] for r in mine)
            summary[which] = {"count": len(errors), "median": errors[len(errors) // 2] if errors else None,
                              "worst": max(errors, key=abs) if errors else None}
        kernels[kernel] = summary
    return {"rows": rows, "kernels": kernels, "copy_rate": rate}


def against(predicted_path: Path, sweep_path: Path, json_path: Path | None = None,
            copy_rate: float | None = None) -> str:
    """:func:`model_errors` of a ``--predict`` file and a sweep's ``results.json`` as a table (and as JSON in
    ``json_path``)."""
    errors = model_errors(json.loads(predicted_path.read_text()), json.loads(sweep_path.read_text()), copy_rate)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(errors, indent=1))
    lines = [f"{'case':28s} {'config':40s} {'measured us':>11s} {'model us':>9s} {'error':>7s}"]
    for r in errors["rows"]:
        lines.append(f"{r['case']:28s} {r['config']:40s} {r['measured_s'] * 1e6:11.1f} {r['predicted_s'] * 1e6:9.1f} "
                     f"{r['error']:+7.1%}{'  chosen' if r['chosen'] else ''}")
    for kernel, summary in errors["kernels"].items():
        every, chosen = summary["candidates"], summary["chosen"]
        lines.append(f"{kernel}: median error {every['median']:+.1%}, worst {every['worst']:+.1%} over "
                     f"{every['count']} candidates; the chosen configs' worst {chosen['worst']:+.1%} over "
                     f"{chosen['count']} cases")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="shape preset (default llava-7b; tiny on a CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help=f"prefill tokens (default {PREFILL_TOKENS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"no case starts after this many seconds (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiling children before timing (default: min(8, cores - 2) on CUDA, 0 elsewhere)")
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    parser.add_argument("--match", default=None, metavar="TEXT",
                        help="only the cases whose name holds TEXT (e.g. 'b1', 'prefill')")
    parser.add_argument("--install", type=Path, default=None, metavar="TUNED_JSON",
                        help="merge a sweep's tuned_configs.json into the committed table and stop")
    parser.add_argument("--predict", type=Path, default=None, metavar="FILE",
                        help="write the static model's predicted time of every case and candidate (no GPU)")
    parser.add_argument("--against", nargs=2, type=Path, default=None, metavar=("PREDICTED", "SWEEP"),
                        help="compare a --predict file with a GPU sweep's results.json and stop")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="with --against: the comparison as JSON too")
    from . import static

    static.add_copy_rate_arguments(parser)  # with --against: the rate the model prices at
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.against is None and (args.copy_rate is not None or args.copy_from is not None):
        parser.error("--copy-rate and --copy-from price a comparison: give them with --against")
    args.priced_at = static.copy_rate(args, parser) if args.against is not None else None
    if args.install is None and args.against is None:
        args.device = checked_device(parser, args.device)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.tokens is not None and args.tokens < 1:
        parser.error(f"--tokens must be a positive int, got {args.tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.install is not None:
        table = install(args.install)
        print(f"installed {args.install} into {tuning.TABLE}: {sorted(table['configs'])}")
        return 0
    if args.against is not None:
        print(against(*args.against, args.json, args.priced_at))
        return 0
    if args.predict is not None:
        predict(args.predict, get_shape(args.model or "llava-7b"), args.tokens or PREFILL_TOKENS)
        print(f"wrote {args.predict}")
        return 0
    start = time.monotonic()
    deadline = start + args.budget_s
    device = args.device
    on_gpu = device.type == "cuda"
    if not on_gpu and not INTERPRETING:
        write(args.out, {"meta": metadata(device, torch.float32, "bench.tune"), "device": device_name(device),
                         "cases": [], "note": "no GPU and no TRITON_INTERPRET=1: nothing to tune"}, {}, device)
        print("bench.tune: no GPU and no TRITON_INTERPRET=1: nothing tuned; wrote an empty table")
        return 0
    shape = get_shape(args.model or ("llava-7b" if on_gpu else "tiny"))
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokens = args.tokens or (PREFILL_TOKENS if on_gpu else 20)
    batches = DECODE_BATCHES if on_gpu else (1,)
    case_list = [c for c in cases(shape, dtype, device, tokens, batches) if args.match is None or args.match in c.name]
    if not case_list:
        print(f"bench.tune: error: --match {args.match!r} names no case", file=sys.stderr)
        return 2
    if args.compile_only:
        index, count = (int(p) for p in args.shard.split("/"))
        sweep(case_list[index::count], device, args.out, deadline, args.quick, compile_only=True)
        return 0
    jobs = args.jobs if args.jobs is not None else (max(0, min(8, (os.cpu_count() or 2) - 2)) if on_gpu else 0)
    if jobs:
        compile_in_children([a for a in argv if a != "--compile-only"], jobs, start + 0.6 * args.budget_s)
    torch.manual_seed(0)
    results = sweep(case_list, device, args.out, deadline, args.quick)
    for row in results["cases"]:
        best, first = row.get("best"), row.get("default_seconds")
        if best:
            gain = f", {first / best['seconds']:.2f}x the first config" if first else ""
            print(f"{row['case']:28s} {row['bucket']:40s} best {best['seconds'] * 1e6:9.1f} us "
                  f"{best['kwargs']} w{best['num_warps']} s{best['num_stages']}{gain}")
        else:
            print(f"{row['case']:28s} no candidate ran")
    if results.get("skipped"):
        print(f"not reached within the budget: {', '.join(results['skipped'])}")
    print(f"wrote {args.out / 'tuned_configs.json'} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
