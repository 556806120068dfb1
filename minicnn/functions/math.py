"""Differentiable array arithmetic: the operators of ``Tensor`` and the shape functions.

Every operation is a ``Function`` with its chain rule in ``backward``. Binary operations
broadcast like NumPy; their gradients are summed back to each input's shape (``unbroadcast``).
"""
from __future__ import annotations

import numpy as np

from kernels import backend, dispatch
from kernels.backend import get_array_module
from minicnn.tensor import Function, Tensor, as_tensor


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, back to ``shape``."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def broadcast_shape(name: str, a_shape, b_shape) -> tuple:
    """The broadcast shape, or ValueError naming the operation and both shapes."""
    try:
        return np.broadcast_shapes(a_shape, b_shape)
    except ValueError:
        raise ValueError(f"{name}: shapes {tuple(a_shape)} and {tuple(b_shape)} do not "
                         "broadcast together") from None


class BinaryFunction(Function):
    """Elementwise function of two broadcastable arrays."""

    def __call__(self, a, b):
        a = as_tensor(a, like=b if isinstance(b, Tensor) else None)
        b = as_tensor(b, like=a)
        broadcast_shape(self.name, a.shape, b.shape)
        return super().__call__(a, b)


class Add(BinaryFunction):
    """y = a + b;  da = g, db = g."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(BinaryFunction):
    """y = a - b;  da = g, db = -g."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        db = -unbroadcast(g, self.shapes[1]) if self.needs_input_grad[1] else None
        return unbroadcast(g, self.shapes[0]), db


class Mul(BinaryFunction):
    """y = a * b;  da = g * b, db = g * a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = unbroadcast(g * self.b, self.a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(g * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return da, db


class Div(BinaryFunction):
    """y = a / b;  da = g / b, db = -g * a / b**2 = -g * y / b."""

    def forward(self, a, b):
        self.a_shape, self.b = a.shape, b
        self.y = a / b
        return self.y

    def backward(self, g):
        da = unbroadcast(g / self.b, self.a_shape) if self.needs_input_grad[0] else None
        db = unbroadcast(-g * self.y / self.b, self.b.shape) if self.needs_input_grad[1] else None
        return da, db


class Power(Function):
    """y = x ** p for a constant p;  dx = g * p * x ** (p - 1)."""

    def __init__(self, exponent):
        self.exponent = exponent

    def forward(self, x):
        self.x = x
        return x ** self.exponent

    def backward(self, g):
        p = self.exponent
        return g * p * self.x ** (p - 1)


class Neg(Function):
    """y = -x;  dx = -g."""

    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Exp(Function):
    """y = exp(x);  dx = g * y."""

    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    def backward(self, g):
        return g * self.y


class Log(Function):
    """y = log(x);  dx = g / x."""

    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, g):
        return g / self.x


class Sqrt(Function):
    """y = sqrt(x);  dx = g / (2 y)."""

    def forward(self, x):
        self.y = get_array_module(x).sqrt(x)
        return self.y

    def backward(self, g):
        return g / (2 * self.y)


class MatMul(Function):
    """y = a @ b (NumPy's matmul rules, batched and broadcast);
    da = g @ b^T, db = a^T @ g (last two axes swapped), summed back over broadcast axes."""

    def __call__(self, a, b):
        a, b = as_tensor(a), as_tensor(b)
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"{self.name}: shapes {a.shape} and {b.shape} are not aligned "
                             "for a matrix product")
        return super().__call__(a, b)

    def forward(self, a, b):
        self.a, self.b = a, b
        y = a @ b              # NumPy's bfloat16 (ml_dtypes) matmul returns float32: undo that
        return y.astype(get_array_module(y).result_type(a, b), copy=False)

    def backward(self, g):
        xp = get_array_module(g)
        a = self.a[None, :] if self.a.ndim == 1 else self.a
        b = self.b[:, None] if self.b.ndim == 1 else self.b
        if self.a.ndim == 1:
            g = xp.expand_dims(g, -2)
        if self.b.ndim == 1:
            g = xp.expand_dims(g, -1)
        da = db = None
        if self.needs_input_grad[0]:
            da = unbroadcast(g @ xp.swapaxes(b, -1, -2), a.shape).reshape(self.a.shape)
        if self.needs_input_grad[1]:
            db = unbroadcast(xp.swapaxes(a, -1, -2) @ g, b.shape).reshape(self.b.shape)
        return da, db


def _axes(axis, ndim):
    """A tuple of non-negative axes (all of them for None)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


class Sum(Function):
    """y = sum of x over ``axis``;  dx = g broadcast back over the summed axes."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, g):
        xp = get_array_module(g)
        if not self.keepdims:
            g = xp.expand_dims(g, _axes(self.axis, len(self.shape)))
        return xp.broadcast_to(g, self.shape)


class Max(Function):
    """y = max of x over ``axis``;  dx = g at the maxima (split evenly between ties), 0 elsewhere."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        xp = get_array_module(x)
        y = x.max(axis=self.axis, keepdims=True)
        winners = (x == y).astype(x.dtype)
        self.share = winners / winners.sum(axis=self.axis, keepdims=True)
        return y if self.keepdims else xp.squeeze(y, axis=_axes(self.axis, x.ndim))

    def backward(self, g):
        xp = get_array_module(g)
        if not self.keepdims:
            g = xp.expand_dims(g, _axes(self.axis, self.share.ndim))
        return g * self.share


class Reshape(Function):
    """y = x viewed with a new shape;  dx = g reshaped back."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"Reshape: cannot reshape {x.shape} into {self.shape}") from None

    def backward(self, g):
        return g.reshape(self.in_shape)


class Transpose(Function):
    """y = x with axes permuted;  dx = g with the inverse permutation."""

    def __init__(self, axes=None):
        self.axes = None if axes is None else tuple(axes)

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, g):
        if self.axes is None:
            return g.transpose()
        return g.transpose(tuple(np.argsort(self.axes)))


def _is_basic_index(index) -> bool:
    """True for ints, slices, None and Ellipsis only (each element selected at most once)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


def _index_on_device_of(x, index):
    """``index`` with its NumPy arrays moved to x's device (CuPy arrays take CuPy indices)."""
    if not backend.is_gpu_array(x):
        return index
    move = (lambda i: backend.to_device(i, "gpu") if isinstance(i, np.ndarray) else i)
    return tuple(move(i) for i in index) if isinstance(index, tuple) else move(index)


class GetItem(Function):
    """y = x[index];  dx = zeros with g scattered back to the selected positions
    (added up where an advanced index selects a position twice)."""

    def __init__(self, index):
        self.index = index.data if isinstance(index, Tensor) else index

    def forward(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        self.index = _index_on_device_of(x, self.index)
        return x[self.index]

    def backward(self, g):
        xp = get_array_module(g)
        dx = xp.zeros(self.shape, dtype=self.dtype)
        if _is_basic_index(self.index):
            dx[self.index] = g
        else:
            backend.scatter_add(dx, self.index, g)        # np.add.at, on NumPy or CuPy
        return dx


class ToDevice(Function):
    """y = x copied to ``device`` ('cpu' or 'gpu');  dx = g copied back to x's device."""

    def __init__(self, device):
        self.device = backend.check_device(device)

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, g):
        return backend.to_device(g, self.source)


class Concatenate(Function):
    """y = the inputs joined along ``axis``;  each input's gradient is its slice of g."""

    def __init__(self, axis=-1):
        self.axis = axis

    def __call__(self, *tensors):
        tensors = [as_tensor(t) for t in tensors]
        if not tensors:
            raise ValueError("concatenate: needs at least one tensor")
        ndim = tensors[0].ndim
        axis = self.axis % ndim if ndim else 0
        shapes = [t.shape for t in tensors]
        for shape in shapes[1:]:
            if len(shape) != ndim or any(shape[i] != shapes[0][i] for i in range(ndim) if i != axis):
                raise ValueError(f"concatenate along axis {self.axis}: shapes {shapes} differ "
                                 "outside that axis")
        return super().__call__(*tensors)

    def forward(self, *arrays):
        self.sizes = [a.shape[self.axis] for a in arrays]
        return dispatch.concatenate(*arrays, axis=self.axis)

    def backward(self, g):
        xp = get_array_module(g)
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(g, bounds, axis=self.axis))


class Stack(Function):
    """y = the inputs stacked on a new ``axis``;  each input's gradient is g indexed on that axis."""

    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, *tensors):
        tensors = [as_tensor(t) for t in tensors]
        shapes = {t.shape for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"stack: all shapes must be equal, got {[t.shape for t in tensors]}")
        return super().__call__(*tensors)

    def forward(self, *arrays):
        return get_array_module(*arrays).stack(arrays, axis=self.axis)

    def backward(self, g):
        xp = get_array_module(g)
        return tuple(xp.moveaxis(g, self.axis, 0))


class Pad(Function):
    """y = x padded with a constant (``numpy.pad`` widths);  dx = the centre of g."""

    def __init__(self, pad_width, value=0.0):
        self.pad_width, self.value = pad_width, value

    def forward(self, x):
        xp = get_array_module(x)
        self.pad_width = np.broadcast_to(np.asarray(self.pad_width, dtype=int), (x.ndim, 2))
        self.shape = x.shape
        return xp.pad(x, self.pad_width.tolist(), constant_values=self.value)

    def backward(self, g):
        centre = tuple(slice(before, before + n) for (before, _), n in zip(self.pad_width, self.shape))
        return g[centre]


# -- the functional forms ---------------------------------------------------------------------
def add(a, b): return Add()(a, b)
def sub(a, b): return Sub()(a, b)
def mul(a, b): return Mul()(a, b)
def div(a, b): return Div()(a, b)
def neg(x): return Neg()(x)
def exp(x): return Exp()(x)
def log(x): return Log()(x)
def sqrt(x): return Sqrt()(x)
def matmul(a, b): return MatMul()(a, b)
def sum(x, axis=None, keepdims=False): return Sum(axis, keepdims)(x)  # noqa: A001
def max(x, axis=None, keepdims=False): return Max(axis, keepdims)(x)  # noqa: A001
def reshape(x, shape): return Reshape(shape)(x)
def transpose(x, axes=None): return Transpose(axes)(x)
def getitem(x, index): return GetItem(index)(x)
def to_device(x, device): return ToDevice(device)(x)
def concatenate(tensors, axis=-1): return Concatenate(axis)(*tensors)
def stack(tensors, axis=0): return Stack(axis)(*tensors)
def pad(x, pad_width, value=0.0): return Pad(pad_width, value)(x)


def power(x, exponent):
    """x ** exponent; a tensor exponent goes through exp(exponent * log(x))."""
    if isinstance(exponent, Tensor):
        return exp(mul(exponent, log(x)))
    return Power(exponent)(x)


def mean(x, axis=None, keepdims=False):
    """The sum divided by the number of elements summed."""
    x = as_tensor(x)
    count = int(np.prod([x.shape[a] for a in _axes(axis, x.ndim)]))
    return div(sum(x, axis, keepdims), count)
