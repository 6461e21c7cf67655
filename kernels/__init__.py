"""Triton kernels, installed as `vigface.kernels`: one file per op, each with its plain PyTorch
reference beside it and a `torch.autograd.Function` so training can use it.

    adaln.py            fused LayerNorm + per-sample modulate, and gated residual + LayerNorm + modulate
    flash_attention.py  flash attention forward/backward (online softmax, no N x N matrix)
    margin_softmax.py   margin-softmax cross-entropy over real + virtual prototypes, blockwise (no B x C)

On a CPU they run under Triton's interpreter (`TRITON_INTERPRET=1`, set by the tests); the
callers' "auto" settings pick them on CUDA only.
"""
