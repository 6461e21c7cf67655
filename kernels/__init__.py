"""Triton kernels, installed as `vigface.kernels` (one file per op, each with its PyTorch reference).

Empty for now: the Triton issues (fused AdaLN, flash attention, margin softmax) fill it.
"""
