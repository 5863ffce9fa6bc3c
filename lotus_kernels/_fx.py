"""Symbolic tracing (``torch.fx``) of the lotus op wrappers and layers.

torch.fx runs Python code on ``Proxy`` objects in place of tensors. The public op wrappers check
their tensors (shapes, dtypes, devices) and apply autocast before they call the registered op,
which a Proxy cannot answer; while tracing they record themselves as one ``call_function`` node
instead (``record``), so the traced graph calls the wrapper, checks and autocast included, when it
runs. TorchScript compiles the same wrappers down to the registered op (their
``torch.jit.is_scripting()`` branch). See docs/design/fx_torchscript.md.
"""

from __future__ import annotations

import torch


def is_proxy(*values) -> bool:
    """Whether torch.fx is tracing: one of ``values`` is an fx ``Proxy``."""
    return any(isinstance(v, torch.fx.Proxy) for v in values)


def record(fn, *args):
    """A ``call_function`` node calling ``fn(*args)`` in the graph being traced (some arg is a Proxy)."""
    tracer = next(a.tracer for a in args if isinstance(a, torch.fx.Proxy))
    return tracer.create_proxy("call_function", fn, args, {})


def register_timm_leaf_modules(*classes) -> None:
    """Register ``classes`` with timm's FX helpers as modules not to trace through, so timm's feature
    extraction (``create_feature_extractor``, ``features_only=True, feature_cls="fx"``) keeps a sparse
    layer as one node named like the ``nn.Linear`` it replaced. Other tracers trace into the layer and
    record its op wrapper as one node. Nothing to do without timm."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:
        return
    for cls in classes:
        register_notrace_module(cls)
