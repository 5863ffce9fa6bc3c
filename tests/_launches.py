"""Counting what a call launches: Triton kernels, and the aten ops that would each be a GPU kernel.

``launches()`` records, while active:
  * ``triton``: the name of every Triton kernel launched (``JITFunction.run`` on a GPU,
    ``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``; the interpreter's own host copies of
    the arguments are not counted);
  * ``aten``: every aten op dispatched (a ``TorchDispatchMode``; the package's custom ops are entered,
    so the ops inside their Python bodies are seen), split into ``allocations`` (``empty*``: no kernel
    on a GPU, a caching-allocator call), ``views`` (metadata only) and ``kernels`` (everything else:
    one GPU launch each, a few microseconds apiece at small sizes).
Works on CPU tensors under the interpreter and on CUDA tensors alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
VIEWS = {
    "detach",
    "view",
    "_unsafe_view",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "expand",
    "as_strided",
    "alias",
    "_reshape_alias",
    "unbind",
    "split",
    "chunk",
    "narrow",
    "diagonal",
}


@dataclass
class Launches:
    triton: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)

    @property
    def allocations(self) -> list[str]:
        return [n for n in self.aten if n.split(".")[1] in ALLOCATIONS]

    @property
    def views(self) -> list[str]:
        return [n for n in self.aten if n.split(".")[1] in VIEWS]

    @property
    def kernels(self) -> list[str]:
        return [n for n in self.aten if n.split(".")[1] not in ALLOCATIONS | VIEWS]


class _Mode(TorchDispatchMode):
    def __init__(self, record: Launches):
        super().__init__()
        self.record, self.paused = record, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{name}") if func.namespace == "lotus_kernels" else None
        if opdef is not None:
            with self:  # run the op's own Python body under this mode
                return opdef._init_fn(*args, **kwargs)
        if not self.paused:
            self.record.aten.append(f"{func.namespace}.{name}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def launches():
    """Yields a ``Launches`` filled by what runs inside the block (see the module docstring)."""
    from triton.runtime import interpreter, jit

    record = Launches()
    mode = _Mode(record)
    patched = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]

    def counting(orig):
        def run(fn, *args, **kwargs):
            if kwargs.get("warmup"):
                return orig(fn, *args, **kwargs)
            record.triton.append(fn.fn.__name__ if hasattr(fn, "fn") else str(fn))
            mode.paused = True  # the interpreter copies arguments to and from the host: not launches
            try:
                return orig(fn, *args, **kwargs)
            finally:
                mode.paused = False

        return run

    try:
        for cls, orig in patched:
            cls.run = counting(orig)
        with mode:
            yield record
    finally:
        for cls, orig in patched:
            cls.run = orig
