"""LOTUS pipeline: attention data tickets + two-step magnitude pruning, fine-tuned on lotus_kernels.

Stages, one module each: ``data`` -> ``model`` -> ``train`` (pretrain) -> ``tickets`` (score) ->
``prune`` (one-shot sweep, essential sparsity, ISP / ISSP) -> ``finetune`` -> timing -> ``report``;
``pipeline`` runs them in order with resume, ``cli`` is the ``lotus`` command.
"""
from .errors import LotusError

__all__ = ["LotusError"]
