"""Argument checks shared by the ops. Each op validates once, before dispatch, so every backend
refuses bad input the same way; messages name the argument and say what was expected."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected a tensor on {first.device} (like {first_name}), got one on {t.device}")


def same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n}: expected dtype {first.dtype} (like {first_name}), got {t.dtype}")


def index_tensor(name: str, idx, *, batch: int, batch_name: str) -> None:
    """``idx`` [B, K] int64 with B == ``batch`` and K >= 1 (values are checked by ``index_range``)."""
    tensor(name, idx, ndim=2)
    if idx.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 index tensor, got {str(idx.dtype).replace('torch.', '')}")
    if idx.shape[0] != batch:
        raise ValueError(f"{name}: batch size {idx.shape[0]} does not match {batch_name}'s batch size {batch}")
    if idx.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one index per row (K >= 1), got K = 0")


def host_reads_are_free(device: torch.device) -> bool:
    """Whether a value check may read the tensor on the host: on the CPU it costs nothing, on a GPU
    it waits for the whole queue (and forbids CUDA graphs). ``LOTUS_KERNELS_SYNC_CHECKS=1`` makes the
    GPU checks read too (exact messages with the offending value, at the cost of a sync). Tests patch
    this to run the GPU code path of the checks on CPU tensors."""
    return device.type == "cpu" or os.environ.get(ENV_SYNC_CHECKS) == "1"


ENV_SYNC_CHECKS = "LOTUS_KERNELS_SYNC_CHECKS"


def device_assert(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` where ``ok`` (a 0-d bool tensor) is False, without reading it back: on a
    GPU a device-side assert (torch's CUDA kernel takes messages under 255 bytes), on the CPU at once."""
    torch._assert_async(ok, message[:250])


def version(t: torch.Tensor) -> int | None:
    """``t._version`` (bumped by every in-place write), or None for an inference tensor: tensors made
    under ``torch.inference_mode`` keep no version counter, so nothing may be cached against them."""
    return None if t.is_inference() else t._version


def _stamp(t: torch.Tensor):
    """(version, data pointer, shape) of ``t``: changes with any in-place write or new storage; None
    where ``t`` has no version counter (checked on every call instead)."""
    v = version(t)
    return None if v is None else (v, t.data_ptr(), tuple(t.shape))


def index_range(name: str, idx: torch.Tensor, n: int) -> None:
    """Every index in [0, n): kernels index memory with them, so an out-of-range value would otherwise
    be a crash or a silent wrong answer.

    Remembered per index tensor (until it is written in place): a keep index used by the patch
    embedding, its backward and every gather of a step is checked once. Where host reads are free
    (CPU) the values are read and a bad one is named; on a GPU the check runs on the device
    (``torch._assert_async``: no host sync, the stream fails at the next sync point like torch's own
    indexing kernels do)."""
    if idx.numel() == 0:
        return
    stamp = _stamp(idx)
    seen = getattr(idx, "_lotus_range", None)
    if stamp is not None and seen is not None and seen[0] == stamp and n >= seen[1]:
        return  # this exact tensor already passed a check with a bound <= n
    if host_reads_are_free(idx.device):
        lo, hi = torch.aminmax(idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name}: index {bad} is out of range; expected values in [0, {n})")
        ok_n = hi + 1
    else:
        lo, hi = torch.aminmax(idx)
        device_assert(
            (lo >= 0) & (hi < n),
            f"{name}: an index is out of range; expected values in [0, {n}) "
            f"(set {ENV_SYNC_CHECKS}=1 to have the bad value named)",
        )
        ok_n = n
    if stamp is None:
        return
    try:
        idx._lotus_range = (stamp, ok_n)
    except (AttributeError, RuntimeError):  # a tensor subclass without a __dict__: check every time
        pass


def autocast_inputs(*tensors):
    """The floating tensors cast to the autocast dtype when ``torch.autocast`` is on for their device,
    as autocast casts ``F.linear`` / SDPA inputs (float64 is left alone, as autocast does). A
    ``register_autocast`` rule would fix one dtype per device; this follows the context's dtype.
    Called by the public op wrappers before the checks, so the ops see one dtype."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        for t in tensors
    )
