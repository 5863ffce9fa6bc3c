"""The registered ops (namespace ``torch.ops.lotus_kernels``), one module each."""

from .attention import attention
from .block_sparse_linear import block_sparse_linear, bsr_from_dense, bsr_to_dense
from .masked_linear import masked_linear
from .patch_embed_gather import im2col_gather, patch_embed_gather
from .semi_structured_linear import semi_structured_linear
from .token_gather import gather_tokens, scatter_tokens

__all__ = [
    "attention",
    "gather_tokens",
    "scatter_tokens",
    "im2col_gather",
    "patch_embed_gather",
    "masked_linear",
    "semi_structured_linear",
    "block_sparse_linear",
    "bsr_from_dense",
    "bsr_to_dense",
]
