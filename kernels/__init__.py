"""Triton kernels, installed as ``orthograd_fast.kernels``.

Each ``<op>.py`` holds the ``@triton.jit`` kernels of one op and their launch function.
Importing this package never calls CUDA; importing an op module needs Triton.
"""
