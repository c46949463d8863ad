"""The offline CLIP tokenizer gives OpenAI CLIP's ids (checked against open_clip's
SimpleTokenizer, the reference implementation shipped with the same BPE file)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
from importlib import resources
from pathlib import Path

import pytest

from freecure.core.errors import WeightsNotFoundError
from freecure.core.tokenization import (
    EOS_TOKEN,
    VOCAB_SIZE,
    bytes_to_unicode,
    cached_clip_tokenizer_dir,
    find_clip_bpe,
    load_clip_tokenizer,
    write_clip_tokenizer_files,
)

CLASS_WORDS = ("man", "woman", "boy", "girl", "person")
TRICKY = (
    "A Man's HAT, 3 earrings & 12 rings!!",
    "don't stop -- it's 100% fine...",
    "hello,world;black-curly   hair\tand\nEYES",
    "a woman with 'quoted' words (and brackets) [1990s]",
    "café naïve façade",
    "a man with zorblaxian hair",
)


def _table3_prompts() -> list[str]:
    data = resources.files("freecure") / "data" / "prompts_table3.csv"
    rows = csv.DictReader(data.read_text(encoding="utf-8").splitlines())
    return [row["prompt"] for row in rows]


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    try:
        return find_clip_bpe()
    except WeightsNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tokenizer_dir(bpe_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip"), bpe_path)


@pytest.fixture(scope="module")
def reference(bpe_path: Path):
    """open_clip's SimpleTokenizer, loaded from its file so open_clip's models are not imported."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", bpe_path.parent / "tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_path))


def _reference_ids(reference, text: str) -> list[int]:
    return [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]


def test_vocabulary_matches_openai_construction(tokenizer_dir: Path, reference) -> None:
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == 49406 and vocab[EOS_TOKEN] == 49407
    assert [vocab[symbol] for symbol in bytes_to_unicode().values()] == list(range(256))
    assert vocab["a</w>"] == 320 and vocab["man</w>"] == 786
    expected = {token: index for token, index in reference.encoder.items() if index < 49406}
    assert {token: index for token, index in vocab.items() if index < 49406} == expected


@pytest.mark.parametrize("class_word", CLASS_WORDS)
def test_ids_match_reference_on_table3_prompts(tokenizer_dir, reference, class_word) -> None:
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    for template in _table3_prompts():
        prompt = template.replace("<S>", class_word)
        assert tokenizer(prompt)["input_ids"] == _reference_ids(reference, prompt), prompt


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_reference_on_tricky_strings(tokenizer_dir, reference, text) -> None:
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    assert tokenizer(text)["input_ids"] == _reference_ids(reference, text)


def test_truncation_and_padding_at_77(tokenizer_dir, reference) -> None:
    long_prompt = "a man with " + ", ".join(["black curly hair"] * 40)
    short_prompt = "a girl laughing happily"
    # open_clip pads with id 0 ("!"), like SD 2.x / SDXL's second tokenizer.
    bang = load_clip_tokenizer(tokenizer_dir, pad_token="!")
    assert bang.pad_token_id == 0
    for prompt in (long_prompt, short_prompt):
        ids = bang(prompt, padding="max_length", truncation=True)["input_ids"]
        assert ids == reference(prompt)[0].tolist()
    # SD 1.x pads with <|endoftext|>.
    eos = load_clip_tokenizer(tokenizer_dir)
    assert eos.model_max_length == 77 and eos.pad_token == EOS_TOKEN
    ids = eos(short_prompt, padding="max_length", truncation=True)["input_ids"]
    n = len(_reference_ids(reference, short_prompt))
    assert len(ids) == 77 and ids[:n] == _reference_ids(reference, short_prompt)
    assert set(ids[n:]) == {49407}
    truncated = eos(long_prompt, padding="max_length", truncation=True)["input_ids"]
    assert len(truncated) == 77 and truncated[-1] == 49407


def test_saved_dir_reloads_with_auto_and_fast_classes(tokenizer_dir: Path) -> None:
    import transformers

    prompt = "a woman with red long straight hair, frowning worriedly"
    expected = load_clip_tokenizer(tokenizer_dir)(prompt)["input_ids"]
    loaders = [transformers.CLIPTokenizer, transformers.AutoTokenizer]
    if hasattr(transformers, "CLIPTokenizerFast"):
        loaders.append(transformers.CLIPTokenizerFast)
    for loader in loaders:
        tokenizer = loader.from_pretrained(str(tokenizer_dir))
        assert tokenizer(prompt)["input_ids"] == expected, loader.__name__
        assert tokenizer.model_max_length == 77


def test_default_load_converts_once_into_cache(bpe_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FREECURE_CACHE", str(tmp_path))
    first = cached_clip_tokenizer_dir()
    assert first.parent == tmp_path and (first / "vocab.json").is_file()
    stamp = (first / "vocab.json").stat().st_mtime_ns
    assert cached_clip_tokenizer_dir() == first
    assert (first / "vocab.json").stat().st_mtime_ns == stamp
    tokenizer = load_clip_tokenizer()
    assert tokenizer("a man")["input_ids"] == [49406, 320, 786, 49407]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging dirs left


def test_missing_or_wrong_bpe_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        write_clip_tokenizer_files(tmp_path / "out", tmp_path / "missing.txt.gz")
    wrong = tmp_path / "wrong.txt.gz"
    wrong.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(WeightsNotFoundError, match="not CLIP's BPE merge table"):
        write_clip_tokenizer_files(tmp_path / "out", wrong)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_clip_tokenizer(tmp_path / "no-such-dir")


def test_unknown_pad_token_is_rejected(bpe_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pad_token"):
        write_clip_tokenizer_files(tmp_path, bpe_path, pad_token="<pad>")
