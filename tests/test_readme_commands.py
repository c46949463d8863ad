"""Every `freecure …` command of README.md and docs/cli.md, run as written through the CLI entry point.

The commands are read from README.md itself (its ```bash blocks and the backends table), so
the README and this test cannot drift apart. Each runs in-process with `freecure.cli.main`
and as little work as keeps it meaningful: `--tiny` added where the README says a command
needs real weights ("add `--tiny` to run offline"), 3 denoising steps, 1 prompt and 1 seed
for the evaluation, output folders under the test's temporary folder, and `emb.safetensors`
replaced by an identity embedding this test saves with safetensors. A renamed symbol on any
documented path (such as the token-fusion embedding loader) fails here.

Optional parts written ``[--json]`` or ``[--fasa-mask fd-parse|same]`` run with their first
alternative. A face-embedding or keypoint file that the README names as a placeholder for the
user's own (``face.safetensors``, ``kps.json``) is left out: under ``--tiny`` the backends draw
a random stand-in identity. ``freecure demo`` starts a server and is tested in
tests/test_demo.py, not here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from freecure.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The documents whose commands run: the README's examples, then the command-line reference.
DOCUMENTS = (README, ROOT / "docs" / "cli.md")
#: Options whose value is shrunk to keep the suite fast: option → value.
SMALL = {"--steps": "3", "--inject-step": "1", "--num-seeds": "1", "--limit-prompts": "1"}


def readme_commands(text: str) -> list[str]:
    """The `freecure` command lines of a README, in order: lines of ```bash blocks (with `\\`
    continuations joined and `# comments` dropped) and inline code in table rows."""
    commands, in_bash, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh", "```shell") and not in_bash
            continue
        if in_bash:
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if line.startswith("freecure "):
                commands.append(shlex.join(shlex.split(line, comments=True)))
        elif line.startswith("|"):
            for code in re.findall(r"`(freecure [a-z]+ --[^`]*)`", line):
                commands.append(code)
    return commands


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert {c.split()[1] for c in commands} >= {"generate", "cost", "attributes", "parse", "eval", "report"}
    backends = {re.search(r"--backend (\S+)", c).group(1) for c in commands if "--backend" in c}
    from freecure.backends import BACKENDS

    assert backends >= set(BACKENDS) - {"photomaker-v2"}, "every backend has a README command"
    assert all(c.split()[1] in COMMANDS for c in commands)


#: Options naming a file of the user's own; dropped when the file is not in the repository.
USER_FILES = ("--face-embedding", "--face-keypoints")
#: Sub-commands that serve rather than finish (tested elsewhere).
SERVERS = ("demo",)


def with_optional_parts(command: str) -> str:
    """``[--x a|b]`` → ``--x a``: the optional parts, with their first alternative."""
    return re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), command)


def runnable(command: str, tmp_path: Path, embedding: Path) -> list[str]:
    """The README command as arguments for `main`, made offline, small and tmp-bound."""
    words = shlex.split(with_optional_parts(command))[1:]
    for option in USER_FILES:
        while option in words and not (ROOT / words[words.index(option) + 1]).exists():
            del words[words.index(option) : words.index(option) + 2]
    name = words[0]
    args = []
    for index, word in enumerate(words):
        previous = words[index - 1] if index else ""
        if previous in SMALL:
            word = SMALL[previous]
        elif previous == "--out" or (name == "report" and index == 1):
            word = str(tmp_path / word)
        elif word == "emb.safetensors":
            word = str(embedding)
        args.append(word)
    if name in ("generate", "eval"):
        args += [] if "--tiny" in args else ["--tiny"]
    if name in ("generate", "eval", "analyze"):
        for option in ("--steps",) + (("--num-seeds", "--limit-prompts") if name == "eval" else ()):
            args += [] if option in args else [option, SMALL[option]]
    if name in ("generate", "eval", "report"):
        args.append("--no-progress")
    if name == "generate" and "--out" not in args:
        args += ["--out", str(tmp_path / f"generate-{len(list(tmp_path.glob('generate-*')))}")]
    return args


@pytest.fixture
def embedding(tmp_path) -> Path:
    """A token-fusion identity embedding of the tiny SD1.5 text encoder's width (32), saved as
    the README says: a safetensors file with a tensor named 'identity'."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "emb.safetensors"
    save_file({"identity": torch.randn(32, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


#: The documented commands that finish (servers are tested elsewhere), in document order, each once.
COMMANDS_RUN = list(
    dict.fromkeys(
        c for doc in DOCUMENTS for c in readme_commands(doc.read_text(encoding="utf-8")) if c.split()[1] not in SERVERS
    )
)


def prerequisites(command: str) -> list[str]:
    """The earlier README commands whose output ``command`` reads: ``report DIR`` reads the
    ``eval --out DIR`` (and ``generate --out``) runs the README lists before it."""
    words = shlex.split(with_optional_parts(command))
    if words[1] != "report":
        return []
    index = COMMANDS_RUN.index(command)
    earlier = [shlex.split(with_optional_parts(c)) for c in COMMANDS_RUN[:index]]
    return [shlex.join(w) for w in earlier if "--out" in w and w[w.index("--out") + 1] == words[2]]


def test_the_readme_runs_every_command_and_backend():
    backend = re.compile(r"--backend (\S+)")
    ran = {c.split()[1] + (f" {backend.search(c).group(1)}" if "--backend" in c else "") for c in COMMANDS_RUN}
    assert "generate token-fusion" in ran and "report" in ran
    assert all(prerequisites(c) for c in COMMANDS_RUN if c.split()[1] == "report")


def command_id(command: str) -> str:
    """``03-generate-infiniteyou``: the README position, the sub-command and the backend."""
    words = command.split()
    backend = words[words.index("--backend") + 1] if "--backend" in words else ""
    study = words[2] if words[1] == "analyze" else ""
    return "-".join(filter(None, (f"{COMMANDS_RUN.index(command):02d}", words[1], study, backend)))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS_RUN, ids=command_id)
def test_readme_command_runs(command, tmp_path, embedding, monkeypatch, capsys):
    pytest.importorskip("dlib")  # `freecure eval` scores identity offline with dlib under --tiny
    pytest.importorskip("facenet_pytorch")
    monkeypatch.chdir(ROOT)  # README paths (examples/…) are relative to the repository
    for earlier in prerequisites(command):
        assert main(runnable(earlier, tmp_path, embedding)) == 0, f"README command failed: {earlier}"
        capsys.readouterr()
    args = runnable(command, tmp_path, embedding)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, f"README command failed: {command}\n{captured.err[-2000:]}"
    if "--json" in args:
        json.loads(captured.out)  # strict JSON (no NaN)
    if args[0] == "generate":
        out = Path(args[args.index("--out") + 1])
        images = int(args[args.index("--num-images") + 1]) if "--num-images" in args else 1
        runs = [out] if images == 1 else sorted(p for p in out.iterdir() if p.is_dir())  # one folder per seed
        assert len(runs) == images
        if images > 1:  # and a top-level manifest listing them
            assert json.loads((out / "manifest.json").read_text())["runs"] == [p.name for p in runs]
        for run in runs:
            manifest = json.loads((run / "manifest.json").read_text())
            assert sorted(manifest["files"]) == sorted(p.name for p in run.iterdir())
