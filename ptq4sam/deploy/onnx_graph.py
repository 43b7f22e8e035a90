"""Reads of an ONNX graph that the graph rewrites share (:mod:`.conv_forms`, :mod:`.int4`)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def constants(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    """Every constant value of ``graph``: its initializers and the outputs of its ``Constant`` nodes."""
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def attr(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` where it has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
