"""Tuned CPU twins of the readable kernels: the same functions with the same arguments and results
(to float rounding), faster on NumPy arrays.

    runtime.py        the thread pool, OpenBLAS's thread count, glibc's malloc, how work is split
    scratch.py        temporaries reused between calls, per kernel and per thread
    conv2d.py         convolution: "shifted" (stride 1) and im2col, in pieces, row taps in chunks
    depthwise.py      depthwise convolution: stride 1 in blocks of rows of the flattened image
    pooling.py        max and average pooling: exact tilings by reshape, batches on the threads
    normalization.py  batch normalisation in cache-sized blocks on the threads
    activations.py    ReLU in blocks on the threads
    arrays.py         concatenation in groups of images on the threads

``kernels.dispatch`` picks these over the plain kernels (``mc.config.kernels == "fast"``, the
default); every one is tested against its plain twin. Their sizes and thresholds are settings
(``kernels.config``), measured in benchmarks/RESULTS.md.
"""
