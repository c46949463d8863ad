"""Which prompt tokens the analyses look at, and where each sits in FD's and PD's sequences.

FD sees the foundation prompt; PD sees the same prompt with the identity written into the
class word's token(s) (S → S* in the paper's Figure 2). Most backends keep the positions
(token fusion, FastComposer, Face-diffuser); PhotoMaker repeats the class word's last token
once per ID embedding, so every later token moves by that many columns minus one. Backends
that inject identity elsewhere (image adapters) have no identity column at all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenAlignment:
    """The prompt's word tokens in FD's and PD's sequences.

    Attributes:
        labels: one label per word token of the foundation prompt (BOS, EOS and padding left
            out); the tokens of the attended text stream (CLIP for UNets, T5 for FLUX).
        fd_columns: each label's column in FD's sequence.
        pd_columns: each label's columns in PD's sequence (the identity may span several).
        identity_fd: FD's columns of the class word tokens that carry the identity in PD
            (n of eq. 3); empty when the identity is not a prompt token.
        identity_pd: PD's identity columns (m of eq. 3); empty likewise.
    """

    labels: tuple[str, ...]
    fd_columns: tuple[int, ...]
    pd_columns: tuple[tuple[int, ...], ...]
    identity_fd: tuple[int, ...]
    identity_pd: tuple[int, ...]

    @property
    def identity_in_prompt(self) -> bool:
        return bool(self.identity_pd)

    @property
    def identity_pairs(self) -> tuple[tuple[int, int], ...]:
        """(m, n) of eq. 3: each PD identity column with the FD column it corresponds to."""
        return tuple((m, n) for n in self.identity_fd for m in self.pd_columns[self.fd_columns.index(n)])


def adapter_mechanism(backend) -> str:
    """A short description of where a backend without an identity token puts the identity."""
    return getattr(backend, "identity_mechanism", "") or "its own adapter"


def identity_in_prompt(backend) -> bool:
    """Whether the backend writes the identity into prompt tokens (``Backend.prompt_identity``)."""
    return getattr(backend, "prompt_identity", None) is not None


def word_columns(tokenizer, ids: list[int]) -> list[int]:
    """The columns of ``ids`` that are words: without a leading BOS (CLIP) and the closing EOS
    (CLIP and T5; T5 has no BOS)."""
    start = 1 if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
    stop = len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)
    return list(range(start, stop))


def token_label(token: str) -> str:
    """A token as a label: CLIP's word-end mark "</w>" and SentencePiece's word-start "▁" dropped."""
    return token.replace("</w>", "").lstrip("\u2581") or token


def align_tokens(backend, parsed, n_references: int = 1) -> TokenAlignment:
    """The :class:`TokenAlignment` of ``parsed`` (a prompt parsed with the backend's tokenizer)."""
    tokenizer = backend.tokenizer
    ids = tokenizer(parsed.foundation_prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    words = word_columns(tokenizer, ids)
    labels = tuple(token_label(tokenizer.convert_ids_to_tokens(ids[c])) for c in words)
    if not identity_in_prompt(backend) or not parsed.class_token_indices:
        return TokenAlignment(labels, tuple(words), tuple((c,) for c in words), (), ())
    which = backend.prompt_identity
    identity_fd = tuple(parsed.class_token_indices) if which == "all" else (parsed.class_token_indices[-1],)
    copies = 1
    encoder = getattr(backend, "id_encoder", None)
    if encoder is not None and hasattr(encoder, "tokens_per_image"):
        copies = int(encoder.tokens_per_image) * max(1, n_references)  # PhotoMaker's stacked ID tokens
    last = identity_fd[-1]
    shift = copies - 1

    def pd_of(column: int) -> tuple[int, ...]:
        if column == last:
            return tuple(range(last, last + copies))
        return (column + shift,) if column > last else (column,)

    identity_pd = tuple(c for column in identity_fd for c in pd_of(column))
    return TokenAlignment(labels, tuple(words), tuple(pd_of(c) for c in words), identity_fd, identity_pd)
