"""Shared check that a model compiles as one graph and matches eager."""
import torch


def assert_compiles_fullgraph(
        model: torch.nn.Module,
        x: torch.Tensor,
        ref: torch.Tensor,
        backend: str = 'aot_eager',
        rtol: float = 1e-5,
        atol: float = 1e-5,
) -> None:
    """`torch.compile(fullgraph=True)` output equal to the eager `ref`.

    `fullgraph=True` makes any graph break an error, so one compilation (no separate `torch._dynamo.explain`
    pass) proves the model is a single graph. `backend='eager'` checks the capture only (cheapest);
    'aot_eager' also runs AOTAutograd's functionalisation, as inductor would.
    """
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=rtol, atol=atol)
