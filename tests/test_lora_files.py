import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from loratool.lora import keys as K
from loratool.lora.apply import add_adapter, layer_shapes, network_from_peft
from loratool.lora.io import check_fits, keymap_for, read_lora, write_lora
from loratool.lora.network import LoraModule, LoraNetwork
from loratool.lora.targets import text_targets, unet_targets


@pytest.fixture(scope="module")
def base(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")


def random_network(pipe, seed=0, conv=True, te=True):
    """Random LoRA over kohya's targets (+ convs, + text encoders) with varied ranks and alphas."""
    g = torch.Generator().manual_seed(seed)
    network = LoraNetwork()
    parts = [("unet", pipe.unet, unet_targets(pipe.unet, conv=conv))]
    if te:
        parts += [("te1", pipe.text_encoder, text_targets(pipe.text_encoder))]
        parts += [("te2", pipe.text_encoder_2, text_targets(pipe.text_encoder_2))]
    for component, model, paths in parts:
        shapes = layer_shapes(model, component)
        for i, path in enumerate(paths):
            shape = shapes[(component, path)]
            rank = 2 + (i % 3)
            down_shape = (rank, *shape[1:])
            up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            down = torch.randn(down_shape, generator=g) * 0.1
            up = torch.randn(up_shape, generator=g) * 0.1
            network.add(LoraModule(component, path, down, up, alpha=float(rank) / (1 + i % 2)))
    return network


def assert_same(a: LoraNetwork, b: LoraNetwork):
    assert a.modules.keys() == b.modules.keys()
    for key, m in a.modules.items():
        n = b.modules[key]
        assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up), key
        assert m.alpha == n.alpha, key


def scale_one(network: LoraNetwork) -> LoraNetwork:
    return LoraNetwork({k: m.with_alpha(m.rank) for k, m in network.modules.items()})


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip_is_bitwise(base, tmp_path, fmt):
    """kohya keeps factors and alphas; diffusers files carry the scale in `up` (alpha = rank), bitwise both ways."""
    keymap = keymap_for(base.unet)
    network = random_network(base)
    write_lora(network, tmp_path / "x.safetensors", keymap=keymap, fmt=fmt)
    back = read_lora(tmp_path / "x.safetensors", keymap)
    assert back.source_format == fmt
    assert_same(network if fmt == "kohya" else scale_one(network), back)
    # and across formats: kohya → memory → diffusers → memory
    write_lora(back, tmp_path / "y.safetensors", keymap=keymap, fmt="diffusers" if fmt == "kohya" else "kohya")
    assert_same(scale_one(network), scale_one(read_lora(tmp_path / "y.safetensors", keymap)))


def test_kohya_names_use_sgm_paths(base, tmp_path):
    keymap = keymap_for(base.unet)
    write_lora(random_network(base, te=True), tmp_path / "x.safetensors", keymap=keymap)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_unet_middle_block_1_proj_in.alpha" in names
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_up.weight" in names  # LoCon conv naming
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in names
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["loratool_version"]


def _peft_trained(pipe, seed=1):
    """A LoRA 'trained' in memory: peft adapter on the UNet with non-zero random factors."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=2, target_modules=unet_targets(pipe.unet), init_lora_weights="gaussian"),
        adapter_name="copy",
    )
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return network_from_peft(pipe.unet, "unet", "copy")


def _render(pipe):
    return pipe("", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_our_files_and_reproduces_images(tiny_models, tmp_path, fmt, caplog):
    from diffusers import StableDiffusionXLPipeline

    trained = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    trained.set_progress_bar_config(disable=True)
    network = _peft_trained(trained)
    reference = _render(trained)
    write_lora(network, tmp_path / "l.safetensors", keymap=keymap_for(trained.unet), fmt=fmt)

    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    fresh.set_progress_bar_config(disable=True)
    plain = _render(fresh)
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="loaded")
    # "No LoRA keys associated to CLIPTextModel" is diffusers' note that the file has no text-encoder part.
    messages = [
        r.getMessage().lower() for r in caplog.records if "no lora keys associated" not in r.getMessage().lower()
    ]
    problems = [m for m in messages if "unexpected" in m or "missing" in m]
    assert not problems, caplog.text
    loaded = _render(fresh)
    assert (loaded - reference).abs().max() <= 1e-5
    assert (plain - reference).abs().max() > 1e-3  # the LoRA really does something


def test_add_adapter_reproduces_peft_images(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    trained = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    trained.set_progress_bar_config(disable=True)
    network = _peft_trained(trained)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    fresh.set_progress_bar_config(disable=True)
    add_adapter(fresh.unet, network, "unet", "mine")
    assert (_render(fresh) - _render(trained)).abs().max() <= 1e-6


def test_reads_diffusers_convert_state_dict_to_kohya(base, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    keymap = keymap_for(base.unet)
    network = random_network(base, conv=False, te=False)
    peft_sd = {K.diffusers_key("unet", m.path, "lora_A"): m.down for m in network}
    peft_sd |= {K.diffusers_key("unet", m.path, "lora_B"): m.up for m in network}
    kohya_sd = convert_state_dict_to_kohya(peft_sd)
    assert any(k.startswith("lora_unet_down_blocks_") for k in kohya_sd)  # diffusers-style paths
    save_file({k: v.contiguous() for k, v in kohya_sd.items()}, tmp_path / "c.safetensors")
    back = read_lora(tmp_path / "c.safetensors", keymap)
    for m in network:
        n = back.modules[m.key]
        assert torch.equal(n.down, m.down) and torch.equal(n.up, m.up)


def test_real_sdxl_config_gives_722_kohya_modules():
    from loratool.sdxl.reference import BASE_UNET, meta_unet

    unet = meta_unet(BASE_UNET)
    targets = unet_targets(unet)
    assert len(targets) == 722
    keymap = keymap_for(unet)
    lookup = keymap.kohya_lookup()
    names = {keymap.kohya_name("unet", t) for t in targets}
    assert len(names) == 722
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2" in names
    modules = dict(unet.named_modules())
    assert all(keymap.resolve_kohya(n, lookup)[1] in modules for n in names)


def test_shipped_sdxl_index_matches_a_fresh_build():
    from loratool.sdxl.index import build_base_index
    from loratool.sdxl.reference import load_base_index

    fresh = build_base_index()
    shipped = load_base_index()
    assert {(c, p): tuple(s) for c, layers in fresh.items() for p, s in layers.items()} == shipped
    assert sum(1 for c, p in shipped if c == "te2") == 32 * 6 + 1  # bigG: 32 layers × 6 linears + projection


def test_sgm_mapping_round_trips_every_unet_module(base):
    paths = K.UnetPaths.from_config(base.unet.config)
    names = [n for n, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert all(paths.to_diffusers(paths.to_sgm(n)) == n for n in names)


def test_missing_alpha_means_scale_one(base, tmp_path):
    keymap = keymap_for(base.unet)
    network = random_network(base, conv=False, te=False)
    write_lora(network, tmp_path / "x.safetensors", keymap=keymap)
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(tmp_path / "x.safetensors").items() if not k.endswith(".alpha")}
    save_file(sd, tmp_path / "noalpha.safetensors")
    back = read_lora(tmp_path / "noalpha.safetensors", keymap)
    assert all(m.scale == 1.0 for m in back)


def test_check_fits_names_module_and_shapes(base):
    network = random_network(base, conv=False, te=False)
    m = next(iter(network))
    m.up = torch.zeros(m.up.shape[0] + 1, m.rank)
    with pytest.raises(Exception, match=r"is \d+×\d+ but the model's layer is"):
        check_fits(network, layer_shapes(base.unet, "unet"), "x.safetensors")


# ---- inspect CLI and bad inputs -------------------------------------------------------------------------


def _write(base, tmp_path, name="ok.safetensors", **kw):
    write_lora(random_network(base, **kw), tmp_path / name, keymap=keymap_for(base.unet))
    return tmp_path / name


def test_inspect_reports_and_matches_model(cli, base, tiny_models, tmp_path):
    path = _write(base, tmp_path)
    code, out, err = cli("inspect", path, "--model", tiny_models / "base", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "kohya" and report["ranks"] == [2, 3, 4] and report["conv"] is True
    assert set(report["components"]) == {"unet", "te1", "te2"}
    code, out, _ = cli("inspect", path, "--model", tiny_models / "base")
    assert code == 0 and "components" in out


def _bad(cli, tmp_path, path, message, *extra):
    code, out, err = cli("inspect", path, *extra)
    assert code == 1, (out, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_inspect_tiny_lora_against_real_sdxl_fails_with_names(cli, base, tmp_path):
    _bad(cli, tmp_path, _write(base, tmp_path), "this LoRA was made for another base model")


def test_missing_file(cli, tmp_path):
    _bad(cli, tmp_path, tmp_path / "none.safetensors", "not found")


def test_pickle_refused(cli, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"x")
    _bad(cli, tmp_path, tmp_path / "x.pt", "pickle")


def test_corrupt_file(cli, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    _bad(cli, tmp_path, tmp_path / "x.safetensors", "not a readable .safetensors")


@pytest.mark.parametrize(
    "key,message",
    [
        ("lora_unet_middle_block_1_proj_in.dora_scale", "DoRA"),
        ("lora_unet_middle_block_1_proj_in.hada_w1_a", "LoHa"),
        ("lora_unet_middle_block_1_proj_in.lokr_w1", "LoKr"),
        ("lora_unet_middle_block_1_proj_in.diff", "full weight differences"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "Stable Diffusion 1.x/2.x"),
        ("model.something.weight", "no LoRA keys"),
    ],
)
def test_unsupported_kinds(cli, tmp_path, key, message):
    save_file({key: torch.zeros(2, 2)}, tmp_path / "u.safetensors")
    _bad(cli, tmp_path, tmp_path / "u.safetensors", message)


def test_unknown_module_names_are_listed(cli, base, tiny_models, tmp_path):
    sd = {
        "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(8, 2),
    }
    save_file(sd, tmp_path / "u.safetensors")
    _bad(
        cli,
        tmp_path,
        tmp_path / "u.safetensors",
        "lora_unet_input_blocks_99_1_proj_in",
        "--model",
        tiny_models / "base",
    )


def test_write_refuses_overwrite(base, tmp_path):
    from loratool.errors import OutputExistsError

    path = _write(base, tmp_path)
    with pytest.raises(OutputExistsError):
        write_lora(random_network(base), path, keymap=keymap_for(base.unet))
    assert [p.name for p in tmp_path.iterdir()] == ["ok.safetensors"]  # no temp file left behind
