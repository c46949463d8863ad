"""AttentionStore: how captured cross-attention becomes H_i (per-resolution aggregation, grid
orientation on non-square latents)."""

from __future__ import annotations

import pytest
import torch

from freecure.attention.capture import AttentionStore


def constant_layer(tokens: int, value: float, columns: int = 2) -> torch.Tensor:
    return torch.full((tokens, columns), value)


def test_per_resolution_weighs_each_resolution_equally_and_per_layer_each_layer():
    # SDXL-like: many coarse layers, few fine ones
    stores = {mode: AttentionStore((3, 4), (8, 8), mode) for mode in ("per_resolution", "per_layer")}
    for store in stores.values():
        for k in range(5):
            store.add(f"coarse{k}", constant_layer(16, 1.0))  # 4×4
        store.add("fine", constant_layer(64, 0.0))  # 8×8
    torch.testing.assert_close(stores["per_resolution"].aggregate(), torch.full((2, 8, 8), 0.5))
    torch.testing.assert_close(stores["per_layer"].aggregate(), torch.full((2, 8, 8), 5 / 6))


def test_equal_layer_counts_make_both_aggregations_agree():
    # SD1.5-like: as many layers at every resolution
    g = torch.Generator().manual_seed(0)
    layers = [(f"l{k}", torch.rand(tokens, 1, generator=g)) for k, tokens in enumerate([16, 16, 64, 64, 256, 256])]
    results = []
    for mode in ("per_resolution", "per_layer"):
        store = AttentionStore((5,), (16, 16), mode)
        for name, probs in layers:
            store.add(name, probs)
        results.append(store.aggregate())
    torch.testing.assert_close(results[0], results[1])


def test_steps_are_averaged_within_a_layer():
    store = AttentionStore((1,), (2, 2))
    store.add("a", constant_layer(4, 1.0, 1))
    store.add("a", constant_layer(4, 3.0, 1))
    torch.testing.assert_close(store.aggregate(), torch.full((1, 2, 2), 2.0))


def test_non_square_grids_keep_their_orientation():
    # latent 4 high × 8 wide; a layer at half resolution is 2 × 4, row-major (rows first)
    store = AttentionStore((1,), (4, 8))
    coarse = torch.zeros(2, 4)
    coarse[:, :2] = 1.0  # the left half
    store.add("coarse", coarse.reshape(8, 1))
    fine = torch.zeros(4, 8)
    fine[:, :4] = 1.0
    store.add("fine", fine.reshape(32, 1))
    heat = store.token_map([1])
    assert heat.shape == (4, 8)
    assert heat[:, :3].min() > 0.5 and heat[:, 5:].max() < 0.5
    assert torch.allclose(heat[0], heat[-1])  # no top/bottom pattern


def test_unknown_aggregation_is_refused():
    store = AttentionStore((1,), (2, 2), "median")
    store.add("a", constant_layer(4, 1.0, 1))
    with pytest.raises(ValueError, match="aggregation"):
        store.aggregate()


@pytest.mark.slow
def test_capture_under_torch_compile_does_not_recompile_per_step():
    """The per-layer step count lives in a tensor: a compiled layer with the capture processor
    traces a bounded number of graphs (first call, then every later one), not one per step, and
    records the same mean as eager."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from freecure.attention.capture import CrossAttentionCapture

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    hidden, text = torch.randn(3, 16, 16), torch.randn(3, 5, 8)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    stores = {}
    for mode in ("eager", "compiled"):
        store = stores[mode] = AttentionStore((1, 2), (4, 4))
        attn.set_processor(CrossAttentionCapture(AttnProcessor2_0(), store, "layer"))
        forward = attn.forward if mode == "eager" else torch.compile(attn.forward, backend=counting, fullgraph=True)
        for step in range(6):
            store.set_context(step, (1, 2))
            forward(hidden * (1 + step), encoder_hidden_states=text)
    torch._dynamo.reset()
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 6 steps: the capture recompiles per step"
    assert float(stores["compiled"].counts["layer"]) == 6
    torch.testing.assert_close(stores["compiled"].layer_map("layer", 1), stores["eager"].layer_map("layer", 1))
