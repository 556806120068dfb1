"""Tensor and Function: define-by-run reverse-mode autograd.

A ``Function`` computes its output from arrays in ``forward`` and, when any input needs a
gradient, records itself as the output's creator. ``Tensor.backward()`` walks the recorded graph
from the output back to the leaves (weights, inputs) in reverse topological order, applying the
chain rule ``dL/dx = sum over uses of (dL/dy * dy/dx)`` one ``Function.backward`` at a time.

The graph holds *nodes*, not data: a node knows its creator, shape and dtype, and a weak
reference to its tensor. An activation is therefore kept alive only by the functions that saved
it for their backward (Chainer's VariableNode design), and each function's saved arrays are freed
as soon as its backward has run.
"""
from __future__ import annotations

import contextlib
import numbers
import weakref

import numpy as np

from kernels import backend
from kernels.config import settings as kernel_settings

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Within this block, operations build no graph (inference, optimizer updates), and the tuned
    kernels keep nothing for a backward pass (``mc.config.keep_workspaces``)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    keep, kernel_settings.keep_workspaces = kernel_settings.keep_workspaces, False
    try:
        yield
    finally:
        _grad_enabled = previous
        kernel_settings.keep_workspaces = keep


def is_grad_enabled() -> bool:
    return _grad_enabled


class Node:
    """What the graph keeps of a tensor: its creator, shape and dtype, never its data."""

    __slots__ = ("creator", "shape", "dtype", "tensor", "retain_grad")

    def __init__(self, tensor: "Tensor", creator: "Function | None" = None):
        self.creator = creator
        self.shape = tensor.data.shape
        self.dtype = tensor.data.dtype
        self.tensor = weakref.ref(tensor)
        self.retain_grad = creator is None   # leaves keep their gradient; others on request

    def accumulate(self, grad):
        """Store ``grad`` on the tensor (if it still exists), adding to any earlier gradient."""
        tensor = self.tensor()
        if tensor is not None:
            tensor.grad = grad if tensor.grad is None else tensor.grad + grad


class Function:
    """Base of every differentiable operation.

    Subclasses take their settings in ``__init__`` and implement
    ``forward(self, *arrays) -> array`` (keeping on ``self`` what backward needs) and
    ``backward(self, grad) -> tuple`` (one gradient array per input, or None).
    ``self.needs_input_grad`` (one bool per input) is set before ``forward`` runs.

    ``MyOp(settings)(x, w)`` applies the operation to tensors (or arrays) and returns a Tensor.
    """

    needs_input_grad: tuple = ()
    inputs: tuple = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, *inputs) -> "Tensor":
        tensors = [as_tensor(x) for x in inputs]
        check_same_device(self.name, tensors)
        track = _grad_enabled and any(t.requires_grad for t in tensors)
        self.needs_input_grad = tuple(track and t.requires_grad for t in tensors)
        output = Tensor(self.forward(*[t.data for t in tensors]))
        if track:
            self.inputs = tuple(t.node if t.requires_grad else None for t in tensors)
            output.node = Node(output, creator=self)
        return output

    def forward(self, *arrays):
        raise NotImplementedError(f"{self.name}.forward")

    def backward(self, grad):
        raise NotImplementedError(f"{self.name}.backward")


def check_same_device(name: str, tensors) -> None:
    """Raise ValueError when the tensors of one operation live on different devices."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        described = ", ".join(f"{t.device} {tuple(t.shape)}" for t in tensors)
        raise ValueError(f"{name}: inputs are on different devices ({described}); "
                         "move them with .to('cpu') or .to('gpu')")


class Tensor:
    """An array (NumPy or CuPy) plus what autograd needs.

    ``data``: the array; ``grad``: an array of the same shape after ``backward()`` (leaves, and
    tensors that called ``retain_grad()``), else None; ``requires_grad``: whether gradients flow
    to it.
    """

    __array_priority__ = 1000   # ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if not backend.is_gpu_array(data):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.name = name
        self.node = None
        if requires_grad:
            self.requires_grad = True

    # -- autograd -----------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        return self.node is not None

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value and self.node is None:
            if not backend.is_floating(self.data.dtype):
                raise TypeError(f"only floating-point tensors can require gradients, "
                                f"got dtype {self.data.dtype}")
            self.node = Node(self)
        elif not value:
            self.node = None

    @property
    def creator(self):
        return None if self.node is None else self.node.creator

    def retain_grad(self) -> "Tensor":
        """Keep this non-leaf tensor's gradient in ``.grad`` after backward."""
        if self.node is not None:
            self.node.retain_grad = True
        return self

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a one-element tensor. The graph's saved arrays are freed as
        it is walked unless ``retain_graph=True``.
        """
        if self.node is None:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input required grad, or it was computed under no_grad())")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a one-element tensor, "
                                 f"got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient of shape {grad.shape} for a tensor of "
                                 f"shape {self.shape}")
        run_backward(self.node, grad, retain_graph)

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    # -- array facts ----------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: backend.device_of(self.data))

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self) -> np.ndarray:
        """A host (NumPy) copy of the data (one device-to-host copy for a GPU tensor)."""
        if backend.is_gpu_array(self.data):
            return self.data.get()
        return np.array(self.data)

    def item(self) -> float:
        return self.data.item()

    def to(self, device: str) -> "Tensor":
        """This tensor on ``device`` ('cpu', 'gpu' or 'auto'); itself when it is there already.

        A leaf gives a new leaf (same requires_grad and name, no grad): move weights before
        building the graph. A computed tensor gives a differentiable copy: its gradient flows
        back to this device (``minicnn.functions.math.ToDevice``).
        """
        if backend.device_of(self.data) == backend.check_device(device):
            return self
        if self.creator is not None:
            return _math.to_device(self, device)
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad,
                      name=self.name)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"

    # -- operators (differentiable; defined in minicnn.functions.math) ---------------------------
    def __add__(self, other): return _math.add(self, other)
    def __radd__(self, other): return _math.add(other, self)
    def __sub__(self, other): return _math.sub(self, other)
    def __rsub__(self, other): return _math.sub(other, self)
    def __mul__(self, other): return _math.mul(self, other)
    def __rmul__(self, other): return _math.mul(other, self)
    def __truediv__(self, other): return _math.div(self, other)
    def __rtruediv__(self, other): return _math.div(other, self)
    def __matmul__(self, other): return _math.matmul(self, other)
    def __rmatmul__(self, other): return _math.matmul(other, self)
    def __pow__(self, exponent): return _math.power(self, exponent)
    def __neg__(self): return _math.neg(self)
    def __getitem__(self, index): return _math.getitem(self, index)

    def exp(self): return _math.exp(self)
    def log(self): return _math.log(self)
    def sqrt(self): return _math.sqrt(self)
    def sum(self, axis=None, keepdims=False): return _math.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _math.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _math.max(self, axis, keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _math.reshape(self, shape)

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _math.transpose(self, axes or None)

    @property
    def T(self):
        return _math.transpose(self, None)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """A Tensor as it is; an array or Python number as a constant Tensor.

    With ``like``, a Python number (or list) takes like's dtype, so that ``x * 2`` stays
    float32, and like's device; so does a NumPy scalar (``x / np.sqrt(2)``), keeping its own
    dtype. A number becomes a device array by a fill, without a host-to-device copy. Arrays
    stay where they are (mixing devices is an error of the operation).
    """
    if isinstance(value, Tensor):
        return value
    if like is None:
        return Tensor(value)
    xp = backend.get_array_module(like.data)
    if isinstance(value, numbers.Number) and not isinstance(value, np.generic):
        return Tensor(xp.full((), value, dtype=like.dtype))
    if isinstance(value, np.generic):
        return Tensor(xp.full((), value, dtype=value.dtype))
    if not hasattr(value, "dtype"):
        return Tensor(xp.asarray(value, dtype=like.dtype))
    return Tensor(value)


def post_order(roots, parents_of) -> list:
    """Every item reachable from ``roots`` through ``parents_of(item)``, each after its parents.

    An iterative depth-first search, so a chain of any length stays far from Python's recursion
    limit. Used for the autograd graph and for functional models' layer graphs.
    """
    order, expanded = [], set()
    stack = [(item, False) for item in reversed(list(roots))]
    while stack:
        item, done = stack.pop()
        if done:
            order.append(item)
            continue
        if id(item) in expanded:
            continue
        expanded.add(id(item))
        stack.append((item, True))
        stack.extend((parent, False) for parent in reversed(parents_of(item))
                     if parent is not None and id(parent) not in expanded)
    return order


def graph_order(root: Node) -> list:
    """Nodes reachable from ``root``, each before the nodes it was computed from."""
    order = post_order([root], lambda node: node.creator.inputs if node.creator else ())
    order.reverse()
    return order


def run_backward(root: Node, grad, retain_graph: bool = False) -> None:
    """The chain rule over the graph below ``root``, seeded with ``grad``."""
    order = graph_order(root)
    pending = {id(root): grad}          # gradients still to be passed down, by node
    for position, node in enumerate(order):
        grad = pending.pop(id(node), None)
        order[position] = None          # let the node go once handled
        if grad is None:
            continue
        if node.retain_grad:
            node.accumulate(grad)
        fn = node.creator
        if fn is None:
            continue
        if not fn.inputs:
            raise RuntimeError(f"{fn.name}: its graph was freed by an earlier backward(); "
                               "pass retain_graph=True to the first backward() to call it twice")
        input_grads = fn.backward(grad)
        if not isinstance(input_grads, (tuple, list)):
            input_grads = (input_grads,)
        if len(input_grads) != len(fn.inputs):
            raise RuntimeError(f"{fn.name}.backward returned {len(input_grads)} gradients "
                               f"for {len(fn.inputs)} inputs")
        for parent, parent_grad in zip(fn.inputs, input_grads):
            if parent is None or parent_grad is None:
                continue
            if parent_grad.shape != parent.shape:
                raise RuntimeError(f"{fn.name}.backward returned a gradient of shape "
                                   f"{parent_grad.shape} for an input of shape {parent.shape}")
            if parent_grad.dtype != parent.dtype:   # e.g. NumPy's bfloat16 (ml_dtypes) matrix
                parent_grad = parent_grad.astype(parent.dtype)    # product returns float32
            key = id(parent)
            pending[key] = parent_grad if key not in pending else pending[key] + parent_grad
        if not retain_graph:
            vars(fn).clear()            # frees every array the function saved


from minicnn.functions import math as _math  # noqa: E402  (operators need Tensor defined first)
