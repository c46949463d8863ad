"""The published transformer configurations of FLUX.2 [klein] 4B and 9B, FLUX.2 [dev] and FLUX.1
Kontext [dev] (tests/families/configs/*.json, each with the source of its numbers in "_source"),
built on the meta device: block counts, widths, guidance embedding and parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from freecure.core.configs import FLUX_DEV_TRANSFORMER

CONFIGS = Path(__file__).parent / "configs"

#: name → (double-stream blocks, single-stream blocks, width, text width, guidance embedded,
#: published parameter count)
EXPECTED = {
    "flux2-klein-4b": (5, 20, 3072, 7680, False, 4.0e9),  # "4B"
    "flux2-klein-9b": (8, 24, 4096, 12288, False, 9.0e9),  # "9B" (Qwen3-8B text encoder aside)
    "flux2-dev": (8, 48, 6144, 15360, True, 32e9),  # "32B"
    "flux1-kontext-dev": (19, 38, 3072, 4096, True, 12e9),  # "12B", as FLUX.1-dev
}


def load(name: str) -> tuple[type, dict, dict]:
    raw = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    config = {key: value for key, value in raw.items() if not key.startswith("_")}
    return getattr(diffusers, raw["_class_name"]), config, raw


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def built(request):
    cls, config, raw = load(request.param)
    with torch.device("meta"):
        model = cls(**config)
    return request.param, model, raw


def test_every_config_names_its_source():
    names = sorted(path.stem for path in CONFIGS.glob("*.json"))
    assert names == sorted(EXPECTED)
    for name in names:
        _, _, raw = load(name)
        assert len(raw["_source"]) > 40 and raw["_model_id"].startswith("black-forest-labs/")


def test_blocks_widths_and_parameter_count(built):
    name, model, _ = built
    double, single, width, text_width, guidance, published = EXPECTED[name]
    assert next(model.parameters()).device.type == "meta"  # nothing allocated
    assert len(model.transformer_blocks) == double
    assert len(model.single_transformer_blocks) == single
    assert model.inner_dim == width == model.config.num_attention_heads * model.config.attention_head_dim
    assert model.context_embedder.in_features == text_width
    assert sum(model.config.axes_dims_rope) == model.config.attention_head_dim  # RoPE spans a head
    assert model.config.guidance_embeds is guidance
    count = sum(p.numel() for p in model.parameters())
    # the published sizes are rounded names: 3.88e9 ("4B"), 9.08e9, 32.2e9, 11.9e9
    assert abs(count - published) / published < 0.04, f"{name}: {count / 1e9:.2f}e9 parameters"


def test_flux2_latents_are_128_patchified_channels():
    for name in ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev"):
        _, config, _ = load(name)
        assert config["in_channels"] == 128  # 32 VAE channels × a 2×2 patch
        assert len(config["axes_dims_rope"]) == 4  # ids (t, h, w, l)


def test_kontext_is_flux1_dev_shaped():
    _, config, _ = load("flux1-kontext-dev")
    assert {key: config[key] for key in FLUX_DEV_TRANSFORMER} == {
        key: list(value) if isinstance(value, tuple) else value for key, value in FLUX_DEV_TRANSFORMER.items()
    }


def test_freecure_processors_install_on_exactly_the_named_blocks(built):
    """FASA's and SAME's processors on the real-size transformer (meta device): on exactly the
    blocks their layer choice names, every other processor left as it was, and each chosen
    block's attention of the width FASA's output projection expects."""
    from freecure.attention.capture import AttentionStore, capture_joint_attention
    from freecure.attention.fasa import FasaState, _out_weight, foundation_aware_joint_attention, joint_fasa_layers
    from freecure.attention.projections import is_parallel

    name, model, _ = built
    double, single, width, *_ = EXPECTED[name]
    before = dict(model.attn_processors)
    layers = joint_fasa_layers(model, "up")  # the later half of the blocks in execution order
    assert len(layers) == round((double + single) / 2)
    assert layers[-1] == f"single_transformer_blocks.{single - 1}.attn.processor"
    state = FasaState(torch.ones(16, 16), 1.5, (16, 16))
    with foundation_aware_joint_attention(model, state, layers):
        now = model.attn_processors
        changed = sorted(key for key in now if now[key] is not before[key])
        assert changed == sorted(layers)
        for layer in layers:
            attn = model.get_submodule(layer.removesuffix(".processor"))
            assert attn.heads * attn.head_dim == width
            # FLUX.2's single-stream blocks project [attention; MLP] with one to_out: FASA adds its
            # change through the attention columns only
            assert is_parallel(attn) == (name.startswith("flux2") and layer.startswith("single_"))
            if is_parallel(attn) or layer.startswith("transformer_blocks."):
                assert tuple(_out_weight(attn).shape) == (width, width)
    assert all(model.attn_processors[key] is before[key] for key in before)  # restored
    store = AttentionStore((1,), (32, 32))
    with capture_joint_attention(model, store):
        now = model.attn_processors
        assert sorted(key for key in now if now[key] is not before[key]) == sorted(
            f"transformer_blocks.{i}.attn.processor" for i in range(double)
        )
