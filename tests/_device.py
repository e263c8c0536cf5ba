"""Where the kernel tests run: the GPU when there is one, else the CPU (Triton under its interpreter).

Inputs are made on the CPU from the seeded generator, moved here, and the
outputs moved back to be compared with float64 oracles computed on the CPU.
"""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(*tensors):
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors)


def on_device(fn):
    """``fn`` run on DEVICE: tensor arguments moved there, the result (and any ``out``) brought back.

    An ``out`` tensor is copied back into the caller's, NaN poison included, so
    an element the kernel did not write still shows.
    """

    def call(*args, **kwargs):
        moved = {name: to_device(value)[0] for name, value in kwargs.items()}
        result = fn(*to_device(*args), **moved)
        out = kwargs.get("out")
        if out is not None:
            if moved["out"] is not out:
                out.copy_(moved["out"])
            return out
        return result.cpu()

    return call
