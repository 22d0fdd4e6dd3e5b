"""mmattn.kernels: attention kernels (Triton on CUDA), their plain-torch references and CPU paths.

Installed only as ``mmattn.kernels``; this folder is never a top-level package.
"""
