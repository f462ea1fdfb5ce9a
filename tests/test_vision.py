"""vision.py against transformers (the independent oracle): random-weight SiglipVisionModel, SiglipModel and Dinov2Model
of tiny configs saved with save_pretrained must give the same hidden states through `load_vision`; preprocessing
against hand-computed pixels and HF's SigLIP image processor."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel, SiglipVisionConfig,
                          SiglipVisionModel)
try:                                         # transformers 5: the PIL implementation has its own class
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:                          # transformers 4: SiglipImageProcessor is the PIL one
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil

from conftest import DEVICE
from vision import (IMAGENET_MEAN, FusedVisionEncoder, VisionConfig, VisionEncoder, load_vision, preprocess,
                    preprocess_batch)

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
    out = {}
    for kind, (model, vision) in towers.items():
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, vision)
    return out


def _hf_forward(vision, pixels, mean, std):
    """HF's hidden states and final output for [0, 1] pixels, normalised here as HF's image processors do."""
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    kwargs = {} if isinstance(vision, Dinov2Model) else {"interpolate_pos_encoding": True}   # DINOv2 always does
    with torch.no_grad():
        out = vision((pixels - mean) / std, output_hidden_states=True, **kwargs)
    return out.hidden_states, out.last_hidden_state


@pytest.mark.parametrize("size", [(36, 36), (40, 40), (44, 28)], ids=["36px", "40px", "44x28px"])
@pytest.mark.parametrize("kind", ["siglip_vision", "siglip_full", "dinov2"])
def test_every_hidden_state_matches_transformers(hf_towers, kind, size):
    """36 px is SigLIP's native grid, 40 px DINOv2's; other sizes resample the position embeddings."""
    folder, vision = hf_towers[kind]
    encoder = load_vision(folder, feature_layer=None)
    pixels = torch.rand(2, 3, *size)
    hf_states, hf_last = _hf_forward(vision, pixels, encoder.config.image_mean, encoder.config.image_std)
    with torch.no_grad():
        features, states = encoder(pixels, return_hidden_states=True)
    assert len(states) == len(hf_states) == SIGLIP["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(states, hf_states)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m: f"hidden state {i}: {m}")
    prefix = 1 if kind == "dinov2" else 0                     # DINOv2's CLS token is not a patch feature
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
# Preprocessing


def _solid(mode, size, colour, **info):
    image = Image.new(mode, size, colour)
    image.info.update(info)
    return image


@pytest.mark.parametrize("mode", ["RGB", "L", "P"])
def test_resize_matches_hf_siglip_processor(mode):
    """resize="resize" + the SigLIP normalisation is HF's SiglipImageProcessor (bicubic, 1/255, mean = std = 0.5).
    Not RGBA: transformers versions differ on alpha (5.17 drops it, 5.23 composites on white as we do); our
    compositing is pinned by the hand-computed cases below."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA").convert(mode)
    theirs = SiglipImageProcessorPil(size={"height": 24, "width": 24})(images=image, return_tensors="pt")
    ours = (preprocess(image, 24, resize="resize") - 0.5) / 0.5
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
    pixels = preprocess(image, 16, resize="resize")
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    expected = (torch.tensor(rgb, dtype=torch.float32) / 255)[:, None, None].expand(3, 16, 16)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1.01 / 255)


@pytest.mark.parametrize("size, band", [
    ((300, 6), (15, 16, 0, 32)),      # very wide: a 1-pixel row, (32 - 1) // 2 = 15 from the top
    ((1000, 1), (15, 16, 0, 32)),     # a 0.03-pixel-high strip still gets its row
    ((6, 300), (0, 32, 15, 16)),      # very tall: a 1-pixel column
    ((2, 1), (8, 24, 0, 32)),         # 32 x 16 centred
    ((1, 1), (0, 32, 0, 32)),         # tiny: fills the square
])
def test_letterbox_places_the_image_in_the_middle(size, band):
    fill = (0.25, 0.5, 0.75)
    pixels = preprocess(_solid("RGB", size, (200, 10, 90)), 32, fill=fill)
    top, bottom, left, right = band
    expected = (torch.tensor([int(c * 255) for c in fill], dtype=torch.float32) / 255)[:, None, None].repeat(1, 32, 32)
    expected[:, top:bottom, left:right] = (torch.tensor([200, 10, 90]) / 255)[:, None, None]
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    image = _solid("RGB", (8, 4), (255, 0, 0))
    image.paste((0, 0, 255), (4, 0, 8, 4))                                  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                                        # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = image.transpose(Image.Transpose.ROTATE_270)                   # 4 wide, 8 tall, red on top
    torch.testing.assert_close(preprocess(tmp_path / "rotated.png", 16, resize="resize"),
                               preprocess(upright, 16, resize="resize"), rtol=0, atol=0)


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
