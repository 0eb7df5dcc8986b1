"""Graph helpers shared by the quantizers."""

from __future__ import annotations

from onnx import TensorProto, helper

from tritonembed.export.onnx_graph import names_read


def test_names_read_counts_what_if_branches_read_from_the_outer_graph():
    """The BERT graphs' attention sits in If branches that read the outer q / k / v / bias by name: a pass that
    prunes initializers or casts nobody reads must see those reads (int8 once dropped the packed bias)."""
    def branch(name: str, inputs: list[str]):
        node = helper.make_node("Add", inputs, [f"{name}_out"])
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    inner = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", ["x", "bias"]),
                             else_branch=branch("else", ["x", "nested_only"]))
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["x"]), inner], "g", [], [])
    assert names_read(graph) == {"a", "cond", "x", "bias", "nested_only"}
