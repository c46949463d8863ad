"""Prompt → facial attributes, the input of FreeCure's two restore strategies (paper §4).

A prompt ``c`` holds attributes ``A = {A_1, ..., A_n}`` of two kinds:

* **localized** attributes (hair, eyes, eyewear, earrings, hats, ...) are restored by noise
  blending inside SAME masks (eq. 4–6); each needs the face-parser classes that cover it (in
  FD's image; PD's side may instead use where its category belongs on the face, see
  :func:`freecure.masks.placement_region`) and the columns of its tokens in the foundation
  prompt, whose cross-attention maps ``H_i`` it uses;
* **abstract** attributes (expressions) are restored by inverting with a template prompt
  ("a man") and denoising with the expression prompt ("a man laughing happily"), §4.2.

The grammar is deliberately small and driven by a vocabulary file
(``data/attribute_vocabulary.csv``, see its header for the roles):

* localized attribute = a ``head`` plus the ``modifier``/``intensifier`` words right before it
  ("red long straight hair", "silver earrings"; commas may separate modifiers: "long, wavy hair");
  a head alone is an attribute ("sunglasses");
* abstract attribute = a run of ``expression``/``adverb``/``intensifier`` words with at least
  one expression word and no punctuation inside ("very angry looking", "laughing happily");
* ``stop`` words ("with", "and", "wearing", articles) and punctuation separate attributes;
* anything else — words the vocabulary lacks, known words that do not end up in an attribute
  ("purple" in "purple mohawk") and negated attributes ("without glasses") — is reported in
  ``ParsedPrompt.unknown_words``, never silently dropped.

Expression prompt grammar: the abstract attributes are written back into the template in
prompt order — those before the class word between the article and the class word, those
after it behind the class word, joined by ", ". Linking words such as "with" are not kept:
"a man with very angry looking" gives "a man very angry looking"; "an angry man" gives
"an angry man" with template "a man" (a/an follow the next word).
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError, shorten
from .labels import class_ids

logger = logging.getLogger(__name__)

ROLES = ("head", "modifier", "intensifier", "expression", "adverb", "negation", "stop")
LOCALIZED, ABSTRACT = "localized", "abstract"
ARTICLES = ("a", "an", "the")
# A word: letters/digits, with inner apostrophes or hyphens ("close-up", "shoulder-length").
WORD_PATTERN = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
# Gaps that may sit between the modifiers of one localized attribute ("long, wavy hair").
_MODIFIER_GAP = re.compile(r"[\s,]*")

#: The longest prompt :func:`parse_prompt` (and so every command) reads, in characters. No text
#: encoder sees more than a few hundred tokens (CLIP 77; FLUX's T5 512, about 2,000 characters),
#: so this only refuses pasted documents; ``freecure demo`` accepts far less
#: (:data:`freecure.demo.service.MAX_PAGE_PROMPT_CHARS`). The parser is linear in the length.
MAX_PROMPT_CHARS = 100_000


def check_prompt_length(prompt: str, limit: int = MAX_PROMPT_CHARS) -> None:
    """Refuse a prompt longer than ``limit`` characters, in one line.

    Raises:
        InputError: naming the prompt's length and the limit.
    """
    if len(prompt) > limit:
        raise InputError(
            f"the prompt is {len(prompt):,} characters long; at most {limit:,} are accepted "
            "(the text encoder reads a few hundred at most): shorten it"
        )


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabularyEntry:
    """One row of the attribute vocabulary.

    Args:
        phrase: the lower-case words of the phrase ("pony", "tail").
        role: one of :data:`ROLES`.
        category: the attribute category for heads ("hair"), the word kind otherwise.
        parse_classes: face-parser classes or groups covering a head; empty for other roles.
    """

    phrase: tuple[str, ...]
    role: str
    category: str
    parse_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = " ".join(self.phrase)
        if not self.phrase or any(not WORD_PATTERN.fullmatch(word) for word in self.phrase):
            raise ValueError(f"vocabulary phrase {name!r} must be one or more plain words")
        if any(word != word.lower() for word in self.phrase):
            raise ValueError(f"vocabulary phrase {name!r} must be lower case")
        if self.role not in ROLES:
            raise ValueError(
                f"vocabulary phrase {name!r}: role {self.role!r} is not one of {ROLES}"
            )
        if self.role == "head" and not self.parse_classes:
            raise ValueError(f"vocabulary head {name!r} needs at least one parse class")
        if self.role != "head" and self.parse_classes:
            raise ValueError(f"vocabulary phrase {name!r}: only heads have parse classes")
        try:
            class_ids(self.parse_classes)
        except KeyError as error:
            raise ValueError(f"vocabulary phrase {name!r}: {error.args[0]}") from None


class Vocabulary:
    """Phrase lookup for the parser; multi-word phrases win over their parts.

    Args:
        entries: the vocabulary rows; a later row for the same phrase replaces an earlier one.
    """

    def __init__(self, entries: Iterable[VocabularyEntry]) -> None:
        self._entries: dict[tuple[str, ...], VocabularyEntry] = {}
        for entry in entries:
            self._entries[entry.phrase] = entry
        self.max_phrase_words = max((len(phrase) for phrase in self._entries), default=1)

    @classmethod
    def from_csv(cls, source: str | Path | io.TextIOBase) -> Vocabulary:
        """Read ``phrase,role,category,parse_classes`` rows; ``#`` lines are comments.

        Args:
            source: a path, or an open text file.
        """
        if isinstance(source, (str, Path)):
            text = Path(source).read_text(encoding="utf-8")
        else:
            text = source.read()
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        entries = []
        for row in csv.DictReader(lines):
            entries.append(
                VocabularyEntry(
                    phrase=tuple(row["phrase"].split()),
                    role=row["role"].strip(),
                    category=row["category"].strip(),
                    parse_classes=tuple((row.get("parse_classes") or "").split()),
                )
            )
        return cls(entries)

    def extended(self, entries: Iterable[VocabularyEntry]) -> Vocabulary:
        """A copy with ``entries`` added (replacing rows for the same phrase)."""
        return Vocabulary([*self._entries.values(), *entries])

    @property
    def entries(self) -> tuple[VocabularyEntry, ...]:
        return tuple(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, phrase: str) -> VocabularyEntry | None:
        """The entry of a phrase such as ``"pony tail"`` (case-insensitive), or None."""
        return self._entries.get(tuple(phrase.lower().split()))

    def match(self, words: Sequence[str], start: int) -> tuple[VocabularyEntry | None, int]:
        """Longest entry starting at ``words[start]`` (lower-case words) and its length in words."""
        longest = min(self.max_phrase_words, len(words) - start)
        for length in range(longest, 0, -1):
            entry = self._entries.get(tuple(words[start : start + length]))
            if entry is not None:
                return entry, length
        return None, 1


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The vocabulary shipped in ``freecure/data/attribute_vocabulary.csv``."""
    data = resources.files("freecure") / "data" / "attribute_vocabulary.csv"
    return Vocabulary.from_csv(io.StringIO(data.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Attribute:
    """One facial attribute of a prompt.

    Args:
        text: the phrase as written in the prompt ("black curly hair").
        kind: ``"localized"`` (restored by noise blending) or ``"abstract"`` (by inversion).
        category: "hair", "eyes", "eyewear", "earrings", "hat", "expression", ...
        parse_classes: face-parser classes/groups covering it where it is drawn; empty for
            abstract attributes.
        words: the prompt words that make it up.
        token_indices: columns of its tokens in the tokenized foundation prompt (BOS is
            column 0); empty when no tokenizer was given.
    """

    text: str
    kind: str
    category: str
    parse_classes: tuple[str, ...]
    words: tuple[str, ...]
    token_indices: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "kind": self.kind,
            "category": self.category,
            "parse_classes": list(self.parse_classes),
            "words": list(self.words),
            "token_indices": list(self.token_indices),
        }


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into FreeCure's attributes.

    Args:
        prompt: the prompt as given.
        class_word: the subject's class word ("man").
        trigger: the personalization trigger word ("img"), or None.
        foundation_prompt: the prompt without the trigger word: what the FD process sees.
        attributes: the attributes in prompt order.
        unknown_words: content words that are not part of any attribute.
        template_prompt: the class alone ("a man"), used for the inversion of §4.2.
        expression_prompt: the template plus the abstract attributes ("a man laughing
            happily"); equal to the template when there is no abstract attribute.
        class_token_indices: columns of the class word's tokens in the foundation prompt.
    """

    prompt: str
    class_word: str
    trigger: str | None
    foundation_prompt: str
    attributes: tuple[Attribute, ...]
    unknown_words: tuple[str, ...]
    template_prompt: str
    expression_prompt: str
    class_token_indices: tuple[int, ...] = ()

    @property
    def localized(self) -> tuple[Attribute, ...]:
        return tuple(attribute for attribute in self.attributes if attribute.kind == LOCALIZED)

    @property
    def abstract(self) -> tuple[Attribute, ...]:
        return tuple(attribute for attribute in self.attributes if attribute.kind == ABSTRACT)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return {
            "prompt": self.prompt,
            "class_word": self.class_word,
            "trigger": self.trigger,
            "foundation_prompt": self.foundation_prompt,
            "template_prompt": self.template_prompt,
            "expression_prompt": self.expression_prompt,
            "class_token_indices": list(self.class_token_indices),
            "attributes": [attribute.to_dict() for attribute in self.attributes],
            "unknown_words": list(self.unknown_words),
        }


# --------------------------------------------------------------------------- words


@dataclass(frozen=True)
class _Word:
    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower()


@dataclass
class _Unit:
    """A vocabulary phrase (or one unknown word) found in the prompt: words[first:last + 1]."""

    first: int
    last: int
    entry: VocabularyEntry | None
    is_class: bool = False
    owner: int | None = None  # index of the attribute that claimed it

    @property
    def role(self) -> str | None:
        return "class" if self.is_class else (self.entry.role if self.entry else None)


def _split_words(text: str) -> list[_Word]:
    """The words of ``text`` with their character spans (punctuation is not a word)."""
    return [
        _Word(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(text)
    ]


def _gap(text: str, words: Sequence[_Word], index: int) -> str:
    """The characters between word ``index - 1`` and word ``index``."""
    return text[words[index - 1].end : words[index].start] if index > 0 else text[: words[0].start]


def _find_phrase(words: Sequence[_Word], phrase: Sequence[str]) -> list[int]:
    """Start indices where the lower-case ``phrase`` occurs as whole words."""
    lowered = [word.lower for word in words]
    n = len(phrase)
    return [i for i in range(len(words) - n + 1) if lowered[i : i + n] == list(phrase)]


# --------------------------------------------------------------------------- subject


def _validated_word(value: str, what: str) -> tuple[str, ...]:
    words = tuple(value.lower().split())
    if not words or any(not WORD_PATTERN.fullmatch(word) for word in words):
        raise InputError(f"{what} {value!r} must be one or more plain words, e.g. 'man'")
    return words


def _locate_subject(
    prompt: str, words: Sequence[_Word], class_words: tuple[str, ...], trigger: str | None
) -> tuple[int, int | None]:
    """Index of the subject's class word and of the trigger word after it (None without one).

    Raises:
        InputError: the class word is missing, or the trigger is missing or misplaced.
    """
    class_text = " ".join(class_words)
    starts = _find_phrase(words, class_words)
    if not starts:
        raise InputError(
            f"the class word {class_text!r} does not occur in the prompt {shorten(prompt)!r}; "
            f"write the subject into the prompt (e.g. 'a {class_text} with black hair') "
            "or pass the class word the prompt uses"
        )
    if trigger is None:
        return starts[0], None
    example = f"'a {class_text} {trigger} with black hair'"
    triggers = [i for i, word in enumerate(words) if word.lower == trigger.lower()]
    if not triggers:
        raise InputError(
            f"the trigger word {trigger!r} does not occur in the prompt {shorten(prompt)!r}; the "
            f"personalized model needs it right after the class word, e.g. {example}"
        )
    if len(triggers) > 1:
        raise InputError(
            f"the trigger word {trigger!r} occurs {len(triggers)} times in {shorten(prompt)!r}; "
            f"write it once, right after the class word, e.g. {example}"
        )
    position = triggers[0]
    for start in starts:
        after = start + len(class_words)
        if after == position and not _gap(prompt, words, position).strip():
            return start, position
    before = repr(words[position - 1].text) if position > 0 else "nothing"
    raise InputError(
        f"the trigger word {trigger!r} must come right after the class word {class_text!r}, "
        f"e.g. {example}; in {shorten(prompt)!r} it follows {before}"
    )


def _remove_trigger(prompt: str, words: Sequence[_Word], trigger_index: int | None) -> str:
    """The prompt without the trigger word and the space before it."""
    if trigger_index is None:
        return prompt
    return prompt[: words[trigger_index - 1].end] + prompt[words[trigger_index].end :]


# --------------------------------------------------------------------------- grammar


def _units(
    text: str,
    words: Sequence[_Word],
    vocabulary: Vocabulary,
    class_words: tuple[str, ...],
    subject: int,
) -> list[_Unit]:
    """Group the words into vocabulary phrases; phrases never span punctuation or the class."""
    lowered = [word.lower for word in words]
    class_starts = set(_find_phrase(words, class_words))
    units: list[_Unit] = []
    i = 0
    while i < len(words):
        if i in class_starts:
            # Only the subject's occurrence is the class; other occurrences are stop words.
            other = None if i == subject else VocabularyEntry(class_words, "stop", "class")
            units.append(_Unit(i, i + len(class_words) - 1, other, is_class=i == subject))
            i += len(class_words)
            continue
        # A phrase ends at punctuation or the class, and is at most the longest vocabulary
        # phrase long: looking further (to the end of a long unpunctuated run) made the parser
        # quadratic in the prompt's length.
        limit = min(len(words), i + vocabulary.max_phrase_words)
        stop = i + 1
        while stop < limit and stop not in class_starts and not _gap(text, words, stop).strip():
            stop += 1
        entry, length = vocabulary.match(lowered[i:stop], 0)
        units.append(_Unit(i, i + length - 1, entry))
        i += length
    return units


def _unit_gap(text: str, words: Sequence[_Word], units: Sequence[_Unit], k: int) -> str:
    """The characters between unit ``k - 1`` and unit ``k``."""
    return _gap(text, words, units[k].first)


def _claim_localized(text: str, words: Sequence[_Word], units: list[_Unit]) -> list[list[int]]:
    """Each head with the modifiers/intensifiers right before it; returns unit-index groups."""
    groups: list[list[int]] = []
    for k, unit in enumerate(units):
        if unit.role != "head":
            continue
        group = [k]  # built backwards (appending), then reversed: inserting in front is quadratic
        j = k - 1
        while (
            j >= 0
            and units[j].owner is None
            and units[j].role in ("modifier", "intensifier")
            and _MODIFIER_GAP.fullmatch(_unit_gap(text, words, units, j + 1))
        ):
            group.append(j)
            j -= 1
        group.reverse()
        for member in group:
            units[member].owner = len(groups)
        groups.append(group)
    return groups


def _claim_abstract(
    text: str, words: Sequence[_Word], units: list[_Unit], first_owner: int
) -> list[list[int]]:
    """Runs of expression/adverb/intensifier units holding an expression, without punctuation."""
    groups: list[list[int]] = []
    run: list[int] = []

    def close() -> None:
        if any(units[k].role == "expression" for k in run):
            for member in run:
                units[member].owner = first_owner + len(groups)
            groups.append(list(run))
        run.clear()

    for k, unit in enumerate(units):
        joinable = unit.owner is None and unit.role in ("expression", "adverb", "intensifier")
        if run and (not joinable or _unit_gap(text, words, units, k).strip()):
            close()
        if joinable:
            run.append(k)
    close()
    return groups


def _negation_before(
    text: str, words: Sequence[_Word], units: Sequence[_Unit], k: int
) -> int | None:
    """Index of a negation unit governing unit ``k`` ("without [any] glasses"), or None."""
    j = k - 1
    while j >= 0 and not _unit_gap(text, words, units, j + 1).strip():
        if units[j].role == "negation":
            return j
        if units[j].role != "stop":
            return None
        j -= 1
    return None


# --------------------------------------------------------------------------- tokens


def token_indices_for_spans(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]
) -> list[tuple[int, ...]]:
    """Columns of the tokens of ``text`` (special tokens included, BOS = 0) inside each span.

    Uses the tokenizer's offset mapping (linear in the text's length); tokenizers without one
    (slow ``transformers`` tokenizers) are handled by tokenizing the prefix of the text before
    and up to each span, which is quadratic.

    Args:
        tokenizer: anything with the Hugging Face call interface.
        text: the text as it is fed to the text encoder.
        spans: ``(start, end)`` character spans in ``text``.
    """
    try:
        offsets = tokenizer(text, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return _token_indices_by_prefix(tokenizer, text, spans)
    tokens = [
        (column, token_start, token_end)
        for column, (token_start, token_end) in enumerate(offsets)
        if token_start < token_end  # special tokens have empty spans
    ]
    if any(before[2] > after[1] for before, after in zip(tokens, tokens[1:])):
        # overlapping or unordered offsets (no tokenizer FreeCure ships): compare every pair
        return [
            tuple(column for column, token_start, token_end in tokens if token_start < end and token_end > start)
            for start, end in spans
        ]
    # Tokens in order and disjoint: those overlapping a span are one run, found by bisection
    # (one pass over every token for every span made long prompts quadratic).
    ends = [token_end for _, _, token_end in tokens]
    result = []
    for start, end in spans:
        k = bisect.bisect_right(ends, start)  # the first token ending after the span's start
        columns = []
        while k < len(tokens) and tokens[k][1] < end:
            columns.append(tokens[k][0])
            k += 1
        result.append(tuple(columns))
    return result


def _token_indices_by_prefix(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]
) -> list[tuple[int, ...]]:
    def count(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    with_special = list(tokenizer(text)["input_ids"])
    without = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    lead = next(
        (
            k
            for k in range(len(with_special) - len(without) + 1)
            if with_special[k : k + len(without)] == without
        ),
        0,
    )
    return [
        tuple(range(lead + count(text[:start].rstrip()), lead + count(text[:end])))
        for start, end in spans
    ]


def _context_limit(tokenizer: Any) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit <= 100_000 else None


def _report_cut_words(
    tokenizer: Any, prompt: str, words: Sequence[_Word], columns: Sequence[tuple[int, ...]], class_columns
) -> None:
    """Say which words fall past the text encoder's context (it sees BOS + limit − 2 tokens +
    EOS) and are cut; refuse a prompt whose class word is cut."""
    limit = _context_limit(tokenizer)
    if limit is None:
        return
    cut = [word.text for word, cols in zip(words, columns) if cols and min(cols) > limit - 2]
    if class_columns and max(class_columns) > limit - 2:
        raise InputError(
            f"the class word lies past the {limit}-token context of the text encoder in {shorten(prompt)!r}; "
            "shorten the prompt or name the subject earlier"
        )
    if cut:
        logger.warning(
            "the prompt is longer than the text encoder's %d tokens; these words are cut and have no effect: %s",
            limit,
            shorten(" ".join(cut), 120),
        )


def _check_context(tokenizer: Any, prompt: str, attributes: Sequence[Attribute]) -> None:
    """Raise when an attribute's tokens fall past the text encoder's context window."""
    limit = _context_limit(tokenizer)
    if limit is None:
        return
    for attribute in attributes:
        if attribute.token_indices and max(attribute.token_indices) > limit - 2:
            raise InputError(
                f"the attribute {shorten(attribute.text)!r} lies past the {limit}-token context of the "
                f"text encoder in {shorten(prompt)!r}; shorten the prompt or move the attribute forward"
            )


# --------------------------------------------------------------------------- prompts


def _article_for(article: str, next_word: str) -> str:
    if article in ("a", "an"):
        return "an" if next_word[:1].lower() in "aeiou" else "a"
    return article


def _subject_prompts(
    words: Sequence[_Word],
    subject: int,
    class_words: tuple[str, ...],
    abstract: Sequence[tuple[int, Attribute]],
) -> tuple[str, str]:
    """The template prompt ("a man") and the expression prompt ("a man laughing happily").

    Args:
        words: the foundation prompt's words.
        subject: index of the class word.
        class_words: the class word(s).
        abstract: (first word index, attribute) of each abstract attribute, in prompt order.
    """
    class_text = " ".join(word.text for word in words[subject : subject + len(class_words)])
    article = next((w.lower for w in reversed(words[:subject]) if w.lower in ARTICLES), "a")
    before = [attribute.text for first, attribute in abstract if first < subject]
    after = [attribute.text for first, attribute in abstract if first > subject]
    template = f"{_article_for(article, class_text)} {class_text}"
    middle = " ".join([*before, class_text])
    expression = f"{_article_for(article, middle)} {middle}"
    if after:
        expression += " " + ", ".join(after)
    return template, expression


# --------------------------------------------------------------------------- parser


def parse_prompt(
    prompt: str,
    class_word: str,
    trigger: str | None = None,
    tokenizer: Any = None,
    vocabulary: Vocabulary | None = None,
) -> ParsedPrompt:
    """Split a prompt into FreeCure's localized and abstract attributes.

    Matching is case-insensitive; see the module docstring for the grammar.

    Args:
        prompt: the user prompt, e.g. ``"a man img with black curly hair, laughing happily"``.
        class_word: the subject's class word ("man", "woman", "boy", "girl", "person", ...).
        trigger: the personalization trigger word that follows the class word (PhotoMaker's
            ``"img"``); it is removed to form the foundation prompt.
        tokenizer: a Hugging Face style tokenizer of the foundation text encoder; when given,
            token columns are filled in.
        vocabulary: the attribute vocabulary; :func:`default_vocabulary` when None.

    Raises:
        InputError: empty prompt, a prompt over :data:`MAX_PROMPT_CHARS` characters, class
            word missing, trigger missing or misplaced, or an attribute past the tokenizer's
            context length.
    """
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; give one such as 'a man with black curly hair'")
    check_prompt_length(prompt)
    class_words = _validated_word(class_word, "class word")
    if trigger is not None:
        if len(_validated_word(trigger, "trigger word")) != 1:
            raise InputError(f"trigger word {trigger!r} must be a single word such as 'img'")
        if (trigger.lower(),) == class_words:
            raise InputError(f"the trigger word {trigger!r} cannot be the class word")
    vocabulary = vocabulary or default_vocabulary()

    words = _split_words(prompt)
    subject, trigger_index = _locate_subject(prompt, words, class_words, trigger)
    foundation = _remove_trigger(prompt, words, trigger_index)
    words = _split_words(foundation)

    attributes, unknown = _read_attributes(foundation, words, vocabulary, class_words, subject)
    class_columns: tuple[int, ...] = ()
    if tokenizer is not None:
        class_span = (subject, subject + len(class_words) - 1)
        class_columns, attributes = _fill_token_indices(
            tokenizer, foundation, words, class_span, attributes
        )

    template, expression = _subject_prompts(
        words, subject, class_words, [(f, a) for f, a in attributes if a.kind == ABSTRACT]
    )
    return ParsedPrompt(
        prompt=prompt,
        class_word=class_word,
        trigger=trigger,
        foundation_prompt=foundation,
        attributes=tuple(attribute for _, attribute in attributes),
        unknown_words=unknown,
        template_prompt=template,
        expression_prompt=expression,
        class_token_indices=class_columns,
    )


def _read_attributes(
    text: str,
    words: Sequence[_Word],
    vocabulary: Vocabulary,
    class_words: tuple[str, ...],
    subject: int,
) -> tuple[list[tuple[int, Attribute]], tuple[str, ...]]:
    """The attributes of ``text`` with their first word index, and the unknown words.

    Localized attributes are claimed first, so a degree word before a head ("very long
    hair") belongs to the head; negated attributes are moved to the unknown words.
    """
    units = _units(text, words, vocabulary, class_words, subject)
    groups = _claim_localized(text, words, units)
    groups += _claim_abstract(text, words, units, first_owner=len(groups))
    groups.sort(key=lambda group: group[0])

    attributes: list[tuple[int, Attribute]] = []
    negated: set[int] = set()
    for group in groups:
        attribute = _attribute(text, words, units, group)
        negation = _negation_before(text, words, units, group[0])
        if negation is not None:
            negated.update([negation, *group])
            logger.warning(
                "%r is negated in %r: it is not restored and is listed as unknown",
                attribute.text,
                text,
            )
            continue
        attributes.append((units[group[0]].first, attribute))
    return attributes, _unknown_words(words, units, negated)


def _attribute(
    text: str, words: Sequence[_Word], units: Sequence[_Unit], group: list[int]
) -> Attribute:
    first, last = units[group[0]].first, units[group[-1]].last
    members = [units[k] for k in group]
    head = next((unit for unit in members if unit.role == "head"), None)
    core = head or next(unit for unit in members if unit.role == "expression")
    assert core.entry is not None
    return Attribute(
        text=text[words[first].start : words[last].end],
        kind=LOCALIZED if head is not None else ABSTRACT,
        category=core.entry.category,
        parse_classes=core.entry.parse_classes,
        words=tuple(word.text for word in words[first : last + 1]),
    )


def _fill_token_indices(
    tokenizer: Any,
    text: str,
    words: Sequence[_Word],
    class_span: tuple[int, int],
    attributes: list[tuple[int, Attribute]],
) -> tuple[tuple[int, ...], list[tuple[int, Attribute]]]:
    """Token columns of the class word and of each attribute (its words' tokens only, so a
    comma between modifiers is left out), from one tokenization of ``text``.

    Args:
        class_span: first and last word index of the class word.
        attributes: (first word index, attribute) pairs.

    Returns:
        The class word's columns and the attributes with ``token_indices`` filled in.
    """
    word_ranges = [class_span] + [(first, first + len(a.words) - 1) for first, a in attributes]
    spans = [(word.start, word.end) for word in words]
    columns = token_indices_for_spans(tokenizer, text, spans)

    def columns_of(first: int, last: int) -> tuple[int, ...]:
        return tuple(sorted({c for k in range(first, last + 1) for c in columns[k]}))

    class_columns = columns_of(*word_ranges[0])
    _report_cut_words(tokenizer, text, words, columns, class_columns)
    filled = [
        (first, replace(attribute, token_indices=columns_of(*word_range)))
        for (first, attribute), word_range in zip(attributes, word_ranges[1:])
    ]
    _check_context(tokenizer, text, [attribute for _, attribute in filled])
    return class_columns, filled


def _unknown_words(
    words: Sequence[_Word], units: Sequence[_Unit], negated: set[int]
) -> tuple[str, ...]:
    """Words of units that are neither stop words, the class, nor part of an attribute."""
    unknown = []
    for k, unit in enumerate(units):
        claimed = unit.owner is not None and k not in negated
        if unit.is_class or unit.role == "stop" or claimed:
            continue
        unknown.extend(word.text for word in words[unit.first : unit.last + 1])
    return tuple(unknown)


#: Class words :func:`detect_class_word` looks for, in this order.
COMMON_CLASS_WORDS = ("man", "woman", "boy", "girl", "person", "child", "lady", "gentleman")


def detect_class_word(prompt: str, candidates: Sequence[str] = COMMON_CLASS_WORDS) -> str:
    """The first of ``candidates`` that appears in ``prompt`` as a whole word.

    Raises:
        InputError: none appears (the message asks for an explicit class word), or the prompt
            is longer than :data:`MAX_PROMPT_CHARS`.
    """
    check_prompt_length(prompt)
    words = {word.lower() for word in re.findall(r"[A-Za-z]+", prompt)}
    for candidate in candidates:
        if candidate in words:
            return candidate
    raise InputError(
        f"no class word ({', '.join(candidates)}) found in the prompt {shorten(prompt)!r}; "
        "name the subject's class word explicitly (--class-word WORD)"
    )
