"""The vision encoder: a ViT that turns an image into a grid of patch features for the connector.

ML-Mamba (Huang & Hu 2024, arXiv 2407.19832, §3.1) encodes the image with pretrained ViTs and hands their patch
features to the connector, which scans the 2D grid. Two towers are supported, built from the same pieces:

- SigLIP (Zhai et al. 2023, arXiv 2303.15343), HF `google/siglip-*`: patch embedding + learned position embeddings,
  pre-norm blocks with a GELU-tanh MLP, a post layernorm.
- DINOv2 (Oquab et al. 2023, arXiv 2304.07193), HF `facebook/dinov2-*` (register-free): the same with a CLS token in
  front, layer scale on each residual branch and an exact-erf GELU.

`FusedVisionEncoder` runs both on the same image and concatenates their patch features channel-wise, as Prismatic's
"dinosiglip" backbone (Karamcheti et al. 2024, arXiv 2402.07865) that ML-Mamba inherits through Cobra.

Input convention: `pixel_values` are RGB in [0, 1], (batch, 3, height, width), straight from `preprocess`. Each tower
normalises with its own checkpoint's mean/std as its first step, so a fused encoder takes one tensor (Prismatic
instead builds one normalised tensor per tower). Features come from `hidden_states[feature_layer]`, before the post
layernorm: -2, the second-to-last block's output, as LLaVA and Prismatic take.

    encoder = load_vision("siglip-so400m-patch14-384", dinov2_path="dinov2-large", dtype=torch.bfloat16, device="cuda")
    pixels = preprocess_batch(["cat.jpg", "dog.png"], encoder.image_size, fill=encoder.image_mean).cuda()
    features = encoder(pixels)               # (batch, num_patches, out_dim), patches in row-major grid_size order
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)    # DINOv2's normalisation


@dataclass
class VisionConfig:
    """One ViT tower. The defaults are SigLIP-B/16 at 224 px (google/siglip-base-patch16-224)."""
    arch: str = "siglip"                  # "siglip", or "dinov2": CLS token, layer scale, exact GELU
    image_size: int = 224                 # side of the square input image; fixes the patch grid the connector sees
    patch_size: int = 16
    width: int = 768                      # d_model
    depth: int = 12                       # number of transformer blocks
    heads: int = 12
    mlp_dim: int = 3072
    norm_eps: float = 1e-6
    pos_grid: int | None = None           # side of the stored position-embedding grid; None: image_size // patch_size.
                                          # Other grids are reached by bicubic resampling (DINOv2 stores 37 x 37).
    feature_layer: int | None = -2        # features = hidden_states[feature_layer]: 0 the embeddings, i block i's
                                          # output, negative from the end; None: the last block after the post layernorm
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)     # the checkpoint's normalisation of [0, 1] RGB
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.arch not in ("siglip", "dinov2"):
            raise ValueError(f"vision: arch must be 'siglip' or 'dinov2', got {self.arch!r}")
        positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        sizes = {name: getattr(self, name)
                 for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "pos_grid")}
        wrong = [f"{name}={v!r}" for name, v in sizes.items()
                 if not (positive_int(v) or name == "pos_grid" and v is None)]
        if wrong:
            raise ValueError(f"vision: sizes must be positive integers, got {', '.join(wrong)}")
        if self.feature_layer is not None and (not isinstance(self.feature_layer, int)
                                               or isinstance(self.feature_layer, bool)):
            raise ValueError(f"vision: feature_layer must be an integer or None, got {self.feature_layer!r}")
        if not (number(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ValueError(f"vision: norm_eps must be a number between 0 and 1, got {self.norm_eps!r}")
        for name, fits, bounds in (("image_mean", lambda x: 0 <= x <= 1, "[0, 1]"),     # statistics of RGB in [0, 1]
                                   ("image_std", lambda x: 0 < x <= 1, "(0, 1]")):
            v = getattr(self, name)
            if not (isinstance(v, (tuple, list)) and len(v) == 3 and all(number(x) and fits(x) for x in v)):
                raise ValueError(f"vision: {name} must be 3 numbers in {bounds}, got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if self.width % self.heads:
            raise ValueError(f"vision: heads={self.heads} must divide width={self.width}")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision: image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        if self.feature_layer is not None and not -(self.depth + 1) <= self.feature_layer <= self.depth:
            raise ValueError(f"vision: feature_layer={self.feature_layer} is not a hidden state of a "
                             f"{self.depth}-block ViT (0..{self.depth}, or negative from the end, or None)")


# ----------------------------------------------------------------------------------------------------------------------
# 1. The transformer


def resample_pos_embed(pos_embed, grid_size):
    """Position embeddings of a square grid, bicubically resampled to grid_size = (h, w): how a ViT runs at a
    resolution it was not trained at. As HF's `interpolate_pos_encoding` (to an output size, no antialias); the
    original DINOv2 code's scale-factor variant and timm's antialiased resampling differ slightly. Computed in
    float32: bicubic in half precision shifts the embeddings.

    pos_embed (side * side, width) -> (h * w, width); returned unchanged when the grid already matches."""
    side = math.isqrt(pos_embed.shape[0])
    if (side, side) == tuple(grid_size):
        return pos_embed
    grid = rearrange(pos_embed.float(), "(h w) c -> 1 c h w", h=side)
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> (h w) c").to(pos_embed.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), through torch's SDPA so a GPU takes the flash kernel."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)       # the checkpoints' q, k, v projections, stacked
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x):                                            # (batch, seqlen, width)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)                  # softmax(q kᵀ / √head_dim) v
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)
        self.gelu = "tanh" if config.arch == "siglip" else "none"   # SigLIP: gelu_pytorch_tanh; DINOv2: exact erf

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). DINOv2 multiplies each branch by a
    learned per-channel γ before adding it (layer scale, CaiT: Touvron et al. 2021, arXiv 2103.17239)."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config)
        layer_scale = config.arch == "dinov2"
        self.gamma1 = nn.Parameter(torch.ones(config.width)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.ones(config.width)) if layer_scale else None

    def forward(self, x):                                            # (batch, seqlen, width)
        a = self.attn(self.norm1(x))
        x = x + (a if self.gamma1 is None else a * self.gamma1)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma2 is None else m * self.gamma2)


class VisionEncoder(nn.Module):
    """A ViT tower: `forward(pixel_values)` gives the patch features of layer `config.feature_layer`.

    Built from a config it has fresh random weights (for training from scratch); `load_vision` fills it with a
    checkpoint's. `grid_size`, `num_patches` and `out_dim` describe the features at `config.image_size`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)  # a Linear per patch
        pos_grid = c.pos_grid or c.image_size // c.patch_size
        self.pos_embed = nn.Parameter(torch.empty(pos_grid * pos_grid, c.width))
        # DINOv2's CLS token, its own position embedding already added: only the sum is ever used
        self.cls_token = nn.Parameter(torch.empty(c.width)) if c.arch == "dinov2" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)           # the post layernorm
        self.reset_parameters()

    def reset_parameters(self):
        """Random weights as for training from scratch: truncated normal(0.02) matrices and embeddings, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def image_mean(self):
        """The colour that normalises to 0: what `preprocess` letterboxes with."""
        return self.config.image_mean

    @property
    def grid_size(self):
        """(rows, cols) of the patch grid at `image_size`: features[:, r * cols + c] is the patch at row r, col c."""
        side = self.config.image_size // self.config.patch_size
        return side, side

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]

    @property
    def out_dim(self):
        return self.config.width

    def normalize(self, pixel_values):
        """(pixels − mean) / std per RGB channel, in float32. The statistics stay Python floats, so casting the module
        to bfloat16 cannot round them."""
        pixels = pixel_values.float()
        mean, std = self.config.image_mean, self.config.image_std
        return torch.stack([(pixels[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)

    def embed(self, pixel_values):
        """Patch embeddings plus position embeddings (DINOv2: the CLS token in front), (batch, [1 +] h * w, width)."""
        x = self.patch_embed(self.normalize(pixel_values).to(self.patch_embed.weight.dtype))  # (batch, width, h, w)
        x = rearrange(x, "b c h w -> b (h w) c") + resample_pos_embed(self.pos_embed, x.shape[-2:])
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return x

    def forward(self, pixel_values, return_hidden_states=False):
        """pixel_values (batch, 3, height, width), RGB in [0, 1]. Other sizes than `image_size` work: the position
        embeddings are resampled to the new grid (and a remainder of fewer than patch_size pixels is cut off).

        Returns the patch features (batch, num_patches, width) of `config.feature_layer` (DINOv2's CLS token dropped).
        With return_hidden_states also every layer's output as HF's `output_hidden_states` gives it: a tuple of
        depth + 1 tensors, the embeddings then each block's output, before the post layernorm, CLS token included.
        Without it, the blocks after the feature layer are skipped."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"vision: pixel_values has shape {tuple(pixel_values.shape)}, expected (batch, 3, "
                             f"height, width)")
        if min(pixel_values.shape[-2:]) < self.config.patch_size:
            raise ValueError(f"vision: image {tuple(pixel_values.shape[-2:])} is smaller than one "
                             f"{self.config.patch_size}-pixel patch")
        depth, layer = self.config.depth, self.config.feature_layer
        index = depth if layer is None else layer % (depth + 1)      # into hidden_states
        x = self.embed(pixel_values)
        hidden_states = [x]
        for block in self.blocks[:depth if return_hidden_states else index]:
            x = block(x)
            if return_hidden_states:
                hidden_states.append(x)
        features = hidden_states[index] if return_hidden_states else x
        if layer is None:
            features = self.norm(features)
        features = features[:, 0 if self.cls_token is None else 1:]
        return (features, tuple(hidden_states)) if return_hidden_states else features


class FusedVisionEncoder(nn.Module):
    """Several towers on the same image, patch features concatenated channel-wise: DINOv2 then SigLIP is Prismatic's
    "dinosiglip" backbone (ML-Mamba's, through Cobra). The towers must agree on image size and patch grid."""

    def __init__(self, towers):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        first = self.towers[0]
        for tower in self.towers[1:]:
            if (tower.image_size, tower.grid_size) != (first.image_size, first.grid_size):
                raise ValueError(f"vision: cannot fuse a {first.config.arch} tower ({first.image_size} px, grid "
                                 f"{first.grid_size}) with a {tower.config.arch} tower ({tower.image_size} px, grid "
                                 f"{tower.grid_size}); fused towers need the same image size and patch size")

    image_size = property(lambda self: self.towers[0].image_size)
    grid_size = property(lambda self: self.towers[0].grid_size)
    num_patches = property(lambda self: self.towers[0].num_patches)
    out_dim = property(lambda self: sum(tower.out_dim for tower in self.towers))
    # one letterbox colour for all towers: the first's mean (Prismatic pads each tower's copy with its own mean)
    image_mean = property(lambda self: self.towers[0].image_mean)

    def forward(self, pixel_values, return_hidden_states=False):
        """pixel_values (batch, 3, height, width) RGB in [0, 1] -> (batch, num_patches, out_dim); with
        return_hidden_states also a tuple holding each tower's hidden states (see `VisionEncoder.forward`)."""
        outputs = [tower(pixel_values, return_hidden_states) for tower in self.towers]
        if not return_hidden_states:
            return torch.cat(outputs, dim=-1)
        return torch.cat([f for f, _ in outputs], dim=-1), tuple(h for _, h in outputs)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Loading Hugging Face checkpoints (local folders only)

# Values HF's SiglipVisionConfig / Dinov2Config take when config.json leaves them out (google/siglip-* leave most out)
_HF_DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "dinov2": dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                   image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                   use_swiglu_ffn=False),
}
# Checkpoint tensors that a vision tower does not use: SigLIP's text tower, contrastive logit scale/bias and attention
# pooling head; DINOv2's mask token (masked-image pretraining only)
_IGNORED = {"siglip": ("text_model.", "logit_scale", "logit_bias", "head."), "dinov2": ("embeddings.mask_token",)}


def _read_json(file):
    """A JSON object from file; ValueError naming the file when it is not one."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:          # not UTF-8 or JSON, nested too deep, a 4300-digit number
        raise ValueError(f"vision: {file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"vision: {file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_config(directory, image_size, feature_layer):
    """VisionConfig from an HF folder's config.json (and preprocessor_config.json for mean, std and input size)."""
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"vision: {file} not found; expected a Hugging Face model folder (config.json and "
                                f"model.safetensors) of a SigLIP or DINOv2 model")
    raw = _read_json(file)
    model_type = raw.get("model_type")
    if model_type not in ("siglip", "siglip_vision_model", "dinov2"):
        raise ValueError(f"vision: {file} has model_type {model_type!r}; supported: 'siglip' (SiglipModel), "
                         f"'siglip_vision_model' (SiglipVisionModel), 'dinov2' (Dinov2Model)")
    arch = "dinov2" if model_type == "dinov2" else "siglip"
    processor = directory / "preprocessor_config.json"
    p = _read_json(processor) if processor.is_file() else {}
    try:
        return _vision_config(arch, raw.get("vision_config", {}) if model_type == "siglip" else raw, p, image_size,
                              feature_layer)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:    # values of the wrong type or size
        files = f"{file} or {processor.name}" if p else file
        raise ValueError(f"vision: {files}: {str(e).removeprefix('vision: ')}") from None


def _vision_config(arch, fields, p, image_size, feature_layer):
    """VisionConfig from the HF config's fields (`vision_config` of a SiglipModel) and its preprocessor config p."""
    hf = {**_HF_DEFAULTS[arch], **fields}
    expected = {"num_channels": 3, "hidden_act": _HF_DEFAULTS[arch]["hidden_act"]}
    if arch == "dinov2":
        expected.update(qkv_bias=True, use_swiglu_ffn=False)                 # dinov2-giant's SwiGLU is not supported
    for key, value in expected.items():
        if hf[key] != value:
            raise ValueError(f"{key}={hf[key]!r} is not supported (only {value!r})")
    width = hf["hidden_size"]
    mlp_dim = hf["intermediate_size"] if arch == "siglip" else int(width * hf["mlp_ratio"])
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if arch == "dinov2" else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    native_size = hf["image_size"]                                           # what the position embeddings cover
    if p:                                                                    # the checkpoint's own input size and stats
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
        size = p.get("crop_size") if p.get("do_center_crop") else p.get("size")
        if isinstance(size, dict) and "height" in size:
            native_size = size["height"]
    return VisionConfig(arch=arch, image_size=image_size or native_size, patch_size=hf["patch_size"], width=width,
                        depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"], mlp_dim=mlp_dim,
                        norm_eps=hf["layer_norm_eps"], pos_grid=hf["image_size"] // hf["patch_size"],
                        feature_layer=feature_layer, image_mean=tuple(mean), image_std=tuple(std))


def _read_tensors(directory, arch):
    """The checkpoint's tensors by HF name (a SiglipModel's "vision_model." prefix removed), ignored ones skipped
    unread. Reads model.safetensors, its shards (model.safetensors.index.json) or, failing those, pytorch_model.bin."""
    def vision_names(names):
        """(name in the file, name without the prefix) for the names a vision tower uses."""
        stripped = ((name, name.removeprefix("vision_model.")) for name in names)
        return [(name, short) for name, short in stripped if not short.startswith(_IGNORED[arch])]

    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files, source = [directory / "model.safetensors"], directory / "model.safetensors"
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"vision: {index}: no 'weight_map' from tensor names to file names")
        files, source = sorted({directory / f for f in weight_map.values()}), index
    elif (directory / "pytorch_model.bin").is_file():
        source = directory / "pytorch_model.bin"
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:                         # refused (not only tensors), truncated, corrupt: many kinds
            raise ValueError(f"vision: {source}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"vision: {source}: expected a state dict {{name: tensor}}, got {type(state).__name__}")
        return {short: state[name] for name, short in vision_names(state)}, source
    else:
        raise FileNotFoundError(f"vision: no model.safetensors (or its shards, or pytorch_model.bin) in {directory}")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"vision: {file}, a shard that {source} lists, not found")
        try:
            with safe_open(file, framework="pt") as f:
                tensors.update({short: f.get_tensor(name) for name, short in vision_names(f.keys())})
        except SafetensorError as e:
            raise ValueError(f"vision: {file}: not a readable safetensors file, truncated or corrupt? ({e})") from None
    return tensors, source


# Our module -> the checkpoint's, for the .weight and .bias of each; {i} runs over the blocks. Our attention keeps q, k
# and v in one stacked Linear (one matmul instead of three): its weight is the concatenation of the checkpoint's three.
_SIGLIP_MODULES = {
    "patch_embed": "embeddings.patch_embedding",
    "blocks.{i}.norm1": "encoder.layers.{i}.layer_norm1",
    "blocks.{i}.attn.qkv": ["encoder.layers.{i}.self_attn.q_proj", "encoder.layers.{i}.self_attn.k_proj",
                            "encoder.layers.{i}.self_attn.v_proj"],
    "blocks.{i}.attn.proj": "encoder.layers.{i}.self_attn.out_proj",
    "blocks.{i}.norm2": "encoder.layers.{i}.layer_norm2",
    "blocks.{i}.mlp.fc1": "encoder.layers.{i}.mlp.fc1",
    "blocks.{i}.mlp.fc2": "encoder.layers.{i}.mlp.fc2",
    "norm": "post_layernorm",
}
_DINOV2_MODULES = {
    "patch_embed": "embeddings.patch_embeddings.projection",
    "blocks.{i}.norm1": "encoder.layer.{i}.norm1",
    "blocks.{i}.attn.qkv": ["encoder.layer.{i}.attention.attention.query", "encoder.layer.{i}.attention.attention.key",
                            "encoder.layer.{i}.attention.attention.value"],
    "blocks.{i}.attn.proj": "encoder.layer.{i}.attention.output.dense",
    "blocks.{i}.norm2": "encoder.layer.{i}.norm2",
    "blocks.{i}.mlp.fc1": "encoder.layer.{i}.mlp.fc1",
    "blocks.{i}.mlp.fc2": "encoder.layer.{i}.mlp.fc2",
    "norm": "layernorm",
}


def _hf_names(config):
    """Our parameter name -> ([the checkpoint tensors it is made of], how to make it from them)."""
    cat = lambda *parts: torch.cat(parts)
    siglip = config.arch == "siglip"
    out = {}
    for ours, theirs in (_SIGLIP_MODULES if siglip else _DINOV2_MODULES).items():
        for i in range(config.depth) if "{i}" in ours else [None]:
            for kind in ("weight", "bias"):
                parts = [f"{t.format(i=i)}.{kind}" for t in (theirs if isinstance(theirs, list) else [theirs])]
                out[f"{ours.format(i=i)}.{kind}"] = (parts, cat)
    if siglip:
        out["pos_embed"] = (["embeddings.position_embedding.weight"], cat)
        return out
    pos = "embeddings.position_embeddings"                                   # (1, 1 + grid², width), CLS row first
    out["pos_embed"] = ([pos], lambda p: p[0, 1:])
    out["cls_token"] = (["embeddings.cls_token", pos], lambda cls, p: cls[0, 0] + p[0, 0])
    for i in range(config.depth):
        for j in (1, 2):
            out[f"blocks.{i}.gamma{j}"] = ([f"encoder.layer.{i}.layer_scale{j}.lambda1"], cat)
    return out


def _convert(model, tensors, source):
    """Our state dict from the checkpoint's tensors; ValueError listing every missing, unexpected, mis-shaped or
    non-floating-point one (any floating dtype is converted on loading)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state, used, missing, wrong, not_float = {}, set(), [], [], []
    for ours, (theirs, make) in _hf_names(model.config).items():
        used.update(theirs)
        absent = [name for name in theirs if name not in tensors]
        if absent:
            missing += absent
            continue
        parts = [tensors[name] for name in theirs]
        try:
            tensor = make(*parts)
        except (RuntimeError, IndexError):                                   # parts that do not fit together
            tensor = None
        if tensor is None or tuple(tensor.shape) != expected[ours]:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(theirs, parts))
            wrong.append(f"{shapes} for {ours} {expected[ours]}")
        elif not all(t.is_floating_point() for t in parts):
            not_float += [f"{name} {t.dtype}" for name, t in zip(theirs, parts) if not t.is_floating_point()]
        else:
            state[ours] = tensor
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or wrong or not_float:
        c = model.config
        listing = lambda names: ", ".join(names[:20]) + (f" ... and {len(names) - 20} more" if len(names) > 20 else "")
        problems = [f"  {what} ({len(names)}): {listing(names)}" for what, names in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                     ("wrong dtype, not floating point", not_float)) if names]
        raise ValueError(f"vision: {source} does not match its config.json ({c.arch}, width {c.width}, depth "
                         f"{c.depth}, heads {c.heads}, mlp {c.mlp_dim}, patch {c.patch_size}, position grid "
                         f"{c.pos_grid}x{c.pos_grid}):\n" + "\n".join(problems))
    return state


def _load_tower(path, image_size, feature_layer, dtype, device):
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"vision: {directory} is not a directory; expected a local Hugging Face model folder")
    config = _read_config(directory, image_size, feature_layer)
    tensors, source = _read_tensors(directory, config.arch)
    blocks = {m.group(1) for m in map(re.compile(r"encoder\.layers?\.(\d+)\.").match, tensors) if m}
    if config.depth > len(blocks):                     # checked first: a billion blocks would take hours to build
        raise ValueError(f"vision: {directory / 'config.json'} has {config.depth} blocks, but {source} holds only "
                         f"{len(blocks)}")
    try:
        with torch.device("meta"):                                            # no memory, no random init
            model = VisionEncoder(config)
    except (RuntimeError, TypeError) as e:                                    # torch's, for sizes past int64
        raise ValueError(f"vision: {directory / 'config.json'}: sizes too large to build "
                         f"({str(e).splitlines()[0]})") from None
    model.load_state_dict(_convert(model, tensors, source), assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_vision(path, dinov2_path=None, dtype=torch.float32, device="cpu", image_size=None, feature_layer=-2):
    """A vision encoder from a local Hugging Face folder, in eval mode.

    path: a SigLIP folder (`google/siglip-*` SiglipModel, text tower ignored, or a SiglipVisionModel) or a DINOv2 one
    (`facebook/dinov2-*`), each with config.json and model.safetensors (or pytorch_model.bin); preprocessor_config.json,
    when present, gives the normalisation and default input size. dinov2_path: a DINOv2 folder to fuse in front of
    `path`'s tower (a `FusedVisionEncoder`, at `path`'s input size unless image_size is given). image_size: the input
    side in pixels (the position embeddings are resampled when the checkpoint's differ). feature_layer: see
    VisionConfig. Raises ValueError naming the file and every missing, unexpected or mis-shaped tensor."""
    tower = _load_tower(path, image_size, feature_layer, dtype, device)
    if dinov2_path is None:
        return tower
    dino = _load_tower(dinov2_path, image_size or tower.image_size, feature_layer, dtype, device)
    if dino.config.arch != "dinov2":
        raise ValueError(f"vision: dinov2_path {dinov2_path} holds a {dino.config.arch} model, not DINOv2")
    return FusedVisionEncoder([dino, tower])


# ----------------------------------------------------------------------------------------------------------------------
# 3. Images in, pixel tensors out


def load_image(image):
    """An image file's path (or a PIL image) -> an RGB PIL image, EXIF orientation applied.

    Any mode: transparency (RGBA, LA, P with a transparent colour) is composited onto white as HF's processors do;
    16-bit grey (I;16, PNG/TIFF; also 32-bit I) is scaled 65535 -> 255 where Pillow's own convert would clip it.
    A file that cannot be read raises ValueError naming it."""
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or f"<PIL image {image.mode} {image.size}>"
    else:
        name = str(image)
    try:
        if isinstance(image, Image.Image):
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        else:
            with Image.open(image) as file:
                rgb = _to_rgb(ImageOps.exif_transpose(file))
    except Exception as e:                      # truncated, not an image, unknown mode, decompression bomb, missing
        raise ValueError(f"vision: cannot read image {name}: {type(e).__name__}: {e}") from e
    if min(rgb.size) == 0:
        raise ValueError(f"vision: image {name} has no pixels (width x height = {rgb.size})")
    return rgb


def _to_rgb(image):
    if image.mode.startswith("I"):
        grey = np.asarray(image, dtype=np.float64) / 257                     # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, image_size, resize="letterbox", fill=(0.5, 0.5, 0.5)):
    """An image (path or PIL image) -> (3, image_size, image_size) float32 RGB in [0, 1], for `VisionEncoder`.

    resize="letterbox": scale the long side to image_size keeping the aspect ratio and pad the short side evenly with
    `fill` (RGB in [0, 1]; pass the encoder's `image_mean` so the padding normalises to 0), as LLaVA's and Prismatic's
    letterbox. They pad to a square first and resize after; resizing first gives the same picture up to the edge
    pixels of the band and never builds a huge canvas for a panorama. resize="resize": stretch to the square
    (HF's SiglipImageProcessor, Prismatic's "resize-naive"). Bicubic resampling throughout, as those do."""
    if resize not in ("letterbox", "resize"):
        raise ValueError(f"vision: resize must be 'letterbox' or 'resize', got {resize!r}")
    image = load_image(image)
    if resize == "resize":
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    else:
        scale = image_size / max(image.size)
        w, h = (max(1, round(side * scale)) for side in image.size)        # at least a 1-pixel band
        canvas = Image.new("RGB", (image_size, image_size), tuple(int(c * 255) for c in fill))  # 8-bit, as LLaVA's
        canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((image_size - w) // 2, (image_size - h) // 2))
        image = canvas
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255)        # (height, width, 3)
    return rearrange(pixels, "h w c -> c h w")


def preprocess_batch(images, image_size, resize="letterbox", fill=(0.5, 0.5, 0.5)):
    """A list of paths or PIL images -> (batch, 3, image_size, image_size); see `preprocess`."""
    return torch.stack([preprocess(image, image_size, resize, fill) for image in images])
