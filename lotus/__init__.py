"""LOTUS pipeline: attention data tickets + two-step pruning, fine-tuned on lotus_kernels.

Stages, one module each: ``task`` / ``data`` / ``canvas`` (the source and target tasks) -> ``model``
-> ``train`` (pretrain on the source) -> ``probe`` (the start model) -> ``tickets`` (score) -> ``prune``
(one-shot sweep, essential sparsity, ISP / ISSP / control / Instant Soup) -> ``finetune`` -> timing
-> ``results`` (statistics, ``stats``; whole-job costs, ``cost``) -> ``report``; ``plan`` says what
a config runs, ``pipeline`` runs it with resume, ``cli`` is the ``lotus`` command. See docs/lotus.md.
"""

from .errors import LotusError

__all__ = ["LotusError"]
