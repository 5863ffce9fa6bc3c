"""Counting host reads of tensor values: what makes a GPU training step wait for its queue.

``host_reads()`` lists, while active:
  * Python-level reads: ``Tensor.item / tolist / numpy`` and ``int / float / bool / index`` of a tensor;
  * dispatcher-level ones (a ``TorchDispatchMode``): ``aten._local_scalar_dense``, ops whose output
    size depends on the values (nonzero, masked_select, unique, bincount, ``repeat_interleave``
    without ``output_size``, boolean-mask indexing), value comparisons returning a Python bool
    (``equal``, ``is_nonzero``), and copies from a GPU to the CPU.
The mode enters the package's own custom ops (runs their Python body under the mode), so the checks
and launchers inside them are seen too. ``torch._assert_async`` is not a read: on a GPU it is a
device-side check (on the CPU it runs synchronously, where that costs nothing).
"""

from __future__ import annotations

import contextlib

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

_PY_READS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")
_SIZE_FROM_VALUES = {
    "nonzero",
    "masked_select",
    "unique_dim",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "bincount",
    "equal",
    "is_nonzero",
    "item",
    "_local_scalar_dense",
    "allclose",
}


class _Mode(TorchDispatchMode):
    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    # ------------------------------------------------------------ dispatcher-level reads
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SIZE_FROM_VALUES:
            self.reads.append(f"aten.{name}")
        elif (
            name == "repeat_interleave"
            and func._overloadname in ("Tensor", "self_Tensor")
            and kwargs.get("output_size") is None
        ):
            self.reads.append("aten.repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.reads.append(f"aten.{name} with a boolean mask")
        elif name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst_cpu = (
                (args[0].device.type == "cpu")
                if name == "copy_"
                else (torch.device(kwargs.get("device") or src.device).type == "cpu")
            )
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_cpu:
                self.reads.append(f"aten.{name} device -> host")
        opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{name}") if func.namespace == "lotus_kernels" else None
        if opdef is not None:
            with self:  # run the op's own Python body under this mode
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads():
    """Yields the list of host reads made inside the block (see the module docstring)."""
    reads: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _PY_READS}

    def patched(name, orig):
        def read(t, *a, **k):
            reads.append(f"Tensor.{name}")
            return orig(t, *a, **k)

        return read

    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, patched(name, orig))
        with _Mode(reads):
            yield reads
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
