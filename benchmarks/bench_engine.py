"""FreeCure wall time and peak memory against plain PD generation, on real-size denoisers and VAEs.

The SD1.5 (512 px) and SDXL (1024 px) UNets and VAEs, and FLUX.1-dev's transformer (1024 px,
≈ 11.9 B parameters; run it in bf16 on a GPU with ≥ 40 GB) and VAE are built from their
published configs with random weights (no checkpoint needed; a random network costs the same
FLOPs as a trained one). FLUX runs guidance-distilled (one row per lane, embedded guidance
3.5) with 512 T5 tokens; ``--flux-reduced`` keeps FLUX's structure at a CPU-sized width and
depth (a *reduced-size ratio*, not a performance figure). Text conditioning is random tensors
of the real shapes, the identity is injected at step ``--inject-step`` as a different random
conditioning, and the face parser is the synthetic layout parser, so every stage runs: SAME
pass, masks, then each method's correction: ROFA + expression restore (``--methods rofa``, the
paper) and FASA (``--methods fasa``, the authors' released code; a family the engine cannot run
FASA on is skipped with a note).

    python benchmarks/bench_engine.py --family sdxl --steps 50 --dtype fp16      # on a GPU
    python benchmarks/bench_engine.py --family flux --steps 28 --dtype bf16      # on a GPU (≈ 30 GB)
    python benchmarks/bench_engine.py --family sd15 --steps 3 --size 128 --device cpu  # smoke test
    python benchmarks/bench_engine.py --family flux --flux-reduced --steps 6 --inject-step 2 \
        --size 512 --device cpu --dtype fp32                                      # CPU ratio

Scenarios (``--scenarios``), each timing plain PD and FreeCure with every method side by side
in one process: ``single`` (one image), ``batch`` (``--num-images`` seeds in one batch: plain PD
batched the same way, FreeCure with ``num_images_per_prompt``), ``offload`` (model CPU offload
hooks on the UNet and VAE, as diffusers' ``enable_model_cpu_offload``) and ``compiled`` (the
UNet's forward under ``torch.compile``, static shapes; warm-up runs of plain PD and of each
method compile every graph first and are reported apart as compile time, with the number of
graphs compiled; the timed runs then reuse the graphs, so stages of equal shape compile once).
``--compile-mode`` defaults to ``reduce-overhead`` (CUDA graphs) on a GPU and to inductor's
default mode on the CPU, where CUDA graphs do not exist. Peak memory is CUDA's peak
allocation on a GPU; on the CPU it is the peak resident set above the resident set before the
run, sampled every 5 ms.

Prints a table and one JSON object per family (``--out`` also writes the JSON records to a
file); record results with card, date and settings in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import threading
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from freecure.backends.base import Backend
from freecure.core.attributes import parse_prompt
from freecure.core.conditioning import Conditions, TextConditioning
from freecure.core.configs import (
    FLUX_DEV_TRANSFORMER,
    FLUX_SCHEDULER,
    FLUX_VAE_SCALING_FACTOR,
    FLUX_VAE_SHIFT_FACTOR,
    SD15_UNET,
    SD15_VAE,
    SDXL_UNET,
    SDXL_VAE,
)
from freecure.core.configs import SD_SCHEDULER as SCHEDULER
from freecure.core.errors import InputError
from freecure.core.tokenization import load_clip_tokenizer
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCureConfig, FreeCurePipeline
from freecure.stages.decode import decode_latents
from freecure.stages.fasa import FasaConfig
from freecure.stages.sampling import plain_pass


class BenchPipeline:
    """The few attributes of a diffusers pipeline the engine reads."""

    def __init__(self, unet, vae, tokenizer, sdxl: bool):
        from diffusers.image_processor import VaeImageProcessor

        self.unet, self.vae, self.tokenizer = unet, vae, tokenizer
        self.text_encoder_2 = object() if sdxl else None
        self.scheduler = DDIMScheduler(**SCHEDULER)
        self.vae_scale_factor = 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=8)
        self._execution_device = unet.device


class BenchFluxPipeline:
    """The few attributes of a diffusers ``FluxPipeline`` the engine reads."""

    def __init__(self, transformer, vae, tokenizer_2):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        self.transformer, self.vae, self.tokenizer_2 = transformer, vae, tokenizer_2
        self.scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        self.vae_scale_factor = 8
        self.default_sample_size = 128
        self.image_processor = VaeImageProcessor(vae_scale_factor=16)
        self._execution_device = transformer.device


#: FLUX.1's VAE (16 latent channels, no quant convs).
FLUX_VAE = dict(
    SD15_VAE,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=FLUX_VAE_SCALING_FACTOR,
    shift_factor=FLUX_VAE_SHIFT_FACTOR,
)
#: FLUX's structure at CPU size (same block kinds, ratio of double to single blocks, rope).
FLUX_REDUCED = dict(FLUX_DEV_TRANSFORMER, num_layers=2, num_single_layers=4, num_attention_heads=4)
FLUX_VAE_REDUCED = dict(FLUX_VAE, block_out_channels=(32, 32, 64, 64))


class RandomConditioningBackend(Backend):
    """Random text conditioning of the real shapes; PD differs from FD after injection."""

    name = "bench"

    def __init__(self, pipeline, dim: int, pooled: int | None, inject_step: int, tokens: int = 77):
        super().__init__(pipeline)
        self.dim, self.pooled, self.inject_step, self.tokens = dim, pooled, inject_step, tokens

    def _random(self, seed: int) -> TextConditioning:
        g = torch.Generator().manual_seed(seed)
        embeds = torch.randn(1, self.tokens, self.dim, generator=g)
        pooled = torch.randn(1, self.pooled, generator=g) if self.pooled else None
        return TextConditioning(embeds, pooled)

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None) -> Conditions:
        return Conditions(
            uncond=self._random(0),
            fd=self._random(1),
            pd=self._random(2),
            inject_step=self.inject_step,
            template=self._random(3),
            expression=self._random(4),
        )


SCENARIOS = ("single", "batch", "offload", "compiled")


def build(family: str, size: int | None, device, dtype, reduced: bool = False):
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from freecure.families.tiny import tiny_t5_tokenizer

        config = FLUX_REDUCED if reduced else FLUX_DEV_TRANSFORMER
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config).to(dtype).eval()
            vae = AutoencoderKL(**(FLUX_VAE_REDUCED if reduced else FLUX_VAE)).to(dtype).eval()
        return BenchFluxPipeline(transformer, vae, tiny_t5_tokenizer(512)), size or 1024
    sdxl = family == "sdxl"
    unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).to(device, dtype).eval()
    vae = AutoencoderKL(**(SDXL_VAE if sdxl else SD15_VAE)).to(device, dtype).eval()
    pipeline = BenchPipeline(unet, vae, load_clip_tokenizer(), sdxl)
    size = size or (1024 if sdxl else 512)
    return pipeline, size


def conditioning_dims(family: str, pipeline) -> tuple[int, int | None]:
    """(text embedding width, pooled width or None), read from the denoiser's config: SD1.5
    768 / None, SDXL 2048 / 1280, FLUX 4096 / 768."""
    if family == "flux":
        config = pipeline.transformer.config
        return config.joint_attention_dim, config.pooled_projection_dim
    config = pipeline.unet.config
    if family == "sdxl":  # the added embedding takes the pooled text and 6 time ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return config.cross_attention_dim, pooled
    return config.cross_attention_dim, None


def _rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the start, sampled in a thread (CPU runs)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    @contextlib.contextmanager
    def watch(self):
        self.base = self.peak = _rss()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def timed(fn, device):
    """(result, seconds, peak GiB): CUDA's peak allocation, or the CPU's peak RSS above the start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS()
    with rss.watch() if device.type != "cuda" else contextlib.nullcontext():
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss.gib
    return result, seconds, round(peak, 3)


METHODS = ("rofa", "fasa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "flux"], nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--flux-reduced", action="store_true", help="FLUX at CPU size (2+4 blocks, 4 heads)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inject-step", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=None, help="image size (default 512 / 1024)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--approximate-shared-uncond", action="store_true")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="FreeCure methods (one the family lacks is skipped)",
    )
    parser.add_argument(
        "--fasa-mask-source",
        choices=["fd-parse", "same"],
        default="fd-parse",
        help="FASA's mask (same cost either way; at 64 px the synthetic parser's FD regions vanish on the "
        "8×8 latent grid, use 'same' there)",
    )
    parser.add_argument("--num-images", type=int, default=4, help="seeds of the batch scenario (default 4)")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compiled scenario (default reduce-overhead on CUDA, inductor's default on CPU)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON records (a list) to this file")
    args = parser.parse_args(argv)
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if torch.device(args.device).type == "cuda" else "default"
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    records = []

    def write(partial: dict) -> None:  # after every scenario, so a long run keeps what it measured
        if args.out:
            with open(args.out, "w") as file:
                json.dump(records + [partial] if records or len(args.family) > 1 else partial, file, indent=1)
                file.write("\n")

    for family in args.family:
        record = bench_family(family, args, device, dtype, on_scenario=write)
        write(record)
        records.append(record)
        print(format_table(record), flush=True)
        print(json.dumps(record), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def format_table(record: dict) -> str:
    """The record as a text table: per scenario, plain PD and each method, time and peak memory."""
    methods = record["methods"]
    header = ["scenario", "images", "plain PD s"]
    header += [f"{m} s (×PD)" for m in methods] + ["plain PD GiB"] + [f"{m} GiB (×PD)" for m in methods]
    lines = [
        f"{record['family']} {record['size']} px, {record['steps']} steps, injection {record['inject_step']}, "
        f"{record['dtype']}, {record['device']}",
        " | ".join(header),
    ]
    for name, row in record["scenarios"].items():
        cured = row["freecure"]
        cells = [name, str(row["images"]), f"{row['plain_pd_s']:.2f}"]
        cells += [f"{cured[m]['s']:.2f} ({cured[m]['time_ratio']:.2f}×)" for m in methods]
        cells.append(f"{row['plain_pd_peak_gib']:.3f}")
        cells += [f"{cured[m]['peak_gib']:.3f} ({_ratio(cured[m]['memory_ratio'])})" for m in methods]
        if "compile" in row:
            cells.append(
                f"eager plain PD {row['eager_plain_pd']['s']:.2f} s; "
                f"compile {row['compile']['total_s']:.0f} s, {row['compile']['graphs']} graphs"
            )
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def bench_family(family: str, args, device, dtype, on_scenario=None) -> dict:
    """Time plain PD and FreeCure (each method) on one model family; return the record.

    ``on_scenario(record)`` is called after each scenario with the record so far.
    """
    prompt = "a man with black curly hair, laughing happily"
    pipeline, size = build(family, args.size, device, dtype, getattr(args, "flux_reduced", False))
    dim, pooled = conditioning_dims(family, pipeline)
    tokens = 512 if family == "flux" else 77
    backend = RandomConditioningBackend(pipeline, dim, pooled, args.inject_step, tokens=tokens)
    freecures = {}
    for method in getattr(args, "methods", ["rofa"]):
        config = FreeCureConfig(
            gamma=args.gamma,
            approximate_shared_uncond=args.approximate_shared_uncond,
            method=method,
            fasa=FasaConfig(mask_source=getattr(args, "fasa_mask_source", "fd-parse")),
        )
        try:
            freecures[method] = FreeCurePipeline(backend, LayoutFaceParser(), config)
        except InputError as error:  # a family without the method (FASA on FLUX before it landed)
            log(f"{family}: method {method} skipped: {error}")
            continue
        freecures[method].set_progress_bar_config(disable=True)
    methods = list(freecures)
    model_family = backend.family
    guidance_scale = {"sd15": 7.5, "sdxl": 5.0, "flux": 3.5}[family]
    guidance = model_family.loop_guidance(guidance_scale)
    backend.guidance_scale = guidance_scale
    latent_size = model_family.latent_size(pipeline, size, size)

    def plain(n: int = 1):
        scheduler = copy.deepcopy(pipeline.scheduler)
        model_family.set_timesteps(scheduler, args.steps, device, latent_size)
        parse_prompt(prompt, "man", tokenizer=backend.tokenizer)
        conditions = freecure_conditions(backend, args.steps, device, dtype)
        generators = [torch.Generator().manual_seed(k) for k in range(n)]
        z = torch.cat(
            [model_family.initial_latents(pipeline, scheduler, latent_size, g, device, dtype) for g in generators]
        )
        z = plain_pass(backend, scheduler, z, conditions, guidance, (size, size))
        return decode_latents(pipeline, z, (size, size))

    def cured(method: str, n: int = 1):
        generators = [torch.Generator().manual_seed(k) for k in range(n)]
        return freecures[method](
            prompt,
            [],
            class_word="man",
            num_inference_steps=args.steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            generator=generators if n > 1 else generators[0],
            num_images_per_prompt=n,
        )

    def side_by_side(n: int = 1, baselines: dict | None = None) -> dict:
        # repeats interleave plain PD, the methods and any extra baseline (name → callable), so a
        # drift in the machine's load (shared CPUs) falls on all of them alike; each time is the
        # median of its repeats
        baselines = baselines or {}
        runs = {name: [] for name in ["plain_pd", *methods, *baselines]}
        for _ in range(args.repeats):
            runs["plain_pd"].append(timed(lambda: plain(n), device))
            for method in methods:
                runs[method].append(timed(lambda: cured(method, n), device))
            for name, fn in baselines.items():
                runs[name].append(timed(fn, device))
        plain_s = statistics.median(r[1] for r in runs["plain_pd"])
        plain_peak = max(r[2] for r in runs["plain_pd"])
        log(f"{family}: {n} image(s), plain PD {plain_s:.2f} s")
        row = {
            "images": n,
            "plain_pd_s": round(plain_s, 3),
            "plain_pd_runs_s": [round(r[1], 2) for r in runs["plain_pd"]],
            "plain_pd_best_s": round(min(r[1] for r in runs["plain_pd"]), 3),
            "plain_pd_images_per_s": round(n / plain_s, 4),
            "plain_pd_peak_gib": plain_peak,
            "freecure": {},
        }
        for name in baselines:
            row[name] = {
                "s": round(statistics.median(r[1] for r in runs[name]), 3),
                "runs_s": [round(r[1], 2) for r in runs[name]],
                "best_s": round(min(r[1] for r in runs[name]), 3),
                "peak_gib": max(r[2] for r in runs[name]),
            }
            log(f"{family}: {n} image(s), {name} {row[name]['s']:.2f} s")
        for method in methods:
            cured_s = statistics.median(r[1] for r in runs[method])
            cured_peak = max(r[2] for r in runs[method])
            log(f"{family}: {n} image(s), FreeCure {method} {cured_s:.2f} s")
            output = runs[method][-1][0]
            output = output[0] if isinstance(output, list) else output
            # the correction stage must have run, else the time is the SAME pass's alone
            corrected = any(s.name == method and s.unet_calls for s in output.stages)
            if not corrected:
                log(f"{family}: WARNING: the {method} stage did not run (empty mask): its time is not FreeCure's")
            row["freecure"][method] = {
                "corrected": corrected,
                "s": round(cured_s, 3),
                "runs_s": [round(r[1], 2) for r in runs[method]],
                "time_ratio": round(cured_s / plain_s, 3),
                # fastest repeat over fastest repeat: on a contended machine noise only adds time
                "best_time_ratio": round(min(r[1] for r in runs[method]) / min(r[1] for r in runs["plain_pd"]), 3),
                "images_per_s": round(n / cured_s, 4),
                "peak_gib": cured_peak,
                "memory_ratio": round(cured_peak / plain_peak, 3) if plain_peak else None,
                "stages": {
                    s.name: dict(
                        s=round(s.seconds, 3), calls=s.unet_calls, items=s.batch_items, bytes=s.freecure_bytes
                    )
                    for s in output.stages
                },
            }
        return row

    # warm-up: one denoiser call (kernels, allocator)
    with torch.no_grad():
        scheduler = copy.deepcopy(pipeline.scheduler)
        model_family.set_timesteps(scheduler, args.steps, device, latent_size)
        z = model_family.initial_latents(pipeline, scheduler, latent_size, torch.Generator(), device, dtype)
        rows = [backend._random(0).to(device, dtype)] * 2
        backend.predict_noise(torch.cat([z, z]).to(dtype), scheduler.timesteps[0], rows, ("uncond", "fd"), 0, (size, size))
    scenarios = {}
    record = {
        "family": family,
        "flux_reduced": family == "flux" and getattr(args, "flux_reduced", False),
        "size": size,
        "steps": args.steps,
        "inject_step": args.inject_step,
        "gamma": args.gamma,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
        "approximate_shared_uncond": args.approximate_shared_uncond,
        "methods": methods,
        "repeats": args.repeats,
        "scenarios": scenarios,
        "torch": torch.__version__,
    }
    for scenario in args.scenarios:
        start = time.perf_counter()
        log(f"{family}: scenario {scenario} ...")
        if scenario == "single":
            scenarios["single"] = side_by_side(1)
        elif scenario == "batch":
            scenarios["batch"] = side_by_side(args.num_images)
        elif scenario == "offload":
            with model_offload(backend.denoiser, pipeline.vae, device):
                scenarios["offload"] = side_by_side(1)
        elif scenario == "compiled":
            with compiled(backend.denoiser, args.compile_mode) as eager_forward:
                compile_record, graphs_before = {"mode": args.compile_mode}, _graphs_compiled()
                # warm-up runs: every graph (plain PD's, then each method's stage shapes) compiles
                # here; later runs with the same shapes and processors reuse the graphs
                for name, fn in [("plain_pd", plain)] + [(m, lambda m=m: cured(m)) for m in methods]:
                    graphs = _graphs_compiled()
                    warm = time.perf_counter()
                    fn()
                    compile_record[f"{name}_warmup_s"] = round(time.perf_counter() - warm, 1)
                    compile_record[f"{name}_graphs"] = _graphs_compiled() - graphs
                    log(f"{family}: compiled warm-up {name}: {compile_record[f'{name}_warmup_s']} s, "
                        f"{compile_record[f'{name}_graphs']} graphs")
                compile_record["total_s"] = round(time.perf_counter() - start, 1)
                compile_record["graphs"] = _graphs_compiled() - graphs_before

                def eager_plain():  # the same process, the same load: plain PD without compiling
                    compiled_forward, backend.denoiser.forward = backend.denoiser.forward, eager_forward
                    try:
                        return plain(1)
                    finally:
                        backend.denoiser.forward = compiled_forward

                row = side_by_side(1, baselines={"eager_plain_pd": eager_plain})
                row["compile"] = compile_record
                # graphs compiled during the timed runs (0 when the warm-up covered every shape)
                compile_record["graphs_while_timed"] = _graphs_compiled() - graphs_before - compile_record["graphs"]
            scenarios["compiled"] = row
        scenarios[scenario]["scenario_wall_s"] = round(time.perf_counter() - start, 1)
        scenarios[scenario]["load_average_after"] = os.getloadavg()
        log(f"{family}: scenario {scenario} done in {scenarios[scenario]['scenario_wall_s']} s")
        if on_scenario is not None:
            on_scenario(record)
    if "single" in scenarios and "batch" in scenarios:
        single, batch = scenarios["single"], scenarios["batch"]
        batch["throughput_vs_single"] = {
            m: round(batch["freecure"][m]["images_per_s"] / single["freecure"][m]["images_per_s"], 3)
            for m in methods
        }
    if "compiled" in scenarios:  # against eager plain PD timed in the same scenario, interleaved
        row = scenarios["compiled"]
        row["compiled_freecure_vs_eager_plain_pd"] = {
            m: round(row["freecure"][m]["s"] / row["eager_plain_pd"]["s"], 3) for m in methods
        }
        row["compiled_plain_pd_vs_eager_plain_pd"] = round(row["plain_pd_s"] / row["eager_plain_pd"]["s"], 3)
        row["best_compiled_freecure_vs_eager_plain_pd"] = {
            m: round(min(row["freecure"][m]["runs_s"]) / row["eager_plain_pd"]["best_s"], 3) for m in methods
        }
    record.update(load_average=os.getloadavg(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return record


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table and the JSON)."""
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def compiled(denoiser, mode: str):
    """The denoiser's forward under ``torch.compile`` (:func:`freecure.runtime.compile_denoiser`);
    yields the eager forward."""
    from freecure.core.runtime import compile_denoiser

    forward = denoiser.forward
    compile_denoiser(denoiser, mode=None if mode == "default" else mode)
    try:
        yield forward
    finally:
        denoiser.forward = forward


@contextlib.contextmanager
def model_offload(denoiser, vae, device):
    """diffusers' model CPU offload on the bench pipeline's denoiser and VAE (accelerate's
    ``cpu_offload_with_hook``, chained denoiser → VAE as ``enable_model_cpu_offload`` does)."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    _, hook = cpu_offload_with_hook(denoiser, device)
    _, vae_hook = cpu_offload_with_hook(vae, device, prev_module_hook=hook)
    try:
        yield
    finally:
        for module in (denoiser, vae):
            remove_hook_from_module(module, recurse=True)
            module.to(device)


def freecure_conditions(backend, steps, device, dtype):
    return backend.conditions(None, [], steps).to(device, dtype)


if __name__ == "__main__":
    main()
