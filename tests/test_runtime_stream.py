"""A stateful random test of the serving runtime: one PlannedDecoder, one running DecodeBatch, random rules.

Requests under -L, -H, full and distinct random plans are admitted (or refused: the pool is small),
given plans, prefilled in left-padded groups (some planned mid-prefill), and join, leave, step and are
freed in any order on one running batch of a fixed capacity, which is sometimes closed and reopened over
the same buffers. Bad joins, leaves, steps and calls are refused with a ``ValueError`` that names the
sequence or the problem, and change nothing.

Checked after every rule, on the torch backend (the CPU's path), eagerly and through the CUDA-graph
stand-in (tests/_graphs.py):

- every row of every step decodes as its request decoded alone under its own plan (tokens exactly, the
  logits within the float32 tolerance), whatever joined or left around it; the prefill's logits too;
- the batch's rows are the model's, in the order leave() documents (the last row moves into the hole);
- the pool's pages in use are the sum of the live reservations, no page is held twice, each sequence not
  in the batch has stored the positions the model says, and once everything is freed no page is in use;
- a step's outputs are the caller's (later rules leave them as they were);
- with graphs, one capture per bucket of rows, whatever the plans, and a replay for every other step.
"""

import gc
import re

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from adallava_kernels import ExecutionPlan
from adallava_kernels.runtime.slots import bucket_of
from adallava_kernels.testing import assert_close

from _graphs import FreedTensorRead
from test_runtime import (  # noqa: F401 (model: the tiny Llama fixture)
    LAYERS, PLAN_H, PLAN_H2, PLAN_L, SHAPE, VOCAB, admit_and_prefill, decode_alone, distinct_h_plans, equal_new,
    model, prompts, stream_runner,
)

CAPACITY = 4  # rows of the running batch: buckets 1, 2 and 4
BATCH_MAX_TOKENS = 16  # its tables: 4 pages of 4 positions; a request of more max_tokens cannot join
NUM_PAGES = 128  # a full plan of 16 positions takes 32 (4 layers x 2 KV heads x 4 pages): admissions get refused
MAX_PROMPT, MAX_ROOM = 9, 12  # max_tokens = prompt + room (past BATCH_MAX_TOKENS only for long prompts)
MAX_REQUESTS = 7  # admitted at once (admit is not drawn past them)
PROMPTS = prompts(batch=2, length=MAX_PROMPT)[0]  # a prompt is the first L ids of one of these rows

FULL = ExecutionPlan.full(SHAPE)
PLANS = [FULL, PLAN_L, ExecutionPlan.from_layer_mask([1, 0, 1, 1], SHAPE), PLAN_H, PLAN_H2,
         *distinct_h_plans(3, seed=7)]
# What a planner may give after layer 2 to a request admitted for any plan: layers 0 and 1 as they ran (whole).
AFTER_PREFIX = [i for i, p in enumerate(PLANS) if p.heads[:2] == FULL.heads[:2] and p.neurons[:2] == FULL.neurons[:2]]
PLAN_AFTER = 2

# Per (plan, prompt): the logits [MAX_ROOM + 1, vocab] of the request decoded alone (the prefill's, then one per
# step, each step fed the greedy token), made once for the whole module.
_ALONE: dict[tuple[int, int, int], torch.Tensor] = {}


def alone(model, plan: int, prompt: tuple[int, int]) -> torch.Tensor:
    key = (plan, *prompt)
    if key not in _ALONE:
        k, length = prompt
        _ALONE[key] = decode_alone(model, "torch", PLANS[plan], PROMPTS[k, :length], MAX_ROOM + 1)
    return _ALONE[key]


class Req:
    """The model of one admitted request."""

    def __init__(self, plan: int | None, obj, prompt: tuple[int, int], max_tokens: int):
        self.plan = plan  # index into PLANS; None: admitted for any plan (runs the full plan until given one)
        self.obj = obj  # the plan object the runner holds (None for any plan)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.prefilled = False
        self.length = 0  # positions stored (the padded prompt, then one per step)
        self.generated = 0  # steps decoded: the next output is alone(...)[generated + 1]

    @property
    def effective(self) -> int:
        return 0 if self.plan is None else self.plan


def same(a, b) -> bool:
    """Equal, tensors bit for bit, through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class RuntimeStream(RuleBasedStateMachine):
    def __init__(self, model, graphs: bool):
        super().__init__()
        self.model, self.graphs = model, graphs
        self.runner, _ = stream_runner(model, "torch", graphs, num_pages=NUM_PAGES)
        self.batch = self.runner.decode(capacity=CAPACITY, max_tokens=BATCH_MAX_TOKENS)
        self.requests: dict[str, Req] = {}
        self.rows: list[str] = []  # the batch's rows, in their order
        self.waiting: set[str] = set()  # rows that joined without a token and have not been given one
        self.freed: list[str] = []
        self.count = 0
        self.outputs: list[tuple] = []  # (logits, tokens, their copies) of the latest steps: the caller's
        self.graph_keys: set = set()
        self.steps = 0  # steps taken
        self.steps_here = 0  # steps taken by the open batch

    # -- the model ---------------------------------------------------------------------------------

    def alone(self, seq_id: str) -> torch.Tensor:
        req = self.requests[seq_id]
        return alone(self.model, req.effective, req.prompt)

    def next_token(self, seq_id: str) -> torch.Tensor:
        """The input the request feeds next: its latest greedy token, as decoded alone."""
        return self.alone(seq_id)[self.requests[seq_id].generated].argmax(-1).view(1)

    def unprefilled(self) -> list[str]:
        return [s for s, r in self.requests.items() if not r.prefilled]

    def idle(self) -> list[str]:
        """Prefilled requests that are not rows."""
        return [s for s, r in self.requests.items() if r.prefilled and s not in self.rows]

    def joinable(self) -> list[str]:
        return [s for s in self.idle() if self.requests[s].length < self.requests[s].max_tokens <= BATCH_MAX_TOKENS]

    def finished(self) -> list[str]:
        return [s for s in self.idle() if self.requests[s].length >= self.requests[s].max_tokens]

    def wide(self) -> list[str]:
        return [s for s in self.idle() if self.requests[s].length < self.requests[s].max_tokens
                and self.requests[s].max_tokens > BATCH_MAX_TOKENS]

    def full_rows(self) -> list[str]:
        return [s for s in self.rows if self.requests[s].length >= self.requests[s].max_tokens]

    def left(self, seq_ids) -> None:
        """``seq_ids`` leave the model's batch as DecodeBatch.leave documents: the last row moves into the hole."""
        for seq_id in seq_ids:
            row = self.rows.index(seq_id)
            last = self.rows.pop()
            if row < len(self.rows):
                self.rows[row] = last
            self.waiting.discard(seq_id)

    def snapshot(self):
        """Everything a refused call must leave as it was."""
        runner, batch, cache = self.runner, self.batch, self.runner.cache
        slots = batch.slots
        buffers = {name: t.clone() for name, t in vars(slots).items() if isinstance(t, torch.Tensor)}
        if slots.index is not None:
            buffers.update({f"index.{name}": t.clone() for name, t in vars(slots.index).items()})
        requests = {s: (r.plan, r.max_tokens, r.prefilled, r.length, r.batch is batch, r.batch is None)
                    for s, r in runner._requests.items()}
        pool = (cache.pages.clone(), cache.pages_in_use, cache.sequences,
                {s: [cache.page_lists(s, layer) for layer in range(LAYERS)] for s in cache.sequences},
                {s: [cache.length(s, layer) for layer in range(LAYERS)] for s in cache.sequences})
        rows = (list(batch.seq_ids), batch.steps, set(batch._waiting), {s: batch.length(s) for s in batch.seq_ids})
        graphs = None if runner.graphs is None else runner.graphs.stats.as_dict()
        return buffers, requests, pool, rows, graphs

    def refused(self, call, match: str):
        """``call`` raises a ``ValueError`` matching ``match`` and changes nothing; returns the match."""
        before = self.snapshot()
        with pytest.raises(ValueError, match=match) as error:
            call()
        after = self.snapshot()
        for name, b, a in zip(("the batch's buffers", "the requests", "the pool", "the rows", "the graphs"),
                              before, after):
            assert same(b, a), f"refused ({match}) but changed {name}"
        return re.search(match, str(error.value))

    # -- requests ------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def serving(self, data):
        """Start serving: a few requests admitted (or refused), prefilled one by one, joined while they fit, and
        a few steps."""
        for _ in range(data.draw(st.integers(3, 6), label="requests")):
            self.admit(data, data.draw(st.sampled_from(range(len(PLANS))), label="plan"))
        for seq_id in self.unprefilled():
            self.prefill_group(data, [seq_id])
        while self.joinable() and len(self.rows) < CAPACITY:
            self.join(data)
        if self.rows:
            self.decode(data)

    @precondition(lambda self: len(self.requests) < MAX_REQUESTS)
    @rule(data=st.data(), plan=st.sampled_from(range(len(PLANS))))
    def admit(self, data, plan):
        """A request under a plan (or for any plan), a prompt and max_tokens; refused when its pages are not free."""
        for_any = data.draw(st.booleans(), label="admitted for any plan")
        obj = None if for_any else (equal_new(PLANS[plan]) if data.draw(st.booleans(), label="new object")
                                    else PLANS[plan])
        k = data.draw(st.integers(0, PROMPTS.shape[0] - 1), label="prompt row")
        length = data.draw(st.integers(1, MAX_PROMPT), label="prompt length")
        max_tokens = length + data.draw(st.integers(0, MAX_ROOM), label="room")
        if self.freed and data.draw(st.booleans(), label="reuse a freed id"):
            seq_id = data.draw(st.sampled_from(self.freed), label="freed id")
        else:
            seq_id, self.count = f"q{self.count}", self.count + 1
        runner = self.runner
        needed, free = runner.pages_for(obj, max_tokens), runner.cache.pages_free
        if needed > free:
            self.refused(lambda: runner.admit(seq_id, obj, max_tokens), re.escape(
                f"KV pool exhausted: sequence {seq_id!r} needs {needed} pages for {max_tokens} positions under its "
                f"plan, {free} of {NUM_PAGES} are free"))
            return
        runner.admit(seq_id, obj, max_tokens)
        if seq_id in self.freed:
            self.freed.remove(seq_id)
        self.requests[seq_id] = Req(None if for_any else plan, obj, (k, length), max_tokens)
        assert runner.plan(seq_id) is obj

    @precondition(lambda self: self.unprefilled())
    @rule(data=st.data(), plan=st.sampled_from(range(len(PLANS))))
    def set_plan(self, data, plan):
        seq_id = data.draw(st.sampled_from(self.unprefilled()), label="sequence")
        req, runner, obj = self.requests[seq_id], self.runner, PLANS[plan]
        more = runner.pages_for(obj, req.max_tokens) - runner.pages_for(req.obj, req.max_tokens)
        free = runner.cache.pages_free
        if more > free:
            self.refused(lambda: runner.set_plan(seq_id, obj), re.escape(
                f"KV pool exhausted: the new plan of sequence {seq_id!r} needs {more} more pages, {free} of "
                f"{NUM_PAGES} are free"))
            return
        runner.set_plan(seq_id, obj)
        req.plan, req.obj = plan, obj
        assert runner.plan(seq_id) is obj

    @precondition(lambda self: self.unprefilled())
    @rule(data=st.data())
    def prefill(self, data):
        """A left-padded group of prompts of different lengths; a group admitted for any plan sometimes gets
        its plans from a planner after layer 2."""
        seq_ids = data.draw(st.lists(st.sampled_from(self.unprefilled()), min_size=1, max_size=3, unique=True),
                            label="group")
        self.prefill_group(data, seq_ids)

    def prefill_group(self, data, seq_ids):
        reqs = [self.requests[s] for s in seq_ids]
        width = max(r.prompt[1] for r in reqs)
        ids = torch.zeros(len(reqs), width, dtype=torch.long)
        mask = torch.zeros(len(reqs), width, dtype=torch.long)
        for b, r in enumerate(reqs):
            k, length = r.prompt
            ids[b, width - length:] = PROMPTS[k, :length]
            mask[b, width - length:] = 1
        if bool(mask.all()) and data.draw(st.booleans(), label="no mask"):
            mask = None
        runner = self.runner
        embeds = runner.weights.embed[ids]
        planned = None
        if any(r.plan is None for r in reqs) and data.draw(st.booleans(), label="planner"):
            planned = [data.draw(st.sampled_from(AFTER_PREFIX), label="planned") if r.plan is None else None
                       for r in reqs]
            plans = [r.obj if p is None else PLANS[p] for r, p in zip(reqs, planned)]
            kwargs = dict(planner=lambda h: plans, plan_after=PLAN_AFTER)
        else:
            kwargs = {}
        too_long = [(s, r) for s, r in zip(seq_ids, reqs) if width > r.max_tokens]
        if too_long:
            s, r = too_long[0]
            self.refused(lambda: runner.prefill(seq_ids, embeds, mask, **kwargs), re.escape(
                f"sequence {s!r}: a prompt of {width} positions exceeds its max_tokens {r.max_tokens}"))
            return
        logits = runner.prefill(seq_ids, embeds, mask, **kwargs)
        assert logits.shape == (len(reqs), 1, VOCAB)
        for b, (s, r) in enumerate(zip(seq_ids, reqs)):
            if planned is not None and planned[b] is not None:
                r.plan, r.obj = planned[b], PLANS[planned[b]]
            assert runner.plan(s) is r.obj
            r.prefilled, r.length = True, width
            expected = self.alone(s)[0]
            assert logits[b, -1].argmax() == expected.argmax(), f"{s}: the prefill's token is not alone's"
            assert_close(logits[b, -1], expected, torch.float32)

    @precondition(lambda self: len(self.requests) > 2)
    @rule(data=st.data())
    def free(self, data):
        """Any request; a row leaves the batch first (runner.free), the others' rows then moved as leave moves
        them."""
        seq_id = data.draw(st.sampled_from(sorted(self.requests)), label="sequence")
        if seq_id in self.rows:
            self.left([seq_id])
        self.runner.free(seq_id)
        del self.requests[seq_id]
        self.freed.append(seq_id)
        assert seq_id not in self.batch.seq_ids

    # -- the running batch -------------------------------------------------------------------------------

    @precondition(lambda self: self.joinable() and len(self.rows) < CAPACITY)
    @rule(data=st.data())
    def join(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.joinable()), min_size=1, max_size=CAPACITY - len(self.rows),
                                     unique=True), label="joining")
        with_tokens = data.draw(st.booleans(), label="with tokens")
        tokens = torch.cat([self.next_token(s) for s in seq_ids]) if with_tokens else None
        self.batch.join(seq_ids, tokens)
        self.rows += seq_ids
        if not with_tokens:
            self.waiting.update(seq_ids)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def leave(self, data):
        seq_ids = data.draw(st.lists(st.sampled_from(self.rows), min_size=1, max_size=len(self.rows), unique=True),
                            label="leaving")
        self.batch.leave(seq_ids)
        self.left(seq_ids)

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def decode(self, data):
        """One to four steps (the union sometimes prepared first): tokens given (needed after a join without them)
        or each row's own greedy token; each row's output is its request's alone, at its position. A row past its
        reservation refuses the step (then the full rows leave)."""
        if data.draw(st.booleans(), label="prepare"):
            self.batch.prepare()
        for _ in range(data.draw(st.integers(1, 4), label="steps")):
            if not self.step_once(data):
                break

    def step_once(self, data) -> bool:
        batch, rows = self.batch, len(self.rows)
        with_tokens = bool(self.waiting) or data.draw(st.booleans(), label="with tokens")
        tokens = torch.cat([self.next_token(s) for s in self.rows]) if with_tokens else None
        full = self.full_rows()
        if full:
            found = self.refused(lambda: batch.step(tokens), r"sequence '(\w+)' is full: (\d+) positions stored of "
                                 r"the (\d+) reserved by admit; let it leave")
            seq_id = found.group(1)
            assert seq_id in full and int(found.group(2)) == self.requests[seq_id].length == int(found.group(3))
            # As a server does: the full rows leave, the others go on.
            batch.leave(full)
            self.left(full)
            return bool(self.rows)
        out = None
        if data.draw(st.booleans(), label="out"):
            out = torch.full((rows, VOCAB), float("nan")), torch.full((rows,), -1, dtype=torch.long)
        key = batch.graph_key
        assert key == (batch.slots.id, bucket_of(rows))
        result = batch.step(tokens, out=out)
        if out is not None:
            assert result is out
        logits, next_tokens = result
        assert logits.shape == (rows, VOCAB) and next_tokens.shape == (rows,)
        for row, seq_id in enumerate(self.rows):
            req = self.requests[seq_id]
            expected = self.alone(seq_id)[req.generated + 1]
            assert next_tokens[row] == expected.argmax(), (
                f"{seq_id} (row {row} of {self.rows}) step {req.generated + 1}: token {int(next_tokens[row])}, "
                f"alone {int(expected.argmax())}")
            assert_close(logits[row], expected, torch.float32)
            req.generated += 1
            req.length += 1
        self.waiting.clear()
        self.graph_keys.add(key)
        self.steps += 1
        self.steps_here += 1
        self.outputs = self.outputs[-2:] + [(logits, next_tokens, logits.clone(), next_tokens.clone())]
        self.check_outputs()
        return True

    @precondition(lambda self: self.steps_here >= 3)
    @rule(data=st.data(), with_tokens=st.booleans())
    def reopen(self, data, with_tokens):
        """Close the batch (every row leaves, in row order) and open another of its capacity and width: it takes
        the same buffers, cleared (and, with graphs, the graphs captured over them)."""
        old, slots = self.batch, self.batch.slots
        old.close()
        self.rows, self.waiting, self.steps_here = [], set(), 0
        assert not bool(slots.live.any()) and bool((slots.model_tables == self.runner.cache.scratch_page).all())
        for call in (old.step, old.prepare):
            with pytest.raises(ValueError, match="the batch is closed"):
                call()
        # The buffers own the views their graphs read: once the closed batch is collected, the next batch's
        # replays still read live memory (the stand-in would raise FreedTensorRead otherwise).
        self.batch = call = None
        del old
        gc.collect()
        joining = data.draw(st.lists(st.sampled_from(self.joinable()), max_size=CAPACITY, unique=True)
                            if self.joinable() else st.just([]), label="joining")
        with_tokens = bool(joining) and with_tokens
        tokens = torch.cat([self.next_token(s) for s in joining]) if with_tokens else None
        if joining:
            self.batch = self.runner.decode(joining, tokens, capacity=CAPACITY, max_tokens=BATCH_MAX_TOKENS)
        else:
            self.batch = self.runner.decode(capacity=CAPACITY, max_tokens=BATCH_MAX_TOKENS)
        assert self.batch.slots is slots
        self.rows = list(joining)
        if not with_tokens:
            self.waiting.update(joining)

    # -- bad calls: refused, naming the sequence or the problem, and changing nothing -----------------------

    @rule(data=st.data(), area=st.sampled_from(["join", "leave", "step", "request"]))
    def bad_call(self, data, area):
        """Every bad join, leave, step or call on the runner that the state allows (one rule, so that the good
        ones are drawn often)."""
        for kind in getattr(self, f"_bad_{area}_kinds")():
            getattr(self, f"_bad_{area}")(data, kind)

    def _bad_join_kinds(self) -> list[str]:
        joinable = self.joinable()
        return [kind for kind, possible in [
            ("unknown", True), ("freed", self.freed), ("unprefilled", self.unprefilled()),
            ("finished", self.finished()), ("row", self.rows), ("wide", self.wide()), ("repeated", self.requests),
            ("batch full", len(self.rows) + len(joinable) > CAPACITY),
            ("tokens", joinable and len(self.rows) < CAPACITY)] if possible]

    def _bad_join(self, data, kind):
        batch, joinable = self.batch, self.joinable()
        # Good joiners beside the bad one: they must not join either.
        others = data.draw(st.lists(st.sampled_from(joinable), max_size=2, unique=True) if joinable
                           else st.just([]), label="others")
        pick = lambda ids: data.draw(st.sampled_from(ids), label=f"{kind} id")  # noqa: E731
        tokens = None
        if kind in ("unknown", "freed"):
            bad = f"never{self.count}" if kind == "unknown" else pick(self.freed)
            match = f"sequence {bad!r} is not admitted"
        elif kind == "unprefilled":
            bad = pick(self.unprefilled())
            match = f"sequence {bad!r} has not run its prefill"
        elif kind == "finished":
            bad = pick(self.finished())
            req = self.requests[bad]
            match = f"sequence {bad!r} is full: {req.length} positions stored of the {req.max_tokens} reserved by admit"
        elif kind == "row":
            bad = pick(self.rows)
            match = f"sequence {bad!r} is already a row of this batch"
        elif kind == "wide":
            bad = pick(self.wide())
            pages = -(-self.requests[bad].max_tokens // self.runner.cache.page_size)
            match = (f"sequence {bad!r} reserves {pages} pages per KV head, more than the batch's tables hold "
                     f"({self.batch.width})")
        elif kind == "repeated":
            bad = pick(sorted(self.requests))
            seq_ids = [s for s in others if s != bad] + [bad, bad]
            match = f"seq_ids must not repeat a sequence, got {seq_ids!r}"
        elif kind == "batch full":
            seq_ids = data.draw(st.lists(st.sampled_from(joinable), min_size=CAPACITY - len(self.rows) + 1,
                                         max_size=len(joinable), unique=True), label="joining")
            match = f"the batch is full: {len(self.rows)} rows of {CAPACITY}, {len(seq_ids)} joining"
            if data.draw(st.booleans(), label="with tokens"):
                tokens = torch.cat([self.next_token(s) for s in seq_ids])
        else:  # tokens
            seq_ids = data.draw(st.lists(st.sampled_from(joinable), min_size=1, max_size=CAPACITY - len(self.rows),
                                         unique=True), label="joining")
            good = torch.cat([self.next_token(s) for s in seq_ids])
            problem = data.draw(st.sampled_from(["dtype", "count", "2-D"]), label="problem")
            if problem == "dtype":
                tokens, match = good.int(), "tokens must have dtype in ['torch.int64'], got torch.int32"
            elif problem == "count":
                tokens = torch.cat([good, good[:1]])
                match = f"tokens must have one entry per row ({len(seq_ids)}), got {len(seq_ids) + 1}"
            else:
                tokens, match = good[:, None], f"tokens must be 1-D, got shape [{len(seq_ids)}, 1]"
        if kind not in ("repeated", "batch full", "tokens"):
            at = data.draw(st.integers(0, len(others)), label="position")
            seq_ids = others[:at] + [bad] + others[at:]
        self.refused(lambda: batch.join(seq_ids, tokens), re.escape(match))

    def _bad_leave_kinds(self) -> list[str]:
        return ["not a row"] + (["repeated"] if self.rows else [])

    def _bad_leave(self, data, kind):
        outside = sorted(set(self.requests) - set(self.rows)) + self.freed + [f"never{self.count}"]
        # Rows beside the bad one: they must not leave either.
        others = data.draw(st.lists(st.sampled_from(self.rows), max_size=len(self.rows), unique=True)
                           if self.rows else st.just([]), label="others")
        if kind == "not a row":
            bad = data.draw(st.sampled_from(outside), label="bad id")
            at = data.draw(st.integers(0, len(others)), label="position")
            seq_ids = others[:at] + [bad] + others[at:]
            match = f"sequence {bad!r} is not a row of this batch"
        else:
            bad = data.draw(st.sampled_from(self.rows), label="bad id")
            seq_ids = [s for s in others if s != bad] + [bad, bad]
            match = f"seq_ids must not repeat a sequence, got {seq_ids!r}"
        self.refused(lambda: self.batch.leave(seq_ids), re.escape(match))

    def _bad_step_kinds(self) -> list[str]:
        if not self.rows:
            return ["empty"]
        return ["dtype", "count", "2-D"] + (["waiting"] if self.waiting else []) + (
            ["out"] if not self.full_rows() else [])

    def _bad_step(self, data, kind):
        batch, rows = self.batch, len(self.rows)
        if kind == "empty":
            self.refused(batch.step, re.escape("the batch has no rows: join sequences first"))
            return
        if kind == "waiting":
            found = self.refused(batch.step, r"sequence '(\w+)' joined without a token: pass tokens")
            assert found.group(1) in self.waiting
            return
        good = torch.cat([self.next_token(s) for s in self.rows])
        out = None
        if kind == "dtype":
            tokens, match = good.int(), "tokens must have dtype in ['torch.int64'], got torch.int32"
        elif kind == "count":
            count = data.draw(st.sampled_from([n for n in (0, rows - 1, rows + 1) if n != rows]), label="count")
            tokens = good.repeat(2)[:count]
            match = f"tokens must have one entry per row ({rows}), got {count}"
        elif kind == "2-D":
            tokens, match = good[:, None], f"tokens must be 1-D, got shape [{rows}, 1]"
        else:  # out
            tokens = good
            out = torch.empty(rows, VOCAB), torch.empty(rows)
            match = f"out[1] must be a torch.int64 tensor of shape [{rows}] on cpu, got torch.float32 [{rows}] on cpu"
        self.refused(lambda: batch.step(tokens, out=out), re.escape(match))

    def _bad_request_kinds(self) -> list[str]:
        prefilled = any(r.prefilled for r in self.requests.values())
        return ["free unknown"] + (["admit again"] if self.requests else []) + (
            ["prefill again", "set_plan after prefill"] if prefilled else [])

    def _bad_request(self, data, kind):
        """Calls on the runner that its requests' states refuse."""
        runner = self.runner
        prefilled = [s for s, r in self.requests.items() if r.prefilled]
        if kind == "free unknown":
            bad = data.draw(st.sampled_from(self.freed + [f"never{self.count}"]), label="bad id")
            self.refused(lambda: runner.free(bad), re.escape(f"sequence {bad!r} is not admitted"))
        elif kind == "admit again":
            bad = data.draw(st.sampled_from(sorted(self.requests)), label="bad id")
            self.refused(lambda: runner.admit(bad, FULL, 4), re.escape(f"sequence {bad!r} is already admitted"))
        elif kind == "prefill again":
            bad = data.draw(st.sampled_from(prefilled), label="bad id")
            embeds = runner.weights.embed[PROMPTS[:1, :2]]
            self.refused(lambda: runner.prefill([bad], embeds),
                         re.escape(f"sequence {bad!r} has run its prefill already"))
        else:
            bad = data.draw(st.sampled_from(prefilled), label="bad id")
            self.refused(lambda: runner.set_plan(bad, PLAN_L),
                         re.escape(f"sequence {bad!r} has run its prefill: its plan is fixed"))

    # -- invariants ----------------------------------------------------------------------------------

    @invariant()
    def rows_are_the_models(self):
        batch, runner = self.batch, self.runner
        assert batch.seq_ids == self.rows and batch.rows == len(self.rows)
        assert batch.graph_key == (batch.slots.id, bucket_of(len(self.rows)))
        for seq_id in self.rows:
            assert batch.length(seq_id) == self.requests[seq_id].length, seq_id
        assert set(runner.sequences) == set(self.requests) == set(runner.cache.sequences)
        for seq_id, req in self.requests.items():
            request = runner._requests[seq_id]
            assert (request.prefilled, request.batch) == (req.prefilled, batch if seq_id in self.rows else None)

    @invariant()
    def pages_are_the_reservations(self):
        runner, cache = self.runner, self.runner.cache
        reserved = sum(runner.pages_for(r.obj, r.max_tokens) for r in self.requests.values())
        assert cache.pages_in_use == reserved and cache.pages_free == NUM_PAGES - reserved
        held = [page for s in self.requests for layer in range(LAYERS) for head in cache.page_lists(s, layer)
                for page in head]
        assert len(held) == len(set(held)) == reserved and cache.scratch_page not in held
        for seq_id, req in self.requests.items():
            plan = PLANS[req.effective]
            # A row's positions reach the pool when it leaves; the others' are the model's.
            if seq_id not in self.rows:
                assert [cache.length(seq_id, layer) for layer in range(LAYERS)] == [
                    req.length if plan.kv_heads(layer) else 0 for layer in range(LAYERS)], seq_id

    @invariant()
    def outputs_are_the_callers(self):
        self.check_outputs()

    def check_outputs(self):
        for logits, tokens, kept_logits, kept_tokens in self.outputs:
            assert torch.equal(logits, kept_logits) and torch.equal(tokens, kept_tokens)

    @invariant()
    def one_capture_per_bucket(self):
        if not self.graphs:
            assert self.runner.graph_stats() == {"enabled": False}
            return
        stats = self.runner.graphs.stats
        assert stats.captures == len(self.graph_keys) and stats.replays == self.steps - stats.captures
        assert {key[1] for key in self.graph_keys} <= {1, 2, 4}

    def teardown(self):
        """Everything freed: no page in use."""
        self.batch.close()
        for seq_id in list(self.requests):
            self.runner.free(seq_id)
        cache = self.runner.cache
        assert cache.pages_in_use == 0 and cache.pages_free == NUM_PAGES
        assert self.runner.sequences == () and cache.sequences == ()


SETTINGS = {
    False: settings(max_examples=100, stateful_step_count=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    # A replay through the stand-in records the step again (about 35 ms): fewer, shorter runs.
    True: settings(max_examples=20, stateful_step_count=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
}


@pytest.fixture
def one_thread():
    """The model is tiny: one thread (on a loaded 2-core machine two threads made a prefill up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("graphs", [False, True], ids=["torch", "torch-graphs"])
def test_random_streams_decode_every_row_as_alone(model, graphs, one_thread):
    run_state_machine_as_test(lambda: RuntimeStream(model, graphs), settings=SETTINGS[graphs])


# --- found by the machine: minimal repros, expected to fail until fixed ---------------------------------------


def test_a_batch_of_a_capacity_between_buckets_steps_every_row(model):
    runner, _ = stream_runner(model, "torch", False)
    ids, _ = prompts(batch=3)
    plans = [PLAN_H, PLAN_L, PLAN_H2]
    tokens = [admit_and_prefill(runner, f"r{b}", plan, ids[b], 16)[0] for b, plan in enumerate(plans)]
    batch = runner.decode(["r0", "r1", "r2"], torch.cat(tokens), capacity=3)
    logits, _ = batch.step()
    for b, plan in enumerate(plans):
        assert_close(logits[b], decode_alone(model, "torch", plan, ids[b], 2)[1], torch.float32)


def test_a_graph_outlives_the_batch_that_captured_it(model):
    runner, _ = stream_runner(model, "torch", True)
    ids = prompts()[0][0]
    token, _ = admit_and_prefill(runner, "a", PLAN_H, ids, 16)
    first = runner.decode(["a"], token)
    first.step()  # captured
    _, token = first.step()  # replayed
    slots = first.slots
    first.close()
    second = runner.decode(["a"])
    assert second.slots is slots
    del first
    gc.collect()
    logits, _ = second.step(token)  # replays the graph the first batch captured
    assert_close(logits[0], decode_alone(model, "torch", PLAN_H, ids, 4)[3], torch.float32)
    assert (runner.graphs.stats.captures, runner.graphs.stats.replays) == (1, 2)
