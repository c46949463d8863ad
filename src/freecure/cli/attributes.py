"""`freecure attributes`: show the facial attributes FreeCure finds in a prompt."""

from __future__ import annotations

import argparse

from ..core.atomic import json_text
from ..core.attributes import ParsedPrompt, parse_prompt
from ..core.terminal import printable

_COLUMNS = ("attribute", "kind", "category", "parse classes", "tokens")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attributes`` sub-command."""
    parser = subparsers.add_parser(
        "attributes",
        help="list the localized and abstract attributes of a prompt",
        description=(
            "Split a prompt into FreeCure's localized attributes (restored by noise blending "
            "in face-parser masks) and abstract ones (restored by inversion), with the token "
            "columns of each in the foundation prompt."
        ),
    )
    parser.add_argument("prompt", help='the prompt, e.g. "a man img with black curly hair"')
    parser.add_argument(
        "--class-word", required=True, help="the subject's class word: man, woman, boy, ..."
    )
    parser.add_argument("--trigger", help="personalization trigger word after the class word")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a Hugging Face tokenizer folder (default: CLIP's BPE shipped with open-clip-torch)",
    )
    parser.add_argument(
        "--no-tokens", action="store_true", help="skip the tokenizer and the token columns"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse the prompt and print the result."""
    tokenizer = None
    if not args.no_tokens:
        from ..core.tokenization import load_clip_tokenizer

        tokenizer = load_clip_tokenizer(args.tokenizer)
    parsed = parse_prompt(args.prompt, args.class_word, trigger=args.trigger, tokenizer=tokenizer)
    if args.json:
        print(json_text(parsed.to_dict()), end="")
    else:
        print(format_table(parsed))
    return 0


def format_table(parsed: ParsedPrompt) -> str:
    """A plain-text report: one row per attribute, then the derived prompts. The prompt's text
    is shown through :func:`freecure.terminal.printable`: control characters (an escape
    sequence, a carriage return, a newline) appear escaped, never raw."""
    rows = [
        (
            printable(attribute.text),
            attribute.kind,
            attribute.category,
            " ".join(attribute.parse_classes) or "-",
            " ".join(map(str, attribute.token_indices)) or "-",
        )
        for attribute in parsed.attributes
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [_COLUMNS, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not rows:
        lines.append("(no attributes found)")
    class_tokens = " ".join(map(str, parsed.class_token_indices)) or "-"
    lines += [
        "",
        f"foundation prompt:  {printable(parsed.foundation_prompt)}",
        f"template prompt:    {printable(parsed.template_prompt)}",
        f"expression prompt:  {printable(parsed.expression_prompt)}",
        f"class tokens:       {class_tokens}",
        f"unknown words:      {printable(', '.join(parsed.unknown_words)) or '-'}",
    ]
    return "\n".join(lines)
