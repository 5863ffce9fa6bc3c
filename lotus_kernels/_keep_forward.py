"""The ``forward`` of a patched model: the base class's forward plus the keyword-only keep arguments,
built so that tools which read a forward's signature or source see the base forward.

``keep_forward(base_forward)`` is ``forward(self, *args, keep_idx=None, keep_ratio=None, scores=None,
**kwargs)``, which calls ``self.forward_keep(args, kwargs, keep_idx, keep_ratio, scores)``; that runs
``base_forward`` when no keep argument is given. The function is a wrapper of ``base_forward`` in the
``functools.wraps`` sense (``__wrapped__`` points at it), and the tools follow that:

- torch.fx unwraps a root module's forward to find its inputs: a traced graph has exactly the base
  forward's inputs (no placeholder for a keep argument, which would make ``keep_idx is None`` false
  while tracing) and records the plain path. Calling the traced graph with ``keep_idx=`` is a
  ``TypeError``, never a silently ignored argument.
- TorchScript reads the unwrapped function's source: scripting compiles the base forward (keyword-only
  and variadic arguments cannot be compiled). The kept-patch path exists in eager mode and under
  torch.compile / torch.export only; ``KeptPatchesMixin.__prepare_scriptable__`` says so when a model
  is scripted. The function is built on ``base_forward.__globals__`` so that TorchScript resolves the
  names of that source in its own module; its own body refers to nothing but ``self``.
- ``__signature__`` is the full signature (the base parameters plus the keep arguments), so
  ``inspect.signature``, ``help`` and ``torch.export`` (which binds call arguments by signature) see
  the keep arguments.
"""

from __future__ import annotations

import inspect
import types

KEEP_ARGS = ("keep_idx", "keep_ratio", "scores")


def _forward(self, *args, keep_idx=None, keep_ratio=None, scores=None, **kwargs):
    return self.forward_keep(args, kwargs, keep_idx, keep_ratio, scores)


def _signature(base_forward) -> inspect.Signature:
    params = list(inspect.signature(base_forward).parameters.values())
    if any(p.name in KEEP_ARGS for p in params):
        raise TypeError(f"model: its forward already takes an argument named one of {', '.join(KEEP_ARGS)}")
    keep = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in KEEP_ARGS]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return inspect.signature(base_forward).replace(parameters=params[:at] + keep + params[at:])


def keep_forward(owner: type, base_forward, doc: str | None = None):
    """The ``forward`` of class ``owner`` on top of ``base_forward``, its base class's (module doc)."""
    fn = types.FunctionType(_forward.__code__, base_forward.__globals__, "forward")
    fn.__kwdefaults__ = dict(_forward.__kwdefaults__)
    fn.__qualname__ = f"{owner.__qualname__}.forward"
    fn.__module__ = owner.__module__
    fn.__doc__ = doc
    fn.__wrapped__ = base_forward
    fn.__signature__ = _signature(base_forward)
    return fn
