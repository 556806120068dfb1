"""minicnn's kernels: forward and backward of every operation, arrays in, arrays out.

Each kernel runs on NumPy or CuPy arrays (see ``kernels.backend``) and knows nothing of
tensors, layers or autograd.
"""
