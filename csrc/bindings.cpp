// Schemas of the backend kernels, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations.
// Every kernel writes a caller-allocated `out` completely (the Python op layer allocates it, poisoned
// under test), so the Python layer owns allocation, validation and autograd.
#include <torch/library.h>

TORCH_LIBRARY(lotus_kernels_C, m) {
  // x [B,N,C], idx [B,K] int64 -> out [B,K,C]
  m.def("gather_tokens(Tensor x, Tensor idx, Tensor(a!) out) -> ()");
  // src [B,K,C], idx [B,K] -> out [B,N,C]: sum of rows per index, zero where no index points
  m.def("scatter_tokens(Tensor src, Tensor idx, Tensor(a!) out) -> ()");
  // images [B,Cin,H,W], idx [B,K] -> out [B,K,Cin*ph*pw] (Conv2d weight order: c, i, j)
  m.def("im2col_gather(Tensor images, Tensor idx, int ph, int pw, Tensor(a!) out) -> ()");
  // cols [B,K,Cin*ph*pw], idx [B,K] -> out [B,Cin,H,W]: adjoint of im2col_gather
  m.def("col2im_scatter(Tensor cols, Tensor idx, int ph, int pw, Tensor(a!) out) -> ()");
  // out [B,K,D] = im2col_gather(images, idx) @ weight.view(D,-1)^T + bias + pos[idx]; pos is [N,D]
  m.def(
      "patch_embed_gather(Tensor images, Tensor idx, Tensor weight, Tensor? bias, Tensor? pos, Tensor(a!) out) -> ()");
  // grad [out,in] float, mask [out,in] bool: grad = 0 where mask is false, in place (one pass)
  m.def("masked_fill_grad_(Tensor(a!) grad, Tensor mask) -> ()");
  // q,k,v [B,H,N,D], key_padding_mask [B,N] bool (true = padded) -> out [B,H,N,D], lse [B,H,N] (opmath
  // dtype; +inf for a query that sees no unpadded key), scores [B,N] (scores_mode 1: query 0's
  // probabilities, 2: probability received, both head-averaged; 0: scores untouched, may be empty).
  // Packed varlen: cu_seqlens [B+1] int64 (0 = cu[0] <= ... <= cu[B] = T), q,k,v,out [T,H,D], lse [H,T],
  // scores [T], each sequence attending within itself; max_seqlen >= its longest (ignored when padded).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, int max_seqlen, float "
      "scale, int scores_mode, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) scores) -> ()");
  // flash-style backward from the saved lse: dq, dk, dv shaped like q
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens, int max_seqlen, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
  // Block-sparse linear (format: lotus_kernels/ops/block_sparse_linear.py): values [nnzb,bs,bs], BSR crow/col,
  // BSC ccol/row/perm. out [M,out] = x @ W^T + bias; dx [M,in] = dy @ W; dvalues[k] = dy[:,r_k]^T @ x[:,c_k]
  m.def("bsr_linear_fwd(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("bsr_linear_bwd_input(Tensor dy, Tensor values, Tensor ccol, Tensor row, Tensor perm, Tensor(a!) dx) -> ()");
  // bwd_input and dbias = dy.sum(0) from one pass over dy (CPU only: the GPU backends sum dy separately)
  m.def(
      "bsr_linear_bwd_input_bias(Tensor dy, Tensor values, Tensor ccol, Tensor row, Tensor perm, Tensor(a!) dx, "
      "Tensor(b!) dbias) -> ()");
  m.def("bsr_linear_bwd_weight(Tensor dy, Tensor x, Tensor crow, Tensor col, Tensor(a!) dvalues) -> ()");
}
