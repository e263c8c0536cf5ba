"""A dispatch mode that records the name of every aten (or custom) op run under it."""

from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
