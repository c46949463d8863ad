"""Batches of seeds: n images share every denoiser call and each equals its one-seed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.core.conditioning import FD, PD, PD_UNCOND, UNCOND
from freecure.core.errors import InputError
from freecure.families.tiny import LayoutFaceParser
from freecure.parsing import ParseResult
from freecure.pipeline import FreeCureConfig, FreeCurePipeline
from freecure.stages.rofa import ROFA_LAYOUT
from freecure.stages.sampling import same_layout

PROMPT = "a man with black curly hair, laughing happily"
SEEDS = (3, 7, 11)
STEPS = 4


class _Conditions:
    inject_step, shares_uncond = 1, False


def test_layout_for_images_keeps_keys_lanes_and_capture_rows():
    one = same_layout(2, _Conditions())  # [uncond@FD, fd@FD, pd_uncond@PD, pd@PD]
    three = one.for_images(3)
    assert three.keys == (UNCOND,) * 3 + (FD,) * 3 + (PD_UNCOND,) * 3 + (PD,) * 3
    # lane-major lanes: FD_k is lane k, PD_k lane 3 + k; every row keeps its lane's image
    assert [lane for lane, _ in three.rows] == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert three.lanes == ((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11))
    assert three.capture_rows == (3, 4, 5) and one.capture_rows == (1,)
    # guidance per lane equals the one-image guidance of that image's rows
    eps = torch.randn(12, 2, 3, 3)
    guided = three.guide(eps, 7.5)
    for k in range(3):
        image_rows = eps[[k, 3 + k, 6 + k, 9 + k]]
        alone = one.guide(image_rows, 7.5)
        torch.testing.assert_close(guided[[k, 3 + k]], alone)
    assert ROFA_LAYOUT.for_images(2).keys == (PD_UNCOND, PD_UNCOND, PD, PD)
    assert one.for_images(1) is one
    with pytest.raises(ValueError):
        three.for_images(2)


def _freecure(pipe, dim, parser=None, config=None):
    fc = FreeCurePipeline(
        TokenFusionBackend(pipe, RandomProjectionIdentityEncoder(dim)),
        parser or LayoutFaceParser(),
        config or FreeCureConfig(),
    )
    fc.set_progress_bar_config(disable=True)
    return fc


def _run(fc, seeds, prompt=PROMPT, **kwargs):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return fc(
        prompt,
        [Image.new("RGB", (32, 32), (90, 60, 40))],
        class_word="man",
        num_inference_steps=STEPS,
        generator=generators if len(seeds) > 1 else generators[0],
        num_images_per_prompt=len(seeds),
        **kwargs,
    )


def _assert_same_image(batched, alone):
    for name in ("fd", "pd", "blended", "freecure"):
        if name in alone.latents:
            torch.testing.assert_close(batched.latents[name], alone.latents[name], rtol=1e-4, atol=1e-4)
    assert set(batched.attention_maps) == set(alone.attention_maps)
    for text, heat in alone.attention_maps.items():
        torch.testing.assert_close(batched.attention_maps[text], heat, rtol=1e-4, atol=1e-5)
    assert [s.ran for s in batched.stages] == [s.ran for s in alone.stages]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_batched_seeds_equal_their_single_seed_runs(family, tiny_sd15, tiny_sdxl):
    pipe, dim = (tiny_sd15, 32) if family == "sd15" else (tiny_sdxl, 64)
    seeds = SEEDS if family == "sd15" else SEEDS[:2]
    fc = _freecure(pipe, dim)
    batch = _run(fc, seeds)
    assert isinstance(batch, list) and len(batch) == len(seeds)
    singles = [_run(fc, (seed,)) for seed in seeds]
    for batched, alone in zip(batch, singles):
        _assert_same_image(batched, alone)
        torch.testing.assert_close(batched.mask, alone.mask, rtol=1e-3, atol=1e-3)
    # the n images share every call: same number of calls, n times the rows
    for name in ("same_pass", "rofa", "expression"):
        assert batch[0].stage(name).unet_calls == singles[0].stage(name).unet_calls
        assert batch[0].stage(name).batch_items == len(seeds) * singles[0].stage(name).batch_items
    assert batch[0].stage("same_pass").freecure_bytes > 0
    assert batch[1].settings["image_index"] == 1 and batch[1].settings["num_images_per_prompt"] == len(seeds)
    assert not torch.equal(batch[0].latents["freecure"], batch[1].latents["freecure"])


class BlindParser:
    """Finds nothing in the images of the given batch positions (Ψ is asked FD then PD per image)."""

    def __init__(self, blind: set[int]):
        self.blind, self.calls, self.layout = blind, 0, LayoutFaceParser()

    def __call__(self, image):
        index, self.calls = self.calls // 2, self.calls + 1
        if index in self.blind:
            width, height = image.size
            return ParseResult(np.zeros((height, width), np.uint8), None, (0, 0, width, height), False, "nothing")
        return self.layout(image)


def test_an_image_without_a_mask_keeps_its_pd_and_the_others_blend(tiny_sd15):
    batch = _run(_freecure(tiny_sd15, 32, BlindParser({1})), SEEDS[:2], prompt="a man with black curly hair")
    found, missing = batch
    assert found.stage("rofa").ran and not missing.stage("rofa").ran
    assert "this image's PD is kept" in missing.stage("rofa").reason
    assert missing.mask is None
    assert torch.equal(missing.latents["freecure"], missing.latents["pd"])  # bit for bit, not re-run
    assert missing.images["freecure"] is missing.images["pd"]
    assert found.mask is not None and not torch.equal(found.latents["freecure"], found.latents["pd"])


@pytest.mark.slow
def test_expression_restore_of_a_maskless_image_starts_from_its_pd(tiny_sd15):
    batch = _run(_freecure(tiny_sd15, 32, BlindParser({0})), SEEDS[:2])
    alone = _run(_freecure(tiny_sd15, 32, BlindParser({0})), SEEDS[:1])  # no mask: PD → expression
    assert not batch[0].stage("rofa").ran and not alone.stage("rofa").ran
    assert batch[0].stage("expression").ran
    torch.testing.assert_close(batch[0].latents["freecure"], alone.latents["freecure"], rtol=1e-4, atol=1e-4)
    assert batch[1].stage("rofa").ran


@pytest.mark.slow
def test_method_fasa_batched_seeds_equal_their_single_seed_runs(tiny_sd15):
    fasa = FreeCureConfig(method="fasa")
    prompt = "a man with black curly hair"
    batch = _run(_freecure(tiny_sd15, 32, config=fasa), SEEDS[:2], prompt=prompt)
    singles = [_run(_freecure(tiny_sd15, 32, config=fasa), (seed,), prompt=prompt) for seed in SEEDS[:2]]
    for batched, alone in zip(batch, singles):
        assert alone.stage("fasa").ran and alone.fasa_mask is not None
        _assert_same_image(batched, alone)
        torch.testing.assert_close(batched.fasa_mask, alone.fasa_mask)
        assert not torch.equal(batched.latents["freecure"], batched.latents["pd"])  # FASA moved PD
    # one FASA pass for both images: same calls, twice the rows (each PD row pairs with its own FD row)
    assert batch[0].stage("fasa").unet_calls == singles[0].stage("fasa").unet_calls == STEPS
    assert batch[0].stage("fasa").batch_items == 2 * singles[0].stage("fasa").batch_items
    assert not torch.equal(batch[0].latents["freecure"], batch[1].latents["freecure"])


@pytest.mark.slow
def test_method_fasa_an_image_with_an_empty_mask_keeps_its_pd(tiny_sd15):
    fasa = FreeCureConfig(method="fasa")
    prompt = "a man with black curly hair"
    found, missing = _run(_freecure(tiny_sd15, 32, BlindParser({1}), fasa), SEEDS[:2], prompt=prompt)
    alone = _run(_freecure(tiny_sd15, 32, config=fasa), SEEDS[:1], prompt=prompt)
    assert found.stage("fasa").ran and not missing.stage("fasa").ran
    assert "this image's PD is kept" in missing.stage("fasa").reason and missing.fasa_mask is None
    assert torch.equal(missing.latents["freecure"], missing.latents["pd"])  # bit for bit, not re-run
    assert missing.images["freecure"] is missing.images["pd"]
    # the other image ran FASA alone in the pass (3 rows per step) and equals its one-seed run
    assert found.stage("fasa").batch_items == 3 * STEPS
    _assert_same_image(found, alone)


def test_batch_arguments_are_checked(tiny_sd15):
    fc = _freecure(tiny_sd15, 32)
    with pytest.raises(InputError, match="one per image"):
        fc(PROMPT, [], class_word="man", num_inference_steps=2, generator=[torch.Generator()], num_images_per_prompt=2)
    with pytest.raises(InputError, match="at least 1"):
        fc(PROMPT, [], class_word="man", num_inference_steps=2, num_images_per_prompt=0)
    with pytest.raises(InputError, match="latents hold 1"):
        latents = torch.randn(1, 4, 32, 32)
        fc(PROMPT, [], class_word="man", num_inference_steps=2, latents=latents, num_images_per_prompt=2)


def test_flux_batched_seeds_equal_their_single_seed_runs(tiny_flux):
    fc = _freecure(tiny_flux, 32)
    batch = _run(fc, SEEDS[:2], guidance_scale=3.5)
    for batched, seed in zip(batch, SEEDS[:2]):
        _assert_same_image(batched, _run(fc, (seed,), guidance_scale=3.5))


@pytest.mark.slow
def test_generate_num_images_writes_one_folder_per_seed(tmp_path, astronaut):
    from freecure.cli import main

    astronaut.resize((64, 64)).save(tmp_path / "ref.png")
    common = ["generate", "--tiny", "--prompt", "a man with black curly hair", "--ref", str(tmp_path / "ref.png")]
    common += ["--steps", "3", "--no-progress"]
    assert main([*common, "--num-images", "2", "--seed", "5", "--out", str(tmp_path / "batch")]) == 0
    assert main([*common, "--seed", "6", "--out", str(tmp_path / "alone")]) == 0
    for seed in (5, 6):
        manifest = json.loads((tmp_path / "batch" / f"seed{seed}" / "manifest.json").read_text())
        assert manifest["seed"] == seed and manifest["settings"]["num_images_per_prompt"] == 2
        assert manifest["stages"][0]["name"] == "same_pass" and manifest["stages"][0]["freecure_bytes"] > 0
    assert not (tmp_path / "alone" / "seed6").exists() and (tmp_path / "alone" / "freecure.png").is_file()
    batched = np.asarray(Image.open(tmp_path / "batch" / "seed6" / "freecure.png"), dtype=int)
    alone = np.asarray(Image.open(tmp_path / "alone" / "freecure.png"), dtype=int)
    assert np.abs(batched - alone).max() <= 1  # float tolerance, then 8-bit rounding
    with pytest.raises(SystemExit) as refused:  # at parse time
        main([*common, "--num-images", "0", "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2


@pytest.mark.slow
def test_eval_tiny_batch_size_runs_seeds_together(tmp_path, capsys):
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    from freecure.cli import main
    from freecure.evaluation.store import read_jsonl, shard_paths

    (tmp_path / "prompts.csv").write_text("prompt\na <S> with black curly hair\n")
    args = ["eval", "--tiny", "--identities", "examples/identities", "--prompts", str(tmp_path / "prompts.csv")]
    args += ["--num-seeds", "3", "--steps", "2", "--out", str(tmp_path / "eval"), "--no-progress", "--no-report"]
    assert main([*args, "--batch-size", "2"]) == 0
    assert "3 new, 0 already done" in capsys.readouterr().out
    rows = [row for path in shard_paths(tmp_path / "eval") for row in read_jsonl(path)]
    assert sorted(row["seed"] for row in rows) == [0, 1, 2]
    assert sorted(len(row.get("batch_keys", [row["key"]])) for row in rows) == [1, 2, 2]
    assert main([*args, "--batch-size", "3"]) == 0  # resumed with another batch size: nothing to do
    assert "0 new, 3 already done" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # at parse time
        main([*args, "--batch-size", "0"])
    assert refused.value.code == 2
