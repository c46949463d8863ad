"""benchmarks/bench_engine.py on the tiny SD1.5 UNet: every method is timed in every scenario."""

import importlib.util
from pathlib import Path

import pytest

from freecure.families.tiny import build_tiny_sd15_components


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parents[1] / "benchmarks" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_times_plain_pd_and_each_method_side_by_side(bench, monkeypatch):
    from diffusers.image_processor import VaeImageProcessor

    def tiny_build(family, size, device, dtype, reduced=False):
        parts = build_tiny_sd15_components()
        pipeline = bench.BenchPipeline(parts["unet"].eval(), parts["vae"].eval(), parts["tokenizer"], sdxl=False)
        pipeline.vae_scale_factor = 2  # the tiny VAE has two levels
        pipeline.image_processor = VaeImageProcessor(vae_scale_factor=2)
        return pipeline, size

    monkeypatch.setattr(bench, "build", tiny_build)
    args = bench.parse_args(
        "--family sd15 --steps 3 --inject-step 1 --size 64 --repeats 1 --device cpu --dtype fp32 "
        "--scenarios single batch offload --num-images 2".split()
    )
    assert args.methods == ["rofa", "fasa"] and args.compile_mode == "default"  # both methods by default
    record = bench.bench_family("sd15", args, bench.torch.device("cpu"), bench.torch.float32)

    assert record["methods"] == ["rofa", "fasa"]
    assert list(record["scenarios"]) == ["single", "batch", "offload"]
    for name, row in record["scenarios"].items():
        assert row["images"] == (2 if name == "batch" else 1)
        assert set(row["freecure"]) == {"rofa", "fasa"}
        for method, cured in row["freecure"].items():
            assert cured["time_ratio"] == pytest.approx(cured["s"] / row["plain_pd_s"], rel=1e-2)
            # each method ran its own correction stage and not the other's
            ran = {stage for stage, s in cured["stages"].items() if s["calls"]}
            assert cured["corrected"]
            assert method in ran and ({"rofa", "fasa"} - {method}).isdisjoint(ran)
    batch = record["scenarios"]["batch"]["freecure"]
    assert batch["fasa"]["stages"]["fasa"]["items"] == 3 * 2 * 3  # 3 steps, 3 rows per image, 2 images
    assert set(record["scenarios"]["batch"]["throughput_vs_single"]) == {"rofa", "fasa"}
    table = bench.format_table(record)
    assert "fasa s (×PD)" in table and "rofa GiB (×PD)" in table and len(table.splitlines()) == 5
