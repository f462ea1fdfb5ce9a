"""The vision encoder: a ViT that turns an image into a grid of patch features for the connector.

ML-Mamba (Huang & Hu 2024, arXiv 2407.19832, §3.1) encodes the image with pretrained ViTs and hands their patch
features to the connector, which scans the 2D grid. Two towers are supported, built from the same pieces:

- SigLIP (Zhai et al. 2023, arXiv 2303.15343): patch embedding + learned position embeddings, pre-norm blocks, a post
  layernorm. HF `google/siglip-*` runs its MLP with GELU-tanh, timm `vit_so400m_patch14_siglip_384` with exact GELU.
- DINOv2 (Oquab et al. 2023, arXiv 2304.07193): the same with a CLS token in front, layer scale on each residual
  branch and an exact GELU; with registers (Darcet et al. 2023, arXiv 2309.16588), 4 more learned tokens after the CLS
  token, which carry no position embedding. HF `facebook/dinov2-*`, `facebook/dinov2-with-registers-*`, timm
  `vit_*_patch14[_reg4]_dinov2`.

`FusedVisionEncoder` runs both on the image and concatenates their patch features channel-wise, as Prismatic's
"dinosiglip" backbone (Karamcheti et al. 2024, arXiv 2402.07865) that ML-Mamba inherits through Cobra. The released
ML-Mamba (github.com/WenjunHuang94/ML-Mamba, mlmamba/models/backbones/vision/dinosiglip_vit.py) fuses timm's
`vit_large_patch14_reg4_dinov2.lvd142m` and `vit_so400m_patch14_siglip_384`, both created at 384 px; `load_vision`
reads those timm folders as well as Hugging Face ones.

Input convention: `pixel_values` are RGB in [0, 1], (batch, 3, height, width), from `preprocess_for` (or
`preprocess`). Each tower normalises with its own checkpoint's mean/std as its first step, so towers fed the same
picture share one tensor; where the released preprocessing gives each tower its own picture (letterboxed with the
tower's mean colour), a fused encoder takes (batch, 3 * towers, height, width). Features come from
`hidden_states[feature_layer]`, before the post layernorm, prefix tokens (CLS, registers) dropped: -2, the
second-to-last block's output, as LLaVA and Prismatic take.

    encoder = load_vision("vit_so400m_patch14_siglip_384", dinov2_path="vit_large_patch14_reg4_dinov2.lvd142m",
                          image_size=384, dtype=torch.bfloat16, device="cuda")
    pixels = preprocess_batch_for(encoder, ["cat.jpg", "dog.png"], "resize-naive").cuda()
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from einops import rearrange
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)    # DINOv2's normalisation


@dataclass
class VisionConfig:
    """One ViT tower. The defaults are SigLIP-B/16 at 224 px (google/siglip-base-patch16-224)."""
    arch: str = "siglip"                  # "siglip", or "dinov2": CLS token and layer scale
    image_size: int = 224                 # side of the square input image; fixes the patch grid the connector sees
    patch_size: int = 16
    width: int = 768                      # d_model
    depth: int = 12                       # number of transformer blocks
    heads: int = 12
    mlp_dim: int = 3072
    norm_eps: float = 1e-6
    registers: int = 0                    # register tokens after the CLS token (DINOv2 with registers: 4)
    gelu: str | None = None               # the MLP's GELU: "tanh" (approximation) or "none" (exact erf), as the
                                          # checkpoint has it. None: as HF's checkpoints of arch (SigLIP "tanh", DINOv2
                                          # "none"), so configs saved before this field load unchanged
    pos_grid: int | None = None           # side of the stored position-embedding grid; None: image_size // patch_size.
                                          # Other grids are reached by bicubic resampling (DINOv2 stores 37 x 37).
    pos_antialias: bool = False           # resample the position embeddings with antialiasing, as timm and HF's
                                          # DINOv2-with-registers do (HF's SigLIP and DINOv2 do not)
    feature_layer: int | None = -2        # features = hidden_states[feature_layer]: 0 the embeddings, i block i's
                                          # output, negative from the end; None: the last block after the post layernorm
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)     # the checkpoint's normalisation of [0, 1] RGB
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0                 # the checkpoint's eval crop (timm's pretrained_cfg): "resize-crop" resizes
                                          # the short side to image_size / crop_pct and keeps the centre

    def __post_init__(self):
        if self.arch not in ("siglip", "dinov2"):
            raise ValueError(f"vision: arch must be 'siglip' or 'dinov2', got {self.arch!r}")
        if self.gelu is None:
            self.gelu = "tanh" if self.arch == "siglip" else "none"
        if self.gelu not in ("tanh", "none"):
            raise ValueError(f"vision: gelu must be 'tanh' or 'none', got {self.gelu!r}")
        integer = lambda v, least: isinstance(v, int) and not isinstance(v, bool) and v >= least
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        sizes = {name: getattr(self, name)
                 for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "pos_grid")}
        wrong = [f"{name}={v!r}" for name, v in sizes.items()
                 if not (integer(v, 1) or name == "pos_grid" and v is None)]
        wrong += [] if integer(self.registers, 0) else [f"registers={self.registers!r}"]
        if wrong:
            raise ValueError(f"vision: sizes must be positive integers (registers may be 0), got {', '.join(wrong)}")
        if self.feature_layer is not None and (not isinstance(self.feature_layer, int)
                                               or isinstance(self.feature_layer, bool)):
            raise ValueError(f"vision: feature_layer must be an integer or None, got {self.feature_layer!r}")
        if not isinstance(self.pos_antialias, bool):
            raise ValueError(f"vision: pos_antialias must be True or False, got {self.pos_antialias!r}")
        if not (number(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ValueError(f"vision: norm_eps must be a number between 0 and 1, got {self.norm_eps!r}")
        if not (number(self.crop_pct) and 0 < self.crop_pct <= 1):
            raise ValueError(f"vision: crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
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


def resample_pos_embed(pos_embed, grid_size, antialias=False):
    """Position embeddings of a square grid, bicubically resampled to grid_size = (h, w): how a ViT runs at a
    resolution it was not trained at. To an output size, as HF's `interpolate_pos_encoding` (SigLIP, DINOv2: no
    antialias; DINOv2-with-registers: antialias) and timm's `resample_abs_pos_embed` (timm/layers/pos_embed.py:
    antialias); the original DINOv2 code's scale-factor variant differs slightly. Computed in float32: bicubic in half
    precision shifts the embeddings.

    pos_embed (side * side, width) -> (h * w, width); returned unchanged when the grid already matches. ValueError
    when pos_embed's rows are no square grid."""
    side = math.isqrt(pos_embed.shape[0])
    if side == 0 or side * side != pos_embed.shape[0]:
        raise ValueError(f"vision: {pos_embed.shape[0]} position embeddings are no square grid")
    if (side, side) == tuple(grid_size):
        return pos_embed
    grid = rearrange(pos_embed.float(), "(h w) c -> 1 c h w", h=side)
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bicubic", align_corners=False, antialias=antialias)
    return rearrange(grid, "1 c h w -> (h w) c").to(pos_embed.dtype)


# Every SDPA backend but cuDNN's. Its backward returns NaN in dQ when a sequence is 64 past a multiple of 128 (a 64 px
# image in 8 px patches) and a head's logits are all below about -88.7, so that exp overflows in its padded key tile:
# issue 18's NaN at step 880, found with torch.autograd.detect_anomaly (ScaledDotProductCudnnAttentionBackward0) and
# gone with any other backend on the same weights and batch. Reported upstream as pytorch/pytorch#196678.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), through torch's SDPA so a GPU takes the flash kernel."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)       # the checkpoints' q, k, v projections, stacked
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x):                                            # (batch, seqlen, width)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        with sdpa_kernel(SDPA_BACKENDS):
            y = F.scaled_dot_product_attention(q, k, v)              # softmax(q kᵀ / √head_dim) v
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)
        self.gelu = config.gelu

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
        # DINOv2's CLS and register tokens, their own position embeddings (if any) already added: only the sums are used
        self.cls_token = nn.Parameter(torch.empty(c.width)) if c.arch == "dinov2" else None
        self.reg_token = nn.Parameter(torch.empty(c.registers, c.width)) if c.registers else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)           # the post layernorm
        self.reset_parameters()

    def reset_parameters(self):
        """Random weights as for training from scratch: truncated normal(0.02) matrices and embeddings, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for embedding in (self.pos_embed, self.cls_token, self.reg_token):
            if embedding is not None:
                nn.init.trunc_normal_(embedding, std=0.02)

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
    def num_prefix_tokens(self):
        """Tokens in front of the patches: the CLS token, then the registers."""
        return (self.cls_token is not None) + self.config.registers

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
        """Patch embeddings plus position embeddings, the prefix tokens in front: (batch, prefix + h * w, width)."""
        x = self.patch_embed(self.normalize(pixel_values).to(self.patch_embed.weight.dtype))  # (batch, width, h, w)
        pos_embed = resample_pos_embed(self.pos_embed, x.shape[-2:], self.config.pos_antialias)
        x = rearrange(x, "b c h w -> b (h w) c") + pos_embed
        prefix = [token.view(-1, x.shape[-1]).expand(x.shape[0], -1, -1)     # (batch, 1 or registers, width)
                  for token in (self.cls_token, self.reg_token) if token is not None]
        return torch.cat([*prefix, x], dim=1)                                  # [CLS, registers, patches]

    def forward(self, pixel_values, return_hidden_states=False):
        """pixel_values (batch, 3, height, width), RGB in [0, 1]. Other sizes than `image_size` work: the position
        embeddings are resampled to the new grid (and a remainder of fewer than patch_size pixels is cut off).

        Returns the patch features (batch, num_patches, width) of `config.feature_layer`, the prefix tokens (CLS,
        registers) dropped: with feature_layer=-2, what Prismatic's `get_intermediate_layers(n={depth - 2})` gives
        (timm: block depth - 2's output, no final norm, prefix tokens removed). With return_hidden_states also every
        layer's output as HF's `output_hidden_states` gives it: a tuple of depth + 1 tensors, the embeddings then each
        block's output, before the post layernorm, prefix tokens included. Without it, the blocks after the feature
        layer are skipped."""
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
        features = features[:, self.num_prefix_tokens:]
        return (features, tuple(hidden_states)) if return_hidden_states else features


class FusedVisionEncoder(nn.Module):
    """Several towers on the image, patch features concatenated channel-wise: DINOv2 then SigLIP is Prismatic's
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
    # the first tower's mean: one colour for `preprocess(fill=...)`; `preprocess_for` pads each tower with its own
    image_mean = property(lambda self: self.towers[0].image_mean)

    def forward(self, pixel_values, return_hidden_states=False):
        """pixel_values RGB in [0, 1], (batch, 3, height, width) for the same picture in every tower, or (batch,
        3 * towers, height, width) for one picture per tower, in tower order (see `preprocess_for`) -> (batch,
        num_patches, out_dim); with return_hidden_states also a tuple holding each tower's hidden states (see
        `VisionEncoder.forward`)."""
        n = len(self.towers)
        if pixel_values.dim() != 4 or pixel_values.shape[1] not in (3, 3 * n):
            raise ValueError(f"vision: pixel_values has shape {tuple(pixel_values.shape)}, expected (batch, 3, height, "
                             f"width) or, one picture per tower, (batch, {3 * n}, height, width)")
        pictures = pixel_values.split(3, dim=1) if pixel_values.shape[1] == 3 * n else [pixel_values] * n
        outputs = [tower(picture, return_hidden_states) for tower, picture in zip(self.towers, pictures)]
        if not return_hidden_states:
            return torch.cat(outputs, dim=-1)
        return torch.cat([f for f, _ in outputs], dim=-1), tuple(h for _, h in outputs)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Loading checkpoints: local folders in Hugging Face's layout or timm's


def _read_json(file):
    """A JSON object from file; ValueError naming the file when it is not one."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:          # not UTF-8 or JSON, nested too deep, a 4300-digit number
        raise ValueError(f"vision: {file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"vision: {file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _square(value, name):
    """A side from an int or a [side, side] pair (timm writes sizes as pairs)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not supported (only a square size)")
    return value


# --- Hugging Face: config.json with model_type, preprocessor_config.json, HF tensor names

# model_type -> kind: which defaults, tensors and position-embedding resampling apply
_HF_KINDS = {"siglip": "siglip", "siglip_vision_model": "siglip", "dinov2": "dinov2",
             "dinov2_with_registers": "dinov2_with_registers"}
# Values HF's SiglipVisionConfig / Dinov2Config / Dinov2WithRegistersConfig take when config.json leaves them out
# (google/siglip-* leave most out)
_HF_DINOV2_DEFAULTS = dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                           use_swiglu_ffn=False)
_HF_DEFAULTS = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "dinov2": _HF_DINOV2_DEFAULTS,
    "dinov2_with_registers": {**_HF_DINOV2_DEFAULTS, "num_register_tokens": 4},
}
_HF_GELU = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}                    # hidden_act -> VisionConfig.gelu
# Checkpoint tensors that a vision tower does not use: SigLIP's text tower, contrastive logit scale/bias and attention
# pooling head; DINOv2's mask token (masked-image pretraining only)
_HF_IGNORED = {"siglip": ("text_model.", "logit_scale", "logit_bias", "head."),
               "dinov2": ("embeddings.mask_token",), "dinov2_with_registers": ("embeddings.mask_token",)}


def _hf_config(directory, raw, image_size, feature_layer):
    """(VisionConfig, kind) from an HF folder's config.json, read into raw, and its preprocessor_config.json (mean,
    std and input size)."""
    file = directory / "config.json"
    model_type = raw.get("model_type")
    kind = _HF_KINDS.get(model_type) if isinstance(model_type, str) else None
    if kind is None:
        raise ValueError(f"vision: {file} has model_type {model_type!r}; supported: 'siglip' (SiglipModel), "
                         f"'siglip_vision_model' (SiglipVisionModel), 'dinov2' (Dinov2Model), 'dinov2_with_registers' "
                         f"(Dinov2WithRegistersModel); or timm's config.json, which names an 'architecture'")
    processor = directory / "preprocessor_config.json"
    p = _read_json(processor) if processor.is_file() else {}
    try:
        config = _hf_vision_config(kind, raw.get("vision_config", {}) if model_type == "siglip" else raw, p,
                                   image_size, feature_layer)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:    # values of the wrong type or size
        files = f"{file} or {processor.name}" if p else file
        raise ValueError(f"vision: {files}: {str(e).removeprefix('vision: ')}") from None
    return config, kind


def _hf_vision_config(kind, fields, p, image_size, feature_layer):
    """VisionConfig from the HF config's fields (`vision_config` of a SiglipModel) and its preprocessor config p."""
    hf = {**_HF_DEFAULTS[kind], **fields}
    arch = "siglip" if kind == "siglip" else "dinov2"
    expected = {"num_channels": 3}
    if arch == "dinov2":
        expected.update(qkv_bias=True, use_swiglu_ffn=False)                 # dinov2-giant's SwiGLU is not supported
    for key, value in expected.items():
        if hf[key] != value:
            raise ValueError(f"{key}={hf[key]!r} is not supported (only {value!r})")
    if hf["hidden_act"] not in _HF_GELU:
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only {' or '.join(_HF_GELU)})")
    width = hf["hidden_size"]
    mlp_dim = hf["intermediate_size"] if arch == "siglip" else int(width * hf["mlp_ratio"])
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if arch == "dinov2" else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    native_size = hf["image_size"]                                           # what the position embeddings cover
    if p:                                                                    # the checkpoint's own input size and stats
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
        size = p.get("crop_size") if p.get("do_center_crop") else p.get("size")
        if isinstance(size, dict) and "height" in size:
            native_size = size["height"]
    # crop_pct stays 1: "resize-crop" as timm's DINOv2 configs and Prismatic's SigLIP transform have it (HF's DINOv2
    # processor's 224-of-256 crop is not followed)
    return VisionConfig(arch=arch, image_size=image_size or native_size, patch_size=hf["patch_size"], width=width,
                        depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"], mlp_dim=mlp_dim,
                        norm_eps=hf["layer_norm_eps"], registers=hf.get("num_register_tokens", 0),
                        gelu=_HF_GELU[hf["hidden_act"]], pos_grid=hf["image_size"] // hf["patch_size"],
                        pos_antialias=kind == "dinov2_with_registers",      # Dinov2WithRegistersEmbeddings does
                        feature_layer=feature_layer, image_mean=tuple(mean), image_std=tuple(std))


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


def _cat(*parts):
    """The checkpoint tensors concatenated (one alone is copied)."""
    return torch.cat(parts)


def _module_names(modules, depth):
    """Our .weight/.bias parameter name -> ([the checkpoint tensors it is made of], how to make it from them)."""
    out = {}
    for ours, theirs in modules.items():
        for i in range(depth) if "{i}" in ours else [None]:
            for kind in ("weight", "bias"):
                parts = [f"{t.format(i=i)}.{kind}" for t in (theirs if isinstance(theirs, list) else [theirs])]
                out[f"{ours.format(i=i)}.{kind}"] = (parts, _cat)
    return out


def _hf_names(config):
    """Our parameter name -> ([the HF checkpoint tensors it is made of], how to make it from them)."""
    if config.arch == "siglip":
        return {**_module_names(_SIGLIP_MODULES, config.depth),
                "pos_embed": (["embeddings.position_embedding.weight"], _cat)}
    out = _module_names(_DINOV2_MODULES, config.depth)
    pos = "embeddings.position_embeddings"                                   # (1, 1 + grid², width), CLS row first
    out["pos_embed"] = ([pos], lambda p: p[0, 1:])
    out["cls_token"] = (["embeddings.cls_token", pos], lambda cls, p: cls[0, 0] + p[0, 0])
    if config.registers:                 # none of their own: Dinov2WithRegistersEmbeddings adds none to the registers
        out["reg_token"] = (["embeddings.register_tokens"], lambda r: r[0])
    for i in range(config.depth):
        for j in (1, 2):
            out[f"blocks.{i}.gamma{j}"] = ([f"encoder.layer.{i}.layer_scale{j}.lambda1"], _cat)
    return out


# --- timm: config.json with "architecture", "model_args", "pretrained_cfg" (timm/models/_hub.py, save_config_for_hf)

# The VisionTransformer arguments that shape a tower, at the constructor's defaults (timm/models/vision_transformer.py,
# VisionTransformer.__init__; its LayerNorm has eps 1e-6, its Mlp int(embed_dim * mlp_ratio) hidden units)
_TIMM_DEFAULTS = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, class_token=True,
                      reg_tokens=0, no_embed_class=False, init_values=None, act_layer=None)
# Each supported architecture's own arguments, from its model function in that file. The released ML-Mamba fuses
# vit_large_patch14_reg4_dinov2 and vit_so400m_patch14_siglip_384.
_DINOV2, _REG4 = dict(patch_size=14, init_values=1e-5), dict(reg_tokens=4, no_embed_class=True)
_SIGLIP_B16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False)
_SIGLIP_SO400M = dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False)
_TIMM_ARCHS = {
    "vit_small_patch14_dinov2": dict(_DINOV2, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_dinov2": dict(_DINOV2, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": dict(_DINOV2, embed_dim=1024, depth=24, num_heads=16),
    "vit_small_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_reg4_dinov2": dict(_DINOV2, **_REG4, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_siglip_224": _SIGLIP_B16,
    "vit_base_patch16_siglip_384": _SIGLIP_B16,
    "vit_so400m_patch14_siglip_224": _SIGLIP_SO400M,
    "vit_so400m_patch14_siglip_384": _SIGLIP_SO400M,
}
# Arguments whose other values change the computation in ways not supported here
_TIMM_REQUIRED = dict(in_chans=3, qkv_bias=True, qk_norm=False, proj_bias=True, pre_norm=False, final_norm=True,
                      pos_embed="learn", dynamic_img_pad=False)
# Arguments of the head, of training, or of run-time resizing (ours always resamples): ignored
_TIMM_IGNORED_ARGS = ("img_size", "num_classes", "global_pool", "fc_norm", "pool_include_prefix", "dynamic_img_size",
                      "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate", "weight_init", "fix_init")
_TIMM_GELU = {None: "none", "gelu": "none", "gelu_tanh": "tanh"}           # act_layer (None: nn.GELU) -> gelu
# Tensors of the pooling head (SigLIP's attention pool "map"), none of the features
_TIMM_IGNORED = ("attn_pool.", "fc_norm.", "head.")


def _timm_config(file, raw, image_size, feature_layer):
    """(VisionConfig, no_embed_class) from timm's config.json, read into raw; ValueError naming the file."""
    try:
        return _timm_vision_config(raw, image_size, feature_layer)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:    # values of the wrong type or size
        raise ValueError(f"vision: {file}: {str(e).removeprefix('vision: ')}") from None


def _timm_vision_config(raw, image_size, feature_layer):
    """timm's own reading of config.json (timm/models/_hub.py, _parse_model_cfg; timm/data/config.py,
    resolve_data_config for the defaults of the preprocessing fields), into a VisionConfig."""
    name = raw["architecture"]                             # "vit_large_patch14_reg4_dinov2.lvd142m": tag after the dot
    base = name.split(".", 1)[0] if isinstance(name, str) else None
    if base not in _TIMM_ARCHS:
        raise ValueError(f"architecture {name!r} is not supported; supported: {', '.join(_TIMM_ARCHS)}")
    model_args = raw.get("model_args", {})
    if not isinstance(model_args, dict):
        raise ValueError(f"model_args must be an object, got {type(model_args).__name__}")
    unknown = sorted(set(model_args) - set(_TIMM_DEFAULTS) - set(_TIMM_REQUIRED) - set(_TIMM_IGNORED_ARGS))
    if unknown:
        raise ValueError(f"model_args {unknown} are not supported")
    args = {**_TIMM_DEFAULTS, **_TIMM_REQUIRED, **_TIMM_ARCHS[base], **model_args}
    for key, value in _TIMM_REQUIRED.items():
        if args[key] != value:
            raise ValueError(f"{key}={args[key]!r} is not supported (only {value!r})")
    if args["act_layer"] not in _TIMM_GELU:
        raise ValueError(f"act_layer={args['act_layer']!r} is not supported (only 'gelu' or 'gelu_tanh')")
    if args["class_token"] != (args["init_values"] is not None):              # our arch ties the two together
        raise ValueError(f"class_token={args['class_token']!r} with init_values={args['init_values']!r} is not "
                         f"supported (DINOv2: a class token and layer scale; SigLIP: neither)")
    cfg = raw.get("pretrained_cfg", raw)                   # older exports keep its fields at the top level
    if not isinstance(cfg, dict):
        raise ValueError(f"pretrained_cfg must be an object, got {type(cfg).__name__}")
    for key, value in (("interpolation", "bicubic"), ("crop_mode", "center")):   # what `preprocess` does
        if cfg.get(key, value) != value:
            raise ValueError(f"pretrained_cfg {key}={cfg[key]!r} is not supported (only {value!r})")
    # the input size: model_args' img_size, else pretrained_cfg's (timm/_builder.py, _update_default_model_kwargs)
    native_size = _square(model_args.get("img_size") or list(cfg.get("input_size", (3, 224, 224)))[1:], "img_size")
    patch_size, width = _square(args["patch_size"], "patch_size"), args["embed_dim"]
    image_size = image_size or native_size
    config = VisionConfig(arch="dinov2" if args["class_token"] else "siglip", image_size=image_size,
                          patch_size=patch_size, width=width, depth=args["depth"], heads=args["num_heads"],
                          mlp_dim=int(width * args["mlp_ratio"]), norm_eps=1e-6, registers=args["reg_tokens"],
                          gelu=_TIMM_GELU[args["act_layer"]],
                          pos_grid=image_size // patch_size,               # resampled on loading, as timm does
                          pos_antialias=True,                              # as timm's dynamic_img_size resampling
                          feature_layer=feature_layer, image_mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                          image_std=tuple(cfg.get("std", IMAGENET_STD)), crop_pct=cfg.get("crop_pct") or 0.875)
    return config, args["no_embed_class"]


def _timm_names(config, no_embed_class):
    """Our parameter name -> ([the timm checkpoint tensors it is made of], how to make it from them).

    The stored position embeddings are resampled to config.image_size's grid as timm's `checkpoint_filter_fn`
    (timm/models/vision_transformer.py) does when a model is created with another img_size, as the released ML-Mamba
    creates both towers at 384 px: `resample_abs_pos_embed`, bicubic, antialiased, in float32. Their rows for the
    prefix tokens (none under no_embed_class, as in the reg4 DINOv2s) are added to those tokens here."""
    names = {f"{p}.{kind}": ([f"{p}.{kind}"], _cat) for kind in ("weight", "bias")
             for p in ["norm", *(f"blocks.{i}.{m}" for i in range(config.depth)
                                 for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"))]}
    names.update({f"patch_embed.{kind}": ([f"patch_embed.proj.{kind}"], _cat) for kind in ("weight", "bias")})
    n_cls, n_reg = int(config.arch == "dinov2"), config.registers
    stored_prefix = 0 if no_embed_class else n_cls + n_reg                   # rows in front of the patches' rows
    grid = (config.image_size // config.patch_size,) * 2
    names["pos_embed"] = (["pos_embed"], lambda p: resample_pos_embed(p[0, stored_prefix:], grid, antialias=True))
    prefix_pos = lambda p: p[0, :stored_prefix] if stored_prefix else p.new_zeros(n_cls + n_reg, p.shape[-1])
    if n_cls:
        names["cls_token"] = (["cls_token", "pos_embed"], lambda cls, p: cls[0, 0] + prefix_pos(p)[0])
    if n_reg:
        names["reg_token"] = (["reg_token", "pos_embed"], lambda reg, p: reg[0] + prefix_pos(p)[n_cls:])
    if config.arch == "dinov2":
        for i in range(config.depth):
            for j in (1, 2):
                names[f"blocks.{i}.gamma{j}"] = ([f"blocks.{i}.ls{j}.gamma"], _cat)
    return names


# --- Both layouts


def _read_tensors(directory, ignored):
    """The checkpoint's tensors by name (a SiglipModel's "vision_model." prefix removed), those starting with an
    `ignored` prefix skipped unread. Reads model.safetensors, its shards (model.safetensors.index.json) or, failing
    those, pytorch_model.bin (tensors only: weights_only)."""
    def vision_names(names):
        """(name in the file, name without the prefix) for the names a vision tower uses."""
        stripped = ((name, name.removeprefix("vision_model.")) for name in names)
        return [(name, short) for name, short in stripped if not short.startswith(ignored)]

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


def _convert(model, tensors, source, names):
    """Our state dict from the checkpoint's tensors, names from `_hf_names` or `_timm_names`; ValueError listing every
    missing, unexpected, mis-shaped or non-floating-point one (any floating dtype is converted on loading)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state, used, missing, wrong, not_float = {}, set(), [], [], []
    for ours, (theirs, make) in names.items():
        used.update(theirs)
        absent = [name for name in theirs if name not in tensors]
        if absent:
            missing += [name for name in absent if name not in missing]     # pos_embed serves several of ours
            continue
        parts = [tensors[name] for name in theirs]
        try:
            tensor, why = make(*parts), ""
        except (RuntimeError, IndexError, ValueError) as e:                  # parts that do not fit together
            tensor, why = None, f" ({str(e).splitlines()[0].removeprefix('vision: ')})"
        if tensor is None or tuple(tensor.shape) != expected[ours]:
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(theirs, parts))
            wrong.append(f"{shapes} for {ours} {expected[ours]}{why}")
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
                         f"{c.depth}, heads {c.heads}, mlp {c.mlp_dim}, patch {c.patch_size}, {c.registers} registers, "
                         f"position grid {c.pos_grid}x{c.pos_grid}):\n" + "\n".join(problems))
    return state


def _load_tower(path, image_size, feature_layer, dtype, device):
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"vision: {directory} is not a directory; expected a local Hugging Face or timm model "
                                f"folder")
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"vision: {file} not found; expected a Hugging Face or timm model folder (config.json "
                                f"and model.safetensors) of a SigLIP or DINOv2 model")
    raw = _read_json(file)
    timm_layout = "architecture" in raw                         # Hugging Face's names a "model_type" instead
    if timm_layout:
        config, no_embed_class = _timm_config(file, raw, image_size, feature_layer)
        ignored = _TIMM_IGNORED
    else:
        config, kind = _hf_config(directory, raw, image_size, feature_layer)
        ignored = _HF_IGNORED[kind]
    tensors, source = _read_tensors(directory, ignored)
    blocks = {m.group(1) for m in map(re.compile(r"(?:encoder\.layers?|blocks)\.(\d+)\.").match, tensors) if m}
    if config.depth > len(blocks):                     # checked first: a billion blocks would take hours to build
        raise ValueError(f"vision: {directory / 'config.json'} has {config.depth} blocks, but {source} holds only "
                         f"{len(blocks)}")
    try:
        with torch.device("meta"):                                            # no memory, no random init
            model = VisionEncoder(config)
    except (RuntimeError, TypeError) as e:                                    # torch's, for sizes past int64
        raise ValueError(f"vision: {directory / 'config.json'}: sizes too large to build "
                         f"({str(e).splitlines()[0]})") from None
    names = _timm_names(config, no_embed_class) if timm_layout else _hf_names(config)
    model.load_state_dict(_convert(model, tensors, source, names), assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_vision(path, dinov2_path=None, dtype=torch.float32, device="cpu", image_size=None, feature_layer=-2):
    """A vision encoder from a local folder in Hugging Face's or timm's layout, in eval mode.

    path: a folder with config.json and model.safetensors (or its shards, or pytorch_model.bin) of
    - Hugging Face: SigLIP (`google/siglip-*` SiglipModel, text tower ignored, or a SiglipVisionModel), DINOv2
      (`facebook/dinov2-*`) or DINOv2 with registers (`facebook/dinov2-with-registers-*`); preprocessor_config.json,
      when present, gives the normalisation and default input size;
    - timm (the hub's `timm/<architecture>.<tag>` folders, or `timm.models.save_for_hf`'s): an architecture of
      `_TIMM_ARCHS`, such as the released ML-Mamba's `vit_large_patch14_reg4_dinov2.lvd142m` and
      `vit_so400m_patch14_siglip_384`, sizes updated by config.json's "model_args", normalisation, input size and crop
      from its "pretrained_cfg".
    dinov2_path: a DINOv2 folder to fuse in front of `path`'s tower (a `FusedVisionEncoder`, at `path`'s input size
    unless image_size is given), as Prismatic's dinosiglip backbone. image_size: the input side in pixels; where the
    checkpoint's position embeddings cover another grid, a timm checkpoint's are resampled on loading as timm does, a
    Hugging Face one's on every forward as transformers does. feature_layer: see VisionConfig. Raises ValueError
    naming the file and every missing, unexpected or mis-shaped tensor."""
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


# The released image_resize_strategy names (Prismatic's base_vision.py, TimmViTBackbone; ML-Mamba's registry.py
# ships "resize-naive", its "Naive Resize")
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def preprocess(image, image_size, resize="letterbox", fill=(0.5, 0.5, 0.5), crop_pct=1.0):
    """An image (path or PIL image) -> (3, image_size, image_size) float32 RGB in [0, 1], for `VisionEncoder`.

    resize, as Prismatic builds it (base_vision.py, TimmViTBackbone; dinosiglip_vit.py, DinoSigLIPViTBackbone) from
    timm's eval transform (timm/data/transforms_factory.py, transforms_imagenet_eval) and torchvision's Resize and
    CenterCrop on PIL images:
    - "resize-naive": stretch to the square.
    - "resize-crop": resize the short side to floor(image_size / crop_pct), the long side in proportion (truncated),
      and keep the centre image_size square.
    - "letterbox": pad to a square with `fill` (RGB in [0, 1], taken as int(255 * c); pass the tower's image_mean so
      the padding normalises to 0) by (long - short) // 2 pixels on each side, one short of square when that is odd
      (Prismatic's LetterboxPad), then "resize-crop". A panorama builds its whole square canvas, as the released code.
    Bicubic resampling throughout, as the released towers' configs."""
    if resize not in RESIZE_STRATEGIES:
        raise ValueError(f"vision: resize must be one of {', '.join(RESIZE_STRATEGIES)}, got {resize!r}")
    if not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise ValueError(f"vision: crop_pct must be a number in (0, 1], got {crop_pct!r}")
    image = load_image(image)
    if resize == "resize-naive":
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    else:
        if resize == "letterbox":
            image = _letterbox_pad(image, tuple(int(c * 255) for c in fill))
        image = _resize_crop(image, image_size, crop_pct)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255)        # (height, width, 3)
    return rearrange(pixels, "h w c -> c h w")


def _letterbox_pad(image, fill):
    """Pad the short side by (long - short) // 2 pixels of colour fill (8-bit RGB) on each side: Prismatic's
    LetterboxPad (base_vision.py) through torchvision's pad."""
    (w, h), side = image.size, max(image.size)
    dx, dy = (side - w) // 2, (side - h) // 2
    return ImageOps.expand(image, border=(dx, dy, dx, dy), fill=fill)


def _resize_crop(image, size, crop_pct):
    """timm's centre-crop eval transform: torchvision's Resize(floor(size / crop_pct)) on the short side (the long side
    scaled and truncated, functional._compute_resized_output_size), then CenterCrop(size) (the corner rounded half to
    even, functional.center_crop)."""
    scale = math.floor(size / crop_pct)
    (w, h) = image.size
    new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return image.crop((left, top, left + size, top + size))


def preprocess_batch(images, image_size, resize="letterbox", fill=(0.5, 0.5, 0.5), crop_pct=1.0):
    """A list of paths or PIL images -> (batch, 3, image_size, image_size); see `preprocess`."""
    return torch.stack([preprocess(image, image_size, resize, fill, crop_pct) for image in images])


def preprocess_for(encoder, image, strategy):
    """An image (path or PIL image) -> the pixel tensor `encoder` takes, preprocessed by one of RESIZE_STRATEGIES as
    the released code prepares each tower's input (Prismatic's dinosiglip_vit.py, DinoSigLIPViTBackbone):

    - "letterbox" pads each tower's copy with that tower's own mean colour;
    - "resize-crop" and "letterbox" crop with the tower's crop_pct, except SigLIP's, which stays 1: Prismatic's "Fix"
      (SigLIP's timm transform would resize past image_size and crop).

    Returns (3, image_size, image_size) when every tower gets the same picture (always for "resize-naive"), else
    (3 * towers, image_size, image_size), one picture per tower in encoder.towers' order, which
    `FusedVisionEncoder.forward` splits. RGB in [0, 1]: each tower normalises its own. `ImageTransform` is the same
    for DataLoader workers."""
    return ImageTransform(encoder, strategy)(image)


def _tower_preprocessing(tower, strategy):
    """preprocess's fill and crop_pct for one tower under strategy (only those the strategy uses)."""
    if strategy == "resize-naive":
        return {}
    crop_pct = 1.0 if tower.config.arch == "siglip" else tower.config.crop_pct
    return {"crop_pct": crop_pct} if strategy == "resize-crop" else {"crop_pct": crop_pct, "fill": tower.image_mean}


class ImageTransform:
    """`preprocess_for(encoder, image, strategy)` as a small picklable callable that holds only the towers' settings,
    not their weights, for DataLoader workers: `ImageTransform(model.vision, "resize-naive")(image)`."""

    def __init__(self, encoder, strategy):
        if strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"vision: strategy must be one of {', '.join(RESIZE_STRATEGIES)}, got {strategy!r}")
        towers = encoder.towers if isinstance(encoder, FusedVisionEncoder) else [encoder]
        self.image_size, self.strategy = encoder.image_size, strategy
        self.settings = [_tower_preprocessing(tower, strategy) for tower in towers]

    def __call__(self, image):
        image = load_image(image)
        if all(s == self.settings[0] for s in self.settings):
            return preprocess(image, self.image_size, self.strategy, **self.settings[0])
        return torch.cat([preprocess(image, self.image_size, self.strategy, **s) for s in self.settings])


def preprocess_batch_for(encoder, images, strategy):
    """A list of paths or PIL images -> (batch, channels, image_size, image_size); see `preprocess_for`."""
    return torch.stack([preprocess_for(encoder, image, strategy) for image in images])
