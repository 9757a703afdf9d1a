"""Kernels of certified block-sparse attention: the plain-torch reference, the shared
certificate, and the Triton kernels."""
