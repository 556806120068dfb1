"""Model, in the three Keras styles: subclassed, ``Sequential([...])`` and functional.

Functional::

    inputs = layers.Input((64, 64, 3))
    x = layers.Conv2D(4, (5, 5))(inputs)
    model = Model(inputs, x)

Subclassed: ``class Net(Model)`` with layers assigned in ``__init__`` and ``call(self, x, training)``.
"""
from __future__ import annotations

from minicnn.layers.base import Layer, SymbolicTensor, format_shape, shape_of, unique_name
from minicnn.tensor import post_order
from minicnn.training import Trainer


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def graph_nodes(outputs) -> list:
    """The symbolic tensors that lead to ``outputs``, each after its inputs."""
    return post_order(outputs, lambda tensor: tensor.inputs)


class Model(Layer, Trainer):
    """A layer made of layers, that can be compiled and fitted.

    ``Model(inputs, outputs)`` builds a functional model from symbolic tensors; a subclass
    defines ``call`` instead.
    """

    def __init__(self, inputs=None, outputs=None, name=None, **kwargs):
        functional = inputs is not None or outputs is not None
        if name is None and functional:
            name = unique_name("functional")       # Keras' name for graph models
        super().__init__(name=name, **kwargs)
        self.functional = functional
        if self.functional:
            self._init_graph(inputs, outputs)

    # -- functional graph -----------------------------------------------------------------------
    def _init_graph(self, inputs, outputs):
        self._single_input = not isinstance(inputs, (list, tuple))
        self._single_output = not isinstance(outputs, (list, tuple))
        self._inputs, self._outputs = _as_list(inputs), _as_list(outputs)
        for t in self._inputs + self._outputs:
            if not isinstance(t, SymbolicTensor):
                raise TypeError(f"Model: inputs and outputs must come from layers.Input(...), "
                                f"got {type(t).__name__}")
        nodes = graph_nodes(self._outputs)
        known = {id(t) for t in self._inputs}
        for t in nodes:
            if t.layer is None and id(t) not in known:
                raise ValueError(f"Model: output depends on {t.name!r}, which is not among the "
                                 "model's inputs")
        self._nodes = [t for t in nodes if t.layer is not None]
        last_use = {}
        for position, t in enumerate(self._nodes):
            for parent in t.inputs:
                last_use[id(parent)] = position
        self._last_use = last_use
        for t in self._nodes:              # track each layer once, in call order
            if all(t.layer is not known_layer for known_layer in self._layers):
                self._layers.append(t.layer)
        self.built = True
        self.built_input_shape = [t.shape for t in self._inputs]

    @property
    def inputs(self):
        return self._inputs if self.functional else None

    @property
    def outputs(self):
        return self._outputs if self.functional else None

    def _run_graph(self, inputs, training):
        given = _as_list(inputs)
        if len(given) != len(self._inputs):
            raise ValueError(f"Model '{self.name}': expected {len(self._inputs)} inputs, "
                             f"got {len(given)}")
        values = {}
        for symbol, tensor in zip(self._inputs, given):
            _check_input_shape(self.name, symbol, tensor.shape)
            values[id(symbol)] = tensor
        keep = {id(t) for t in self._outputs}
        for position, symbol in enumerate(self._nodes):
            args = [values[id(parent)] for parent in symbol.inputs]
            values[id(symbol)] = symbol.layer(args if symbol.multiple else args[0],
                                              training=training, **symbol.kwargs)
            for parent in symbol.inputs:   # drop activations nobody needs any more
                if self._last_use.get(id(parent)) == position and id(parent) not in keep:
                    values.pop(id(parent), None)
        outputs = [values[id(t)] for t in self._outputs]
        return outputs[0] if self._single_output else outputs

    # -- Layer interface --------------------------------------------------------------------------
    def _prepare(self, shape) -> None:
        """Sub-layers build themselves on the first call; remember the first input shape."""
        if not self.built:
            self.built_input_shape = shape
        self.built = True

    def compute_output_shape(self, input_shape):
        symbolic = ([SymbolicTensor(s) for s in input_shape] if isinstance(input_shape, list)
                    else SymbolicTensor(input_shape))
        return shape_of(self.call(symbolic, training=False))

    # -- saving (see minicnn.io) -------------------------------------------------------------------
    def save_weights(self, path) -> None:
        """Every weight to ``path`` (.npz + JSON manifest), written atomically."""
        from minicnn import io
        io.save_weights(self, path)

    def load_weights(self, path) -> None:
        """Weights from ``save_weights`` or a checkpoint; lists every mismatch."""
        from minicnn import io
        io.load_weights(self, path)

    def save(self, path) -> None:
        """Architecture and weights; reload with ``minicnn.models.load_model(path)``."""
        from minicnn import io
        io.save_model(self, path)

    def call(self, inputs, training=False):
        if self.functional:
            return self._run_graph(inputs, training)
        raise NotImplementedError(f"{type(self).__name__}: define call(self, x, training=False) "
                                  "or build the model with Model(inputs, outputs)")

    def build(self, input_shape):
        """Build a subclassed model by tracing ``call`` on a symbolic batch of ``input_shape``."""
        if self.functional:
            return
        shape = tuple(input_shape)
        self.call(SymbolicTensor(shape), training=False)
        self.built = True
        self.built_input_shape = shape

    def summary(self, print_fn=print) -> None:
        """Print each layer, its output shape and its parameter count, like Keras."""
        rows = []
        if self.functional:
            for t in self._inputs:
                rows.append((f"{t.name} (InputLayer)", format_shape(t.shape), 0))
        for layer in self._layers:
            shape = layer.output_shape
            shape = "?" if shape is None else (format_shape(shape) if not isinstance(shape, list)
                                               else ", ".join(format_shape(s) for s in shape))
            rows.append((f"{layer.name} ({type(layer).__name__})", shape, layer.count_params()))
        width = [max(len("Layer (type)"), *(len(r[0]) for r in rows)) + 2,
                 max(len("Output Shape"), *(len(r[1]) for r in rows)) + 2, 12]
        line = "-" * sum(width)
        print_fn(f'Model: "{self.name}"')
        print_fn(line)
        print_fn("Layer (type)".ljust(width[0]) + "Output Shape".ljust(width[1]) + "Param #")
        print_fn("=" * sum(width))
        for name, shape, count in rows:
            print_fn(name.ljust(width[0]) + shape.ljust(width[1]) + f"{count:,}")
        print_fn("=" * sum(width))
        trainable = sum(w.size for w in self.trainable_weights)
        total = self.count_params()
        print_fn(f"Total params: {total:,} ({_size(total)})")
        print_fn(f"Trainable params: {trainable:,} ({_size(trainable)})")
        print_fn(f"Non-trainable params: {total - trainable:,} ({_size(total - trainable)})")

    def get_config(self) -> dict:
        return {"name": self.name}


class Sequential(Model):
    """A plain stack: each layer's output is the next one's input."""

    def __init__(self, layers=None, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.stack = []
        for layer in layers or []:
            self.add(layer)

    def add(self, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add: expected a Layer, got {type(layer).__name__}")
        self.stack = self.stack + [layer]

    def call(self, x, training=False):
        for layer in self.stack:
            x = layer(x, training=training)
        return x


def _check_input_shape(model_name, symbol, shape):
    expected = symbol.shape
    if len(shape) != len(expected) or any(e is not None and e != s
                                          for e, s in zip(expected[1:], shape[1:])):
        raise ValueError(f"Model '{model_name}': input {symbol.name!r} expects shape "
                         f"{format_shape(expected)}, got {format_shape(tuple(shape))}")


def _size(count: int) -> str:
    size = count * 4
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
