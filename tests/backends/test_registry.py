"""A backend is declared in one place (issue 21): a backend defined here, in the test, registered
with one call, runs ``freecure generate --tiny``, ``cost`` and ``eval --tiny`` without any other
file knowing its name; every registered backend's declared options reach the command line."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from freecure.backends import BACKENDS, Backend, get_backend, register, unregister
from freecure.cli import build_parser, main
from freecure.core.errors import InputError
from freecure.core.options import Option, finite_float

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "freecure"


class ShiftBackend(Backend):
    """The smallest personalization method: PD is FD's conditioning with the class word's token
    states moved by ``--shift-amount`` from step 1 on."""

    name = "shift-test"
    families = ("sd15",)
    prompt_identity = "all"
    license = "test only"
    options = (
        Option("--shift-amount", type=finite_float(0.0, 10.0), default=1.0, help="shift-test: the identity's size"),
    )
    built: list[float] = []

    def __init__(self, pipeline, amount: float):
        super().__init__(pipeline)
        self.amount = amount

    @classmethod
    def from_options(cls, args) -> ShiftBackend:
        from freecure.families.tiny import tiny_pipeline

        if not args.tiny:
            raise InputError("shift-test runs on tiny models only; pass --tiny")
        pipeline = tiny_pipeline(args.tiny_family)
        pipeline.to(args.device)
        cls.built.append(args.shift_amount)
        return cls(pipeline, args.shift_amount)

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        embeds = fd.prompt_embeds.clone()
        embeds[:, list(parsed.class_token_indices)] += self.amount
        return replace(fd, prompt_embeds=embeds), 1


@pytest.fixture
def shift_backend():
    register(ShiftBackend)
    ShiftBackend.built.clear()
    yield ShiftBackend
    unregister(ShiftBackend.name)


def test_registry_binds_names_and_refuses_unknown_or_taken_names(shift_backend):
    assert get_backend("shift-test") is ShiftBackend
    with pytest.raises(InputError, match="unknown backend 'nope'; choose one of .*shift-test"):
        get_backend("nope")

    class Impostor(ShiftBackend):
        pass

    with pytest.raises(ValueError, match="'shift-test' is taken by ShiftBackend"):
        register(Impostor)


@pytest.mark.slow
def test_a_backend_defined_in_the_test_runs_generate_cost_and_eval(shift_backend, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    tiny = ["--tiny", "--backend", "shift-test", "--shift-amount", "2.5", "--no-progress"]
    out = tmp_path / "generate"
    args = ["--prompt", "a man with black curly hair, laughing", "--ref", "examples/astronaut.png", "--steps", "3"]
    assert main(["generate", *args, *tiny, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["backend"] == "shift-test" and (out / "freecure.png").is_file()
    capsys.readouterr()

    assert (
        main(
            ["cost", "--backend", "shift-test", "--shift-amount", "2.5", "--steps", "4", "--inject-step", "1", "--json"]
        )
        == 0
    )
    counted = json.loads(capsys.readouterr().out)
    assert counted["engine"]["stages"]["same_pass"]["unet_calls"] == 4

    evaluated = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--identities",
                "examples/identities",
                "--limit-prompts",
                "1",
                "--num-seeds",
                "1",
                "--steps",
                "3",
                "--no-report",
                *tiny,
                "--out",
                str(evaluated),
            ]
        )
        == 0
    )
    assert any(p.name == "freecure.png" for p in evaluated.rglob("*.png"))
    assert ShiftBackend.built == [2.5, 2.5, 2.5]  # its own option reached it in all three


def test_another_backends_option_is_refused_for_the_test_backend(shift_backend, tmp_path, capsys):
    args = [
        "generate",
        "--tiny",
        "--backend",
        "token-fusion",
        "--shift-amount",
        "3",
        "--prompt",
        "a man",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(args) == 2
    assert "--shift-amount belongs to the shift-test backend" in capsys.readouterr().err
    assert ShiftBackend.built == []


def test_tiny_has_one_signature_and_checks_its_options(shift_backend):
    backend = ShiftBackend.tiny(shift_amount=0.5)
    assert backend.amount == 0.5 and backend.family.name == "unet"
    with pytest.raises(InputError, match="--shift-amount: 11 is outside"):
        ShiftBackend.tiny(shift_amount=11)
    with pytest.raises(InputError, match="has no option colour"):
        ShiftBackend.tiny(colour="red")
    with pytest.raises(InputError, match="runs on sd15, not flux"):
        ShiftBackend.tiny("flux")


@pytest.mark.parametrize("command", ["generate", "eval", "analyze attention", "cost"])
def test_every_declared_option_is_on_the_commands_that_build_backends(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices[command.split()[1]]
    flags = {flag for action in sub._actions for flag in action.option_strings}
    declared = {option.flag for backend in BACKENDS.values() for option in backend.options}
    assert declared and declared <= flags


def test_no_module_outside_the_backends_names_a_backend():
    """Tables keyed by backend name live only in the registry: the CLI, the demo, the studies,
    the evaluation, cost and the builder read a backend's facts from its class."""
    names = [name for name in BACKENDS if name != "token-fusion"]  # the default lives in the registry
    outside = [
        path for folder in ("cli", "demo", "analysis", "evaluation") for path in (SRC / folder).rglob("*.py")
    ] + [SRC / "cost.py", SRC / "build.py", SRC / "pipeline.py"]
    found = []
    for path in outside:
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text(encoding="utf-8"))  # docstrings may name them
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        found += [f"{path.relative_to(SRC)}: {name}" for name in names if re.search(rf"[\"']{name}[\"']", code)]
    assert found == []
