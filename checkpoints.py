"""Checkpoints: the public ones read into our model, and our own written and read back. The model itself is in
mlmamba.py and vision.py; this file only fills it, and they do not import it.

1. Files          `_read_json`, `_read_weights` (safetensors, its shards, torch .bin), `_check_state_dict`
2. Mamba-2 LM     `load_mamba2(path)`: mamba_ssm's layout (state-spaces/mamba2-*) and transformers'
                  Mamba2ForCausalLM, their config.json read by `mamba2_config_from_official_json` / `_from_hf_json`
3. Vision towers  `load_vision(path)`: SigLIP and DINOv2 folders in Hugging Face's layout or timm's
4. ML-Mamba       `from_pretrained` (pretrained LM and towers, a new connector: how training starts),
                  `save_pretrained` / `load_pretrained` (config.json and model.safetensors: what train.py writes)
5. The release    `load_release`: the authors' released ML-Mamba run directory, `connector_state_from_release`

Local paths only: nothing is downloaded. Each loader builds the model empty (on the meta device: no memory, no random
init), checks every tensor of the file against it, and only then fills it: a missing, unexpected or mis-shaped tensor
is a ValueError that lists them all and names the file, and nothing is half-loaded. Pickled .bin files are read with
torch.load(weights_only=True), which refuses anything but tensors.

    lm = checkpoints.load_mamba2("mamba2-2.7b", dtype=torch.bfloat16, device="cuda")
    encoder = checkpoints.load_vision("vit_so400m_patch14_siglip_384",
                                      dinov2_path="vit_large_patch14_reg4_dinov2.lvd142m", image_size=384)
    model = checkpoints.load_pretrained("out/stage2/latest", device="cuda")
"""
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mlmamba import Connector, ConnectorConfig, Mamba2Config, Mamba2LM, MLMamba, MLMambaConfig
from vision import (IMAGENET_MEAN, IMAGENET_STD, RESIZE_STRATEGIES, FusedVisionEncoder, VisionConfig, VisionEncoder,
                    resample_pos_embed)

# ----------------------------------------------------------------------------------------------------------------------
# 1. Files


def _read_json(path, prefix=""):
    """A JSON object from a file; errors name the file, after `prefix` ("vision: " for the towers)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}{path}: no such config file") from None
    except (ValueError, RecursionError) as e:          # not UTF-8 or JSON, nested too deep, a 4300-digit number
        raise ValueError(f"{prefix}{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix}{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_weights(file):
    """{name: tensor} from a safetensors or torch .bin file, or from the shards an index .json lists."""
    if file.name.endswith(".index.json"):
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{file}: no 'weight_map' in the shard index")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weights(file.parent / shard))
        return state
    if not file.is_file():
        raise FileNotFoundError(f"{file}: weights file not found")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt? ({e})") from None
    if file.suffix != ".bin":
        raise ValueError(f"{file}: unknown weights format (expected .safetensors, .bin or an .index.json)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: refused by torch.load(weights_only=True): it holds objects other than tensors, "
                         f"or is corrupt ({str(e).splitlines()[0]})") from None
    except Exception as e:                 # a damaged zip or pickle fails in many ways: OSError, KeyError, ...
        raise ValueError(f"{file}: not a readable torch checkpoint, truncated or corrupt? "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict {{name: tensor}}, got {type(state).__name__}")
    return state


def _check_state_dict(model, state, what):
    """Raises ValueError("what: ...") listing every tensor of `state` that `model` misses, does not have, has in
    another shape, or holds as integers or booleans (any floating dtype is converted on loading)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(expected) & set(state))
    misshaped = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in common
                 if tuple(state[k].shape) != expected[k]]
    not_float = [f"{k} {state[k].dtype}" for k in common if not state[k].is_floating_point()]
    problems = [f"{kind} ({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
                for kind, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped),
                                    ("wrong dtype, not floating point", not_float)) if names]
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# 2. The Mamba-2 language model: mamba_ssm's checkpoints (state-spaces/mamba2-*) and transformers'


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_mamba2(path, dtype=torch.float32, device="cpu"):
    """A Mamba2LM from a local checkpoint: a directory, or a weights file inside one, with config.json beside it.

    Two layouts, told apart by config.json:
    - mamba_ssm's (state-spaces/mamba2-*): d_model, n_layer, ssm_cfg {layer: Mamba2, ...}; keys
      backbone.embedding.weight, backbone.layers.N.{norm, mixer.*}, backbone.norm_f.weight, lm_head.weight;
    - transformers' Mamba2ForCausalLM (model_type "mamba2"): the same keys but backbone.embeddings.weight.
    Weights: model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (read with
    torch.load(weights_only=True), which refuses pickles that hold anything but tensors).
    Every parameter must come from the checkpoint with its shape: anything missing, unexpected or mis-shaped is an
    error that lists it."""
    directory, weights = _find_checkpoint(Path(path))
    config_path = directory / "config.json"
    raw = _read_json(config_path)
    if raw.get("model_type") == "mamba2":
        config = mamba2_config_from_hf_json(config_path)
    elif "d_model" in raw or "ssm_cfg" in raw:
        config = mamba2_config_from_official_json(config_path)
    else:
        raise ValueError(f"{config_path}: neither a mamba_ssm config (d_model, n_layer, ssm_cfg) nor a transformers "
                         f"Mamba2 config (model_type 'mamba2')")
    state = {_our_name(k): v for k, v in _read_weights(weights).items()}
    if config.tie_embeddings:
        _untie(state, weights)
    layers = {k.split(".")[1] for k in state if k.startswith("layers.")}
    if config.n_layer > len(layers):                               # checked first: a billion layers take hours to build
        raise ValueError(f"{config_path}: n_layer={config.n_layer}, but {weights} holds only {len(layers)} layers")
    try:
        with torch.device("meta"):                                 # no memory, no init: every tensor is replaced
            model = Mamba2LM(config)
    except (RuntimeError, TypeError) as e:                         # torch's errors for sizes past what int64 counts
        raise ValueError(f"{config_path}: sizes too large to build ({str(e).splitlines()[0]})") from None
    _check_state_dict(model, state, f"{weights} does not fit the model of {config_path} (names without 'backbone.')")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def _find_checkpoint(path):
    """(directory, weights file) for a checkpoint directory or a weights file."""
    if not path.exists():
        raise FileNotFoundError(f"load_mamba2: {path} does not exist")
    if path.is_file():
        return path.parent, path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path, path / name
    raise FileNotFoundError(f"load_mamba2: no weights in {path} (looked for {', '.join(_WEIGHT_FILES)})")


def _our_name(key):
    """Checkpoint key -> our parameter name: drop 'backbone.'; transformers calls the embedding 'embeddings'."""
    key = key.removeprefix("backbone.")
    return "embedding.weight" if key == "embeddings.weight" else key


def _untie(state, source):
    """Tied checkpoints store the embedding once, or also as lm_head.weight (mamba_ssm's .bin); keep the embedding."""
    head = state.pop("lm_head.weight", None)
    if head is None:
        return
    if "embedding.weight" not in state:
        state["embedding.weight"] = head
    elif not torch.equal(head, state["embedding.weight"]):
        raise ValueError(f"{source}: the config ties the embeddings, but lm_head.weight differs from the embedding")


def mamba2_config_from_official_json(path):
    """From mamba_ssm's config.json (state-spaces/mamba2-*): d_model, n_layer, vocab_size, ssm_cfg {layer: Mamba2}.

    Settings the public checkpoints do not use (MLP or attention layers, LayerNorm, D per channel, dt_limit, ...)
    are refused rather than ignored."""
    raw = _read_json(path)
    _require(raw, ("d_model", "n_layer", "vocab_size"), path)
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise ValueError(f"{path}: ssm_cfg must be an object, got {type(ssm_cfg).__name__}")
    ssm_cfg = dict(ssm_cfg)
    layer = ssm_cfg.pop("layer", "Mamba1")                     # mamba_ssm's default mixer is Mamba-1
    if layer != "Mamba2":
        raise ValueError(f"{path}: ssm_cfg.layer is {layer!r}; only Mamba-2 checkpoints are supported")
    _refuse(path, {"d_intermediate": (raw.get("d_intermediate", 0), 0),
                   "attn_layer_idx": (raw.get("attn_layer_idx") or [], []),
                   "rms_norm": (raw.get("rms_norm", True), True)})
    _refuse(path, {f"ssm_cfg.{k}": (_json_value(ssm_cfg.pop(k, v)), v) for k, v in _OFFICIAL_FIXED.items()})
    sizes = {k: ssm_cfg.pop(k) for k in _OFFICIAL_SIZES if k in ssm_cfg}
    unknown = sorted(set(ssm_cfg) - _OFFICIAL_INIT_ONLY)
    if unknown:
        raise ValueError(f"{path}: unknown ssm_cfg fields {unknown}")
    top = {k: raw[k] for k in ("pad_vocab_size_multiple", "residual_in_fp32", "tie_embeddings") if k in raw}
    return _named(path, Mamba2Config, d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=raw["vocab_size"],
                  **top, **sizes)


def mamba2_config_from_hf_json(path):
    """From a transformers Mamba2Config's config.json (model_type "mamba2"). Its vocab_size is already padded."""
    raw = _read_json(path)
    _require(raw, ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim", "state_size",
                   "n_groups"), path)
    _refuse(path, {"hidden_act": (raw.get("hidden_act", "silu"), "silu"),
                   "time_step_limit": (_json_value(raw.get("time_step_limit", [0.0, math.inf])), [0.0, math.inf])})
    config = _named(path, Mamba2Config, d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"],
                    vocab_size=raw["vocab_size"], pad_vocab_size_multiple=1, d_state=raw["state_size"],
                    d_conv=raw.get("conv_kernel", 4), expand=raw.get("expand", 2), headdim=raw["head_dim"],
                    ngroups=raw["n_groups"], chunk_size=raw.get("chunk_size", 256),
                    bias=raw.get("use_bias", False), conv_bias=raw.get("use_conv_bias", True),
                    norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                    residual_in_fp32=raw.get("residual_in_fp32", True),
                    tie_embeddings=raw.get("tie_word_embeddings", False))
    if raw["num_heads"] != config.nheads:
        raise ValueError(f"{path}: num_heads={raw['num_heads']} but expand*hidden_size/head_dim={config.nheads}")
    return config


# ssm_cfg fields of mamba_ssm's Mamba2: those we read, those only its initialisation uses, and those we hold fixed
_OFFICIAL_SIZES = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias", "conv_bias")
_OFFICIAL_INIT_ONLY = {"dt_min", "dt_max", "dt_init_floor", "A_init_range", "conv_init", "use_mem_eff_path"}
_OFFICIAL_FIXED = {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False, "d_ssm": None,
                   "dt_limit": [0.0, math.inf]}


def _json_value(value):
    """Lists for tuples, and floats for transformers' {"__float__": "Infinity"} (how it writes inf in JSON)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):                # not a number: left as it is, for _refuse to name
            return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _named(path, cls, **fields):
    """cls(**fields), its errors prefixed with the config file they came from."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _require(raw, names, path):
    missing = [k for k in names if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing config fields {missing}")


def _refuse(path, settings):
    """settings: name -> (value, the only value we implement)."""
    bad = [f"{name}={value!r} (only {wanted!r} is supported)" for name, (value, wanted) in settings.items()
           if value != wanted]
    if bad:
        raise ValueError(f"{path}: unsupported settings: {', '.join(bad)}")


# ----------------------------------------------------------------------------------------------------------------------
# 3. The vision towers: local folders in Hugging Face's layout or timm's


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
    p = _read_json(processor, "vision: ") if processor.is_file() else {}
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
        weight_map = _read_json(index, "vision: ").get("weight_map")
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
    raw = _read_json(file, "vision: ")
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
# 4. ML-Mamba: pretrained parts and a new connector; our own checkpoints


def from_pretrained(lm_path, vision_path, connector, dinov2_path=None, dtype=torch.float32, device="cpu",
                    image_resize_strategy="resize-naive"):
    """An MLMamba of pretrained parts and a new connector, as ML-Mamba starts training: the Mamba-2 LM of
    `load_mamba2(lm_path)`, the SigLIP (or any) tower of `load_vision(vision_path, dinov2_path)` (DINOv2 fused in
    front when given), and a randomly initialised connector of ConnectorConfig `connector`. Local paths only."""
    lm = load_mamba2(lm_path, dtype=dtype, device=device)
    vision = load_vision(vision_path, dinov2_path=dinov2_path, dtype=dtype, device=device)
    towers = vision.towers if isinstance(vision, FusedVisionEncoder) else None
    config = MLMambaConfig(vision=[t.config for t in towers] if towers is not None else vision.config,
                           connector=connector, lm=lm.config, image_resize_strategy=image_resize_strategy)
    with torch.device("meta"):
        model = MLMamba(config)                                     # the skeleton: no memory, no init, replaced below
    model.vision, model.lm = vision, lm
    model.connector = Connector(connector, vision.out_dim, lm.config).to(device=device, dtype=dtype)
    return model


def save_pretrained(model, directory):
    """An MLMamba's config.json and model.safetensors in `directory`, which is replaced as a whole (anything else in
    it goes): written to a temporary folder beside it and renamed into place, so it never holds half a checkpoint."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def load_pretrained(directory, dtype=torch.float32, device="cpu"):
    """The MLMamba that `save_pretrained` wrote. Every tensor must be there with its shape: anything missing,
    unexpected or mis-shaped is a ValueError that lists it; a bad config.json one that names it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_pretrained: {directory} is not a directory")
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    raw = _read_json(config_path)
    try:
        config = MLMambaConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    state = _read_weights(weights)
    _check_block_counts(config, state, config_path, weights)         # first: a billion blocks take hours to build
    try:
        with torch.device("meta"):
            model = MLMamba(config)
    except (RuntimeError, TypeError) as e:                           # torch's errors for sizes past int64
        raise ValueError(f"{config_path}: sizes too large to build ({str(e).splitlines()[0]})") from None
    _check_state_dict(model, state, f"{weights} does not fit the model of {config_path}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def _check_block_counts(config, state, config_path, weights):
    """Each stack of blocks the config asks for (LM layers, vision blocks, MSC blocks) is in the weights."""
    towers = config.vision if isinstance(config.vision, list) else [config.vision]
    stacks = {"lm.layers": config.lm.n_layer}
    for i, tower in enumerate(towers):
        stacks[f"vision.towers.{i}.blocks" if isinstance(config.vision, list) else "vision.blocks"] = tower.depth
    if config.connector.kind == "msc":
        stacks["connector.msc.layers"] = config.connector.n_blocks
    for prefix, wanted in stacks.items():
        held = {k[len(prefix) + 1:].split(".")[0] for k in state if k.startswith(prefix + ".")}
        if wanted > len(held):
            raise ValueError(f"{config_path}: {wanted} blocks in {prefix}, but {weights} holds only {len(held)}")


# ----------------------------------------------------------------------------------------------------------------------
# 5. The released ML-Mamba (WenjunHuang94/ML-Mamba): its run directory and checkpoint
#
#   run_dir/config.json                          the run's config; its "model" object names the parts
#   run_dir/checkpoints/latest-checkpoint.pt     torch.save({"model": {"llm_backbone": ..., "mlp": ...,
#                                                "bidirectional_mamba": ..., "projector": ...}})
# as mlmamba/training/strategies/fsdp.py `FSDPStrategy.save_checkpoint` writes it and mlmamba/models/load.py `load`
# reads it. The vision towers are not in it (they stay frozen): the released code takes them from timm's hub.

# Prismatic's vision_backbone_id -> (input side, the towers fused in this order); the released run uses the first
RELEASE_VISION = {"dinosiglip-vit-so-384px": (384, ("dinov2", "siglip")),
                  "dinosiglip-vit-so-224px": (224, ("dinov2", "siglip")),
                  "siglip-vit-so400m-384px": (384, ("siglip",)),
                  "siglip-vit-so400m": (224, ("siglip",))}
RELEASE_PARTS = ("llm_backbone", "mlp", "bidirectional_mamba", "projector")
STATE_SPACES_VOCAB = 50277          # state-spaces/mamba2-*'s config.json: vocab_size, padded to a multiple of 16


def load_release(path, vision_path, dinov2_path=None, dtype=torch.float32, device="cpu"):
    """The authors' released ML-Mamba: a run directory (config.json, checkpoints/latest-checkpoint.pt; see above)
    and the vision towers it names, from local folders (timm's hub layout, as the released code loads them, or
    transformers'): `vision_path` the SigLIP tower, `dinov2_path` the DINOv2 one for a "dinosiglip" run.
    Every missing, unexpected or mis-shaped tensor is listed in a ValueError naming the file."""
    settings, config_path, checkpoint = read_release(path)
    image_size, towers = RELEASE_VISION[settings["vision_backbone_id"]]
    if ("dinov2" in towers) != (dinov2_path is not None):
        need = "needs a DINOv2 tower (dinov2_path) beside" if "dinov2" in towers else "has no DINOv2 tower, only"
        raise ValueError(f"{config_path}: vision_backbone_id {settings['vision_backbone_id']!r} {need} SigLIP")
    release = _read_release_state(checkpoint)
    lm_config = lm_config_from_release(release["llm_backbone"], checkpoint)
    n_blocks = len({k.split(".")[1] for k in release["bidirectional_mamba"] if k.startswith("layers.")})
    if n_blocks == 0:
        raise ValueError(f"{checkpoint}: bidirectional_mamba holds no layers")
    vision = load_vision(vision_path, dinov2_path=dinov2_path, dtype=dtype, device=device, image_size=image_size)
    fused = isinstance(vision, FusedVisionEncoder)
    config = MLMambaConfig(vision=[t.config for t in vision.towers] if fused else vision.config,
                           connector=ConnectorConfig(kind="msc", scan="bidirectional", n_blocks=n_blocks),
                           lm=lm_config, image_resize_strategy=settings["image_resize_strategy"])
    state = release_state_dict(release, checkpoint)
    with torch.device("meta"):
        model = MLMamba(config)
    model.vision = vision
    parts = nn.ModuleDict({"lm": model.lm, "connector": model.connector})
    _check_state_dict(parts, state, f"{checkpoint} does not fit the model its sizes give (our names)")
    parts.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                          assign=True)
    return model


def read_release(path):
    """(the run config's "model" object, its config.json, the checkpoint file) for a released run directory, or for
    a checkpoint .pt inside its checkpoints/ folder. Every field the loader needs is checked here."""
    path = Path(path)
    if path.is_file():
        checkpoint, run_dir = path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        run_dir, checkpoint = path, path / "checkpoints" / "latest-checkpoint.pt"
    config_path = run_dir / "config.json"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ML-Mamba release: no checkpoint {checkpoint}")
    model = _read_json(config_path).get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{config_path}: no \"model\" object (the run config of the released ML-Mamba)")
    _require(model, ("vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy"), config_path)
    wanted = {"vision_backbone_id": RELEASE_VISION, "image_resize_strategy": RESIZE_STRATEGIES}
    for key, known in wanted.items():
        if model[key] not in known:
            raise ValueError(f"{config_path}: {key}={model[key]!r} is not supported (only {', '.join(known)})")
    if not str(model["arch_specifier"]).endswith("fused-gelu-mlp"):       # the released MLMambaVLM's projector
        raise ValueError(f"{config_path}: arch_specifier={model['arch_specifier']!r} is not supported (only the "
                         f"released '...fused-gelu-mlp' projector)")
    return model, config_path, checkpoint


def _read_release_state(checkpoint):
    """{part: {name: tensor}} from the checkpoint, read with weights_only=True and memory-mapped."""
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{checkpoint}: refused by torch.load(weights_only=True): it holds objects other than "
                         f"tensors, or is corrupt ({str(e).splitlines()[0]})") from None
    except Exception as e:                                     # a damaged zip or pickle fails in many ways
        raise ValueError(f"{checkpoint}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{checkpoint}: expected {{\"model\": {{part: state dict}}}}, got "
                         f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    missing = [part for part in RELEASE_PARTS if not isinstance(model.get(part), dict)]
    unexpected = sorted(set(model) - set(RELEASE_PARTS))
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: the \"model\" entry must hold {', '.join(RELEASE_PARTS)}; "
                         f"missing {missing}, unexpected {unexpected}")
    for part in RELEASE_PARTS:
        bad = [k for k, v in model[part].items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if bad:
            raise ValueError(f"{checkpoint}: {part} holds entries that are not named tensors: {bad[:5]}")
    return model


def lm_config_from_release(lm_state, checkpoint):
    """The Mamba-2 LM's sizes read off its tensors (the checkpoint has no LM config; the released code builds the LM
    from state-spaces/<llm_backbone_id>'s config.json). One B/C group, as every public Mamba-2 has."""
    try:
        rows, d_model = lm_state["backbone.embedding.weight"].shape
        n_layer = len({k.split(".")[2] for k in lm_state if k.startswith("backbone.layers.")})
        d_inner = lm_state["backbone.layers.0.mixer.out_proj.weight"].shape[1]
        nheads = lm_state["backbone.layers.0.mixer.A_log"].shape[0]
        conv_dim, _, d_conv = lm_state["backbone.layers.0.mixer.conv1d.weight"].shape
    except (KeyError, ValueError) as e:
        raise ValueError(f"{checkpoint}: llm_backbone lacks a tensor the LM's sizes are read from ({e})") from None
    state_spaces = rows == -(-STATE_SPACES_VOCAB // 16) * 16
    vocab, multiple = (STATE_SPACES_VOCAB, 16) if state_spaces else (rows, 1)
    try:
        return Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=vocab, pad_vocab_size_multiple=multiple,
                            d_state=(conv_dim - d_inner) // 2, d_conv=d_conv, expand=d_inner // d_model,
                            headdim=d_inner // nheads)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: llm_backbone's tensors give no Mamba-2 LM: {e}") from None


def release_state_dict(release, checkpoint):
    """The checkpoint's parts -> our MLMamba state dict without the vision towers (`lm.*`, `connector.*`)."""
    state = {"lm." + _our_name(k): v for k, v in release["llm_backbone"].items()}
    head = state.pop("lm.lm_head.weight", None)                 # tied: mamba_ssm saves the embedding twice
    if head is not None and not torch.equal(head, state.get("lm.embedding.weight", head)):
        raise ValueError(f"{checkpoint}: llm_backbone's lm_head.weight differs from its (tied) embedding")
    parts = {f"{part}.{k}": v for part in ("mlp", "bidirectional_mamba", "projector") for k, v in release[part].items()}
    try:
        connector = connector_state_from_release(parts)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from None
    state.update({"connector." + k: v for k, v in connector.items()})
    return state


_DIRECTION_PAIRS = ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D")    # forward, then the released "_b"


def connector_state_from_release(release):
    """The released checkpoint's connector tensors (its `mlp`, `bidirectional_mamba` and `projector` entries, keys
    prefixed by those names) -> our Connector's state dict for kind "msc", scan "bidirectional". A key map: the
    backward direction's conv1d_b, dt_bias_b, A_log_b, D_b are stacked after the forward direction's, and the
    projector loses the inner `.projector` of the released `FusedMLPProjector`. A missing direction is an error."""
    state, missing = {}, []
    for key, value in release.items():
        name = key.replace("bidirectional_mamba.", "msc.", 1).replace("projector.projector.", "projector.", 1)
        pair = next((p for p in _DIRECTION_PAIRS if key.endswith((f"mixer.{p}", f"mixer.{_backward_name(p)}"))), None)
        if pair is None:
            state[name] = value
            continue
        prefix = key[:key.rindex("mixer.") + len("mixer.")]
        forward, backward = prefix + pair, prefix + _backward_name(pair)
        if forward not in release or backward not in release:
            missing.append(backward if key == forward else forward)
        elif key == forward:                                                    # the backward one comes with it
            both = (value, release[backward])
            state[name] = torch.cat(both) if pair.startswith("conv1d") else torch.stack(both)
    if missing:
        raise ValueError(f"the released connector lacks one direction of {len(missing)} tensors: {', '.join(missing)}")
    return state


def _backward_name(name):
    """The released name of the backward direction's copy: conv1d.weight -> conv1d_b.weight, dt_bias -> dt_bias_b."""
    return name.replace("conv1d.", "conv1d_b.") if name.startswith("conv1d") else name + "_b"
