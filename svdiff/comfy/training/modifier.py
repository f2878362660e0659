"""Custom Diffusion's modifier token V*: a caption word trained as a new token embedding."""

from __future__ import annotations

import torch

from ..tokens import word_ids

PLACEHOLDERS = ("sks", "bnp", "pll", "olis")
"""Rare single-token words that mark the modifier's place while a caption is tokenized."""


class ModifierToken:
    """Custom Diffusion's modifier token V*: a placeholder word of the captions trained
    as a new token embedding, one vector per CLIP text encoder (SDXL: clip_l and clip_g).

    The vector starts from the initializer's row of the token table: a token id (the
    reference code uses 42170, the word piece "ktn") or a word that is a single token.
    Captions are tokenized with the placeholder replaced by a rare single-token word
    they do not contain; the vector then takes that token's place in the token list,
    which ComfyUI's text encoders accept as an embedding, exactly as they accept
    ``embedding:name`` — so the vectors saved as an embedding file give the same text
    features at inference.
    """

    def __init__(self, clip, word: str, initializer: str, captions: list[str] | None):
        if clip is None:
            raise ValueError("modifier_token needs the CLIP; connect it, or clear modifier_token")
        self.word, self.initializer = word, initializer.strip()
        probe = clip.tokenize("a")
        self.vectors: dict[str, torch.nn.Parameter] = {}
        if self.initializer.isascii() and self.initializer.isdigit():
            init_ids = {key: int(self.initializer) for key in probe}
        else:
            init_ids = {}
            for key, found in word_ids(clip, self.initializer).items():
                if len(found) != 1:
                    raise ValueError(
                        f"initializer_token '{self.initializer}' is {len(found)} tokens for the '{key}' text encoder; "
                        "choose a word that is a single rare token (e.g. 'sks'), or a token id such as 42170"
                    )
                init_ids[key] = found[0]
        for key, token_id in init_ids.items():
            module = getattr(clip.cond_stage_model, f"clip_{key}", None)
            embeddings = getattr(getattr(module, "transformer", None), "get_input_embeddings", None)
            if embeddings is None:
                raise ValueError(
                    f"the '{key}' text encoder has no token-embedding table this node can extend; "
                    "modifier tokens work with the CLIP text encoders of SD1.x, SD2.x and SDXL — clear modifier_token"
                )
            table = embeddings().weight
            if not 0 <= token_id < table.shape[0]:
                raise ValueError(f"initializer_token {token_id} is not a token id of the '{key}' text encoder (0 … {table.shape[0] - 1})")
            self.vectors[key] = torch.nn.Parameter(table[token_id].detach().float().clone())
        self.placeholders = []
        for candidate in PLACEHOLDERS:
            ids = word_ids(clip, candidate)
            if all(len(found) == 1 for found in ids.values()):
                self.placeholders.append((candidate, {key: found[0] for key, found in ids.items()}))
        captions = captions or []
        if not any(word in caption for caption in captions):
            raise ValueError(
                f"no training caption contains the modifier token '{word}'; write it into the captions "
                f"(e.g. 'photo of a {word} cat') or clear modifier_token"
            )
        for caption in captions:
            self.tokens(clip, caption)  # refuses captions where the token does not stand alone

    def to(self, device) -> None:
        for vector in self.vectors.values():
            vector.data = vector.data.to(device)

    def tokens(self, clip, caption: str) -> dict:
        """``clip.tokenize(caption)`` with the trainable vectors in the placeholder's place."""
        count = caption.count(self.word)
        if count == 0:
            return clip.tokenize(caption)
        words = caption.lower().split()
        placeholder, ids = next(((w, ids) for w, ids in self.placeholders if w not in words), (None, None))
        if placeholder is None:
            raise ValueError(f"the caption '{caption}' uses every placeholder word SVDiff could mark the modifier token with; reword it")
        tokens = clip.tokenize(caption.replace(self.word, f" {placeholder} "))
        out = {}
        for key, chunks in tokens.items():
            token_id = ids.get(key)
            found = sum(1 for chunk in chunks for t in chunk if not torch.is_tensor(t[0]) and t[0] == token_id)
            if token_id is None or found != count:
                raise ValueError(f"in the caption '{caption}' the modifier token '{self.word}' must stand alone as a word")
            vector = self.vectors[key]
            out[key] = [[(vector, *t[1:]) if (not torch.is_tensor(t[0]) and t[0] == token_id) else t for t in chunk] for chunk in chunks]
        return out

    def embedding(self) -> dict[str, torch.Tensor]:
        """The vectors as a ComfyUI embedding file's tensors (``clip_l``, ``clip_g``, … of shape (1, d))."""
        return {f"clip_{key}": vector.detach().float().cpu()[None].clone() for key, vector in self.vectors.items()}
