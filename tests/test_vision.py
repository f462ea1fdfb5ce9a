"""vision.py against transformers and timm (the independent oracles): random-weight SiglipVisionModel, SiglipModel,
Dinov2Model and Dinov2WithRegistersModel of tiny configs saved with save_pretrained, and the released ML-Mamba's timm
towers (vit_large_patch14_reg4_dinov2, vit_so400m_patch14_siglip_384) shrunk and saved in timm's hub layout, must give
the same hidden states through `load_vision`; preprocessing against hand-computed pixels, HF's SigLIP image processor
and the released strategies written out step by step."""
import io
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig,
                          SiglipModel, SiglipVisionConfig, SiglipVisionModel)
try:                                         # transformers 5: the PIL implementation has its own class
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:                          # transformers 4: SiglipImageProcessor is the PIL one
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil

import timm_oracle
from conftest import DEVICE
from checkpoints import load_vision
from vision import (IMAGENET_MEAN, IMAGENET_STD, RESIZE_STRATEGIES, FusedVisionEncoder, ImageTransform, VisionConfig,
                    VisionEncoder, preprocess, preprocess_batch, preprocess_batch_for, preprocess_for)

# Tiny towers with awkward sizes: head_dim 12, 36 px inputs with 8 px patches (a 4 px remainder the patch embedding
# cuts off), an MLP width that is no multiple of anything. DINOv2's position table covers a 5 x 5 grid (40 px) while
# it runs at 4 x 4, as the real one stores 37 x 37 (518 px) and runs at 224 or 384.
SIGLIP = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4, image_size=36,
              patch_size=8)
DINOV2 = dict(hidden_size=48, mlp_ratio=3, num_hidden_layers=3, num_attention_heads=4, image_size=40, patch_size=8)


def _randomize(model, seed):
    """Perturb every parameter: HF initialises LayerNorms to (1, 0), biases and layer scales to constants, and a
    loader that swaps two of those would still match."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    """kind -> (folder written by save_pretrained, the HF module that computes that tower's vision features)."""
    torch.manual_seed(0)
    towers = {}
    model = _randomize(SiglipVisionModel(SiglipVisionConfig(**SIGLIP)), seed=1)
    towers["siglip_vision"] = (model, model)
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = _randomize(SiglipModel(SiglipConfig(text_config=text, vision_config=SIGLIP)), seed=2)
    towers["siglip_full"] = (model, model.vision_model)       # text tower and logit scale/bias saved, to be ignored
    model = _randomize(Dinov2Model(Dinov2Config(**DINOV2)), seed=3)
    towers["dinov2"] = (model, model)
    model = _randomize(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINOV2, num_register_tokens=4)), seed=5)
    towers["dinov2_reg"] = (model, model)
    out = {}
    for kind, (model, vision) in towers.items():
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, vision)
    return out


def _hf_forward(vision, pixels, mean, std):
    """HF's hidden states and final output for [0, 1] pixels, normalised here as HF's image processors do."""
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    always = isinstance(vision, (Dinov2Model, Dinov2WithRegistersModel))       # DINOv2s always interpolate
    kwargs = {} if always else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        out = vision((pixels - mean) / std, output_hidden_states=True, **kwargs)
    return out.hidden_states, out.last_hidden_state


@pytest.mark.parametrize("size", [(36, 36), (40, 40), (44, 28)], ids=["36px", "40px", "44x28px"])
@pytest.mark.parametrize("kind", ["siglip_vision", "siglip_full", "dinov2", "dinov2_reg"])
def test_every_hidden_state_matches_transformers(hf_towers, kind, size):
    """36 px is SigLIP's native grid, 40 px DINOv2's; other sizes resample the position embeddings (with registers:
    antialiased, as Dinov2WithRegistersEmbeddings does)."""
    folder, vision = hf_towers[kind]
    encoder = load_vision(folder, feature_layer=None)
    pixels = torch.rand(2, 3, *size)
    hf_states, hf_last = _hf_forward(vision, pixels, encoder.config.image_mean, encoder.config.image_std)
    with torch.no_grad():
        features, states = encoder(pixels, return_hidden_states=True)
    assert len(states) == len(hf_states) == SIGLIP["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(states, hf_states)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m: f"hidden state {i}: {m}")
    prefix = {"dinov2": 1, "dinov2_reg": 1 + 4}.get(kind, 0)  # the CLS token and registers are no patch features
    assert encoder.num_prefix_tokens == prefix
    torch.testing.assert_close(features, hf_last[:, prefix:], rtol=1e-5, atol=1e-5)
    assert features.shape[1] == (size[0] // 8) * (size[1] // 8)


@pytest.mark.parametrize("feature_layer", [0, 1, -2, -1, None])
@pytest.mark.parametrize("kind", ["siglip_vision", "dinov2"])
def test_feature_layer_selects_that_hidden_state(hf_towers, kind, feature_layer):
    folder, vision = hf_towers[kind]
    encoder = load_vision(folder, image_size=36, feature_layer=feature_layer)    # DINOv2's own size is 40
    pixels = torch.rand(2, 3, 36, 36)
    hf_states, hf_last = _hf_forward(vision, pixels, encoder.config.image_mean, encoder.config.image_std)
    with torch.no_grad():
        features = encoder(pixels)                            # skips the blocks after feature_layer
    prefix = 1 if kind == "dinov2" else 0
    expected = hf_last if feature_layer is None else hf_states[feature_layer]
    torch.testing.assert_close(features, expected[:, prefix:], rtol=1e-5, atol=1e-5)
    assert features.shape == (2, encoder.num_patches, encoder.out_dim) and encoder.grid_size == (4, 4)


def test_fused_concatenates_dinov2_then_siglip(hf_towers):
    (siglip_folder, siglip), (dino_folder, dino) = hf_towers["siglip_full"], hf_towers["dinov2"]
    encoder = load_vision(siglip_folder, dinov2_path=dino_folder)
    assert isinstance(encoder, FusedVisionEncoder) and encoder.image_size == 36
    assert encoder.grid_size == (4, 4) and encoder.num_patches == 16 and encoder.out_dim == 96
    assert encoder.image_mean == IMAGENET_MEAN               # letterbox colour: the DINOv2 tower's mean
    pixels = torch.rand(3, 3, 36, 36)
    dino_states, _ = _hf_forward(dino, pixels, IMAGENET_MEAN, (0.229, 0.224, 0.225))
    siglip_states, _ = _hf_forward(siglip, pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        features = encoder(pixels)
    expected = torch.cat([dino_states[-2][:, 1:], siglip_states[-2]], dim=-1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="not DINOv2"):
        load_vision(dino_folder, dinov2_path=siglip_folder)
    with pytest.raises(ValueError, match="same image size and patch size"):
        FusedVisionEncoder([VisionEncoder(VisionConfig(arch="dinov2", image_size=36, patch_size=6, width=32,
                                                       depth=1, heads=2, mlp_dim=40)),
                            VisionEncoder(VisionConfig(image_size=36, patch_size=8, width=32, depth=1, heads=2,
                                                       mlp_dim=40))])


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "shards"])
def test_other_checkpoint_layouts(hf_towers, tmp_path, layout):
    folder, vision = hf_towers["siglip_vision"]
    if layout == "shards":
        vision.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        shutil.copy(folder / "config.json", tmp_path)
        torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    pixels = torch.rand(1, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(load_vision(tmp_path)(pixels), load_vision(folder)(pixels), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["siglip_full", "dinov2"])
def test_loader_lists_missing_unexpected_and_misshaped_tensors(hf_towers, tmp_path, kind):
    folder, _ = hf_towers[kind]
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    prefix = "vision_model." if kind == "siglip_full" else ""
    layer = "encoder.layers.1." if kind == "siglip_full" else "encoder.layer.1."
    fc2_bias, fc1_weight = prefix + layer + "mlp.fc2.bias", prefix + layer + "mlp.fc1.weight"
    del tensors[fc2_bias]
    tensors[prefix + "encoder.layers.9.extra.weight"] = torch.zeros(3)
    tensors[fc1_weight] = torch.zeros(99, 48)
    post_norm = "post_layernorm.weight" if kind == "siglip_full" else "layernorm.weight"
    tensors[prefix + post_norm] = tensors[prefix + post_norm].to(torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_vision(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "model.safetensors") in message
    for expected in ("missing (1)", layer + "mlp.fc2.bias", "unexpected (1)", "encoder.layers.9.extra.weight",
                     "wrong shape (1)", f"{layer}mlp.fc1.weight (99, 48) for blocks.1.mlp.fc1.weight",
                     f"wrong dtype, not floating point (1): {post_norm} torch.int32"):
        assert expected in message, (expected, message)


def test_loader_rejects_what_it_cannot_load(hf_towers, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_vision(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision(tmp_path)
    config = json.loads((hf_towers["dinov2"][0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": True}))
    with pytest.raises(ValueError, match=r"config\.json: use_swiglu_ffn=True is not supported"):
        load_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'"):
        load_vision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_vision(tmp_path)


def test_random_init_trains_and_casts(tmp_path):
    """From a config: random weights, every parameter gets a gradient, bfloat16 stays close to float32."""
    config = VisionConfig(arch="dinov2", image_size=30, patch_size=7, width=32, depth=2, heads=4, mlp_dim=50,
                          feature_layer=None, image_mean=IMAGENET_MEAN, image_std=(0.229, 0.224, 0.225))
    encoder = VisionEncoder(config).to(DEVICE)
    pixels = torch.rand(2, 3, 30, 30, device=DEVICE)
    features = encoder(pixels)
    assert features.shape == (2, 16, 32) and encoder.grid_size == (4, 4)
    features.square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        low = encoder.to(torch.bfloat16)(pixels)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), features.detach(), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(2, 4, 30, 30\)"):
        encoder(torch.rand(2, 4, 30, 30, device=DEVICE))
    with pytest.raises(ValueError, match="feature_layer=3"):
        VisionConfig(depth=2, feature_layer=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 SDPA (flash) on a GPU")
def test_bfloat16_on_gpu_as_accurate_as_transformers(tmp_path):
    """At a realistic head size (64), in bfloat16 through SDPA: our error against float32 (on the CPU, no TF32) is
    no worse than HF's."""
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=256, intermediate_size=1000, num_hidden_layers=4, num_attention_heads=4,
                                image_size=224, patch_size=16)
    hf = _randomize(SiglipVisionModel(config), seed=4)
    hf.save_pretrained(tmp_path)
    hf = hf.to("cuda", torch.bfloat16)
    assert hf.config._attn_implementation == "sdpa"
    ours = load_vision(tmp_path, feature_layer=None, device="cuda", dtype=torch.bfloat16)
    pixels = torch.rand(8, 3, 224, 224)
    with torch.no_grad():
        exact = load_vision(tmp_path, feature_layer=None)(pixels).cuda()
        pixels = pixels.cuda()
        ours_error = (ours(pixels).float() - exact).abs().max()
        hf_error = (hf((pixels - 0.5) / 0.5).last_hidden_state.float() - exact).abs().max()
    assert ours_error <= 1.5 * hf_error + 1e-3, (ours_error, hf_error)


# ----------------------------------------------------------------------------------------------------------------------
# timm checkpoints: the released ML-Mamba's towers

# The released towers (Prismatic's DINOSigLIP_VISION_BACKBONES["dinosiglip-vit-so-384px"]) shrunk, 14 px patches kept:
# DINOv2 stored at 56 px (a 4 x 4 grid; the real one stores 37 x 37), SigLIP at 42 px (3 x 3). A fused encoder runs at
# SigLIP's size, so DINOv2's position embeddings are resampled 4 x 4 -> 3 x 3 on loading, as 37 x 37 -> 27 x 27 at
# the released 384 px. kind -> (architecture, create_model's overrides)
TIMM_TOWERS = {
    "dinov2_reg4": ("vit_large_patch14_reg4_dinov2", dict(img_size=56)),
    "siglip": ("vit_so400m_patch14_siglip_384", dict(img_size=42)),
    "siglip_tanh": ("vit_so400m_patch14_siglip_384", dict(img_size=42, act_layer="gelu_tanh")),
}
TIMM_SIZES = dict(embed_dim=48, depth=3, num_heads=4)       # SigLIP's mlp_ratio 3.7362 gives an MLP of 179


@pytest.fixture(scope="module")
def timm_towers(timm, tmp_path_factory):
    """kind -> a folder in timm's hub layout, written by timm.models.save_for_hf: config.json with architecture,
    model_args and pretrained_cfg, and model.safetensors; "dinov2_reg4_bin" holds that DINOv2 as pytorch_model.bin."""
    torch.manual_seed(0)
    folders = {}
    for seed, (kind, (arch, overrides)) in enumerate(TIMM_TOWERS.items()):
        args = {**TIMM_SIZES, **overrides}
        model = _randomize(timm.create_model(arch, pretrained=False, **args), seed=10 + seed)
        folders[kind] = tmp_path_factory.mktemp(kind)
        timm_oracle.save_timm(model, folders[kind], args)
        if kind == "dinov2_reg4":
            folders["dinov2_reg4_bin"] = tmp_path_factory.mktemp("dinov2_reg4_bin")
            timm_oracle.save_timm(model, folders["dinov2_reg4_bin"], args, safe_serialization=False)
    return folders


def _prismatic_tower(timm, folder, image_size):
    return timm_oracle.create_like_prismatic(timm, folder, image_size)


def _timm_normalized(tower, pixels):
    """[0, 1] pixels normalised with the tower's pretrained_cfg, as timm's eval transform does."""
    mean, std = (torch.tensor(tower.pretrained_cfg[k])[:, None, None] for k in ("mean", "std"))
    return (pixels - mean) / std


@pytest.mark.parametrize("kind, image_size", [("dinov2_reg4", 56), ("dinov2_reg4", 70), ("dinov2_reg4_bin", 28),
                                              ("siglip", 42), ("siglip", 56), ("siglip_tanh", 42)])
def test_timm_towers_match_every_hidden_state(timm, timm_towers, kind, image_size):
    """Every block's output (prefix tokens included) equals timm's forward_intermediates, at the stored size and at
    others (position embeddings resampled on loading, as timm does); the default features equal Prismatic's
    get_intermediate_layers(n={depth - 2}), and feature_layer=None's equal timm's forward_features."""
    folder = timm_towers[kind]
    theirs = _prismatic_tower(timm, folder, image_size)
    ours = load_vision(folder, image_size=image_size)
    c = ours.config
    expected_fields = {"dinov2_reg4": ("dinov2", 4, "none", 1.0), "dinov2_reg4_bin": ("dinov2", 4, "none", 1.0),
                       "siglip": ("siglip", 0, "none", 0.9), "siglip_tanh": ("siglip", 0, "tanh", 0.9)}[kind]
    assert (c.arch, c.registers, c.gelu, c.crop_pct) == expected_fields
    assert c.mlp_dim == theirs.blocks[0].mlp.fc1.out_features and ours.grid_size == (image_size // 14,) * 2
    pixels = torch.rand(2, 3, image_size, image_size)
    normalized = _timm_normalized(theirs, pixels)
    with torch.no_grad():
        features, states = ours(pixels, return_hidden_states=True)
        blocks = theirs.forward_intermediates(normalized, return_prefix_tokens=True, output_fmt="NLC",
                                              intermediates_only=True)
        prismatic = theirs.get_intermediate_layers(normalized, n={len(theirs.blocks) - 2})[0]
        last = load_vision(folder, image_size=image_size, feature_layer=None)(pixels)
        final = theirs.forward_features(normalized)[:, theirs.num_prefix_tokens:]
    assert len(states) == len(blocks) + 1 == TIMM_SIZES["depth"] + 1
    for i, block in enumerate(blocks):
        patches, prefix = block if isinstance(block, tuple) else (block, block[:, :0])   # SigLIP: no prefix tokens
        torch.testing.assert_close(states[i + 1], torch.cat([prefix, patches], dim=1), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"block {i}: {m}")
    torch.testing.assert_close(features, prismatic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", RESIZE_STRATEGIES)
def test_timm_fused_equals_prismatic_dinosiglip(timm, timm_towers, strategy):
    """load_vision(SigLIP, dinov2_path=DINOv2) through preprocess_for is Prismatic's DinoSigLIPViTBackbone: both timm
    towers created at SigLIP's size, each fed its own transform of the picture (`_released_steps`: letterbox with the
    tower's mean; timm's DINOv2 crop_pct 1; SigLIP's 0.9 replaced by 1, Prismatic's fix), then the second-to-last
    block's patches, DINOv2's first."""
    encoder = load_vision(timm_towers["siglip"], dinov2_path=timm_towers["dinov2_reg4"])
    assert isinstance(encoder, FusedVisionEncoder) and encoder.image_size == 42 and encoder.out_dim == 96
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    expected = []
    for kind in ("dinov2_reg4", "siglip"):
        tower = _prismatic_tower(timm, timm_towers[kind], 42)
        pixels = _released_steps(image, 42, strategy, fill=tower.pretrained_cfg["mean"], crop_pct=1.0)
        with torch.no_grad():
            expected.append(tower.get_intermediate_layers(_timm_normalized(tower, pixels)[None],
                                                          n={len(tower.blocks) - 2})[0])
    pixels = preprocess_for(encoder, image, strategy)
    assert pixels.shape == (6 if strategy == "letterbox" else 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels[None]), torch.cat(expected, dim=2), rtol=1e-5, atol=1e-5)


def test_timm_loader_lists_missing_unexpected_and_misshaped_tensors(timm_towers, tmp_path):
    folder = timm_towers["dinov2_reg4"]
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["blocks.1.mlp.fc2.bias"]
    tensors["blocks.1.mlp.fc1.weight"] = torch.zeros(99, 48)
    tensors["pos_embed"] = torch.zeros(1, 15, 48)                          # no square grid
    tensors["blocks.9.extra.weight"] = torch.zeros(3)
    tensors["attn_pool.latent"] = torch.zeros(1, 1, 48)                    # a pooling head's: ignored
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_vision(tmp_path)
    message = str(error.value)
    for expected in (f"vision: {tmp_path / 'model.safetensors'} does not match its config.json",
                     "missing (1): blocks.1.mlp.fc2.bias", "unexpected (1): blocks.9.extra.weight", "wrong shape (2)",
                     "blocks.1.mlp.fc1.weight (99, 48) for blocks.1.mlp.fc1.weight (192, 48)",
                     "pos_embed (1, 15, 48) for pos_embed (16, 48)"):
        assert expected in message, (expected, message)


def test_timm_config_errors_name_the_file(timm_towers, tmp_path):
    folder = timm_towers["siglip"]
    config = json.loads((folder / "config.json").read_text())
    shutil.copy(folder / "model.safetensors", tmp_path)
    args = config["model_args"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "vit_so400m_patch14_siglip_384.webli"}))
    assert load_vision(tmp_path).config.width == 48                        # a tag after the name: the weights'
    for change, error in [
        ({"architecture": "vit_huge_patch14_clip_224"}, "architecture 'vit_huge_patch14_clip_224' is not supported"),
        ({"model_args": {**args, "qk_norm": True}}, "qk_norm=True is not supported"),
        ({"model_args": {**args, "norm_layer": "rmsnorm"}}, "model_args ['norm_layer'] are not supported"),
        ({"model_args": {**args, "act_layer": "quick_gelu"}}, "act_layer='quick_gelu' is not supported"),
        ({"model_args": {**args, "img_size": [42, 28]}}, "img_size=[42, 28] is not supported"),
        ({"pretrained_cfg": {**config["pretrained_cfg"], "interpolation": "bilinear"}},
         "pretrained_cfg interpolation='bilinear' is not supported"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError) as caught:
            load_vision(tmp_path)
        assert str(caught.value).startswith(f"vision: {tmp_path / 'config.json'}: {error}"), str(caught.value)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing


def _solid(mode, size, colour, **info):
    image = Image.new(mode, size, colour)
    image.info.update(info)
    return image


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_resize_matches_hf_siglip_processor(mode):
    """resize="resize-naive" + the SigLIP normalisation is HF's SiglipImageProcessor (bicubic, 1/255, mean = std = 0.5).
    Not RGBA: transformers versions differ on alpha (5.17 drops it, 5.23 composites on white as we do); our
    compositing is pinned by the hand-computed cases below."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA").convert(mode)
    theirs = SiglipImageProcessorPil(size={"height": 24, "width": 24})(images=image, return_tensors="pt")
    ours = (preprocess(image, 24, resize="resize-naive") - 0.5) / 0.5
    torch.testing.assert_close(ours, theirs["pixel_values"][0], rtol=0, atol=1e-6)


def _i16(value):
    return Image.fromarray(np.full((3, 5), value, dtype=np.uint16))


@pytest.mark.parametrize("image, rgb", [
    (_solid("RGBA", (5, 3), (10, 200, 30, 255)), (10, 200, 30)),
    (_solid("RGBA", (5, 3), (10, 200, 30, 0)), (255, 255, 255)),           # transparent: onto white, as HF does
    (_solid("LA", (5, 3), (0, 51)), (204, 204, 204)),                      # 20% black over white
    (_solid("L", (5, 3), 77), (77, 77, 77)),
    (_solid("1", (5, 3), 1), (255, 255, 255)),
    (_solid("CMYK", (5, 3), (0, 255, 255, 0)), (255, 0, 0)),
    (_solid("P", (5, 3), 0, transparency=0), (255, 255, 255)),              # the transparent palette entry
    (_i16(65535), (255, 255, 255)),                                         # 16-bit: scaled, not clipped at 255
    (_i16(128 * 257), (128, 128, 128)),
    (_i16(0), (0, 0, 0)),
], ids=["RGBA-opaque", "RGBA-clear", "LA", "L", "1", "CMYK", "P-transparent", "I16-max", "I16-mid", "I16-zero"])
def test_any_mode_becomes_rgb(image, rgb):
    pixels = preprocess(image, 16, resize="resize-naive")
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    expected = (torch.tensor(rgb, dtype=torch.float32) / 255)[:, None, None].expand(3, 16, 16)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1.01 / 255)


def _released_steps(image, size, strategy, fill=(0.5, 0.5, 0.5), crop_pct=1.0):
    """The released preprocessing written out as torchvision runs it on a PIL image: Prismatic's LetterboxPad (a
    border of int((long - side) / 2) on both sides of each short side), then timm's eval transform, Resize(floor(size /
    crop_pct)) of the short side (the long side int()-truncated) and CenterCrop(size) (its corner int(round(...)));
    "resize-naive" resizes to (size, size) instead. ToTensor: /255."""
    if strategy == "letterbox":
        w, h = image.size
        pad_x, pad_y = int((max(w, h) - w) / 2), int((max(w, h) - h) / 2)
        canvas = Image.new("RGB", (w + 2 * pad_x, h + 2 * pad_y), tuple(int(c * 255) for c in fill))
        canvas.paste(image, (pad_x, pad_y))
        image = canvas
    if strategy == "resize-naive":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    else:
        short, (w, h) = math.floor(size / crop_pct), image.size
        image = image.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short),
                             Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255                        # (height, width, 3)
    top, left = int(round((pixels.shape[0] - size) / 2.0)), int(round((pixels.shape[1] - size) / 2.0))
    return torch.from_numpy(pixels[top:top + size, left:left + size].copy()).permute(2, 0, 1)


@pytest.mark.parametrize("crop_pct", [1.0, 0.9])
@pytest.mark.parametrize("size", [(37, 23), (23, 38), (300, 6), (1, 1)], ids=["wide", "tall-odd", "panorama", "1px"])
@pytest.mark.parametrize("strategy", RESIZE_STRATEGIES)
def test_strategies_follow_the_released_steps(strategy, size, crop_pct):
    """Exactly, on non-square pictures: an odd padding (23 x 38 pads 7 + 7 to 37 x 38), a crop offset of 8.5 rounded
    to even (37 x 23 at crop_pct 0.9: 41 x 26 -> 24), a 50:1 panorama."""
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = preprocess(image, 24, strategy, fill=IMAGENET_MEAN, crop_pct=crop_pct)
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, _released_steps(image, 24, strategy, IMAGENET_MEAN, crop_pct), rtol=0, atol=0)


def _tiny_tower(arch, **fields):
    return VisionEncoder(VisionConfig(arch=arch, image_size=28, patch_size=7, width=16, depth=1, heads=2, mlp_dim=24,
                                      **fields)).eval()


def test_preprocess_for_gives_each_tower_its_picture(tmp_path):
    """As the released dinosiglip transform: letterbox pads each tower's copy with that tower's mean; the crops follow
    each tower's crop_pct but SigLIP's (kept at 1 by Prismatic's fix); resize-naive gives all towers one picture."""
    dino = _tiny_tower("dinov2", registers=4, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, crop_pct=0.875)
    siglip = _tiny_tower("siglip", crop_pct=0.9)
    fused = FusedVisionEncoder([dino, siglip])
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8))     # 60 x 20: 20 rows of padding
    image.save(tmp_path / "wide.png")

    naive = preprocess_for(fused, image, "resize-naive")
    torch.testing.assert_close(naive, preprocess(image, 28, "resize-naive"), rtol=0, atol=0)
    crop = preprocess_for(fused, image, "resize-crop")
    assert crop.shape == (6, 28, 28)
    torch.testing.assert_close(crop[:3], preprocess(image, 28, "resize-crop", crop_pct=0.875), rtol=0, atol=0)
    torch.testing.assert_close(crop[3:], preprocess(image, 28, "resize-crop"), rtol=0, atol=0)
    torch.testing.assert_close(preprocess_for(siglip, image, "resize-crop"), crop[3:], rtol=0, atol=0)
    box = preprocess_for(fused, image, "letterbox")
    torch.testing.assert_close(box[:3], preprocess(image, 28, "letterbox", IMAGENET_MEAN, 0.875), rtol=0, atol=0)
    torch.testing.assert_close(box[3:], preprocess(image, 28, "letterbox"), rtol=0, atol=0)
    torch.testing.assert_close(box[:, 0, 0], torch.tensor([123, 116, 103, 127, 127, 127]) / 255, rtol=0, atol=0)
    batch = preprocess_batch_for(fused, [image, tmp_path / "wide.png"], "letterbox")
    assert batch.shape == (2, 6, 28, 28) and torch.equal(batch[1], box)
    transform = pickle.loads(pickle.dumps(ImageTransform(fused, "letterbox")))     # for DataLoader workers
    assert torch.equal(transform(tmp_path / "wide.png"), box)

    with torch.no_grad():                                  # one picture per tower, or one for all
        torch.testing.assert_close(fused(box[None]), torch.cat([dino(box[None, :3]), siglip(box[None, 3:])], dim=-1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(fused(naive[None]), torch.cat([dino(naive[None]), siglip(naive[None])], dim=-1),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 9, 28, 28\)"):
        fused(torch.rand(1, 9, 28, 28))
    with pytest.raises(ValueError, match="strategy must be one of resize-naive, resize-crop, letterbox"):
        preprocess_for(fused, image, "resize")
    with pytest.raises(ValueError, match="resize must be one of resize-naive, resize-crop, letterbox"):
        preprocess(image, 28, "resize")


def test_exif_orientation_is_applied(tmp_path):
    image = _solid("RGB", (8, 4), (255, 0, 0))
    image.paste((0, 0, 255), (4, 0, 8, 4))                                  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                                        # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = image.transpose(Image.Transpose.ROTATE_270)                   # 4 wide, 8 tall, red on top
    torch.testing.assert_close(preprocess(tmp_path / "rotated.png", 16, resize="resize-naive"),
                               preprocess(upright, 16, resize="resize-naive"), rtol=0, atol=0)


def test_unreadable_images_raise_an_error_naming_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    _solid("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:60])
    for name in ("garbage.png", "truncated.png", "missing.jpg"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            preprocess(tmp_path / name, 16)
    with pytest.raises(ValueError, match="no pixels"):
        preprocess(Image.new("RGB", (0, 4)), 16)


def test_preprocess_batch_takes_paths_and_images(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 30), (41, 7))]
    images[0].save(tmp_path / "a.png")
    batch = preprocess_batch([tmp_path / "a.png", images[1]], 24)
    assert batch.shape == (2, 3, 24, 24)
    torch.testing.assert_close(batch[0], preprocess(images[0], 24), rtol=0, atol=0)
    torch.testing.assert_close(batch[1], preprocess(images[1], 24), rtol=0, atol=0)
    assert 0 <= batch.min() and batch.max() <= 1
