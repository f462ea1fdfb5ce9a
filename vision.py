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
`vit_large_patch14_reg4_dinov2.lvd142m` and `vit_so400m_patch14_siglip_384`, both created at 384 px;
checkpoints.py's `load_vision` reads those timm folders as well as Hugging Face ones into a `VisionEncoder`.

Input convention: `pixel_values` are RGB in [0, 1], (batch, 3, height, width), from `preprocess_for` (or
`preprocess`). Each tower normalises with its own checkpoint's mean/std as its first step, so towers fed the same
picture share one tensor; where the released preprocessing gives each tower its own picture (letterboxed with the
tower's mean colour), a fused encoder takes (batch, 3 * towers, height, width). Features come from
`hidden_states[feature_layer]`, before the post layernorm, prefix tokens (CLS, registers) dropped: -2, the
second-to-last block's output, as LLaVA and Prismatic take.

1. The transformer  `VisionEncoder` (one tower), `FusedVisionEncoder` (towers side by side)
2. Images           `load_image`, `preprocess` (the resize strategies), `preprocess_for` / `ImageTransform` (each
                    tower's own picture)

    encoder = checkpoints.load_vision("vit_so400m_patch14_siglip_384",
                                      dinov2_path="vit_large_patch14_reg4_dinov2.lvd142m", image_size=384,
                                      dtype=torch.bfloat16, device="cuda")
    pixels = preprocess_batch_for(encoder, ["cat.jpg", "dog.png"], "resize-naive").cuda()
    features = encoder(pixels)               # (batch, num_patches, out_dim), patches in row-major grid_size order
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from einops import rearrange
from PIL import Image, ImageOps

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

    Built from a config it has fresh random weights (for training from scratch); checkpoints.load_vision fills it
    with a checkpoint's. `grid_size`, `num_patches` and `out_dim` describe the features at `config.image_size`."""

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
# 2. Images in, pixel tensors out


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
