"""Memory and speed options: CPU offload hooks, VAE savers, the compiled denoiser."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from freecure.core.errors import InputError
from freecure.core.runtime import apply_memory_options
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCurePipeline
from tests.factories import token_fusion_backend

PROMPT = "a man with black curly hair, laughing"


def _run(pipe):
    fc = FreeCurePipeline(token_fusion_backend(pipe), LayoutFaceParser())
    fc.set_progress_bar_config(disable=True)
    reference = Image.new("RGB", (32, 32), (90, 60, 40))
    return fc(PROMPT, [reference], class_word="man", num_inference_steps=3, generator=torch.Generator().manual_seed(0))


def _assert_same_run(a, b):
    assert [s.ran for s in a.stages] == [s.ran for s in b.stages] == [True] * 4
    assert set(b.attention_maps) == {"black curly hair", "laughing"}
    for text, heat in a.attention_maps.items():
        torch.testing.assert_close(b.attention_maps[text], heat)
    for name, latent in a.latents.items():
        torch.testing.assert_close(b.latents[name], latent)


@pytest.mark.slow
def test_capture_and_stages_survive_cpu_offload_hooks(tmp_path):
    """diffusers' model offload accepts a CPU execution device: the whole run under its hooks
    equals the run without. Sequential offload streams weights through accelerate's per-layer
    hooks, which diffusers refuses to run towards the CPU, so the same hooks are attached to
    the UNet directly with accelerate's ``cpu_offload``: its weights then rest on the meta
    device, and the capture processor's own projections only work through the hooks."""
    from accelerate import cpu_offload

    from freecure.families.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe)
    apply_memory_options(pipe, torch.device("cpu"), "model")
    assert type(pipe.unet._hf_hook).__name__ == "CpuOffload"
    _assert_same_run(plain, _run(pipe))
    pipe.remove_all_hooks()
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    assert next(pipe.unet.parameters()).device.type == "meta"
    _assert_same_run(plain, _run(pipe))


def test_memory_options_are_checked(tiny_sd15):
    with pytest.raises(InputError, match="unknown offload"):
        apply_memory_options(tiny_sd15, torch.device("cpu"), "disk")
    with pytest.raises(InputError, match="needs a GPU"):
        apply_memory_options(tiny_sd15, torch.device("cpu"), "sequential")


def test_cli_memory_options_fail_cleanly(tmp_path, capsys):
    from freecure.cli import main

    common = ["generate", "--tiny", "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*common, "--offload", "sequential"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert main([*common, "--offload", "model", "--compile"]) == 2
    assert "do not combine" in capsys.readouterr().err


@pytest.mark.slow
def test_capture_compiles_without_graph_breaks_and_compiled_run_matches(tmp_path):
    """``fullgraph=True`` fails on any graph break: the UNet with the capture processor on its
    recorded layers traces as one graph. Then a whole FreeCure run through the compiled
    denoiser (a counting backend that runs the traced graphs) equals the eager run."""
    from freecure.attention.capture import AttentionStore, capture_cross_attention
    from freecure.core.runtime import compile_denoiser
    from freecure.families.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, t = torch.randn(4, 4, 32, 32), torch.tensor(500)
    text = torch.randn(4, 77, unet.config.cross_attention_dim)
    store = AttentionStore((2, 3), (32, 32))
    compiled = torch.compile(unet.forward, backend=counting, fullgraph=True, dynamic=False)
    with capture_cross_attention(unet, store):
        store.set_context(0, (1, 2))
        compiled(x, t, text, return_dict=False)
    assert len(graphs) == 1 and set(store.sums) and all(s.shape[0] == 2 for s in store.sums.values())

    eager = _run(pipe)
    torch._dynamo.reset()
    graphs.clear()
    compile_denoiser(unet, backend=counting)
    _assert_same_run(eager, _run(pipe))
    assert graphs  # the stages ran through compiled graphs


@pytest.mark.slow
def test_compiled_stages_do_not_recompile_as_steps_grow(tmp_path, astronaut):
    """Each stage compiles once per batch layout: runs with twice the steps, with either method,
    trace no new graph (with the capture's step count a Python int, every captured step was a
    new graph)."""
    from freecure.core.runtime import compile_denoiser
    from freecure.families.tiny import tiny_sd15_pipeline
    from freecure.pipeline import FreeCureConfig

    pipe = tiny_sd15_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compile_denoiser(pipe.unet, backend=counting)
    backend = token_fusion_backend(pipe)
    reference = astronaut.resize((64, 64))
    counts = {}
    for steps in (3, 6):
        for method in ("rofa", "fasa"):
            fc = FreeCurePipeline(backend, LayoutFaceParser(), FreeCureConfig(method=method))
            fc.set_progress_bar_config(disable=True)
            result = fc(PROMPT, [reference], class_word="man", num_inference_steps=steps, inject_step=1,
                        generator=torch.Generator().manual_seed(0))
            assert any(s.ran for s in result.stages if s.name == method)  # the correction ran, compiled
            counts[steps, method] = len(graphs)
    torch._dynamo.reset()
    assert 0 < counts[3, "rofa"] <= counts[3, "fasa"] == counts[6, "rofa"] == counts[6, "fasa"], counts
