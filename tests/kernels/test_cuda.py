"""The CUDA kernels of the GPU path (kernels/cuda).

- every .cu source compiles with nvcc (when nvcc is installed) and defines exactly the kernels
  the wrappers launch; the sources stay NVRTC-friendly (no #include);
- importing kernels.cuda does not import CuPy;
- on a GPU (the ``device`` fixture's "gpu" case), each wrapper equals its NumPy twin over
  hypothesis-drawn shapes, strides, dilations and paddings: float32 to a relative error of 1e-4,
  float64 to 1e-10, and exactly where the kernel only copies or compares (im2col, max pooling);
- on any machine, the wrappers refuse NumPy arrays with a TypeError naming the NumPy twin.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernels import backend, conv2d, losses, normalization, pooling, upsampling
from kernels import cuda
from kernels.backend import to_device, to_numpy
from kernels.cuda import batchnorm as cuda_bn
from kernels.cuda import pool as cuda_pool
from kernels.cuda import runtime
from kernels.shapes import conv_geometry

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(cuda.SOURCE_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
GPU_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow, HealthCheck.data_too_large])
TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = st.sampled_from([np.float32, np.float64])


def gpu_only(device):
    if device != "gpu":
        pytest.skip("the CUDA wrappers take CuPy arrays; their NumPy twins are tested in their "
                    "own test files")


def assert_close(actual, expected, dtype, what="", scale=None):
    """max |actual - expected| <= tol * scale (tol per dtype; scale: max |expected| unless given,
    for results that cancel to ~0); shapes and dtypes equal."""
    actual = to_numpy(actual)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if scale is None:
        scale = float(np.max(np.abs(expected), initial=0.0))
    scale = max(scale, 1e-30)
    error = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g}, scale {scale:.3g}"


# ============================================================================ compiling (CPU)

def test_every_source_has_a_kernel_list():
    assert {p.name for p in SOURCES} == set(cuda.KERNEL_NAMES)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_sources_stay_nvrtc_friendly(source):
    """NVRTC (what CuPy compiles with) has no host headers: the sources include nothing."""
    assert "#include" not in source.read_text()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: cannot compile the CUDA sources")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_compiles_with_nvcc(source, tmp_path):
    """nvcc -std=c++14 to PTX (all warnings are errors) and through ptxas for Hopper (sm_90);
    the PTX defines exactly the kernels listed in KERNEL_NAMES."""
    ptx = tmp_path / (source.stem + ".ptx")
    for command in (
            [NVCC, *cuda.COMPILE_OPTIONS, "--ptx", "-Werror", "all-warnings", "-o", str(ptx),
             str(source)],
            [NVCC, *cuda.COMPILE_OPTIONS, "-arch=sm_90", "--cubin", "-Werror", "all-warnings",
             "-o", str(tmp_path / (source.stem + ".cubin")), str(source)]):
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", ptx.read_text()))
    assert entries == set(cuda.KERNEL_NAMES[source.name])


# ============================================================================ import (CPU)

def test_importing_kernels_cuda_does_not_import_cupy():
    code = ("import sys, kernels.cuda, kernels.cuda.runtime; "
            "sys.exit(1 if any(m == 'cupy' or m.startswith('cupy.') for m in sys.modules) else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr or "kernels.cuda imported cupy"


# ============================================================================ wrappers (CPU)

@pytest.mark.parametrize("call", [
    lambda x: cuda.im2col_gpu(x, conv_geometry("t", (4, 4), (3, 3))),
    lambda x: cuda.col2im_gpu(np.zeros((1, 2, 2, 3, 3, 2)), x.shape,
                              conv_geometry("t", (4, 4), (3, 3))),
    lambda x: cuda.conv2d_forward_gpu(x, np.zeros((3, 3, 2, 1))),
    lambda x: cuda.conv2d_transpose_gpu(x, np.zeros((3, 3, 1, 2)), output_size=(6, 6)),
    lambda x: cuda.conv2d_backward_filter_gpu(x, np.zeros((1, 2, 2, 1)), kernel_size=(3, 3)),
    lambda x: cuda.max_pool2d_forward_gpu(x),
    lambda x: cuda.max_pool2d_backward_gpu(x[:, :2, :2], np.zeros((1, 2, 2, 2), np.uint8),
                                           input_size=(4, 4)),
    lambda x: cuda.upsample2d_forward_gpu(x, size=2, interpolation="bilinear"),
    lambda x: cuda.upsample2d_backward_gpu(x, size=2, interpolation="bilinear"),
    lambda x: cuda.batch_norm_forward_training_gpu(x),
    lambda x: cuda.batch_norm_forward_inference_gpu(x, np.zeros(2), np.ones(2)),
    lambda x: cuda.batch_norm_backward_gpu(x, x, np.ones(2)),
    lambda x: cuda.softmax_cross_entropy_gpu(x, np.zeros(x.shape[:-1], np.int64)),
    lambda x: cuda.sparse_categorical_crossentropy_forward_gpu(np.zeros(x.shape[:-1], np.int64),
                                                               x, from_logits=True),
])
def test_wrappers_refuse_numpy_arrays(call):
    with pytest.raises(TypeError, match="must be a CuPy array"):
        call(np.zeros((1, 4, 4, 2)))


def test_only_logits_have_a_cuda_cross_entropy():
    with pytest.raises(ValueError, match="from_logits=True"):
        cuda.sparse_categorical_crossentropy_forward_gpu(np.zeros(3, np.int64), np.ones((3, 2)),
                                                         from_logits=False)


def test_load_rejects_unknown_sources():
    with pytest.raises(ValueError, match="no CUDA source 'nothing.cu'"):
        cuda.load("nothing.cu")


@pytest.mark.skipif(backend.gpu_available(), reason="checks the message given without a GPU")
def test_load_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="device 'gpu'"):
        cuda.load("conv.cu")


def test_argmax_dtype_matches_the_numpy_kernel():
    for pool in [(1, 1), (2, 2), (3, 5), (16, 16), (16, 17), (32, 32)]:
        assert cuda_pool.argmax_dtype(pool) == pooling.argmax_dtype(pool)


@given(st.integers(1, 10**8))
def test_bn_chunks_cover_every_row_once(m):
    rows, chunks = cuda_bn.chunking(m)
    assert rows >= cuda_bn.MIN_ROWS_PER_CHUNK and 1 <= chunks <= cuda_bn.MAX_CHUNKS
    assert (chunks - 1) * rows < m <= chunks * rows


@given(st.integers(1, 10**10))
def test_launch_grid_is_capped_and_sufficient(total):
    blocks = runtime.blocks_for(total)
    assert 1 <= blocks <= runtime.MAX_BLOCKS
    assert blocks == runtime.MAX_BLOCKS or blocks * runtime.THREADS >= total


# ============================================================================ launches (CPU)
# On any machine: a stand-in for CuPy (NumPy arrays whose type says "cupy") and a recorder in
# place of the compiled kernels check that every wrapper launches a kernel its source defines,
# with exactly that kernel's parameter list (count, int vs long long vs double, element type of
# each pointer, C-contiguous arrays), and returns arrays of its NumPy twin's shapes and dtypes.

class FakeGpuArray(np.ndarray):
    """A NumPy array that kernels.backend takes for a CuPy array (its type's module says cupy)."""


FakeGpuArray.__module__ = "cupy_stand_in"


def fake(a):
    return None if a is None else np.ascontiguousarray(a).view(FakeGpuArray)


class FakeCupy:
    """numpy, with every array it returns turned into a FakeGpuArray."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            return out.view(FakeGpuArray) if isinstance(out, np.ndarray) else out
        return call


C_TYPES = {  # parameter type (without const and spaces) -> check of the Python argument
    "float*": lambda a: isinstance(a, FakeGpuArray) and a.dtype == np.float32,
    "double*": lambda a: isinstance(a, FakeGpuArray) and a.dtype == np.float64,
    "int*": lambda a: isinstance(a, FakeGpuArray) and a.dtype == np.int32,
    "unsignedchar*": lambda a: isinstance(a, FakeGpuArray) and a.dtype == np.uint8,
    "longlong": lambda a: type(a) is np.int64,
    "int": lambda a: type(a) is np.int32,
    "double": lambda a: type(a) is np.float64,
}


def kernel_signatures():
    """{kernel name: [parameter type, ...]} of every source, after the C preprocessor has expanded
    the float/double macros (the parameter names dropped, 'const' and spaces removed)."""
    tool = shutil.which("cpp") or shutil.which("gcc") or shutil.which("clang")
    if tool is None:
        pytest.skip("no C preprocessor (cpp, gcc or clang) to expand the kernel signatures")
    signatures = {}
    for source in SOURCES:
        done = subprocess.run([tool, "-E", "-P", "-x", "c++", str(source)], capture_output=True,
                              text=True, check=True)
        for name, params in re.findall(r'extern "C" __global__ void (\w+)\s*\(([^)]*)\)',
                                       done.stdout):
            types = []
            for param in params.split(","):
                words = param.replace("*", " * ").split()[:-1]           # drop the name
                types.append("".join(w for w in words if w != "const"))
            signatures[name] = (source.name, types)
    return signatures


@pytest.fixture
def launches(monkeypatch):
    """Record (source, name, grid, block, args) of every launch instead of running it."""
    monkeypatch.setattr(backend, "get_array_module", lambda *arrays: FakeCupy())
    record = []

    def fake_kernel(source, name):
        return lambda grid, block, args: record.append((source, name, grid, block, args))
    monkeypatch.setattr(runtime, "kernel", fake_kernel)
    return record


def launch_scenarios(dtype):
    """(what, CUDA wrapper call, NumPy twin call): the twin gives the expected shapes/dtypes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8, 3)).astype(dtype)
    g = conv_geometry("t", (9, 8), (3, 2), strides=(2, 1), dilation=(1, 2), padding="same")
    cols = conv2d.im2col(x, g)
    y_pool, argmax = pooling.max_pool2d_forward(x, pool_size=2, strides=1, padding="same")
    y_big, argmax_big = pooling.max_pool2d_forward(x, pool_size=(9, 8))
    w = rng.standard_normal((3, 2, 3, 4)).astype(dtype)
    y_conv = conv2d.conv2d_forward(x, w, strides=(2, 1), dilation=(1, 2), padding="same")
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    bn = normalization.batch_norm_forward_training(x, gamma, beta)
    labels, valid = rng.integers(0, 3, (2, 9, 8)), rng.random((2, 9, 8)) > 0.5
    weight = np.ones(3, dtype)
    sce = losses.sparse_categorical_crossentropy_forward(labels, x, weight, valid, from_logits=True)
    sce_gpu = (True, fake(labels.astype(np.int32)), fake(sce[1][2]), None, None, fake(sce[1][5]))
    g_rows = np.ones((2, 9, 8), dtype)
    return [
        ("im2col", lambda: cuda.im2col_gpu(fake(x), g), lambda: conv2d.im2col(x, g)),
        ("col2im", lambda: cuda.col2im_gpu(fake(cols), x.shape, g),
         lambda: conv2d.col2im(cols, x.shape, g)),
        ("conv forward", lambda: cuda.conv2d_forward_gpu(fake(x), fake(w), strides=(2, 1),
                                                         dilation=(1, 2), padding="same"),
         lambda: y_conv),
        ("conv transpose", lambda: cuda.conv2d_transpose_gpu(
            fake(y_conv), fake(w), output_size=(9, 8), strides=(2, 1), dilation=(1, 2),
            padding="same"), lambda: x),
        ("conv filter gradient", lambda: cuda.conv2d_backward_filter_gpu(
            fake(x), fake(y_conv), kernel_size=(3, 2), strides=(2, 1), dilation=(1, 2),
            padding="same"), lambda: w),
        ("max pool", lambda: cuda.max_pool2d_forward_gpu(fake(x), pool_size=2, strides=1,
                                                         padding="same"),
         lambda: (y_pool, argmax)),
        ("max pool int32", lambda: cuda.max_pool2d_forward_gpu(fake(x), pool_size=(9, 8)),
         lambda: (y_big, argmax_big)),
        ("max pool dx", lambda: cuda.max_pool2d_backward_gpu(fake(y_pool), fake(argmax),
                                                             input_size=(9, 8), pool_size=2,
                                                             strides=1, padding="same"),
         lambda: pooling.max_pool2d_backward(y_pool, argmax, input_size=(9, 8), pool_size=2,
                                             strides=1, padding="same")),
        ("max pool dx int32", lambda: cuda.max_pool2d_backward_gpu(fake(y_big), fake(argmax_big),
                                                                   input_size=(9, 8),
                                                                   pool_size=(9, 8)),
         lambda: pooling.max_pool2d_backward(y_big, argmax_big, input_size=(9, 8),
                                             pool_size=(9, 8))),
        ("upsample", lambda: cuda.upsample2d_forward_gpu(fake(x), size=(2, 3),
                                                         interpolation="bilinear"),
         lambda: upsampling.upsample2d_forward(x, size=(2, 3), interpolation="bilinear")),
        ("upsample dx", lambda: cuda.upsample2d_backward_gpu(fake(x), size=(3, 2)),
         lambda: upsampling.upsample2d_backward(x, size=(3, 2))),
        ("batch norm", lambda: cuda.batch_norm_forward_training_gpu(fake(x), fake(gamma),
                                                                    fake(beta)),
         lambda: bn),
        ("batch norm plain", lambda: cuda.batch_norm_forward_training_gpu(fake(x)),
         lambda: normalization.batch_norm_forward_training(x)),
        ("batch norm inference", lambda: cuda.batch_norm_forward_inference_gpu(
            fake(x), fake(bn[1]), fake(bn[2]), fake(gamma), fake(beta)),
         lambda: normalization.batch_norm_forward_inference(x, bn[1], bn[2], gamma, beta)),
        ("batch norm dx", lambda: cuda.batch_norm_backward_gpu(fake(x), fake(bn[3]), fake(bn[4]),
                                                               fake(gamma)),
         lambda: normalization.batch_norm_backward(x, bn[3], bn[4], gamma)),
        ("batch norm dx from x_hat", lambda: cuda.batch_norm_backward_gpu(
            fake(x), fake(bn[3]), fake(bn[4]), saved="x_hat"),
         lambda: normalization.batch_norm_backward(x, bn[3], bn[4])),
        ("fused cross-entropy", lambda: cuda.softmax_cross_entropy_gpu(
            fake(x), fake(labels), 2, fake(weight)),
         lambda: (sce[0], losses.sparse_categorical_crossentropy_backward(g_rows, sce[1]))),
        ("cross-entropy", lambda: cuda.sparse_categorical_crossentropy_forward_gpu(
            fake(labels), fake(x), fake(weight), fake(valid), from_logits=True)[0],
         lambda: sce[0]),
        ("cross-entropy dz", lambda: cuda.sparse_categorical_crossentropy_backward_gpu(
            fake(g_rows), sce_gpu),
         lambda: losses.sparse_categorical_crossentropy_backward(g_rows, sce[1])),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_launches_match_the_kernel_signatures(launches, dtype):
    signatures = kernel_signatures()
    assert set(signatures) == {k for names in cuda.KERNEL_NAMES.values() for k in names}
    for what, call, twin in launch_scenarios(dtype):
        launches.clear()
        got, want = call(), twin()
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(want), what
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, a.dtype, b.shape,
                                                               b.dtype)
        assert launches, f"{what}: no kernel launched"
        for source, name, grid, block, args in launches:
            assert name in signatures, f"{what}: unknown kernel {name}"
            assert signatures[name][0] == source, (what, name, source)
            types = signatures[name][1]
            assert len(args) == len(types), f"{what}: {name} takes {len(types)} arguments, " \
                                            f"got {len(args)}"
            for i, (ctype, arg) in enumerate(zip(types, args)):
                assert C_TYPES[ctype](arg), f"{what}: {name} argument {i} should be {ctype}, " \
                    f"got {type(arg).__name__} {getattr(arg, 'dtype', '')}"
                if isinstance(arg, np.ndarray):
                    assert arg.flags.c_contiguous, f"{what}: {name} argument {i} not contiguous"
            assert all(int(v) >= 1 for v in (*grid, *block)) and np.prod(block) <= 1024, \
                (what, grid, block)


# ============================================================================ GPU twins

@st.composite
def conv_cases(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
             draw(st.integers(1, 4)))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
    padding = draw(st.one_of(st.sampled_from(["valid", "same"]), st.tuples(pair, pair)))
    try:
        geometry = conv_geometry("test", shape[1:3], kernel, strides=strides, dilation=dilation,
                                 padding=padding)
    except ValueError:
        assume(False)
    return shape, geometry


@GPU_SETTINGS
@given(case=conv_cases(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_im2col_equals_numpy(device, case, dtype, seed):
    gpu_only(device)
    shape, g = case
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    cols = cuda.im2col_gpu(to_device(x, device), g)
    np.testing.assert_array_equal(to_numpy(cols), conv2d.im2col(x, g))   # a copy: exact


@GPU_SETTINGS
@given(case=conv_cases(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_col2im_equals_numpy(device, case, dtype, seed):
    gpu_only(device)
    shape, g = case
    cols = np.random.default_rng(seed).standard_normal(
        (shape[0], *g.out_hw, *g.kernel_hw, shape[3])).astype(dtype)
    dx = cuda.col2im_gpu(to_device(cols, device), shape, g)
    assert_close(dx, conv2d.col2im(cols, shape, g), dtype, "col2im")


@GPU_SETTINGS
@given(case=conv_cases(), channels=st.integers(1, 3), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_conv_kernels_equal_the_plain_ones(device, case, channels, dtype, seed):
    """conv2d_forward_gpu, conv2d_transpose_gpu and conv2d_backward_filter_gpu against the plain
    kernels of kernels.conv2d (which they replace for CuPy arrays)."""
    gpu_only(device)
    shape, g = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((*g.kernel_hw, shape[3], channels)).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    settings_ = dict(strides=g.strides, dilation=g.dilation, padding=g.pads)
    y = conv2d.conv2d_forward(x, w, b, **settings_)
    gy = rng.standard_normal(y.shape).astype(dtype)
    d = (lambda a: to_device(a, device))
    assert_close(cuda.conv2d_forward_gpu(d(x), d(w), d(b), **settings_), y, dtype, "forward")
    assert_close(cuda.conv2d_transpose_gpu(d(gy), d(w), output_size=shape[1:3], **settings_),
                 conv2d.conv2d_transpose(gy, w, output_size=shape[1:3], **settings_), dtype,
                 "transpose")
    assert_close(cuda.conv2d_backward_filter_gpu(d(x), d(gy), kernel_size=g.kernel_hw,
                                                 **settings_),
                 conv2d.conv2d_backward_filter(x, gy, kernel_size=g.kernel_hw, **settings_),
                 dtype, "filter gradient")


def test_im2col_col2im_cover_more_items_than_one_grid(device):
    """More elements than MAX_BLOCKS * THREADS: the grid-stride loops must reach all of them."""
    gpu_only(device)
    x = np.random.default_rng(0).standard_normal((4, 40, 40, 40)).astype(np.float32)
    g = conv_geometry("test", (40, 40), (3, 3), padding="same")
    assert x.size * 9 > runtime.MAX_BLOCKS * runtime.THREADS
    cols = cuda.im2col_gpu(to_device(x, device), g)
    np.testing.assert_array_equal(to_numpy(cols), conv2d.im2col(x, g))
    assert_close(cuda.col2im_gpu(cols, x.shape, g), conv2d.col2im(conv2d.im2col(x, g), x.shape, g),
                 np.float32, "col2im")


def test_conv_wrappers_check_shapes(device):
    gpu_only(device)
    g = conv_geometry("test", (5, 5), (3, 3))
    with pytest.raises(ValueError, match="im2col_gpu: x of shape"):
        cuda.im2col_gpu(to_device(np.zeros((1, 6, 5, 2), np.float32), device), g)
    with pytest.raises(ValueError, match="col2im_gpu: cols of shape"):
        cuda.col2im_gpu(to_device(np.zeros((1, 3, 3, 3, 3, 1), np.float32), device),
                        (1, 5, 5, 2), g)
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda.im2col_gpu(to_device(np.zeros((1, 5, 5, 2), np.int32), device), g)


@st.composite
def pool_cases(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
             draw(st.integers(1, 3)))
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.sampled_from(["valid", "same"]))
    try:
        pooling.max_pool2d_forward(np.zeros(shape), pool_size=pool, strides=strides,
                                   padding=padding, return_argmax=False)
    except ValueError:
        assume(False)
    return shape, pool, strides, padding


@GPU_SETTINGS
@given(case=pool_cases(), dtype=DTYPES, seed=st.integers(0, 2**16), ties=st.booleans())
def test_max_pool_equals_numpy(device, case, dtype, seed, ties):
    """y and argmax exactly (ties -> the first cell in row-major window order); dx to tolerance."""
    gpu_only(device)
    shape, pool, strides, padding = case
    kw = dict(pool_size=pool, strides=strides, padding=padding)
    rng = np.random.default_rng(seed)
    x = (rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)).astype(dtype)
    y, argmax = cuda.max_pool2d_forward_gpu(to_device(x, device), **kw)
    y_np, argmax_np = pooling.max_pool2d_forward(x, **kw)
    np.testing.assert_array_equal(to_numpy(y), y_np)
    np.testing.assert_array_equal(to_numpy(argmax), argmax_np)
    assert argmax.dtype == argmax_np.dtype
    dy = rng.standard_normal(y_np.shape).astype(dtype)
    dx = cuda.max_pool2d_backward_gpu(to_device(dy, device), argmax, input_size=shape[1:3], **kw)
    assert_close(dx, pooling.max_pool2d_backward(dy, argmax_np, input_size=shape[1:3], **kw),
                 dtype, "max pool dx")


def test_max_pool_large_windows_use_int32_argmax(device):
    gpu_only(device)
    x = np.random.default_rng(1).standard_normal((1, 20, 20, 2))
    y, argmax = cuda.max_pool2d_forward_gpu(to_device(x, device), pool_size=(17, 17), strides=3)
    y_np, argmax_np = pooling.max_pool2d_forward(x, pool_size=(17, 17), strides=3)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(to_numpy(argmax), argmax_np)
    np.testing.assert_array_equal(to_numpy(y), y_np)


def test_max_pool_wrappers_check_shapes(device):
    gpu_only(device)
    dy = to_device(np.zeros((1, 2, 2, 3), np.float32), device)
    with pytest.raises(ValueError, match="max_pool2d_backward_gpu: dy must have the shape"):
        cuda.max_pool2d_backward_gpu(dy, dy.astype(np.uint8), input_size=(6, 6))
    with pytest.raises(ValueError, match="max_pool2d_forward_gpu"):
        cuda.max_pool2d_forward_gpu(to_device(np.zeros((1, 1, 1, 1)), device), pool_size=2)


@GPU_SETTINGS
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)),
       size=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       interpolation=st.sampled_from(["nearest", "bilinear"]), dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_upsample_equals_numpy(device, shape, size, interpolation, dtype, seed):
    gpu_only(device)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y = cuda.upsample2d_forward_gpu(to_device(x, device), size=size, interpolation=interpolation)
    y_np = upsampling.upsample2d_forward(x, size=size, interpolation=interpolation)
    assert_close(y, y_np, dtype, f"upsample {interpolation}")
    dy = rng.standard_normal(y_np.shape).astype(dtype)
    dx = cuda.upsample2d_backward_gpu(to_device(dy, device), size=size,
                                      interpolation=interpolation)
    assert_close(dx, upsampling.upsample2d_backward(dy, size=size, interpolation=interpolation),
                 dtype,
                 f"upsample {interpolation} dx")


def test_bilinear_aliases(device):
    gpu_only(device)
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 2))
    assert_close(cuda.upsample_bilinear_gpu(to_device(x, device), size=(2, 3)),
                 upsampling.upsample2d_forward(x, size=(2, 3), interpolation="bilinear"),
                 np.float64)
    dy = np.random.default_rng(3).standard_normal((2, 6, 12, 2))
    assert_close(cuda.upsample_bilinear_backward_gpu(to_device(dy, device), size=(2, 3)),
                 upsampling.upsample2d_backward(dy, size=(2, 3), interpolation="bilinear"),
                 np.float64)


@GPU_SETTINGS
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 40)),
       dtype=DTYPES, offset=st.sampled_from([0.0, -20.0]), affine=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_norm_equals_numpy(device, shape, dtype, offset, affine, seed):
    """Forward (y, mean, var, x_centered, inv_std), inference and backward (dx, dgamma, dbeta),
    also through x_hat (save="x_hat"). dx is compared on the scale of its terms,
    gamma * inv_std * |dy| (it cancels to ~0 for M <= 2)."""
    gpu_only(device)
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape) * rng.uniform(0.5, 2, shape[-1])).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(dtype) if affine else None
    beta = rng.standard_normal(shape[-1]).astype(dtype) if affine else None
    on_gpu = (lambda a: None if a is None else to_device(a, device))
    got = cuda.batch_norm_forward_training_gpu(on_gpu(x), on_gpu(gamma), on_gpu(beta),
                                               epsilon=1e-3)
    want = normalization.batch_norm_forward_training(x, gamma, beta, epsilon=1e-3)
    for name, a, b in zip(("y", "mean", "var", "x_centered", "inv_std"), got, want):
        assert_close(a, b, dtype, f"batch norm {name}")
    x_hat = cuda.batch_norm_forward_training_gpu(on_gpu(x), save="x_hat")[3]
    assert_close(x_hat, want[3] * want[4], dtype, "batch norm x_hat")
    dy = rng.standard_normal(shape).astype(dtype)
    k = want[4] if gamma is None else gamma * want[4]
    dx_scale = float(np.max(np.abs(dy * k)))
    expected = normalization.batch_norm_backward(dy, want[3], want[4], gamma)
    for saved, kept in (("x_centered", got[3]), ("x_hat", x_hat)):
        grads = cuda.batch_norm_backward_gpu(on_gpu(dy), kept, got[4], on_gpu(gamma), saved=saved)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), grads, expected):
            assert_close(a, b, dtype, f"batch norm {name} (from {saved})",
                         dx_scale if name == "dx" else None)
    moving_mean = rng.standard_normal(shape[-1]).astype(dtype) + offset
    moving_var = rng.uniform(0.5, 2, shape[-1]).astype(dtype)
    y = cuda.batch_norm_forward_inference_gpu(on_gpu(x), on_gpu(moving_mean), on_gpu(moving_var),
                                              on_gpu(gamma), on_gpu(beta), epsilon=1e-3)
    assert_close(y, normalization.batch_norm_forward_inference(
        x, moving_mean, moving_var, gamma, beta, epsilon=1e-3), dtype, "batch norm inference")


def test_batch_norm_many_rows_and_column_tiles(device):
    """M above MIN_ROWS_PER_CHUNK * MAX_CHUNKS (capped chunk count), C over two 32-channel tiles."""
    gpu_only(device)
    rng = np.random.default_rng(4)
    x = (3 + rng.standard_normal((17, 128, 128, 40))).astype(np.float32)
    assert x.size // 40 > cuda_bn.MIN_ROWS_PER_CHUNK * cuda_bn.MAX_CHUNKS
    got = cuda.batch_norm_forward_training_gpu(to_device(x, device))
    want = normalization.batch_norm_forward_training(x)
    for name, a, b in zip(("y", "mean", "var", "x_centered", "inv_std"), got, want):
        assert_close(a, b, np.float32, f"batch norm {name}")
    dy = rng.standard_normal(x.shape).astype(np.float32)
    got = cuda.batch_norm_backward_gpu(to_device(dy, device), got[3], got[4])
    want = normalization.batch_norm_backward(dy, want[3], want[4])
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(a, b, np.float32, f"batch norm {name}")


def test_batch_norm_statistics_survive_a_large_mean(device):
    """float64 values 1e6 +- 1: a one-pass E[x^2] - mean^2 would lose ~4 of its 16 digits to
    cancellation (error ~1e-4 of the variance); the shifted sums keep the two-pass accuracy."""
    gpu_only(device)
    rng = np.random.default_rng(6)
    x = 1e6 + rng.standard_normal((4, 16, 16, 5)) * rng.uniform(0.5, 2, 5)
    mean, var, inv_std = cuda.batch_norm_statistics_gpu(to_device(x, device), epsilon=1e-3)
    flat = x.reshape(-1, 5)
    exact_mean = flat.mean(axis=0)
    exact_var = ((flat - exact_mean) ** 2).mean(axis=0)           # two-pass, float64
    np.testing.assert_allclose(to_numpy(mean), exact_mean, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(var), exact_var, rtol=1e-8)
    np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(exact_var + 1e-3), rtol=1e-8)


def test_batch_norm_is_deterministic(device):
    gpu_only(device)
    x = to_device(np.random.default_rng(5).standard_normal((8, 33, 35, 37)).astype(np.float32),
                  device)
    first = [to_numpy(a) for a in cuda.batch_norm_forward_training_gpu(x)]
    second = [to_numpy(a) for a in cuda.batch_norm_forward_training_gpu(x)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_batch_norm_wrappers_check_shapes(device):
    gpu_only(device)
    x = to_device(np.zeros((2, 3, 3, 4), np.float32), device)
    with pytest.raises(ValueError, match="gamma of shape"):
        cuda.batch_norm_forward_training_gpu(x, to_device(np.ones(3, np.float32), device))
    with pytest.raises(ValueError, match="dy of shape"):
        cuda.batch_norm_backward_gpu(x, x[:1], to_device(np.ones(4, np.float32), device))
    with pytest.raises(ValueError, match="batch axis"):
        cuda.batch_norm_forward_training_gpu(x[0, 0, 0])
    with pytest.raises(ValueError, match="save must be"):
        cuda.batch_norm_forward_training_gpu(x, save="y")


@GPU_SETTINGS
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
       classes=st.integers(1, 6), dtype=DTYPES, ignore=st.booleans(), weighted=st.booleans(),
       scale=st.sampled_from([1.0, 30.0]), seed=st.integers(0, 2**16))
def test_softmax_cross_entropy_equals_numpy(device, shape, classes, dtype, ignore, weighted,
                                            scale, seed):
    gpu_only(device)
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((*shape, classes))).astype(dtype)
    labels = rng.integers(0, classes, shape)
    valid = rng.random(shape) > 0.3 if ignore else None
    class_weight = rng.uniform(0.5, 2, classes).astype(dtype) if weighted else None
    values_np, saved_np = losses.sparse_categorical_crossentropy_forward(
        labels, logits, class_weight, valid, from_logits=True)
    g = rng.standard_normal(shape).astype(dtype)
    dz_np = losses.sparse_categorical_crossentropy_backward(g, saved_np)

    on_gpu = (lambda a: None if a is None else to_device(a, device))
    values, saved = cuda.sparse_categorical_crossentropy_forward_gpu(
        on_gpu(labels), on_gpu(logits), on_gpu(class_weight), on_gpu(valid), from_logits=True)
    assert_close(values, values_np, dtype, "values")
    assert_close(cuda.sparse_categorical_crossentropy_backward_gpu(on_gpu(g), saved), dz_np,
                 dtype, "dz (CUDA backward)")

    # the fused step: ignore_class as a label value
    ignore_class = classes if ignore else None
    marked = labels if valid is None else np.where(valid, labels, classes)
    loss, grad = cuda.softmax_cross_entropy_gpu(on_gpu(logits), on_gpu(marked), ignore_class,
                                                on_gpu(class_weight))
    assert_close(loss, values_np, dtype, "fused loss")
    assert_close(grad, losses.sparse_categorical_crossentropy_backward(
        np.ones(shape, dtype), saved_np), dtype, "fused grad")


def test_softmax_cross_entropy_known_values_and_bad_labels(device):
    """Two classes with logits (0, log 3): p = (1/4, 3/4); label -1 is ignored, label 2 is NaN."""
    gpu_only(device)
    logits = np.array([[0.0, np.log(3.0)]] * 4)
    labels = np.array([0, 1, -1, 2])
    loss, grad = cuda.softmax_cross_entropy_gpu(to_device(logits, device),
                                                to_device(labels, device))
    loss, grad = to_numpy(loss), to_numpy(grad)
    np.testing.assert_allclose(loss[:3], [np.log(4.0), np.log(4.0 / 3.0), 0.0], rtol=1e-12)
    np.testing.assert_allclose(grad[:3], [[-0.75, 0.75], [0.25, -0.25], [0.0, 0.0]], atol=1e-12)
    assert np.isnan(loss[3]) and np.isnan(grad[3]).all()
    with pytest.raises(ValueError, match="labels of shape"):
        cuda.softmax_cross_entropy_gpu(to_device(logits, device), to_device(labels[:3], device))
