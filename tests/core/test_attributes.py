"""Prompt → attributes: the paper's Table-3 prompts, token columns, triggers, errors, CLI."""

from __future__ import annotations

import csv
import json
from importlib import resources

import pytest

from freecure.cli import main
from freecure.core.attributes import (
    Vocabulary,
    VocabularyEntry,
    default_vocabulary,
    parse_prompt,
    token_indices_for_spans,
)
from freecure.core.errors import InputError, WeightsNotFoundError
from freecure.core.labels import class_ids

CLASS_WORDS = ("man", "woman", "boy", "girl", "person")
L, A = "localized", "abstract"

# What a careful reader finds in each Table-3 prompt: (text, kind, category).
TABLE3_EXPECTED: dict[str, list[tuple[str, str, str]]] = {
    "a <S> with black curly hair": [("black curly hair", L, "hair")],
    "a <S> with blonde curly hair": [("blonde curly hair", L, "hair")],
    "a <S> with red long straight hair": [("red long straight hair", L, "hair")],
    "a <S> with very angry looking": [("very angry looking", A, "expression")],
    "a <S> with frowning worriedly": [("frowning worriedly", A, "expression")],
    "a <S> laughing happily": [("laughing happily", A, "expression")],
    "a <S> wearing silver earrings": [("silver earrings", L, "earrings")],
    "a <S> wearing sunglasses": [("sunglasses", L, "eyewear")],
    "a <S> with white curly hair, frowning worriedly": [
        ("white curly hair", L, "hair"),
        ("frowning worriedly", A, "expression"),
    ],
    "a <S> with black curly hair, laughing happily": [
        ("black curly hair", L, "hair"),
        ("laughing happily", A, "expression"),
    ],
    "a <S> with blonde curly hair and blue eyes": [
        ("blonde curly hair", L, "hair"),
        ("blue eyes", L, "eyes"),
    ],
    "a <S> with blue eyes, laughing happily": [
        ("blue eyes", L, "eyes"),
        ("laughing happily", A, "expression"),
    ],
    "a <S> wearing sunglasses, laughing happily": [
        ("sunglasses", L, "eyewear"),
        ("laughing happily", A, "expression"),
    ],
    "a <S> with black hair, wearing silver earrings": [
        ("black hair", L, "hair"),
        ("silver earrings", L, "earrings"),
    ],
    "a <S> with blonde hair and blue eyes": [
        ("blonde hair", L, "hair"),
        ("blue eyes", L, "eyes"),
    ],
    "a <S> with sunglasses and silver earrings": [
        ("sunglasses", L, "eyewear"),
        ("silver earrings", L, "earrings"),
    ],
    "a <S> with red curly hair, wearing pearl earrings, unhappy looking": [
        ("red curly hair", L, "hair"),
        ("pearl earrings", L, "earrings"),
        ("unhappy looking", A, "expression"),
    ],
    "a <S> with blue eyes and blonde curly hair, smiling": [
        ("blue eyes", L, "eyes"),
        ("blonde curly hair", L, "hair"),
        ("smiling", A, "expression"),
    ],
    "a <S> with white curly hair, wearing sunglasses, laughing happily": [
        ("white curly hair", L, "hair"),
        ("sunglasses", L, "eyewear"),
        ("laughing happily", A, "expression"),
    ],
    "a <S> with black curly hair, wearing silver earrings, frowning worriedly": [
        ("black curly hair", L, "hair"),
        ("silver earrings", L, "earrings"),
        ("frowning worriedly", A, "expression"),
    ],
}
PARSE_CLASSES = {
    "hair": ("hair",),
    "eyes": ("eyes",),
    "eyewear": ("eye_g",),
    "earrings": ("ear_r",),
    "expression": (),
}


def _table3_rows() -> list[dict[str, str]]:
    data = resources.files("freecure") / "data" / "prompts_table3.csv"
    return list(csv.DictReader(data.read_text(encoding="utf-8").splitlines()))


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from freecure.core.tokenization import load_clip_tokenizer, write_clip_tokenizer_files

    try:
        directory = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip"))
    except WeightsNotFoundError as error:
        pytest.skip(str(error))
    return load_clip_tokenizer(directory)


@pytest.fixture
def tokenizer_cache(clip_tokenizer, tmp_path_factory, monkeypatch) -> None:
    """Point the CLI's default tokenizer cache at a temporary folder."""
    monkeypatch.setenv("FREECURE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _spelled(tokenizer, prompt: str, columns: tuple[int, ...]) -> str:
    """The text of the tokens at ``columns`` of the tokenized prompt."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    return "".join(tokens[c] for c in columns).replace("</w>", " ").strip()


# --------------------------------------------------------------------------- Table 3


def test_table3_data_matches_the_paper() -> None:
    rows = _table3_rows()
    assert [row["prompt"] for row in rows] == list(TABLE3_EXPECTED)
    counts = [int(row["n_attributes"]) for row in rows]
    assert [counts.count(n) for n in (1, 2, 3)] == [8, 8, 4]  # Sec. 5.1: 8 / 8 / 4
    # The table's group labels sit one or two rows off; those rows carry a note.
    slips = [row["prompt"] for row in rows if row["paper_group"] != row["n_attributes"]]
    assert slips == [
        "a <S> wearing sunglasses",
        "a <S> with blonde hair and blue eyes",
        "a <S> with sunglasses and silver earrings",
    ]
    assert all(row["note"] for row in rows if row["prompt"] in slips)


@pytest.mark.parametrize("class_word", CLASS_WORDS)
@pytest.mark.parametrize("row", _table3_rows(), ids=lambda row: row["prompt"])
def test_table3_prompts_parse_as_a_reader_would(row: dict[str, str], class_word: str) -> None:
    prompt = row["prompt"].replace("<S>", class_word)
    parsed = parse_prompt(prompt, class_word)
    found = [(a.text, a.kind, a.category) for a in parsed.attributes]
    assert found == TABLE3_EXPECTED[row["prompt"]]
    assert len(found) == int(row["n_attributes"])
    assert parsed.unknown_words == ()
    assert parsed.template_prompt == f"a {class_word}"
    for attribute in parsed.attributes:
        assert attribute.parse_classes == PARSE_CLASSES[attribute.category]
        assert attribute.words == tuple(attribute.text.split())
        assert attribute.token_indices == ()


@pytest.mark.parametrize(
    ("prompt", "expression_prompt"),
    [
        ("a man laughing happily", "a man laughing happily"),
        ("a man with very angry looking", "a man very angry looking"),
        ("a man with black curly hair, frowning worriedly", "a man frowning worriedly"),
        ("a man with blue eyes and blonde curly hair, smiling", "a man smiling"),
        ("a man wearing silver earrings", "a man"),
        ("an angry man with a big smile", "an angry man big smile"),
        ("the man smiling, laughing happily", "the man smiling, laughing happily"),
    ],
)
def test_expression_prompt(prompt: str, expression_prompt: str) -> None:
    parsed = parse_prompt(prompt, "man")
    assert parsed.expression_prompt == expression_prompt
    assert parsed.template_prompt == ("the man" if prompt.startswith("the") else "a man")


def test_localized_and_abstract_views_and_json() -> None:
    parsed = parse_prompt("a girl with black hair, laughing happily", "girl")
    assert [a.text for a in parsed.localized] == ["black hair"]
    assert [a.text for a in parsed.abstract] == ["laughing happily"]
    data = json.loads(json.dumps(parsed.to_dict()))
    assert data["attributes"][0] == {
        "text": "black hair",
        "kind": "localized",
        "category": "hair",
        "parse_classes": ["hair"],
        "words": ["black", "hair"],
        "token_indices": [],
    }
    assert data["expression_prompt"] == "a girl laughing happily"


# --------------------------------------------------------------------------- grammar


def test_unknown_words_are_reported() -> None:
    parsed = parse_prompt("a man with purple mohawk", "man")
    # "purple" is a known colour, but without a known head it describes nothing restorable.
    assert parsed.unknown_words == ("purple", "mohawk")
    assert parsed.attributes == ()


def test_case_punctuation_and_comma_separated_modifiers() -> None:
    parsed = parse_prompt("A WOMAN, with Long, Wavy hair; SMILING!!", "woman")
    assert [(a.text, a.kind) for a in parsed.attributes] == [
        ("Long, Wavy hair", "localized"),
        ("SMILING", "abstract"),
    ]
    assert parsed.attributes[0].words == ("Long", "Wavy", "hair")


def test_multiword_heads_and_stop_words() -> None:
    parsed = parse_prompt(
        "a photo of a boy wearing a pair of round sun glasses and a top hat", "boy"
    )
    assert [(a.text, a.category, a.parse_classes) for a in parsed.attributes] == [
        ("round sun glasses", "eyewear", ("eye_g",)),
        ("top hat", "hat", ("hat",)),
    ]
    assert parsed.unknown_words == ()


def test_negated_attribute_is_not_restored() -> None:
    parsed = parse_prompt("a man without glasses, smiling", "man")
    assert [a.text for a in parsed.attributes] == ["smiling"]
    assert parsed.unknown_words == ("without", "glasses")


def test_expression_before_the_class_word() -> None:
    parsed = parse_prompt("an angry man with short hair", "man")
    assert [(a.text, a.kind) for a in parsed.attributes] == [
        ("angry", "abstract"),
        ("short hair", "localized"),
    ]
    assert parsed.template_prompt == "a man"
    assert parsed.expression_prompt == "an angry man"


def test_multiword_class_word() -> None:
    parsed = parse_prompt("a young woman img with pearl earrings", "young woman", trigger="img")
    assert parsed.foundation_prompt == "a young woman with pearl earrings"
    assert parsed.template_prompt == "a young woman"
    assert [a.text for a in parsed.attributes] == ["pearl earrings"]


def test_vocabulary_is_extensible_data() -> None:
    vocabulary = default_vocabulary().extended(
        [VocabularyEntry(("mohawk",), "head", "hair", ("hair",))]
    )
    parsed = parse_prompt("a man with purple mohawk", "man", vocabulary=vocabulary)
    assert [(a.text, a.category) for a in parsed.attributes] == [("purple mohawk", "hair")]
    assert parsed.unknown_words == ()


def test_shipped_vocabulary_is_valid() -> None:
    vocabulary = default_vocabulary()
    assert len(vocabulary) > 100
    for entry in vocabulary.entries:
        class_ids(entry.parse_classes)  # raises on unknown names
    assert vocabulary.get("Sunglasses").parse_classes == ("eye_g",)
    assert vocabulary.get("earrings").parse_classes == ("ear_r",)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("hair,noun,hair,hair", "role"),
        ("hair,head,hair,", "needs at least one parse class"),
        ("hair,head,hair,beard", "unknown face-parser class"),
        ("black,modifier,colour,hair", "only heads"),
        ("Black,modifier,colour,", "lower case"),
    ],
)
def test_bad_vocabulary_rows_are_rejected(tmp_path, row: str, message: str) -> None:
    path = tmp_path / "vocabulary.csv"
    path.write_text("# comment\nphrase,role,category,parse_classes\n" + row + "\n")
    with pytest.raises(ValueError, match=message):
        Vocabulary.from_csv(path)


# --------------------------------------------------------------------------- trigger & errors


def test_trigger_is_removed_from_the_foundation_prompt() -> None:
    parsed = parse_prompt("a man img with black hair, laughing happily", "man", trigger="img")
    assert parsed.foundation_prompt == "a man with black hair, laughing happily"
    assert parsed.unknown_words == ()
    assert parsed.trigger == "img"
    upper = parse_prompt("A MAN IMG, SMILING", "Man", trigger="img")
    assert upper.foundation_prompt == "A MAN, SMILING"


def test_trigger_without_option_is_an_unknown_word() -> None:
    assert parse_prompt("a man img with black hair", "man").unknown_words == ("img",)


@pytest.mark.parametrize(
    ("prompt", "class_word", "trigger", "message"),
    [
        ("", "man", None, "prompt is empty"),
        ("   ", "man", None, "prompt is empty"),
        ("a woman with black hair", "man", None, r"class word 'man' does not occur .*'a woman"),
        ("a man with black hair", "man", "img", "trigger word 'img' does not occur"),
        ("a man with img black hair", "man", "img", "right after the class word 'man'.*'with'"),
        ("a man, img with black hair", "man", "img", "right after the class word"),
        ("a man img with img hair", "man", "img", "occurs 2 times"),
        ("a man img", "", "img", "class word"),
        ("a man img", "man", "man", "cannot be the class word"),
        ("a man img", "man", "img two", "single word"),
    ],
)
def test_bad_input_raises_input_error(prompt, class_word, trigger, message) -> None:
    with pytest.raises(InputError, match=message):
        parse_prompt(prompt, class_word, trigger=trigger)


# --------------------------------------------------------------------------- token columns


@pytest.mark.parametrize("class_word", CLASS_WORDS)
def test_token_columns_spell_the_attributes(clip_tokenizer, class_word: str) -> None:
    for template in TABLE3_EXPECTED:
        prompt = template.replace("<S>", f"{class_word} img")
        parsed = parse_prompt(prompt, class_word, trigger="img", tokenizer=clip_tokenizer)
        foundation = parsed.foundation_prompt
        assert foundation == template.replace("<S>", class_word)
        assert _spelled(clip_tokenizer, foundation, parsed.class_token_indices) == class_word
        assert parsed.class_token_indices == (2,)  # BOS, "a", class
        for attribute in parsed.attributes:
            columns = attribute.token_indices
            assert _spelled(clip_tokenizer, foundation, columns) == " ".join(attribute.words)
            assert list(columns) == list(range(columns[0], columns[-1] + 1))


def test_words_split_into_several_tokens(clip_tokenizer) -> None:
    parsed = parse_prompt("a man, frowning worriedly!", "man", tokenizer=clip_tokenizer)
    (attribute,) = parsed.attributes
    assert len(attribute.token_indices) > len(attribute.words)  # frowning = fro|w|ning
    assert attribute.token_indices[0] == 4  # BOS a man , frowning
    assert _spelled(clip_tokenizer, parsed.foundation_prompt, attribute.token_indices) == (
        "frowning worriedly"
    )
    vocabulary = default_vocabulary().extended(
        [VocabularyEntry(("glimmerquartzite",), "modifier", "material")]
    )
    parsed = parse_prompt(
        "a woman with long, glimmerquartzite earrings",
        "woman",
        tokenizer=clip_tokenizer,
        vocabulary=vocabulary,
    )
    (attribute,) = parsed.attributes
    assert attribute.text == "long, glimmerquartzite earrings"
    spelled = _spelled(clip_tokenizer, parsed.foundation_prompt, attribute.token_indices)
    assert spelled.replace(" ", "") == "longglimmerquartziteearrings"  # the comma is left out
    assert len(attribute.token_indices) > 3


def test_slow_tokenizers_use_prefix_counting(clip_tokenizer) -> None:
    class NoOffsets:
        """A tokenizer without offset mappings, like transformers' slow tokenizers."""

        def __call__(self, text, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError
            return clip_tokenizer(text, **kwargs)

    prompt = "a man with red long straight hair, frowning worriedly; very angry looking"
    fast = parse_prompt(prompt, "man", tokenizer=clip_tokenizer)
    slow = parse_prompt(prompt, "man", tokenizer=NoOffsets())
    assert slow.attributes == fast.attributes
    assert slow.class_token_indices == fast.class_token_indices
    spans = [(0, 1), (11, 14)]
    assert token_indices_for_spans(NoOffsets(), prompt, spans) == token_indices_for_spans(
        clip_tokenizer, prompt, spans
    )


def test_attribute_past_the_context_window(clip_tokenizer) -> None:
    padding = " ".join(["portrait"] * 80)
    with pytest.raises(InputError, match="77-token context"):
        parse_prompt(f"a man {padding} with black hair", "man", tokenizer=clip_tokenizer)


# --------------------------------------------------------------------------- cost of long prompts


class _OffsetTokenizer:
    """A fast-tokenizer stand-in: one token per run of non-space characters, with offsets."""

    model_max_length = 10**30  # no context limit (like a tokenizer without one)

    def __call__(self, text, return_offsets_mapping=False, verbose=False, **kwargs):
        import re

        offsets = [(0, 0), *((m.start(), m.end()) for m in re.finditer(r"\S+", text)), (0, 0)]
        return {"input_ids": list(range(len(offsets))), "offset_mapping": offsets}


def _parser_lines(prompt: str, **kwargs) -> int:
    """Lines of freecure/attributes.py executed while parsing ``prompt`` (a loop's body counts
    once per pass): a measure of the parser's work that does not depend on the machine's speed."""
    import sys

    import freecure.core.attributes as module

    source = module.__file__
    default_vocabulary()  # read once (cached), not counted
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == source else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        parse_prompt(prompt, "woman", **kwargs)
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.parametrize(
    "unit, kwargs",
    [
        ("red ", {}),  # one unpunctuated run of modifiers before the head
        ("zebra ", {}),  # one unpunctuated run of unknown words
        ("with red hair, laughing happily, ", {}),  # many attributes
        ("very ", {}),  # intensifiers: joinable, but no expression
        ("with red hair, laughing happily, ", {"tokenizer": _OffsetTokenizer()}),  # token columns
    ],
    ids=["modifiers", "unknown-words", "attributes", "intensifiers", "token-columns"],
)
def test_parsing_is_linear_in_the_prompt_length(unit, kwargs) -> None:
    """Doubling the prompt at most (about) doubles the parser's work. The first unpunctuated
    run looked ahead to its end for every word (9 KB 0.3 s, 72 KB 11.9 s): 4× the work here."""

    def prompt(n: int) -> str:
        return "a woman " + unit * n + "with black hair"

    short, long = _parser_lines(prompt(300), **kwargs), _parser_lines(prompt(600), **kwargs)
    assert long <= 2.2 * short, (short, long)


def test_long_prompts_parse_as_before() -> None:
    """The linear look-ahead finds the same phrases as the unbounded one: a multi-word phrase
    inside a long run, the longest match first, and stops at punctuation and the class word."""
    run = " ".join(["red"] * 50)
    parsed = parse_prompt(f"a woman with {run} pony tail, a man wearing sunglasses woman laughing", "woman")
    assert [a.text for a in parsed.attributes] == [f"{run} pony tail", "sunglasses", "laughing"]
    assert parsed.unknown_words == ("man",)


def test_overlong_prompts_are_refused_before_parsing() -> None:
    from freecure.core.attributes import MAX_PROMPT_CHARS, check_prompt_length, detect_class_word

    prompt = "a woman with red hair " * (MAX_PROMPT_CHARS // 22 + 1)
    for call in (lambda: parse_prompt(prompt, "woman"), lambda: detect_class_word(prompt)):
        with pytest.raises(InputError, match=f"at most {MAX_PROMPT_CHARS:,} are accepted"):
            call()
    check_prompt_length("a woman", limit=7)
    with pytest.raises(InputError, match="the prompt is 8 characters long; at most 7"):
        check_prompt_length("a woman ", limit=7)


def test_an_attribute_past_the_context_is_named_shortly(clip_tokenizer) -> None:
    run = " ".join(["red"] * 400)
    with pytest.raises(InputError, match="77-token context") as refused:
        parse_prompt(f"a man {run} hair", "man", tokenizer=clip_tokenizer)
    assert len(str(refused.value)) < 400


# --------------------------------------------------------------------------- CLI


def test_cli_table(tokenizer_cache, capsys) -> None:
    prompt = "a man img with red curly hair, wearing pearl earrings, unhappy looking"
    assert main(["attributes", prompt, "--class-word", "man", "--trigger", "img"]) == 0
    out = capsys.readouterr().out
    assert "red curly hair   localized  hair" in out
    assert "pearl earrings   localized  earrings    ear_r" in out
    assert "unhappy looking  abstract   expression" in out
    assert "expression prompt:  a man unhappy looking" in out
    assert "template prompt:    a man" in out


def test_cli_json(tokenizer_cache, capsys) -> None:
    argv = ["attributes", "a girl wearing sunglasses, laughing happily", "--class-word", "girl"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["text"] for a in data["attributes"]] == ["sunglasses", "laughing happily"]
    assert data["attributes"][0]["token_indices"] == [4]
    assert data["class_token_indices"] == [2]


def test_cli_bad_input_exits_2(capsys) -> None:
    argv = ["attributes", "a man with black hair", "--class-word", "man", "--trigger", "img"]
    assert main([*argv, "--no-tokens"]) == 2
    assert "trigger word 'img' does not occur" in capsys.readouterr().err


def test_cli_missing_tokenizer_dir_exits_2(tmp_path, capsys) -> None:
    argv = ["attributes", "a man smiling", "--class-word", "man"]
    assert main([*argv, "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- terminal output

# An escape sequence (colour, clear screen), a bell, a carriage return, a right-to-left
# override, a zero-width space and a C1 control (CSI).
HOSTILE = "\x1b[31m\x1b[2J\x07\r\u202e\u200b\x9b"


def _raw_controls(text: str) -> list[str]:
    import unicodedata

    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def test_printable_escapes_control_characters_and_keeps_text() -> None:
    from freecure.core.terminal import printable

    assert printable("a \x1b[31mred\x1b[0m hair\x07") == "a \\x1b[31mred\\x1b[0m hair\\x07"
    assert printable("tab\there\nnew\rline\x7f\x9b") == "tab\\there\\nnew\\rline\\x7f\\x9b"
    assert printable("rtl \u202e zero\u200bwidth \u2028 \udc80") == "rtl \\u202e zero\\u200bwidth \\u2028 \\udc80"
    assert printable("γ é 中 😀 … “quoted” \\ back") == "γ é 中 😀 … “quoted” \\ back"  # text is kept


def test_cli_table_prints_no_raw_control_characters(capsys) -> None:
    prompt = f"a man {HOSTILE}with red{HOSTILE}hair, laughing{HOSTILE} happily"
    assert main(["attributes", prompt, "--class-word", "man", "--no-tokens"]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out) == [], out
    assert "foundation prompt:  a man \\x1b[31m\\x1b[2J\\x07\\r\\u202e\\u200b\\x9bwith" in out
    assert "red\\x1b[31m" in out  # the attribute's text, escaped too


def test_error_messages_print_no_raw_control_characters(tmp_path, capsys) -> None:
    """A message that names what the user typed (here a file name) shows its control bytes
    escaped: every command's one-line error goes through freecure.terminal.printable."""
    missing = tmp_path / f"me{HOSTILE}.png"
    argv = ["generate", "--tiny", "--prompt", "a man", "--ref", str(missing), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _raw_controls(err) == [], err
    assert "me\\x1b[31m\\x1b[2J\\x07\\r\\u202e\\u200b\\x9b.png" in err and err.count("\n") == 1
