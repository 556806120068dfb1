"""minicnn's kernels: forward and backward of every operation, arrays in, arrays out.

Each kernel runs on NumPy or CuPy arrays (see ``kernels.backend``) and knows nothing of tensors,
layers or autograd. The files directly in this folder are the readable kernels, each next to
its reference loops; ``kernels/fast`` holds their tuned CPU twins, ``kernels/cuda`` their CUDA
twins, ``kernels.dispatch`` picks one per call and ``kernels.config`` (``mc.config``) holds the
settings that steer them.
"""
