"""The bytes every `--tiny` command writes, pinned before the redesign of issue 21.

For every backend on every model family it runs (``Backend.families``) this runs
``generate --tiny`` with both methods (ROFA and FASA), ``analyze attention --tiny`` and
``eval --tiny`` at fixed seeds, and compares the SHA-256 of every PNG written (and of every
tensor of ``maps.safetensors``) with ``tests/data/output_digests.json``. A refactoring that
moves code but changes no computation keeps every digest; one that changes a single pixel
fails here, naming the command and the file.

The digests hold for this project's CPU machines and pinned packages (``constraints.txt``),
with one intra-op thread (``tests/conftest.py``): other CPUs or thread counts may round the
random tiny models' floats differently. Re-record only for an intended change of output:

    FREECURE_RECORD_DIGESTS=1 bash scripts/test.sh tests/test_output_digests.py

and say in the commit why the bytes changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from freecure.backends import BACKENDS
from freecure.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = ROOT / "tests" / "data" / "output_digests.json"
RECORD = os.environ.get("FREECURE_RECORD_DIGESTS", "") not in ("", "0")
PROMPT = "a man img with black curly hair, laughing"
REF = ["--ref", "examples/astronaut.png"]
STEPS = ["--steps", "3", "--seed", "7"]


def cases() -> dict[str, list[str]]:
    """Case name → the command's arguments (``--out`` is added per run)."""
    found = {}
    for name, backend in sorted(BACKENDS.items()):
        for family in backend.families:
            tiny = ["--tiny", "--backend", name, "--tiny-family", family, "--no-progress"]
            if name == "ip-adapter-faceid":
                tiny += ["--faceid-family", family]
            for method in ("rofa", "fasa"):
                found[f"generate-{name}-{family}-{method}"] = [
                    "generate", "--prompt", PROMPT, *REF, *STEPS, "--method", method, *tiny
                ]
            found[f"analyze-{name}-{family}"] = ["analyze", "attention", "--prompt", PROMPT, *REF, *STEPS, *tiny]
            found[f"eval-{name}-{family}"] = [
                "eval", "--identities", "examples/identities", "--limit-prompts", "1", "--num-seeds", "1",
                "--steps", "3", "--no-report", *tiny,
            ]
    return found


CASES = cases()


def digests(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every PNG under ``folder``, and ``maps.safetensors:KEY`` →
    SHA-256 of each tensor's dtype, shape and bytes."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.suffix == ".png":
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.name == "maps.safetensors":
            for key, tensor in sorted(load_file(str(path)).items()):
                data = f"{tensor.dtype}{tuple(tensor.shape)}".encode() + tensor.contiguous().numpy().tobytes()
                found[f"{relative}:{key}"] = hashlib.sha256(data).hexdigest()
    return found


def record(case: str, found: dict[str, str]) -> None:
    """Write ``case``'s digests into the JSON file (under a lock: xdist workers share it)."""
    import fcntl

    with open(DIGESTS.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
        recorded[case] = found
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")


def test_every_backend_and_family_has_a_case():
    names = {(name, family) for name, backend in BACKENDS.items() for family in backend.families}
    assert {(n, f) for n, f in names if f"eval-{n}-{f}" in CASES} == names
    if not RECORD:
        assert set(json.loads(DIGESTS.read_text())) == set(CASES), "re-record: the cases changed"


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_outputs_keep_their_bytes(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # examples/… are relative to the repository
    out = tmp_path / "out"
    assert main([*CASES[case], "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    found = digests(out)
    assert any(name.endswith(".png") for name in found)
    if RECORD:
        record(case, found)
        return
    expected = json.loads(DIGESTS.read_text())[case]
    changed = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    assert not changed, f"{case}: {len(changed)} of {len(expected)} outputs changed, e.g. {changed[:5]}"
