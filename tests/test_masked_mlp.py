import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from adallava_kernels import BackendUnavailableError, ExecutionPlan, masked_mlp
from adallava_kernels.ops import common
from adallava_kernels.testing import assert_close

from _device import DEVICE, on_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def hf_mlp(hidden: int, intermediate: int) -> LlamaMLP:
    # One attention head: transformers checks that it divides hidden_size, the MLP never uses it.
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu",
        num_attention_heads=1, num_key_value_heads=1,
    )
    mlp = LlamaMLP(config)
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(linear.weight, std=hidden**-0.5)
    return mlp


def oracle(mlp: LlamaMLP, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaMLP in float64 with the down_proj columns of inactive neurons zeroed."""
    ref = hf_mlp(mlp.hidden_size, mlp.intermediate_size).double()
    ref.load_state_dict(mlp.state_dict())
    keep = torch.zeros(mlp.intermediate_size, dtype=torch.bool)
    keep[active.long()] = True
    with torch.no_grad():
        ref.down_proj.weight[:, ~keep] = 0
        return ref(x.double())


def run(mlp: LlamaMLP, x: torch.Tensor, active: torch.Tensor, dtype: torch.dtype, **kwargs) -> torch.Tensor:
    """The op on DEVICE, output back on the CPU."""
    weights = [m.weight.detach().to(dtype) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    return on_device(masked_mlp)(x.to(dtype), *weights, active, **kwargs)


def rounded(mlp: LlamaMLP, dtype: torch.dtype) -> LlamaMLP:
    """The module with weights rounded to ``dtype``, so the oracle sees the inputs the op sees."""
    with torch.no_grad():
        for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            m.weight.copy_(m.weight.to(dtype).float())
    return mlp


CASES = {
    # id: (batch, tokens, hidden, intermediate, active neurons or keep ratio)
    "B2-T123-H96-I200-r0.6": (2, 123, 96, 200, 0.6),
    "B1-T1-H96-I200-one": (1, 1, 96, 200, [137]),
    "B3-T7-H64-I130-all": (3, 7, 64, 130, 1.0),
    "B1-T17-H80-I111-r0.25": (1, 17, 80, 111, 0.25),
}


def active_set(intermediate: int, spec) -> torch.Tensor:
    if isinstance(spec, list):
        return torch.tensor(spec, dtype=torch.int32)
    count = round(spec * intermediate)
    return torch.randperm(intermediate)[:count].sort().values.to(torch.int32)


# The Triton backend runs under TRITON_INTERPRET=1 on a CPU (set in conftest.py).
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_llama_mlp_with_zeroed_columns(case, dtype, backend):
    batch, tokens, hidden, intermediate, spec = case
    mlp = rounded(hf_mlp(hidden, intermediate), dtype)
    x = torch.randn(batch, tokens, hidden).to(dtype)
    active = active_set(intermediate, spec)
    out = run(mlp, x, active, dtype, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, oracle(mlp, x, active))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_active_neuron_gives_zero(dtype, backend):
    mlp = hf_mlp(96, 200)
    x = torch.randn(2, 5, 96)
    out = run(mlp, x, torch.empty(0, dtype=torch.int32), dtype, backend=backend)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_int64_index(backend):
    mlp = hf_mlp(96, 200)
    x = torch.randn(96, 9, 4).permute(2, 1, 0)  # [4, 9, 96], strided
    assert not x.is_contiguous()
    active = active_set(200, 0.5).long()
    assert_close(run(mlp, x, active, torch.float32, backend=backend), oracle(mlp, x, active))


def test_plan_indices_drive_the_op():
    from adallava_kernels import ModelShape

    shape = ModelShape(96, 2, 4, 4, 24, 200, 10)
    switches = torch.zeros(2, 2, 4)
    switches[1, 1, [1, 3]] = 1  # groups 1 and 3 of 50 neurons
    layer = ExecutionPlan.from_switches(switches, shape).layer(1)
    mlp = hf_mlp(96, 200)
    x = torch.randn(3, 96)
    out = run(mlp, x, layer.neurons, torch.float32, check_indices=False)
    assert layer.neurons.tolist() == list(range(50, 100)) + list(range(150, 200))
    assert_close(out, oracle(mlp, x, layer.neurons))


# --- bad input -------------------------------------------------------------


def args(hidden=96, intermediate=200, dtype=torch.float32):
    return [
        torch.randn(3, hidden, dtype=dtype),
        torch.randn(intermediate, hidden, dtype=dtype),
        torch.randn(intermediate, hidden, dtype=dtype),
        torch.randn(hidden, intermediate, dtype=dtype),
        torch.tensor([0, 5, 9], dtype=torch.int32),
    ]


def with_arg(position, value):
    a = args()
    a[position] = value
    return a


@pytest.mark.parametrize(
    "call_args, error, match",
    [
        (with_arg(0, torch.randn(3, 95)), ValueError, "x has hidden size 95"),
        (with_arg(0, torch.randn(3, 96).double()), ValueError, "x must have dtype in"),
        (with_arg(1, torch.randn(200, 96).half()), ValueError, "w_gate has dtype torch.float16, but x has torch.float32"),
        (with_arg(2, torch.randn(199, 96)), ValueError, r"w_up must have shape \[200, 96\]"),
        (with_arg(3, torch.randn(200, 96)), ValueError, r"w_down must have shape \[96, 200\]"),
        (with_arg(3, torch.randn(96, 200, 1)), ValueError, "w_down must be 2-D"),
        (with_arg(4, torch.tensor([0, 200], dtype=torch.int32)), ValueError, r"active_neurons: index 200 out of range \[0, 200\)"),
        (with_arg(4, torch.tensor([-1, 3])), ValueError, r"active_neurons: index -1 out of range"),
        (with_arg(4, torch.tensor([3, 3])), ValueError, "active_neurons: index 3 is duplicated"),
        (with_arg(4, torch.tensor([4, 3])), ValueError, "active_neurons: must be sorted ascending: 4 comes before 3"),
        (with_arg(4, torch.tensor([1.0, 2.0])), ValueError, "active_neurons must have dtype in"),
        (with_arg(4, torch.tensor([[1, 2]])), ValueError, "active_neurons must be 1-D"),
        (with_arg(4, [1, 2]), TypeError, "active_neurons must be a torch.Tensor"),
        (with_arg(1, torch.randn(200, 96, device="meta")), ValueError, "w_gate must be on cpu, got meta"),
    ],
)
def test_bad_input(call_args, error, match):
    with pytest.raises(error, match=match):
        masked_mlp(*call_args)


def test_backend_convention(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_mlp(*args(), backend="cuda")
    monkeypatch.setattr(common, "INTERPRETING", False)
    with pytest.raises(BackendUnavailableError, match="Triton kernels run on CUDA tensors"):
        masked_mlp(*args(), backend="triton")
    # "auto" on CPU is the PyTorch reference.
    same = args()
    assert torch.equal(masked_mlp(*same, backend="auto"), masked_mlp(*same, backend="torch"))


# --- the nn.Module drop-in ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_follows_the_plan(backend):
    from adallava_kernels import ModelShape
    from adallava_kernels.modules import MaskedMLP

    shape = ModelShape(96, 2, 4, 4, 24, 200, 10)
    switches = torch.ones(2, 2, 4)
    switches[0, 1, [0, 2]] = 0
    plan = ExecutionPlan.from_switches(switches, shape)
    mlp = hf_mlp(96, 200)
    module = MaskedMLP.from_hf(mlp, backend=backend)
    assert module.down_weight.stride() == (1, 96)  # column-major: gathered columns are contiguous
    forward = on_device(module.to(DEVICE))
    x = torch.randn(2, 19, 96)
    with torch.no_grad():
        assert_close(forward(x), mlp(x).double())  # no plan yet: every neuron
        module.set_plan(plan.layer(0))
        assert_close(forward(x), oracle(mlp, x, plan.layer(0).neurons))
        module.set_plan(None)
        assert_close(forward(x), mlp(x).double())


def test_module_rejects_what_it_cannot_compute():
    from adallava_kernels import ModelShape
    from adallava_kernels.modules import MaskedMLP

    mlp = hf_mlp(96, 200)
    mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="act_fn must be SiLU, got GELU"):
        MaskedMLP.from_hf(mlp)
    mlp = hf_mlp(96, 200)
    mlp.up_proj = torch.nn.Linear(96, 200, bias=True)
    with pytest.raises(ValueError, match="mlp.up_proj has a bias"):
        MaskedMLP.from_hf(mlp)
    bigger = ExecutionPlan.full(ModelShape(96, 1, 4, 4, 24, 300, 10))
    with pytest.raises(ValueError, match="layer plan 0 is for a model with .*300 MLP neurons, but this MLP has 200"):
        MaskedMLP.from_hf(hf_mlp(96, 200)).set_plan(bigger.layer(0))
