"""ONNX export (``model.export("m.onnx", format="onnx")``, Keras 3's name); needs the optional
``onnx`` package (``pip install "minicnn[onnx]"``), and any ONNX runtime to run the file.

The file takes the model's input as the model has it, NHWC ``(N, H, W, C)`` float32 (N, and H, W
when the model leaves them open, are dynamic), and returns what ``model.predict`` returns. Inside,
image tensors are NCHW, ONNX's layout for Conv and pooling: one Transpose after the input and
one before an image output; Flatten and Dense on images transpose back first, so the numbers
come out in Keras' channels-last order.

How it is traced: the model's ``call`` runs on symbolic tensors (as ``Model.build`` does), which
records one node per layer call; a layer with its own converter below becomes ONNX operators, any
other layer made of layers (a nested model, a U-Net block) is traced again inside. Opset 17
(>= 17 accepted). Conversions (Keras kernel layouts on the left):

    Conv2D           Conv, W = kernel (kh, kw, C, F) -> (F, C, kh, kw)
    DepthwiseConv2D  Conv with group = C, W (kh, kw, C, M) -> (C*M, 1, kh, kw)
    SeparableConv2D  the depthwise Conv, then a 1x1 Conv with the pointwise kernel
    Conv2DTranspose  ConvTranspose, W (kh, kw, F, C) -> (C, F, kh, kw), the crop of Keras' rule
    BatchNormalization  BatchNormalization (inference: moving statistics)
    Dense            MatMul + Add;  pooling: MaxPool / AveragePool (padding not counted) /
    GlobalAveragePool;  UpSampling2D: Resize (nearest: asymmetric + floor; bilinear: half_pixel);
    ZeroPadding2D: Pad;  Cropping2D, CropToMatch: Slice;  Concatenate: Concat;  Add: Sum;
    activations: Relu, LeakyRelu, Sigmoid, Tanh, Softmax, LogSoftmax (ReLU's max_value and
    threshold: Clip / Where);  Dropout: nothing (inference)

'same' padding is written as explicit pads (kernels.shapes' rule) where the size is known, else as
auto_pad SAME_UPPER, ONNX's name for the same TensorFlow rule.
"""
from __future__ import annotations

import numpy as np

from minicnn.functions import activations as A
from minicnn.io.files import write_atomic
from minicnn.layers.base import SymbolicTensor
from minicnn.tensor import post_order
from kernels.shapes import conv_padding_1d, conv_transpose2d_geometry, dilated_extent

NHWC_TO_NCHW, NCHW_TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
IR_VERSION = 8                           # ONNX IR of opset 17; read by onnxruntime >= 1.10


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError('ONNX export needs the onnx package: pip install "minicnn[onnx]" '
                          '(or pip install onnx)') from None
    return onnx


class _Graph:
    """The ONNX nodes and initializers being written; names are made unique here."""

    def __init__(self, onnx):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def constant(self, array, hint="w") -> str:
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array),
                                                                    name))
        return name

    def op(self, op_type, inputs, hint=None, **attributes) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out],
                                                name=self.name(op_type), **attributes))
        return out


def export_onnx(model, filepath, input_signature=None, opset: int = 17) -> None:
    """Write ``model`` as an ONNX file (see the module docstring), atomically.

    input_signature: the input shape (batch first, None = dynamic), by default the model's own
    (a functional model's Input, else the shape it was built for); ValueError naming the layer
    for one that has no ONNX conversion."""
    onnx = _onnx()
    if opset < 17:
        raise ValueError(f"export: opset must be >= 17, got {opset}")
    shape = _input_shape(model, input_signature)
    graph = _Graph(onnx)
    symbol = SymbolicTensor(shape, name="input")
    value = {id(symbol): ("input", len(shape) == 4)}
    if len(shape) == 4:
        value[id(symbol)] = (graph.op("Transpose", ["input"], "nchw", perm=NHWC_TO_NCHW), True)
    outputs = model.call(symbol, training=False)
    if isinstance(outputs, (list, tuple)):
        raise ValueError("export: models with several outputs are not supported")
    _emit(graph, [symbol], outputs, value)
    result, is_image = value[id(outputs)]
    if is_image:
        result = graph.op("Transpose", [result], "nhwc", perm=NCHW_TO_NHWC)
    graph.nodes.append(graph.helper.make_node("Identity", [result], ["output"], name="output"))
    elem = onnx.TensorProto.FLOAT

    def dims(shape, names):
        return [names[i] if d is None else d for i, d in enumerate(shape)]
    names = ["N", "H", "W", "C"] if len(shape) == 4 else ["N"] + [f"d{i}" for i in range(1, 9)]
    out_names = ["N", "H_out", "W_out", "C_out"] if len(outputs.shape) == 4 else \
        ["N"] + [f"o{i}" for i in range(1, 9)]
    onnx_graph = graph.helper.make_graph(
        graph.nodes, model.name,
        [graph.helper.make_tensor_value_info("input", elem, dims(shape, names))],
        [graph.helper.make_tensor_value_info("output", elem, dims(outputs.shape, out_names))],
        graph.initializers)
    proto = graph.helper.make_model(onnx_graph, producer_name="minicnn",
                                    opset_imports=[graph.helper.make_opsetid("", opset)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    write_atomic(filepath, lambda stream: stream.write(proto.SerializeToString()))


def _input_shape(model, input_signature) -> tuple:
    if input_signature is not None:
        shape = tuple(input_signature)
    elif getattr(model, "functional", False):
        if len(model.inputs) != 1:
            raise ValueError("export: models with several inputs are not supported")
        shape = tuple(model.inputs[0].shape)
    elif isinstance(model.built_input_shape, tuple):
        shape = tuple(model.built_input_shape)
    else:
        raise ValueError(f"export: {type(model).__name__} '{model.name}' has no input shape yet; "
                         "build it (model.build((None, H, W, C))) or pass input_signature")
    if len(shape) not in (2, 4) or shape[-1] is None:
        raise ValueError(f"export: the input must be (N, H, W, C) or (N, features) with known "
                         f"channels, got {shape}")
    return (None,) + shape[1:]


def _emit(graph, inputs, outputs, value):
    """ONNX nodes for every layer call between ``inputs`` and ``outputs`` (symbolic tensors);
    ``value[id(symbol)]`` is (ONNX name, whether it is an NCHW image)."""
    for node in post_order([outputs], lambda t: t.inputs):
        if id(node) in value:
            continue
        if node.layer is None:
            raise ValueError(f"export: the graph reads an input {node.name!r} it was not given")
        args = [value[id(p)] for p in node.inputs]
        value[id(node)] = _convert(graph, node, args)


def _convert(graph, node, args):
    layer = node.layer
    converter = CONVERTERS.get(type(layer).__name__)
    if converter is not None:
        return converter(graph, layer, node, args)
    if layer.layers:                           # made of layers: trace its call again
        inner = [SymbolicTensor(p.shape, name="inner") for p in node.inputs]
        out = layer.call(inner if node.multiple else inner[0], training=False, **node.kwargs)
        if not isinstance(out, SymbolicTensor):
            raise ValueError(f"export: {type(layer).__name__} '{layer.name}' returns "
                             f"{type(out).__name__}, not one tensor")
        value = {id(s): a for s, a in zip(inner, args)}
        _emit(graph, inner, out, value)
        return value[id(out)]
    raise ValueError(f"export: {type(layer).__name__} '{layer.name}' has no ONNX conversion; "
                     f"supported: {sorted(CONVERTERS)} and layers made of them")


# -- converters: (graph, layer, node, [(name, is_image), ...]) -> (name, is_image) ----------------
def _spatial(node):
    """(H, W) of the node's first input (None where unknown)."""
    return node.inputs[0].shape[1:3]


def _window_pads(size_hw, kernel, strides, dilation, padding):
    """ONNX attributes for 'valid' / 'same' padding of a window op."""
    if padding == "valid":
        return {"pads": [0, 0, 0, 0]}
    if any(s is None for s in size_hw) and any(s > 1 for s in strides):
        return {"auto_pad": "SAME_UPPER"}
    pairs = [conv_padding_1d(size or 1, k, s, d, "same")
             for size, k, s, d in zip(size_hw, kernel, strides, dilation)]
    return {"pads": [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]}


def _activation(graph, identifier, x, is_image):
    name = A.serialize(A.get(identifier))
    if name == "linear":
        return x
    if name in ("relu", "sigmoid", "tanh"):
        return graph.op(name.capitalize(), [x])
    if name == "leaky_relu":
        return graph.op("LeakyRelu", [x], alpha=0.3)       # Keras 3's default slope
    if name in ("softmax", "log_softmax"):
        op = "Softmax" if name == "softmax" else "LogSoftmax"
        return graph.op(op, [x], axis=1 if is_image else -1)
    raise ValueError(f"export: activation {name!r} has no ONNX conversion")


def _conv(graph, x, kernel, bias, size_hw, strides, dilations, padding, group=1):
    """Conv of NCHW ``x`` with an OIHW ``kernel`` and optional ``bias``."""
    kernel_size = tuple(kernel.shape[2:])
    inputs = [x, graph.constant(kernel)] + ([] if bias is None else [graph.constant(bias, "b")])
    return graph.op("Conv", inputs, strides=list(strides), dilations=list(dilations),
                    group=group, kernel_shape=list(kernel_size),
                    **_window_pads(size_hw, kernel_size, strides, dilations, padding))


def _bias(layer):
    return None if layer.bias is None else layer.bias.numpy()


def _depthwise_kernel(kernel):
    """(kh, kw, C, M) -> (C*M, 1, kh, kw): output channel c*M + m reads input channel c."""
    kh, kw, channels, mult = kernel.shape
    return kernel.reshape(kh, kw, channels * mult).transpose(2, 0, 1)[:, None]


def conv2d(graph, layer, node, args):
    y = _conv(graph, args[0][0], layer.kernel.numpy().transpose(3, 2, 0, 1), _bias(layer),
              _spatial(node), layer.strides, layer.dilation_rate, layer.padding)
    return _activation(graph, layer.activation, y, True), True


def depthwise_conv2d(graph, layer, node, args):
    y = _conv(graph, args[0][0], _depthwise_kernel(layer.kernel.numpy()), _bias(layer),
              _spatial(node), layer.strides, layer.dilation_rate, layer.padding,
              group=layer.kernel.shape[2])
    return _activation(graph, layer.activation, y, True), True


def separable_conv2d(graph, layer, node, args):
    h = _conv(graph, args[0][0], _depthwise_kernel(layer.depthwise_kernel.numpy()), None,
              _spatial(node), layer.strides, layer.dilation_rate, layer.padding,
              group=layer.depthwise_kernel.shape[2])
    y = _conv(graph, h, layer.pointwise_kernel.numpy().transpose(3, 2, 0, 1), _bias(layer),
              (None, None), (1, 1), (1, 1), "valid")
    return _activation(graph, layer.activation, y, True), True


def spatial_separable_conv2d(graph, layer, node, args):
    (sh, sw), (dh, dw) = layer.strides, layer.dilation_rate
    height, width = _spatial(node)
    rows = _conv(graph, args[0][0], layer.vertical_kernel.numpy().transpose(3, 2, 0, 1), None,
                 (height, 1), (sh, 1), (dh, 1), layer.padding)
    y = _conv(graph, rows, layer.horizontal_kernel.numpy().transpose(3, 2, 0, 1), _bias(layer),
              (1, width), (1, sw), (1, dw), layer.padding)
    return _activation(graph, layer.activation, y, True), True


def conv2d_transpose(graph, layer, node, args):
    x, _ = args[0]
    size = [s if s is not None else 4 for s in _spatial(node)]   # the crop does not depend on it
    out, forward_pads = conv_transpose2d_geometry(size, layer.kernel_size, layer.strides,
                                                  layer.dilation_rate, layer.padding,
                                                  layer.output_padding)
    begin, end, extra = [], [], []
    for axis in range(2):
        full = (size[axis] - 1) * layer.strides[axis] + \
            dilated_extent(layer.kernel_size[axis], layer.dilation_rate[axis])
        before = forward_pads[axis][0]
        grow = max(out[axis] + before - full, 0)               # rows past the full output
        begin.append(before)
        end.append(full + grow - before - out[axis])
        extra.append(grow)
    kernel = layer.kernel.numpy().transpose(3, 2, 0, 1)
    inputs = [x, graph.constant(kernel)] + ([] if layer.bias is None else
                                            [graph.constant(_bias(layer), "b")])
    y = graph.op("ConvTranspose", inputs, strides=list(layer.strides),
                 dilations=list(layer.dilation_rate), kernel_shape=list(layer.kernel_size),
                 pads=begin + end, output_padding=extra)
    return _activation(graph, layer.activation, y, True), True


def batch_normalization(graph, layer, node, args):
    x, is_image = args[0]
    rank = len(node.inputs[0].shape)
    if layer.axis not in (-1, rank - 1):
        raise ValueError(f"export: BatchNormalization '{layer.name}' normalises axis "
                         f"{layer.axis}; only the channels (-1) convert")
    mean = layer.moving_mean.numpy()
    ones, zeros = np.ones_like(mean), np.zeros_like(mean)
    gamma = ones if layer.gamma is None else layer.gamma.numpy()
    beta = zeros if layer.beta is None else layer.beta.numpy()
    names = [graph.constant(v, hint) for v, hint in
             ((gamma, "gamma"), (beta, "beta"), (mean, "mean"),
              (layer.moving_variance.numpy(), "var"))]
    if rank not in (2, 4):
        raise ValueError(f"export: BatchNormalization '{layer.name}' on rank {rank} input")
    return graph.op("BatchNormalization", [x] + names, epsilon=layer.epsilon), is_image


def dense(graph, layer, node, args):
    x, is_image = args[0]
    if is_image:
        x = graph.op("Transpose", [x], perm=NCHW_TO_NHWC)
    y = graph.op("MatMul", [x, graph.constant(layer.kernel.numpy())])
    if layer.bias is not None:
        y = graph.op("Add", [y, graph.constant(_bias(layer), "b")])
    y = _activation(graph, layer.activation, y, False)
    if is_image:
        y = graph.op("Transpose", [y], perm=NHWC_TO_NCHW)
    return y, is_image


def _pool(op_type, extra=None):
    def convert(graph, layer, node, args):
        attributes = _window_pads(_spatial(node), layer.pool_size, layer.strides, (1, 1),
                                  layer.padding)
        return graph.op(op_type, [args[0][0]], kernel_shape=list(layer.pool_size),
                        strides=list(layer.strides), **attributes, **(extra or {})), True
    return convert


def global_average_pooling2d(graph, layer, node, args):
    y = graph.op("GlobalAveragePool", [args[0][0]])
    return (y, True) if layer.keepdims else (graph.op("Flatten", [y], axis=1), False)


def up_sampling2d(graph, layer, node, args):
    scales = graph.constant(np.array([1, 1, *layer.size], dtype=np.float32), "scales")
    if layer.interpolation == "nearest":
        modes = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                 "nearest_mode": "floor"}
    else:
        modes = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    return graph.op("Resize", [args[0][0], "", scales], **modes), True


def zero_padding2d(graph, layer, node, args):
    (top, bottom), (left, right) = layer.padding
    pads = graph.constant(np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64), "pads")
    return graph.op("Pad", [args[0][0], pads], mode="constant"), True


def _slice(graph, x, crops):
    """Slice rows/columns off an NCHW tensor: crops ((top, bottom), (left, right))."""
    big = np.iinfo(np.int64).max
    starts = np.array([crops[0][0], crops[1][0]], dtype=np.int64)
    ends = np.array([-c[1] if c[1] else big for c in crops], dtype=np.int64)
    axes = np.array([2, 3], dtype=np.int64)
    return graph.op("Slice", [x, graph.constant(starts, "starts"), graph.constant(ends, "ends"),
                              graph.constant(axes, "axes")])


def cropping2d(graph, layer, node, args):
    return _slice(graph, args[0][0], layer.cropping), True


def crop_to_match(graph, layer, node, args):
    shape, reference = node.inputs[0].shape, node.inputs[1].shape
    if None in shape[1:3] or None in reference[1:3]:
        raise ValueError(f"export: CropToMatch '{layer.name}' needs known sizes; export with "
                         "input_signature=(None, H, W, C)")
    return _slice(graph, args[0][0], layer._margins(shape, reference)), True


def _axis(layer_axis, rank, is_image):
    axis = layer_axis % rank
    return NHWC_TO_NCHW.index(axis) if is_image else axis


def concatenate(graph, layer, node, args):
    is_image = args[0][1]
    return graph.op("Concat", [a for a, _ in args],
                    axis=_axis(layer.axis, len(node.inputs[0].shape), is_image)), is_image


def add(graph, layer, node, args):
    return graph.op("Sum", [a for a, _ in args]), args[0][1]


def activation(graph, layer, node, args):
    return _activation(graph, layer.activation, *args[0]), args[0][1]


def relu(graph, layer, node, args):
    x, is_image = args[0]
    slope, limit, threshold = layer.negative_slope, layer.max_value, layer.threshold
    if threshold == 0 and slope == 0:
        y = graph.op("Relu", [x])
    elif threshold == 0:
        y = graph.op("LeakyRelu", [x], alpha=slope)
    else:            # Keras: x >= threshold ? x : slope * (x - threshold)
        t = graph.constant(np.array(threshold, dtype=np.float32), "threshold")
        below = graph.op("Mul", [graph.op("Sub", [x, t]),
                                 graph.constant(np.array(slope, dtype=np.float32), "slope")])
        y = graph.op("Where", [graph.op("GreaterOrEqual", [x, t]), x, below])
    if limit is not None:
        y = graph.op("Min", [y, graph.constant(np.array(limit, dtype=np.float32), "max")])
    return y, is_image


def leaky_relu(graph, layer, node, args):
    return graph.op("LeakyRelu", [args[0][0]], alpha=layer.negative_slope), args[0][1]


def softmax(graph, layer, node, args):
    x, is_image = args[0]
    return graph.op("Softmax", [x], axis=_axis(layer.axis, len(node.inputs[0].shape),
                                               is_image)), is_image


def dropout(graph, layer, node, args):
    return args[0]


def flatten(graph, layer, node, args):
    x, is_image = args[0]
    if is_image:
        x = graph.op("Transpose", [x], perm=NCHW_TO_NHWC)     # Keras flattens h, w, c
    return graph.op("Flatten", [x], axis=1), False


CONVERTERS = {
    "Conv2D": conv2d, "DepthwiseConv2D": depthwise_conv2d, "SeparableConv2D": separable_conv2d,
    "SpatialSeparableConv2D": spatial_separable_conv2d, "Conv2DTranspose": conv2d_transpose,
    "BatchNormalization": batch_normalization, "Dense": dense,
    "MaxPooling2D": _pool("MaxPool"), "AveragePooling2D": _pool("AveragePool",
                                                                {"count_include_pad": 0}),
    "GlobalAveragePooling2D": global_average_pooling2d, "UpSampling2D": up_sampling2d,
    "ZeroPadding2D": zero_padding2d, "Cropping2D": cropping2d, "CropToMatch": crop_to_match,
    "Concatenate": concatenate, "Add": add, "Activation": activation, "ReLU": relu,
    "LeakyReLU": leaky_relu, "Softmax": softmax, "Dropout": dropout, "Flatten": flatten,
}
