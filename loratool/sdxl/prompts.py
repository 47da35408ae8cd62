"""Prompt weighting for SDXL: `(word:1.3)` (A1111, ComfyUI) and `(word)1.3` (compel) on both text encoders,
pooled embedding included. Used by `sample` and by the wrong-LoRA generator.

Token embeddings are compel's: a token weighted w > 1 moves away from the empty prompt's embedding,
z_empty + w·(z − z_empty); a fragment weighted w < 1 is blended toward the prompt without it. The pooled
embedding is one vector for the whole prompt, so the weights reach it at the level of fragments: it moves along
each weighted fragment's contribution, pooled + (w − 1)·(pooled − pooled without the fragment), so w = 0 drops
the fragment and w = 1 leaves the pooled as it was. (compel itself encodes the pooled embedding from the raw
text, brackets and numbers included; here it sees the words only.)

A text with no weight in it is left to the pipeline's own `encode_prompt`, so it renders exactly as before.
Bare brackets `(word)` carry no weight (compel's reading, not A1111's implicit 1.1): they stay literal text.
"""

from __future__ import annotations

import re

from loratool.errors import InputError

_A1111_WEIGHT = re.compile(r":\s*(\d+(?:\.\d*)?|\.\d+)\s*$")  # the `:1.3` that ends an A1111 group


def to_compel(text: str) -> str:
    """A1111 `(words:1.3)` → compel `(words)1.3`, nested groups too; anything else is left as it is."""
    out: list[str] = []
    opened: list[int] = []  # positions in `out` of the `(` not closed yet
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):  # an escaped bracket stays literal
            out.append(text[i : i + 2])
            i += 2
            continue
        if char == "(":
            opened.append(len(out))
        elif char == ")" and opened:
            start = opened.pop()
            inner = "".join(out[start + 1 :])
            match = _A1111_WEIGHT.search(inner)
            if match:
                out[start:] = [f"({inner[: match.start()]}){match.group(1)}"]
                i += 1
                continue
        out.append(char)
        i += 1
    return "".join(out)


def fragments(text: str) -> list[tuple[str, float]]:
    """The text's (fragment, weight) pairs as compel parses it; one pair of weight 1 when nothing is weighted."""
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt

    try:
        conjunction = Compel.parse_prompt_string(to_compel(text))
    except Exception as exc:  # pyparsing's errors share no base class worth naming
        raise InputError(f"cannot read the weights in prompt {text!r}: {exc}.") from None
    if len(conjunction.prompts) != 1 or not isinstance(conjunction.prompts[0], FlattenedPrompt):
        raise InputError(f"prompt {text!r}: .and() and .blend() are not supported; use (word:1.3) weights.")
    return [(f.text, float(f.weight)) for f in conjunction.prompts[0].children]


def is_weighted(text: str | None) -> bool:
    if not text or not any(c in text for c in "()+-"):  # compel's syntax needs one of these
        return False
    return any(w != 1.0 for _, w in fragments(text))


def encode(pipe, prompt: str, prompt_2: str | None = None, negative: str = "", negative_2: str | None = None,
           cfg: bool = True) -> dict:  # fmt: skip
    """encode_prompt's four tensors (negatives None without CFG), with any weighted text encoded with its weights.

    Texts go to the encoders as diffusers sends them: prompt → text_encoder, prompt_2 (or prompt) →
    text_encoder_2; a refiner, which has only text_encoder_2, gets `prompt`."""
    import torch

    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            negative_prompt=negative,
            negative_prompt_2=negative_2,
            device=pipe._execution_device,
            do_classifier_free_guidance=cfg,
        )
        pe, pooled = _weigh(pipe, [prompt, prompt_2 or prompt], pe, pooled)
        if cfg:
            npe, npooled = _weigh(pipe, [negative, negative_2 or negative], npe, npooled)
    return dict(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=npooled,
    )


def _weigh(pipe, texts: list[str], embeds, pooled):
    """Replace each encoder's slice of `embeds` whose text is weighted, and the pooled one if its text is."""
    import torch

    encoders = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))]
    encoders = [(t, e) for t, e in encoders if e is not None]
    texts = texts[: len(encoders)]
    if not any(is_weighted(t) for t in texts):
        return embeds, pooled
    parts, start = [], 0
    for text, (tokenizer, encoder) in zip(texts, encoders, strict=True):
        width = encoder.config.hidden_size
        part = embeds[..., start : start + width]
        if is_weighted(text):
            part = token_embeddings(tokenizer, encoder, text).to(part)
        parts.append(part)
        start += width
    if is_weighted(texts[-1]):
        pooled = pooled_embedding(*encoders[-1], texts[-1]).to(pooled)
    return torch.cat(parts, dim=-1), pooled


def token_embeddings(tokenizer, encoder, text: str):
    """compel's weighted penultimate hidden states (1, 77, width): what SDXL's UNet reads from this encoder."""
    from compel import Compel, ReturnedEmbeddingsType

    compel = Compel(
        tokenizer=tokenizer,
        text_encoder=encoder,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        truncate_long_prompts=True,
    )
    return compel(to_compel(text))


def pooled_embedding(tokenizer, encoder, text: str):
    """text_encoder_2's pooled (projected) embedding of the words, moved by each fragment's weight."""
    parts = fragments(text)
    words = [f for f, _ in parts]
    pooled = _pooled(tokenizer, encoder, _join(words))
    shift = 0
    for i, (_, weight) in enumerate(parts):
        if weight != 1.0:
            without = _pooled(tokenizer, encoder, _join(words[:i] + words[i + 1 :]))
            shift = shift + (weight - 1.0) * (pooled - without)
    return pooled + shift


def _join(words: list[str]) -> str:
    return " ".join(w.strip() for w in words if w.strip())


def _pooled(tokenizer, encoder, text: str):
    import torch

    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    with torch.no_grad():
        return encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=True)[0]
