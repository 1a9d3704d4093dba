"""Shared check that a model compiles as one graph and matches eager."""
import torch


def assert_compiles_fullgraph(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> None:
    """One graph, no breaks, and `torch.compile(fullgraph=True)` output equal to the eager `ref`."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
