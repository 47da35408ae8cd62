"""Prompt weighting (issue 16): A1111 and compel syntax, compel's token embeddings on both encoders, the pooled
embedding moved by the weights, and unweighted prompts untouched."""

import pytest
import torch

from loratool.errors import InputError
from loratool.sdxl import prompts


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a (red:1.3) circle", "a (red)1.3 circle"),
        ("a (red circle: 0.5)", "a (red circle)0.5"),
        ("((red:1.2) circle:1.1)", "((red)1.2 circle)1.1"),
        ("a (red)1.3 circle", "a (red)1.3 circle"),
        (r"a \(red:1.3\) circle", r"a \(red:1.3\) circle"),
        ("a (red circle", "a (red circle"),
        ("time: 12:30 (noon)", "time: 12:30 (noon)"),
    ],
)
def test_a1111_weights_become_compel_weights(text, expected):
    assert prompts.to_compel(text) == expected


def test_both_syntaxes_give_the_same_fragments():
    expected = [("a", 1.0), ("red", 1.3), ("circle", 1.0)]
    assert prompts.fragments("a (red:1.3) circle") == prompts.fragments("a (red)1.3 circle") == expected
    assert not prompts.is_weighted("a t-shirt, (literal brackets), f/1.8")
    assert prompts.is_weighted("a red+ circle") and prompts.is_weighted("a (red:0.5) circle")
    with pytest.raises(InputError, match="blend"):
        prompts.fragments('("red", "blue").blend(0.5, 0.5)')


def test_an_unweighted_prompt_is_encoded_exactly_as_the_pipeline_does(pipe):
    ours = prompts.encode(pipe, "a red circle", "blue", "green", None)
    pe, npe, pooled, npooled = pipe.encode_prompt(
        "a red circle", prompt_2="blue", negative_prompt="green", device="cpu", do_classifier_free_guidance=True
    )
    for a, b in zip([pe, npe, pooled, npooled], ours.values(), strict=True):
        assert torch.equal(a, b)


def test_a_weighted_word_changes_the_embedding_as_compel_does(pipe):
    from compel import Compel, ReturnedEmbeddingsType

    ours = prompts.encode(pipe, "a (red:1.5) circle", cfg=False)
    plain = prompts.encode(pipe, "a red circle", cfg=False)
    width = pipe.text_encoder.config.hidden_size
    for i, (tok, enc) in enumerate([(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]):
        compel = Compel(
            tok, enc, returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        )
        part = slice(0, width) if i == 0 else slice(width, None)
        assert torch.allclose(ours["prompt_embeds"][..., part], compel("a (red)1.5 circle"), atol=1e-6)
    assert ours["negative_prompt_embeds"] is None
    changed = (ours["prompt_embeds"] - plain["prompt_embeds"]).abs().amax(dim=-1)[0]
    assert changed.amax() > 1e-3 and changed[0] == 0  # the start token is not weighted
    # the pooled embedding moves along "red"'s contribution by (1.5 - 1)
    without = prompts.encode(pipe, "a circle", cfg=False)["pooled_prompt_embeds"]
    step = plain["pooled_prompt_embeds"] - without
    assert torch.allclose(ours["pooled_prompt_embeds"], plain["pooled_prompt_embeds"] + 0.5 * step, atol=1e-5)
    dropped = prompts.encode(pipe, "a (red:0) circle", cfg=False)["pooled_prompt_embeds"]
    assert torch.allclose(dropped, without, atol=1e-5)


def test_prompt_2_keeps_its_own_encoder(pipe):
    """Weights in --prompt-2 reach only text_encoder_2 (and the pooled); --prompt's encoder is untouched."""
    width = pipe.text_encoder.config.hidden_size
    plain = prompts.encode(pipe, "a circle", "red", cfg=False)
    weighted = prompts.encode(pipe, "a circle", "(red:1.4)", cfg=False)
    assert torch.equal(weighted["prompt_embeds"][..., :width], plain["prompt_embeds"][..., :width])
    assert not torch.equal(weighted["prompt_embeds"][..., width:], plain["prompt_embeds"][..., width:])
    assert not torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])
    negative = prompts.encode(pipe, "a circle", negative="(blue:1.4)")
    assert torch.equal(negative["prompt_embeds"], prompts.encode(pipe, "a circle", negative="blue")["prompt_embeds"])


def test_sample_renders_a_weighted_prompt_differently(cli, tiny_models, tmp_path):
    import numpy as np
    from PIL import Image

    def png(name, *prompt):
        args = ["sample", "--steps", "2", "--refiner", "none", "--model", tiny_models / "base", "-o", tmp_path / name]
        code, _, err = cli(*args, *prompt)
        assert code == 0, err
        return np.asarray(Image.open(tmp_path / name / "seed0.png"), dtype=np.int16)

    plain = png("plain", "--prompt", "a red circle", "--prompt-2", "blue")
    weighted = png("weighted", "--prompt", "a (red:1.6) circle", "--prompt-2", "(blue)0.5")
    assert np.abs(weighted - plain).mean() > 0.1
