"""What ComfyUI's tokenizers make of a word: its token ids and its positions in a caption.

``clip.tokenize(text)`` returns, per text encoder ("l", "g", …), chunks of
``(token, weight)`` pairs, each chunk framed by start and end tokens and padded; the
frame of a tokenizer is read from how it tokenizes the empty string.
"""

from __future__ import annotations

import torch

from ..training.attention import find_subsequence


def first_chunk(tokens: dict, key: str) -> list:
    """The tokens (ids, or embedding tensors/dicts) of the first chunk of tokenizer ``key``."""
    return [t[0] for t in tokens[key][0]]


def is_token_id(value) -> bool:
    """False for the embedding vectors ComfyUI puts in a token list (``embedding:name``)."""
    return not torch.is_tensor(value) and not isinstance(value, dict)


def _frame(blank: list) -> tuple[int | None, int | None]:
    """(start token, end token) of a tokenizer, from its tokens of the empty string."""
    if len(blank) > 1:
        return int(blank[0]), int(blank[1])
    return None, (int(blank[0]) if blank else None)


def end_token(clip, key: str) -> int:
    """The end-of-text token of tokenizer ``key``."""
    return _frame(first_chunk(clip.tokenize(""), key))[1]


def word_ids(clip, word: str) -> dict[str, list[int]]:
    """Token ids of ``word`` per tokenizer, without start, end and padding tokens."""
    tokens = clip.tokenize(word)
    empty = clip.tokenize("")
    out = {}
    for key in tokens:
        piece = [int(t) for t in first_chunk(tokens, key)]
        start_token, end = _frame(first_chunk(empty, key))
        start = 1 if piece and start_token is not None and piece[0] == start_token else 0
        stop = next((i for i in range(start, len(piece)) if piece[i] == end), len(piece))
        out[key] = piece[start:stop]
    return out


def token_positions(clip, caption: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``caption`` as the UNet's context sees them
    (77 per chunk, start/end tokens included), every occurrence."""
    tokens = clip.tokenize(caption)
    key = "l" if "l" in tokens else sorted(tokens)[0]  # SDXL's two CLIP tokenizers split alike
    flat = [int(t[0]) for chunk in tokens[key] for t in chunk]
    positions = find_subsequence(flat, word_ids(clip, word)[key])
    if not positions:
        raise ValueError(f"the caption '{caption}' does not contain the word '{word}'; add it to the caption")
    return positions
