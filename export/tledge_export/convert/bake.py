"""``--bake-preprocess``: put the uint8 -> normalized float step inside the graph.

The baked graph takes ``input`` as uint8 NHWC at model size (a camera frame after its
resize/crop) and does ``Cast -> Mul(scale/std) -> Add(-mean/std) -> Transpose(NCHW)``
itself, with the runtime's own float32 factors
(:func:`tledge_runtime.image.preprocess.normalize_factors`, which its ``Normalizer`` uses), so baked and
non-baked models see bit-identical tensors. Baking is the last graph edit: fp16 conversion and int8
quantization work on the plain graph, and the normalization stays in float32 ahead of them.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from tledge_runtime.image.preprocess import normalize_factors
from tledge_runtime.model.meta import Preprocess

PREFIX = "tledge_preprocess"


def bake_preprocess(model: onnx.ModelProto, p: Preprocess) -> onnx.ModelProto:
    """A copy of ``model`` whose single NCHW float input becomes a uint8 NHWC input of the same name."""
    baked = onnx.ModelProto()
    baked.CopyFrom(model)
    g = baked.graph
    old = g.input[0]
    name = old.name
    elem = old.type.tensor_type.elem_type  # float32, or float16 for a model with fp16 I/O
    batch = old.type.tensor_type.shape.dim[0]
    inner = f"{PREFIX}_nchw"
    for node in g.node:
        node.input[:] = [inner if i == name else i for i in node.input]

    mul, add = normalize_factors(p)
    g.initializer.extend([numpy_helper.from_array(mul, f"{PREFIX}_mul"), numpy_helper.from_array(add, f"{PREFIX}_add")])
    normalized = f"{PREFIX}_normalized"
    nodes = [
        helper.make_node("Cast", [name], [f"{PREFIX}_float"], to=TensorProto.FLOAT, name=f"{PREFIX}_cast"),
        # NHWC: the last axis is the channel, so the (3,) factors broadcast without a reshape.
        helper.make_node("Mul", [f"{PREFIX}_float", f"{PREFIX}_mul"], [f"{PREFIX}_scaled"], name=f"{PREFIX}_mul"),
        helper.make_node("Add", [f"{PREFIX}_scaled", f"{PREFIX}_add"], [normalized], name=f"{PREFIX}_add"),
    ]
    if elem == TensorProto.FLOAT:
        nodes.append(helper.make_node("Transpose", [normalized], [inner], perm=[0, 3, 1, 2],
                                      name=f"{PREFIX}_transpose"))
    else:
        nodes += [helper.make_node("Transpose", [normalized], [f"{PREFIX}_nchw32"], perm=[0, 3, 1, 2],
                                   name=f"{PREFIX}_transpose"),
                  helper.make_node("Cast", [f"{PREFIX}_nchw32"], [inner], to=elem, name=f"{PREFIX}_cast_graph")]
    existing = list(g.node)
    del g.node[:]
    g.node.extend(nodes + existing)

    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, [None, p.height, p.width, 3])
    new_input.type.tensor_type.shape.dim[0].CopyFrom(batch)
    g.input.remove(old)
    g.input.insert(0, new_input)
    return baked
