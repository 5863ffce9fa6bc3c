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
  torch.compile / torch.export only; ``KeepForwardMixin.__prepare_scriptable__`` says so when a model
  is scripted. The function is built on ``base_forward.__globals__`` so that TorchScript resolves the
  names of that source in its own module; its own body refers to nothing but ``self``.
- ``__signature__`` is the full signature (the base parameters plus the keep arguments), so
  ``inspect.signature``, ``help`` and ``torch.export`` (which binds call arguments by signature) see
  the keep arguments.
"""

from __future__ import annotations

import inspect
import types
import warnings

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
    fn._lotus_keep_forward = True
    return fn


class KeepForwardMixin:
    """Base of every family's ``KeptPatchesMixin`` (timm, torchvision, transformers, open_clip). A
    patched class ``Lotus<Class>(KeptPatchesMixin, Class)`` gets ``forward = keep_forward(...)`` on top
    of ``Class.forward``; the family mixin implements ``forward_keep(args, kwargs, keep_idx,
    keep_ratio, scores)`` and names its family in ``_lotus_family`` (for the TorchScript warning)."""

    _lotus_family = "base"
    _forward_doc = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = getattr(super(), "forward", None)
        # the family mixins themselves have no base forward; a subclass of a patched class keeps its own
        if base is None or "forward" in cls.__dict__ or getattr(base, "_lotus_keep_forward", False):
            return
        cls.forward = keep_forward(cls, base, cls._forward_doc)
        cls._base_forward_args = tuple(inspect.signature(base).parameters)[1:]  # after self

    def _images_only(self, args: tuple, kwargs: dict):
        """The images of a kept-patch call, whose other base-forward arguments (timm's attn_mask /
        is_causal) must be left at their defaults (None / False)."""
        names = self._base_forward_args
        if len(args) > len(names):
            raise TypeError(
                f"forward: takes at most {len(names)} positional arguments ({', '.join(names)}), got {len(args)}"
            )
        given = dict(zip(names, args), **kwargs)
        if names[0] not in given:
            raise TypeError(f"forward: missing the images argument {names[0]!r}")
        x = given.pop(names[0])
        used = [n for n, v in given.items() if v is not None and v is not False]
        if used:
            raise ValueError(f"{' / '.join(used)}: not supported together with keep_idx / keep_ratio")
        return x

    def __prepare_scriptable__(self):
        # Only a warning: returning an unpatched copy here would be written back into a scripted
        # parent's _modules, unpatching the user's eager model (docs/design/fx_torchscript.md).
        warnings.warn(
            f"{type(self).__name__}: TorchScript compiles the model's own ({self._lotus_family}) forward; "
            "keep_idx / keep_ratio / scores exist in eager mode and under torch.compile only",
            stacklevel=2,
        )
        return self
