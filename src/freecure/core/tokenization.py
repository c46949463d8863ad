"""An offline CLIP BPE tokenizer.

Stable Diffusion's text encoders use OpenAI CLIP's byte-level BPE. Its merge table ships
inside ``open-clip-torch`` as ``bpe_simple_vocab_16e6.txt.gz``; this module rebuilds from it
the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, exactly
the way OpenAI's ``SimpleTokenizer`` builds its vocabulary, so token ids match the Hub's
``openai/clip-vit-*`` tokenizers without any download. open_clip itself is never imported.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WeightsNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# OpenAI CLIP keeps merges 1 .. 48894 of the file (line 0 is a version header):
# 49152 BPE symbols - 256 byte symbols - 2 special tokens, see `SimpleTokenizer.__init__`.
_MERGE_SLICE = slice(1, 49152 - 256 - 2 + 1)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space) map
    to code points from 256 upwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return {byte: chr(point) for byte, point in zip(byte_values, code_points)}


def find_clip_bpe() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open-clip-torch``.

    Raises:
        WeightsNotFoundError: open-clip-torch is not installed or lacks the file.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            Path(location) / BPE_FILENAME for location in spec.submodule_search_locations
        ]
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(file.locate())) for file in files if file.name == BPE_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(
        f"cannot find CLIP's BPE merge table {BPE_FILENAME!r}: it ships with open-clip-torch; "
        "install it with `pip install --no-deps open-clip-torch` or pass the path of the file"
    )


def read_clip_merges(bpe_path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The 48 894 merges CLIP uses, in rank order.

    Args:
        bpe_path: the gzipped merge table; found in open-clip-torch when None.
    """
    path = Path(bpe_path) if bpe_path is not None else find_clip_bpe()
    if not path.is_file():
        raise WeightsNotFoundError(f"CLIP BPE merge table {str(path)!r} does not exist")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[_MERGE_SLICE]]
    if len(merges) != _MERGE_SLICE.stop - 1 or any(len(merge) != 2 for merge in merges):
        raise WeightsNotFoundError(
            f"{str(path)!r} is not CLIP's BPE merge table ({BPE_FILENAME}): expected "
            f"{_MERGE_SLICE.stop - 1} merges of two symbols"
        )
    return merges  # type: ignore[return-value]


def build_clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token → id table: bytes, bytes + ``</w>``, one token per merge, then BOS/EOS."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _tokenizer_config(pad_token: str) -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }


def write_clip_tokenizer_files(
    out_dir: str | os.PathLike,
    bpe_path: str | os.PathLike | None = None,
    pad_token: str = EOS_TOKEN,
) -> Path:
    """Write a ``transformers`` CLIP tokenizer directory built from CLIP's BPE merge table.

    Writes ``vocab.json`` (49 408 tokens), ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``; the directory loads with ``CLIPTokenizer.from_pretrained``.

    Args:
        out_dir: directory to write into (created if missing).
        bpe_path: ``bpe_simple_vocab_16e6.txt.gz``; found in open-clip-torch when None.
        pad_token: the padding token recorded in the config: ``"<|endoftext|>"`` as in
            SD 1.x, ``"!"`` as in SD 2.x and SDXL's second tokenizer.

    Returns:
        The directory.
    """
    merges = read_clip_merges(bpe_path)
    vocab = build_clip_vocab(merges)
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - guarded by read_clip_merges
        raise WeightsNotFoundError(
            f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}"
        )
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not a CLIP token; use {EOS_TOKEN!r} or '!'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = _tokenizer_config(pad_token)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return out


def default_cache_dir() -> Path:
    """Where converted tokenizers are cached: ``$FREECURE_CACHE`` or ``~/.cache/freecure``."""
    if os.environ.get("FREECURE_CACHE"):
        return Path(os.environ["FREECURE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "freecure"


def cached_clip_tokenizer_dir(
    bpe_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The converted tokenizer directory for a BPE file, written once per file content.

    The directory is written under a temporary name and renamed, so concurrent processes
    never see it half-written.

    Args:
        bpe_path: ``bpe_simple_vocab_16e6.txt.gz``; found in open-clip-torch when None.
        cache_dir: cache root; :func:`default_cache_dir` when None.
    """
    source = Path(bpe_path) if bpe_path is not None else find_clip_bpe()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"clip-tokenizer-{digest}"
    if (target / "merges.txt").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "freecure"
        root.mkdir(parents=True, exist_ok=True)
        target = root / f"clip-tokenizer-{digest}"
        if (target / "merges.txt").is_file():
            return target
    staging = Path(tempfile.mkdtemp(prefix=".clip-tokenizer-", dir=root))
    write_clip_tokenizer_files(staging, source)
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shareable
    try:
        staging.rename(target)
        logger.info("wrote CLIP tokenizer files to %s", target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_clip_tokenizer(
    path: str | os.PathLike | None = None,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> CLIPTokenizer:
    """Load CLIP's tokenizer offline.

    Args:
        path: a tokenizer directory (for example one written by
            :func:`write_clip_tokenizer_files`, or a diffusers model's ``tokenizer``
            folder); when None, the BPE table of open-clip-torch is converted once and cached.
        pad_token: ``"<|endoftext|>"`` (SD 1.x) or ``"!"`` (SD 2.x, SDXL's second tokenizer).
        model_max_length: context length used by ``padding="max_length"`` and truncation.

    Returns:
        A ``transformers.CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    directory = Path(path) if path is not None else cached_clip_tokenizer_dir()
    if not directory.is_dir():
        raise WeightsNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if not (directory / "tokenizer.json").is_file() and not all(
        (directory / name).is_file() for name in ("vocab.json", "merges.txt")
    ):
        inner = directory / "tokenizer"
        hint = f"; did you mean {inner}?" if inner.is_dir() else ""
        raise WeightsNotFoundError(
            f"{directory} holds no CLIP tokenizer files (vocab.json and merges.txt, or tokenizer.json): "
            f"give a tokenizer folder such as a diffusers model's tokenizer/{hint}"
        )
    # Files must go through from_pretrained: in transformers 5 the constructor's
    # vocab_file/merges_file arguments are silently ignored.
    return CLIPTokenizer.from_pretrained(
        str(directory), pad_token=pad_token, model_max_length=model_max_length
    )
