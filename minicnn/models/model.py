"""Model, in the three Keras styles: subclassed, ``Sequential([...])`` and functional.

Functional::

    inputs = layers.Input((64, 64, 3))
    x = layers.Conv2D(4, (5, 5))(inputs)
    model = Model(inputs, x)

Subclassed: ``class Net(Model)`` with layers assigned in ``__init__`` and ``call(self, x, training)``.
"""
from __future__ import annotations

from minicnn import io
from minicnn.layers.base import (Input, Layer, SymbolicTensor, deserialize, format_shape, register,
                                 serialize, shape_of, unique_name)
from minicnn.tensor import post_order
from minicnn.training import Trainer


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def graph_nodes(outputs) -> list:
    """The symbolic tensors that lead to ``outputs``, each after its inputs."""
    return post_order(outputs, lambda tensor: tensor.inputs)


def keras_order(inputs, outputs) -> list:
    """The graph's operations (each Input symbol and each layer, once) in the order of Keras 3's
    ``Functional.layers`` (``keras.src.ops.function.map_graph``): by decreasing depth (the longest
    path to an output), ties by first visit of a depth-first walk from the outputs. Keras' config
    and weight-file paths follow this order."""
    def op(node):
        return node if node.layer is None else node.layer
    first_visit, nodes, done = {}, [], set()

    def visit(node):                  # recursive like Keras' _build_map; graphs are shallow
        if id(node) in done:
            return
        first_visit.setdefault(id(op(node)), (len(first_visit), op(node)))
        for parent in node.inputs:
            visit(parent)
        done.add(id(node))
        nodes.append(node)
    for output in outputs:
        visit(output)
    node_depth, op_depth = {}, {}
    for node in reversed(nodes):
        depth = max(node_depth.setdefault(id(node), 0), op_depth.get(id(op(node)), 0))
        op_depth[id(op(node))] = node_depth[id(node)] = depth
        for parent in node.inputs:
            node_depth[id(parent)] = max(depth + 1, node_depth.get(id(parent), 0))
    for symbol in inputs:             # an input no output needs still comes first (Keras' rule)
        if id(symbol) not in op_depth:
            op_depth[id(symbol)] = 0
            first_visit[id(symbol)] = (-1, symbol)
    return [item for _, item in sorted(first_visit.values(), key=lambda pair: (
        -op_depth[id(pair[1])], pair[0]))]


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
        # not through __setattr__, which would track the layers in the list a second time
        object.__setattr__(self, "_operations", keras_order(self._inputs, self._outputs))
        for operation in self._operations:        # each layer once, in Keras' order
            if isinstance(operation, Layer):
                self._layers.append(operation)
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
    def save_weights(self, filepath) -> None:
        """Every weight to ``filepath``, written atomically; the suffix picks the format
        (``.npz``: minicnn's, ``.weights.h5``: Keras 3's)."""
        io.save_weights(self, filepath)

    def load_weights(self, filepath) -> None:
        """Weights from ``save_weights``, a checkpoint or a Keras ``.weights.h5`` / ``.keras``
        file; every mismatch is listed and nothing is written unless all of them fit."""
        io.load_weights(self, filepath)

    def save(self, filepath) -> None:
        """Architecture and weights; reload with ``minicnn.models.load_model(filepath)``."""
        io.save_model(self, filepath)

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
        """A subclassed model: its constructor's arguments (subclasses add theirs). A functional
        one: Keras 3's graph config, ``{"name", "trainable", "layers": [{"module", "class_name",
        "config", "name", "inbound_nodes": [{"args": [...], "kwargs": {...}}]}, ...],
        "input_layers", "output_layers"}``, each tensor a ``{"class_name": "__keras_tensor__",
        "config": {"shape", "dtype", "keras_history": [layer name, node index, 0]}}``; the
        layers in ``keras_order``, an Input as an ``InputLayer`` entry with its ``batch_shape``."""
        if not self.functional:
            return {"name": self.name}
        calls, history = {}, {}
        for node in self._nodes:                   # node index: the layer's k-th call
            calls.setdefault(id(node.layer), []).append(node)
            history[id(node)] = [node.layer.name, len(calls[id(node.layer)]) - 1, 0]
        for symbol in self._inputs:
            history[id(symbol)] = [symbol.name, 0, 0]

        def tensor(node):
            return {"class_name": "__keras_tensor__",
                    "config": {"shape": list(node.shape), "dtype": node.dtype.name,
                               "keras_history": history[id(node)]}}
        entries = []
        for operation in self._operations:
            if isinstance(operation, SymbolicTensor):
                entries.append({"module": "minicnn.layers", "class_name": "InputLayer",
                                "config": {"batch_shape": list(operation.shape),
                                           "dtype": operation.dtype.name, "name": operation.name},
                                "name": operation.name, "inbound_nodes": []})
                continue
            nodes = [{"args": [[tensor(p) for p in node.inputs] if node.multiple
                               else tensor(node.inputs[0])], "kwargs": dict(node.kwargs)}
                     for node in calls[id(operation)]]
            entries.append({**serialize(operation), "name": operation.name,
                            "inbound_nodes": nodes})
        names = [entry["name"] for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"Model '{self.name}': layer and input names must be unique to save "
                             f"the graph (as Keras), repeated: {repeated}")

        def ends(symbols, single):
            refs = [history[id(t)] for t in symbols]
            return refs[0] if single else refs
        return {"name": self.name, "trainable": self.trainable, "layers": entries,
                "input_layers": ends(self._inputs, self._single_input),
                "output_layers": ends(self._outputs, self._single_output)}

    @classmethod
    def from_config(cls, config: dict):
        """The inverse of ``get_config``; a functional config (Keras 3's or minicnn's) is rebuilt
        call by call, a node waiting until the tensors it takes exist (Keras' rule)."""
        if "input_layers" not in config:
            return cls(**config)
        made, layers, pending = {}, {}, []
        for entry in config["layers"]:
            name = entry.get("name") or entry["config"]["name"]
            if entry["class_name"] == "InputLayer":
                made[name] = [input_from_config(entry["config"])]
                continue
            layers[name], made[name] = deserialize(entry), []
            pending.append((name, list(entry.get("inbound_nodes") or [])))
        while any(nodes for _, nodes in pending):
            progressed = False
            for name, nodes in pending:
                while nodes:
                    try:
                        args = [_resolve_tensors(arg, made) for arg in nodes[0].get("args", [])]
                    except _NotYet:
                        break
                    if len(args) != 1:
                        raise ValueError(f"Model.from_config: layer {name!r} is called with "
                                         f"{len(args)} positional arguments; minicnn layers take "
                                         "one (a tensor or a list of tensors)")
                    kwargs = {k: v for k, v in (nodes.pop(0).get("kwargs") or {}).items()
                              if k not in ("training", "mask")}
                    made[name].append(layers[name](args[0], **kwargs))
                    progressed = True
            if not progressed:
                waiting = [name for name, nodes in pending if nodes]
                raise ValueError(f"Model.from_config: the graph cannot be rebuilt; layers "
                                 f"{waiting} take tensors no layer makes")

        def ends(refs):
            single = bool(refs) and isinstance(refs[0], str)
            found = [_resolve_tensors({"class_name": "__keras_tensor__",
                                       "config": {"keras_history": ref}}, made)
                     for ref in ([refs] if single else refs)]
            return found[0] if single else found
        return cls(ends(config["input_layers"]), ends(config["output_layers"]),
                   name=config.get("name"), trainable=config.get("trainable", True))

    def export(self, filepath, format="onnx", input_signature=None, opset=17, verbose=None):
        """Write the model for inference elsewhere, Keras 3's ``Model.export``. Only
        ``format="onnx"`` (Keras' default is "tf_saved_model", which minicnn does not write):
        see ``minicnn.io.onnx.export_onnx``."""
        io.export(self, filepath, format=format, input_signature=input_signature, opset=opset)


register(Model, "Functional")      # Keras 3's class name of a graph model


def input_from_config(config: dict) -> SymbolicTensor:
    """An Input symbol from an InputLayer config (``batch_shape``; Keras 2 wrote
    ``batch_input_shape``)."""
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) < 2:
        raise ValueError(f"InputLayer: expected 'batch_shape' [batch, ...], got {config!r:.200}")
    return Input(tuple(shape[1:]), batch_size=shape[0], name=config.get("name"),
                 dtype=config.get("dtype") or "float32")


class _NotYet(Exception):
    """A tensor whose layer call has not been rebuilt yet."""


def _resolve_tensors(value, made):
    """``value`` with each ``__keras_tensor__`` reference replaced by the symbol it names."""
    if isinstance(value, (list, tuple)):
        return [_resolve_tensors(v, made) for v in value]
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        name, node_index, tensor_index = value["config"]["keras_history"]
        if name not in made:
            raise ValueError(f"Model.from_config: a tensor refers to an unknown layer {name!r}")
        if tensor_index != 0:
            raise ValueError(f"Model.from_config: layer {name!r} output {tensor_index}: minicnn "
                             "layers have one output")
        if node_index >= len(made[name]):
            raise _NotYet(name)
        return made[name][node_index]
    return value


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

    def get_config(self) -> dict:
        """``{"name", "trainable", "layers": [serialize(layer), ...], "build_input_shape"}``,
        Keras 3's Sequential config (Keras also lists an InputLayer first)."""
        shape = self.built_input_shape
        return {"name": self.name, "trainable": self.trainable,
                "layers": [serialize(layer) for layer in self.stack],
                "build_input_shape": None if shape is None else list(shape)}

    @classmethod
    def from_config(cls, config: dict):
        shape = config.get("build_input_shape")
        stack = []
        for entry in config.get("layers", []):
            if entry.get("class_name") == "InputLayer":
                shape = shape or entry["config"].get("batch_shape")
            else:
                stack.append(deserialize(entry))
        model = cls(stack, name=config.get("name"), trainable=config.get("trainable", True))
        if shape is not None and stack:
            model.build(tuple(shape))
        return model


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
