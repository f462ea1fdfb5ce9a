"""ML-Mamba (Huang & Hu 2024, arXiv 2407.19832): a multimodal LLM on a pretrained Mamba-2 language model.

An image goes through a ViT (vision.py), its patch grid through the connector, and the resulting tokens into a
Mamba-2 language model (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060) in front of the text. The LM is
mamba_ssm's `MambaLMHeadModel` with `Mamba2` mixers, loadable from its public checkpoints.

1. Config         `Mamba2Config`, read from mamba_ssm's or transformers' config.json
2. Mixer          the Mamba-2 block of SSD paper §7 (Figure 6): in_proj, causal conv, SSD scan, gated RMSNorm, out_proj
3. Language model `Mamba2LM`: embedding, pre-norm residual blocks, final norm, LM head; recurrent cache, step, generate
4. Loading        `load_mamba2(path)`: the state-spaces/mamba2-* layout and transformers' Mamba2ForCausalLM layout
5. Connector      `Connector`: ML-Mamba's Mamba-2 Scan Connector (`Mamba2ScanMixer` in K scan orders, SwiGLU, MLP)
6. ML-Mamba       `MLMamba`: vision + connector + LM; training forward, batched generation, save / load

Shapes: (batch, seqlen, d_model) between blocks (a pair: the block's output and the residual stream); inside a mixer x (batch, seqlen, nheads, headdim) and
B, C (batch, seqlen, ngroups, dstate) as ssd_kernel.py takes them; the patch grid (batch, H, W, channels).
"""
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from mixer_kernel import (causal_conv1d, conv_step, gated_rms_norm, gated_rms_norm_reference, rms_norm,
                          rms_norm_reference)
from scan2d_kernel import cross_merge, cross_merge_reference, cross_scan, cross_scan_reference, resolve_orders
from ssd_kernel import ssd_reference, ssd_scan, ssd_step, ssd_step_reference
from vision import RESIZE_STRATEGIES, Block, FusedVisionEncoder, VisionConfig, VisionEncoder, load_vision


# ----------------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class Mamba2Config:
    """A Mamba-2 LM's sizes. Names and defaults are mamba_ssm's (`MambaConfig` and the `Mamba2` module)."""
    d_model: int
    n_layer: int
    vocab_size: int                     # ids the tokenizer produces; generation samples only these
    pad_vocab_size_multiple: int = 8    # the embedding has vocab_size rounded up to a multiple of this
    d_state: int = 128                  # N, the state size per head and channel
    d_conv: int = 4                     # width of the causal depthwise convolution
    expand: int = 2                     # d_inner = expand * d_model
    headdim: int = 64                   # P; nheads = d_inner / headdim
    ngroups: int = 1                    # heads share B and C in this many groups (SSD §7.2, grouped-value heads)
    chunk_size: int = 256               # the SSD scan's chunk length (§6)
    bias: bool = False                  # biases in in_proj and out_proj
    conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True       # keep the residual stream in float32 whatever the weights' dtype
    tie_embeddings: bool = True         # the LM head reuses the embedding matrix

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand",
                     "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Mamba2Config: {name} must be a positive integer, got {value!r}")
        for name in ("bias", "conv_bias", "residual_in_fp32", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Mamba2Config: {name} must be true or false, got {getattr(self, name)!r}")
        if not _epsilon(self.norm_eps):
            raise ValueError(f"Mamba2Config: norm_eps must be a number between 0 and 1, got {self.norm_eps!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"Mamba2Config: headdim={self.headdim} must divide d_inner=expand*d_model={self.d_inner}")
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Config: ngroups={self.ngroups} must divide nheads={self.nheads}")
        if not 16 <= self.chunk_size <= 4096 or self.chunk_size & (self.chunk_size - 1):   # a sequence is padded to it
            raise ValueError(f"Mamba2Config: chunk_size must be a power of two from 16 to 4096 (ssd_scan), got "
                             f"{self.chunk_size}")

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def nheads(self):
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):
        """The convolved channels: x, B and C side by side."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_official_json(cls, path):
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
        return _named(path, cls, d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=raw["vocab_size"],
                      **top, **sizes)

    @classmethod
    def from_hf_json(cls, path):
        """From a transformers Mamba2Config's config.json (model_type "mamba2"). Its vocab_size is already padded."""
        raw = _read_json(path)
        _require(raw, ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "head_dim", "state_size",
                       "n_groups"), path)
        _refuse(path, {"hidden_act": (raw.get("hidden_act", "silu"), "silu"),
                       "time_step_limit": (_json_value(raw.get("time_step_limit", [0.0, math.inf])), [0.0, math.inf])})
        config = _named(path, cls, d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"],
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


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except (ValueError, RecursionError) as e:          # not UTF-8 or JSON, nested too deep, a 4300-digit number
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _epsilon(value):
    """A number between 0 and 1, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


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
# 2. The Mamba-2 mixer (SSD paper §7.1, Figure 6), as mamba_ssm's `Mamba2` module


def _use_kernels(t):
    """The Triton kernels on a GPU; elsewhere, and for float64 (which they do not take), the PyTorch references: under
    the interpreter the kernels would be correct but slow."""
    return t.is_cuda and t.dtype != torch.float64


def _inference_kernels(t):
    """The forward-only kernels of mixer_kernel.py: on a GPU when autograd is off (generation, evaluation)."""
    return _use_kernels(t) and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 and returned in the weight's dtype (mamba_ssm's fused RMSNorm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """RMSNorm(x); with a residual, (RMSNorm(s), s) for s = x + residual in residual's dtype (the add fused)."""
        norm = rms_norm if _inference_kernels(x) else rms_norm_reference
        return norm(x, self.weight, self.eps, residual)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y ⊙ SiLU(z)) over groups of `group_size` channels: the extra normalisation before out_proj of SSD §7.1,
    as mamba_ssm's RMSNormGated with norm_before_gate=False. One group per B/C group, so that the norm never mixes
    heads of different groups (what tensor parallelism needs, §8)."""

    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        norm = gated_rms_norm if _inference_kernels(y) else gated_rms_norm_reference
        return norm(y, z, self.weight, self.group_size, self.eps)


def init_dt_bias(*shape):
    """mamba_ssm's initialisation of Δ: log-uniform in [1e-3, 0.1], stored as dt_bias = softplus⁻¹(Δ)."""
    dt = torch.exp(math.log(1e-3) + torch.rand(*shape) * (math.log(0.1) - math.log(1e-3))).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def init_A_log(*shape):
    """mamba_ssm's initialisation of A: -A uniform in [1, 16], stored as A_log = log(-A)."""
    return torch.log(torch.empty(*shape).uniform_(1, 16))


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block (SSD §7.1): Δ, B, C and x all come at once from the input, through one projection.

        z, xBC, dt = in_proj(u)             z gate, xBC = [x, B, C] convolved together, dt one per head
        x, B, C    = SiLU(conv1d(xBC))      causal depthwise convolution over time
        y          = SSD(x, Δ, A, B, C) + D x,   Δ = softplus(dt + dt_bias),  A = -exp(A_log)
        out        = out_proj(RMSNorm(y ⊙ SiLU(z)))
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_dim + c.nheads, bias=c.bias)   # [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(c.nheads))
        self.A_log = nn.Parameter(init_A_log(c.nheads))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(self, u, conv_state=None, ssm_state=None):
        """u (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With conv_state and ssm_state (one layer's part of a `Mamba2Cache`) the sequence continues the one they hold,
        and they are updated in place; one token then takes the recurrent `step` instead of the chunked scan."""
        if ssm_state is not None and u.shape[1] == 1:
            return self.step(u[:, 0], conv_state, ssm_state)[:, None]
        c = self.config
        z, xBC, dt = torch.split(self.in_proj(u), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        xBC = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, conv_state)   # (batch, seqlen, conv_dim)
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=c.headdim)                       # (batch, seqlen, nheads, headdim)
        B = rearrange(B, "b l (g n) -> b l g n", g=c.ngroups)                       # (batch, seqlen, ngroups, dstate)
        C = rearrange(C, "b l (g n) -> b l g n", g=c.ngroups)
        A = -torch.exp(self.A_log.float())                                          # (nheads,), A < 0
        scan = ssd_scan if _use_kernels(u) else ssd_reference
        y, final_state = scan(x, dt, A, B, C, chunk_size=c.chunk_size, D=self.D, dt_bias=self.dt_bias,
                              dt_softplus=True, initial_state=ssm_state, return_final_state=True)
        if ssm_state is not None:
            ssm_state.copy_(final_state)
        y = rearrange(y, "b l h p -> b l (h p)")                                    # (batch, seqlen, d_inner)
        return self.out_proj(self.norm(y, z))

    def step(self, u, conv_state, ssm_state):
        """One token: u (batch, d_model) -> (batch, d_model), the states advanced in place (SSD §3's recurrence).

        On a GPU without autograd, one kernel each for the conv, the SSM step and the gated norm, around in_proj and
        out_proj: at batch 1 the launches, not the arithmetic, set the time per token. With autograd, the references,
        which it differentiates."""
        c = self.config
        z, xBC, dt = torch.split(self.in_proj(u), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        if _inference_kernels(u):
            xBC = conv_step(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)   # (batch, conv_dim)
        else:
            xBC = causal_conv1d(xBC[:, None], self.conv1d.weight, self.conv1d.bias, conv_state)[:, 0]
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        x = rearrange(x, "b (h p) -> b h p", p=c.headdim)                           # (batch, nheads, headdim)
        B = rearrange(B, "b (g n) -> b g n", g=c.ngroups)                           # (batch, ngroups, dstate)
        C = rearrange(C, "b (g n) -> b g n", g=c.ngroups)
        step = ssd_step if _inference_kernels(u) else ssd_step_reference
        y = step(ssm_state, x, dt, None, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, A_log=self.A_log)
        return self.out_proj(self.norm(rearrange(y, "b h p -> b (h p)"), z))


# ----------------------------------------------------------------------------------------------------------------------
# 3. The language model


@dataclass
class Mamba2Cache:
    """Everything a Mamba-2 LM needs to continue a sequence: a fixed-size state per layer, whatever the length so far.

    Updated in place by `Mamba2LM.forward(..., cache=)` and `Mamba2LM.step`, so the tensors keep their addresses."""
    conv_state: torch.Tensor    # (n_layer, batch, conv_dim, d_conv), model dtype: each layer's last d_conv conv inputs
    ssm_state: torch.Tensor     # (n_layer, batch, nheads, headdim, dstate), float32: the SSM state h_t (SSD §3)

    def reset(self):
        """Back to the empty sequence."""
        self.conv_state.zero_()
        self.ssm_state.zero_()


class Mamba2Block(nn.Module):
    """Pre-norm residual block as mamba_ssm's `Block`: residual ← hidden + residual, hidden ← Mixer(RMSNorm(residual)).

    It passes (hidden, residual) on rather than their sum, so that the add and the next norm are one step."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config)

    def forward(self, hidden, residual=None, conv_state=None, ssm_state=None):
        """hidden, residual (batch, seqlen, d_model) -> the same two for the next block. The first block takes the
        embeddings as hidden and no residual."""
        if residual is None:
            residual, normed = hidden, self.norm(hidden)
        else:
            normed, residual = self.norm(hidden, residual)
        return self.mixer(normed, conv_state, ssm_state), residual


class Mamba2LM(nn.Module):
    """Embedding, n_layer Mamba-2 blocks, final RMSNorm, LM head (tied to the embedding or not).

    The residual stream stays in float32 with residual_in_fp32 and each norm reads it at full precision, as mamba_ssm's
    fused add+norm does (the public checkpoints set fused_add_norm). Logits cover the padded vocabulary."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Mamba2Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.d_model, config.padded_vocab_size, bias=False))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """mamba_ssm's `_init_weights`: small embeddings, zero biases, out_proj scaled by 1/√n_layer (as GPT-2)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for layer in self.layers:
            mixer = layer.mixer
            mixer.out_proj.weight /= math.sqrt(self.config.n_layer)
            for linear in (mixer.in_proj, mixer.out_proj):
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, input_ids=None, inputs_embeds=None, cache=None):
        """input_ids (batch, seqlen), or inputs_embeds (batch, seqlen, d_model) -> logits (batch, seqlen, padded_vocab).

        With a cache the tokens continue the sequence it holds (an empty one from `allocate_cache` for a prefill), and
        it is updated in place to hold them too."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Mamba2LM.forward: pass exactly one of input_ids and inputs_embeds")
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds   # (batch, seqlen, d_model)
        if h.dim() != 3 or h.shape[-1] != self.config.d_model:
            raise ValueError(f"Mamba2LM.forward: inputs_embeds must be (batch, seqlen, {self.config.d_model}), "
                             f"got {tuple(h.shape)}")
        if cache is not None and cache.ssm_state.shape[1] != h.shape[0]:
            raise ValueError(f"Mamba2LM.forward: the cache holds batch {cache.ssm_state.shape[1]}, "
                             f"the input {h.shape[0]}")
        hidden = h.to(torch.float32 if self.config.residual_in_fp32 else self.embedding.weight.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            states = (cache.conv_state[i], cache.ssm_state[i]) if cache is not None else ()
            hidden, residual = layer(hidden, residual, *states)
        head = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm_f(hidden, residual)[0], head)

    def allocate_cache(self, batch):
        """An empty cache (zeros: the state before any token) on the model's device."""
        c, w = self.config, self.embedding.weight
        return Mamba2Cache(
            conv_state=torch.zeros(c.n_layer, batch, c.conv_dim, c.d_conv, device=w.device, dtype=w.dtype),
            ssm_state=torch.zeros(c.n_layer, batch, c.nheads, c.headdim, c.d_state, device=w.device,
                                  dtype=torch.float32))

    def step(self, input_ids, cache):
        """One token per sequence: input_ids (batch,) -> logits (batch, padded_vocab); the cache advances in place.

        Fixed shapes, in-place state updates, no data-dependent Python branches: capturable in a CUDA graph."""
        return self(input_ids[:, None], cache=cache)[:, 0]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, eos_id=None):
        """input_ids (batch, seqlen) -> (batch, seqlen + n), n ≤ max_new_tokens new tokens after the prompt.

        temperature 0 is greedy decoding; otherwise samples from softmax(logits / temperature), restricted to the top_k
        tokens and/or the smallest set with probability ≥ top_p. Only ids below config.vocab_size are produced.
        With eos_id, a sequence that has produced it continues with eos_id, and generation stops once all have."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        cache = self.allocate_cache(input_ids.shape[0])
        logits = self(input_ids, cache=cache)[:, -1]                                # prefill: (batch, padded_vocab)
        tokens, done = [input_ids], torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
        for i in range(max_new_tokens):
            next_ids = sample_next(logits[:, :self.config.vocab_size], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(done, eos_id)
                done |= next_ids == eos_id
            tokens.append(next_ids[:, None])
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = self.step(next_ids, cache)
        return torch.cat(tokens, dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (batch, vocab) -> token ids (batch,). temperature 0: argmax. top_k keeps the k likeliest tokens; top_p
    keeps the likeliest tokens up to and including the first at which their probabilities reach top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p                               # mass before this token already ≥ p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------------------
# 4. Loading checkpoints


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
        config = Mamba2Config.from_hf_json(config_path)
    elif "d_model" in raw or "ssm_cfg" in raw:
        config = Mamba2Config.from_official_json(config_path)
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
# 5. The connector: the vision encoder's patch grid -> tokens for the LM (ML-Mamba §3.2.3, Eq. 6-8)


CONNECTOR_KINDS = ("msc", "mlp", "vss-mlp", "vss-l2")


@dataclass
class ConnectorConfig:
    """Which connector, and its scan directions. The scans' own sizes (d_state, headdim, expand, d_conv, chunk) are
    the LM's: the released code builds its connector's Mamba-2 layers from the LM's config (ML-Mamba's
    `Bidirectional_Mamba.from_pretrained(<the LM's hub path>)`, which reads the config and keeps the random weights).

    kind: "msc"      ML-Mamba's Mamba-2 Scan Connector, Eq. 8 as the released code runs it (Table 6, MSC-MLP)
          "mlp"      Eq. 6: the three-layer MLP projector alone, no scan (Table 6's baseline)
          "vss-mlp"  VL-Mamba's VSS-MLP connector: V_out = MLP(Norm(VSS(V) + V))
          "vss-l2"   VL-Mamba's VSS-L2 connector: V' = Linear(V), V_out = Linear(Norm(VSS(GELU(V')) + V'))
    scan: the directions of the 2D scan, from scan2d_kernel's registry: "bidirectional" (row + row reversed: the
          Bidirectional-Scan Mechanism of Table 7, ML-Mamba's choice), "cross" (the four routes of the Cross-Scan
          Mechanism), one order ("snake"), or a comma-separated list of orders ("row,diagonal")."""
    kind: str = "msc"
    scan: str = "bidirectional"
    n_blocks: int = 2               # MSC blocks (the released code: 2)
    swiglu: bool = True             # the SwiGLU of Eq. 8 in each MSC block; False: our reading of Eq. 7, Table 6's
                                    # "Basic" MSC (blocks h + mixer(h) alone; the released code has no such path)

    def __post_init__(self):
        if self.kind not in CONNECTOR_KINDS:
            raise ValueError(f"ConnectorConfig: kind must be one of {', '.join(CONNECTOR_KINDS)}, got {self.kind!r}")
        if not isinstance(self.n_blocks, int) or isinstance(self.n_blocks, bool) or self.n_blocks < 1:
            raise ValueError(f"ConnectorConfig: n_blocks must be a positive integer, got {self.n_blocks!r}")
        if not isinstance(self.scan, str):
            raise ValueError(f"ConnectorConfig: scan must be a string, got {self.scan!r}")
        self.orders                                                             # an unknown order fails here, early

    @property
    def orders(self):
        """The names of the scan orders, one per direction."""
        try:
            return resolve_orders(self.scan.split(",") if "," in self.scan else self.scan)
        except ValueError as e:
            raise ValueError(f"ConnectorConfig: scan={self.scan!r} is not a scan set or scan orders: {e}") from None


class Mamba2ScanMixer(nn.Module):
    """The Mamba-2 mixer (`Mamba2Mixer`, SSD §7.1) run over the patch grid in K scan orders π_1 … π_K: the mixer of
    ML-Mamba's MSC. in_proj, the gated norm's weight and out_proj are shared by the directions; each direction has its
    own causal conv1d, dt_bias, A_log and D. On the grid u (batch, H, W, d_model):

        z, xBC, dt   = in_proj(u)                         as Mamba2Mixer, once for all directions
        for each direction k, on the sequence read in order π_k (cross_scan):
            x, B, C  = SiLU(conv1d_k(xBC))                its own causal depthwise convolution
            y_k      = SSD(x, Δ, A_k, B, C) + D_k x,      Δ = softplus(dt + dt_bias_k),  A_k = -exp(A_log_k)
            y_k      = RMSNorm(y_k ⊙ SiLU(z))             the gated norm, weight shared
        y            = mean over k of y_k, each back at its cell (cross_merge)
        out          = out_proj(y)

    With scan "bidirectional" (K = 2: row, row reversed) this is the released code's `Mamba2` with
    bimamba_type="v2" (WenjunHuang94/mamba, mamba_ssm/modules/mamba2.py, `Mamba2.forward`): the backward direction's
    conv1d_b, dt_bias_b, A_log_b, D_b on in_proj's output flipped along the sequence, flipped back, (out + out_b) / 2,
    then out_proj. The K directions run as one SSD call: direction k's heads are heads k·nheads … (k+1)·nheads - 1 of
    the call, reading their own B/C group, so each keeps its own A, dt_bias and D."""

    def __init__(self, config, orders):
        """config: the Mamba2Config whose sizes the scans take; orders: a scan set, an order, or a list of orders."""
        super().__init__()
        self.config, self.orders = config, resolve_orders(orders)
        c, K = config, len(self.orders)
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_dim + c.nheads, bias=c.bias)   # [z, x, B, C, dt]
        # the K directions' convolutions side by side: channels k·conv_dim … (k+1)·conv_dim - 1 are direction k's
        self.conv1d = nn.Conv1d(K * c.conv_dim, K * c.conv_dim, c.d_conv, groups=K * c.conv_dim, bias=c.conv_bias)
        # as the released code, every direction starts from the first one's Δ and A (it clones them for the backward)
        self.dt_bias = nn.Parameter(init_dt_bias(c.nheads).repeat(K, 1))                      # (K, nheads) each
        self.A_log = nn.Parameter(init_A_log(c.nheads).repeat(K, 1))
        self.D = nn.Parameter(torch.ones(K, c.nheads))
        # eps: the LM's norm_eps, 1e-5 in the public configs, which is what the released code hard-codes here
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(self, u):
        """u (batch, H, W, d_model) -> (batch, H, W, d_model)."""
        c, K = self.config, len(self.orders)
        _, H, W, _ = u.shape
        scan, merge, ssd = ((cross_scan, cross_merge, ssd_scan) if _use_kernels(u)
                            else (cross_scan_reference, cross_merge_reference, ssd_reference))
        zxBCdt = scan(self.in_proj(u), self.orders)                             # (K, batch, H*W, d_in_proj)
        z, xBC, dt = torch.split(zxBCdt, [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        xBC = causal_conv1d(rearrange(xBC, "k b l c -> b l (k c)"), self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(rearrange(xBC, "b l (k c) -> b l k c", k=K),
                              [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        y = ssd(rearrange(x, "b l k (h p) -> b l (k h) p", p=c.headdim),       # (batch, H*W, K*nheads, headdim)
                rearrange(dt, "k b l h -> b l (k h)"),
                -torch.exp(self.A_log.float()).flatten(),                       # A_k < 0, (K*nheads,)
                rearrange(B, "b l k (g n) -> b l (k g) n", g=c.ngroups),       # (batch, H*W, K*ngroups, d_state)
                rearrange(C, "b l k (g n) -> b l (k g) n", g=c.ngroups),
                chunk_size=c.chunk_size, D=self.D.flatten(), dt_bias=self.dt_bias.flatten(), dt_softplus=True)
        y = self.norm(rearrange(y, "b l (k h) p -> k b l (h p)", k=K), z)      # (K, batch, H*W, d_inner)
        return self.out_proj(merge(y, self.orders, H, W, reduce="mean"))


class SwiGLU(nn.Module):
    """w3(SiLU(w1 x) ⊙ w2 x) (Shazeer 2020, arXiv 2002.05202), all three d x d with biases: the SwiGLU of ML-Mamba's
    Eq. 8, as the released code's `SwiGLU(dim, dim)` (WenjunHuang94/mamba, mamba_ssm/modules/block.py)."""

    def __init__(self, dim):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MSCBlock(nn.Module):
    """One block of the MSC: h = h + mixer(h), then h = h + SwiGLU(LayerNorm(h)). No norm before the mixer: the
    released `Block.forward` for bimamba_type "v2" (mamba_ssm/modules/block.py of WenjunHuang94/mamba); its drop path
    is 0 in both blocks (rates [0, 0, 0.1] indexed by block 0 and 1), so it is left out."""

    def __init__(self, lm_config, orders, swiglu):
        super().__init__()
        self.mixer = Mamba2ScanMixer(lm_config, orders)
        self.norm = nn.LayerNorm(lm_config.d_model) if swiglu else None
        self.mlp = SwiGLU(lm_config.d_model) if swiglu else None

    def forward(self, h):                                                       # (batch, H, W, d_model)
        h = h + self.mixer(h)
        return h if self.mlp is None else h + self.mlp(self.norm(h))


class MambaScanConnector(nn.Module):
    """ML-Mamba's MSC (§3.2.3): n_blocks MSCBlocks over the grid, then a final LayerNorm. The released code's
    `Bidirectional_Mamba` (WenjunHuang94/mamba, mamba_ssm/models/mixer_seq_simple.py), which puts the SwiGLU of Eq. 8
    inside each block after the scan (the paper writes one MSC, then one SwiGLU; we follow the code)."""

    def __init__(self, lm_config, orders, n_blocks, swiglu):
        super().__init__()
        self.layers = nn.ModuleList(MSCBlock(lm_config, orders, swiglu) for _ in range(n_blocks))
        self.norm_f = nn.LayerNorm(lm_config.d_model)
        self._init_weights(n_blocks)

    @torch.no_grad()
    def _init_weights(self, n_blocks):
        """The released `_init_weights(n_layer=2)`: zero biases, out_proj scaled by 1/√n_blocks."""
        for name, p in self.named_parameters():
            if name.endswith(".bias") and not name.endswith("conv1d.bias"):
                p.zero_()
            elif name.endswith("out_proj.weight"):
                p /= math.sqrt(n_blocks)

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)


def mlp_projector(in_dim, out_dim):
    """Linear(in, 4·in) -> GELU -> Linear(4·in, out) -> GELU -> Linear(out, out), biases zero, weights xavier-normal:
    the "three-layer MLP" of Eq. 6-8, the released `FusedMLPProjector` (WenjunHuang94/ML-Mamba,
    mlmamba/util/nn_utils.py)."""
    layers = nn.Sequential(nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, out_dim), nn.GELU(),
                           nn.Linear(out_dim, out_dim))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return layers


class Connector(nn.Module):
    """The patch grid (batch, H, W, vision_dim) -> tokens for the LM (batch, H*W, d_model), in row-major patch order.

        kind "msc":      V_img = GELU(Linear(V))          `mlp`: the released code's first step, vision -> LM width
                         V'    = MSC(V_img)               `msc`: n_blocks of scan + SwiGLU, final LayerNorm (Eq. 8)
                         V_out = MLP(V')                  `projector`: the three-layer MLP at the LM width
        kind "mlp":      V_out = MLP(V)                   Eq. 6: `projector` alone, from the vision width
        kind "vss-mlp":  V_out = MLP(Norm(VSS(V) + V))    VL-Mamba (arXiv 2403.13600, §MultiModal Connector), VSS at
                                                          the vision width, MLP = Linear -> GELU -> Linear
        kind "vss-l2":   V' = Linear(V),  V_out = Linear(Norm(VSS(GELU(V')) + V'))
    The parameter names are the released checkpoint's (`mlp`, `msc` for its `bidirectional_mamba`, `projector`).
    VL-Mamba's VSS is one Mamba layer over the scanned grid; VL-Mamba ran Mamba-1 (S6) scans, here it is the same
    Mamba2ScanMixer as the MSC's, and its Norm (which the paper leaves open) a LayerNorm."""

    def __init__(self, config, vision_dim, lm_config):
        super().__init__()
        self.config, self.vision_dim = config, vision_dim
        d, kind = lm_config.d_model, config.kind
        if kind == "msc":
            self.mlp = nn.Sequential(nn.Linear(vision_dim, d), nn.GELU())
            self.msc = MambaScanConnector(lm_config, config.orders, config.n_blocks, config.swiglu)
            self.projector = mlp_projector(d, d)
        elif kind == "mlp":
            self.projector = mlp_projector(vision_dim, d)
        elif kind == "vss-mlp":
            self.vss = Mamba2ScanMixer(_mixer_config(lm_config, vision_dim), config.orders)
            self.norm = nn.LayerNorm(vision_dim)
            self.projector = nn.Sequential(nn.Linear(vision_dim, d), nn.GELU(), nn.Linear(d, d))
        else:                                                                   # "vss-l2"
            self.linear1 = nn.Linear(vision_dim, d)
            self.vss = Mamba2ScanMixer(lm_config, config.orders)
            self.norm = nn.LayerNorm(d)
            self.linear2 = nn.Linear(d, d)

    def forward(self, grid):
        if grid.dim() != 4 or grid.shape[-1] != self.vision_dim:
            raise ValueError(f"Connector: expected the patch grid (batch, H, W, {self.vision_dim}), got "
                             f"{tuple(grid.shape)}")
        kind = self.config.kind
        if kind == "msc":
            out = self.projector(self.msc(self.mlp(grid)))
        elif kind == "mlp":
            out = self.projector(grid)
        elif kind == "vss-mlp":
            out = self.projector(self.norm(self.vss(grid) + grid))
        else:
            v = self.linear1(grid)
            out = self.linear2(self.norm(self.vss(F.gelu(v)) + v))
        return rearrange(out, "b h w c -> b (h w) c")


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


def _mixer_config(lm_config, width):
    """The LM's Mamba-2 sizes at another width (VSS-MLP scans the vision features)."""
    try:
        return dataclasses.replace(lm_config, d_model=width)
    except ValueError as e:
        raise ValueError(f"Connector: kind 'vss-mlp' scans the vision features ({width} channels) with the LM's "
                         f"Mamba-2 sizes: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# 6. ML-Mamba: vision encoder + connector + Mamba-2 LM

IGNORE_INDEX = -100                 # labels here are left out of the loss, as in data.py (cross_entropy's default)


@dataclass
class MLMambaConfig:
    vision: VisionConfig | list[VisionConfig]   # one tower, or several fused (DINOv2 then SigLIP: FusedVisionEncoder)
    connector: ConnectorConfig
    lm: Mamba2Config
    image_resize_strategy: str = "resize-naive"  # how images become the encoder's square input (vision.py's
                                                 # strategies, by Prismatic's names); the released default

    def __post_init__(self):
        if isinstance(self.vision, tuple):
            self.vision = list(self.vision)
        if isinstance(self.vision, list) and not self.vision:
            raise ValueError("MLMambaConfig: vision is an empty list; give one tower's config, or several to fuse")
        if self.image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"MLMambaConfig: image_resize_strategy must be one of "
                             f"{', '.join(RESIZE_STRATEGIES)}, got {self.image_resize_strategy!r}")

    def to_dict(self):
        """Plain JSON types; `from_dict` gives back an equal config."""
        asdict = dataclasses.asdict
        vision = [asdict(v) for v in self.vision] if isinstance(self.vision, list) else asdict(self.vision)
        return {"vision": vision, "connector": asdict(self.connector), "lm": asdict(self.lm),
                "image_resize_strategy": self.image_resize_strategy}

    @classmethod
    def from_dict(cls, d):
        """From `to_dict`'s output (or its JSON): unknown or missing fields are errors. A config without
        image_resize_strategy was written before it existed, when every model was trained on letterboxed images."""
        fields = {"vision", "connector", "lm"}
        if not isinstance(d, dict) or not fields <= set(d) <= fields | {"image_resize_strategy"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"MLMambaConfig: expected the fields ['connector', 'image_resize_strategy', 'lm', "
                             f"'vision'], got {got}")
        vision = d["vision"]
        vision = ([_from_fields(VisionConfig, v) for v in vision] if isinstance(vision, list)
                  else _from_fields(VisionConfig, vision))
        return cls(vision=vision, connector=_from_fields(ConnectorConfig, d["connector"]),
                   lm=_from_fields(Mamba2Config, d["lm"]),
                   image_resize_strategy=d.get("image_resize_strategy", "letterbox"))


def _from_fields(cls, fields):
    """cls(**fields) for a dict read from JSON, whose lists are the tuples cls holds."""
    if not isinstance(fields, dict):
        raise ValueError(f"{cls.__name__}: expected an object of fields, got {type(fields).__name__}")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as e:                                                   # a missing field
        raise ValueError(f"{cls.__name__}: {e}") from None


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


def build_vision(config):
    """A randomly initialised encoder for a VisionConfig, or a FusedVisionEncoder for a list of them."""
    if isinstance(config, list):
        return FusedVisionEncoder([VisionEncoder(c) for c in config])
    return VisionEncoder(config)


@dataclass
class MLMambaOutput:
    logits: torch.Tensor                    # (batch, T, padded_vocab); T: see MLMamba.embed
    loss: torch.Tensor | None = None        # mean cross-entropy over the supervised tokens (0 when there are none)
    loss_sum: torch.Tensor | None = None    # their summed cross-entropy, float32
    n_tokens: torch.Tensor | None = None    # how many tokens are supervised, a long scalar on the model's device


def _checkpointed_forward(block, *args, **kwargs):
    """block's own forward, through torch.utils.checkpoint while autograd records: its activations are recomputed in
    the backward pass instead of kept. Generation (no_grad) runs it plainly."""
    forward = type(block).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


class MLMamba(nn.Module):
    """ML-Mamba (arXiv 2407.19832): image -> ViT patch grid -> connector -> tokens in front of the text -> Mamba-2.

    The three parts are `vision`, `connector` and `lm`; training freezes or trains them by these names."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = build_vision(config.vision)
        self.connector = Connector(config.connector, self.vision.out_dim, config.lm)
        self.lm = Mamba2LM(config.lm)
        self.gradient_checkpointing = False

    @property
    def num_visual_tokens(self):
        """H*W of the encoder's patch grid: the tokens each image becomes."""
        return self.vision.num_patches

    @property
    def image_size(self):
        return self.vision.image_size

    # -- inputs ----------------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values):
        """pixel_values (n_images, 3, image_size, image_size), RGB in [0, 1], or 3 channels per fused tower (each its
        own letterboxed picture) -> tokens (n_images, H*W, d_model)."""
        S = self.image_size
        channels = (3, 3 * len(self.vision.towers)) if isinstance(self.vision, FusedVisionEncoder) else (3,)
        if pixel_values.dim() != 4 or pixel_values.shape[1] not in channels or tuple(pixel_values.shape[2:]) != (S, S):
            raise ValueError(f"MLMamba: pixel_values must be (n_images, {' or '.join(map(str, channels))}, {S}, {S}), "
                             f"got {tuple(pixel_values.shape)}; vision.ImageTransform(model.vision, "
                             f"model.config.image_resize_strategy) makes them")
        features = self.vision(pixel_values)                         # (n_images, H*W, vision_dim), row-major
        H, W = self.vision.grid_size
        return self.connector(rearrange(features, "n (h w) c -> n h w c", h=H, w=W))

    def _check_batch(self, input_ids, pixel_values, has_image, lengths):
        """has_image and lengths, filled in when None and checked against input_ids and pixel_values."""
        if input_ids.dim() != 2:
            raise ValueError(f"MLMamba: input_ids must be (batch, seqlen), got {tuple(input_ids.shape)}")
        batch, seqlen = input_ids.shape
        device = input_ids.device
        if has_image is None:
            has_image = torch.full((batch,), pixel_values is not None, dtype=torch.bool, device=device)
        has_image = has_image.to(device=device, dtype=torch.bool)
        if has_image.shape != (batch,):
            raise ValueError(f"MLMamba: has_image must be ({batch},), one flag per row, got {tuple(has_image.shape)}")
        n_images = int(has_image.sum())
        given = 0 if pixel_values is None else pixel_values.shape[0]
        if given != n_images:
            raise ValueError(f"MLMamba: has_image marks {n_images} rows with an image but pixel_values holds {given} "
                             f"images; they must be the images of those rows, in row order")
        if lengths is None:
            lengths = torch.full((batch,), seqlen, dtype=torch.long, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (batch,) or bool(((lengths < 0) | (lengths > seqlen)).any()):
            raise ValueError(f"MLMamba: lengths must be ({batch},) with values in 0..{seqlen}, got {lengths.tolist()}")
        return has_image, lengths

    def embed(self, input_ids, pixel_values=None, has_image=None, lengths=None):
        """The LM's input sequence, each row [its visual tokens if it has an image][its text][padding].

        input_ids (batch, seqlen) right-padded, row i's text being input_ids[i, :lengths[i]]; pixel_values the images
        of the rows with has_image, in row order. Returns (embeds, text_start, lengths): embeds (batch, T, d_model)
        with T = num_visual_tokens + seqlen when any row has an image, else seqlen; text_start (batch,) where each
        row's text begins (num_visual_tokens or 0). The visual tokens come before all text, BOS included, as in
        ML-Mamba's code; Prismatic and Cobra put them after BOS. Right padding is harmless to a causal model."""
        has_image, lengths = self._check_batch(input_ids, pixel_values, has_image, lengths)
        text = self.lm.embedding(input_ids)                                         # (batch, seqlen, d_model)
        text_start = torch.zeros_like(lengths)
        if not bool(has_image.any()):
            return text, text_start, lengths
        visual = self.encode_images(pixel_values)                                   # (n_images, V, d_model)
        (batch, seqlen), V = input_ids.shape, self.num_visual_tokens
        text_start = V * has_image.long()
        embeds = text.new_zeros(batch, V + seqlen, text.shape[-1])
        rows = torch.arange(batch, device=input_ids.device)[:, None]
        embeds[rows, text_start[:, None] + torch.arange(seqlen, device=input_ids.device)] = text
        embeds[has_image, :V] = visual.to(embeds.dtype)
        return embeds, text_start, lengths

    # -- training --------------------------------------------------------------------------------------------------

    def forward(self, input_ids, labels=None, pixel_values=None, has_image=None, lengths=None):
        """Logits, and with labels the next-token cross-entropy over the supervised tokens.

        input_ids, labels (batch, seqlen), right-padded, labels aligned with input_ids (IGNORE_INDEX where there is
        nothing to learn; positions past lengths are ignored whatever they hold): the model shifts them, so the output
        at each token is scored on the label of the next. See `embed` for pixel_values, has_image, lengths and T."""
        embeds, text_start, lengths = self.embed(input_ids, pixel_values, has_image, lengths)
        logits = self.lm(inputs_embeds=embeds)                                      # (batch, T, padded_vocab)
        if labels is None:
            return MLMambaOutput(logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"MLMamba: labels {tuple(labels.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        (batch, seqlen), T = input_ids.shape, logits.shape[1]
        positions = torch.arange(seqlen, device=labels.device)
        targets = labels.new_full((batch, T), IGNORE_INDEX)                          # labels on the T positions
        targets[torch.arange(batch, device=labels.device)[:, None], text_start[:, None] + positions] = (
            labels.masked_fill(positions >= lengths[:, None], IGNORE_INDEX))
        supervised = targets[:, 1:] != IGNORE_INDEX                                 # output t predicts token t + 1
        loss_sum = F.cross_entropy(logits[:, :-1][supervised].float(), targets[:, 1:][supervised], reduction="sum")
        n_tokens = supervised.sum()
        return MLMambaOutput(logits, loss_sum / n_tokens.clamp(min=1), loss_sum, n_tokens)

    def set_gradient_checkpointing(self, enabled=True):
        """Checkpoint each LM block and each vision block (torch.utils.checkpoint, non-reentrant): their activations
        are recomputed in the backward pass instead of kept, trading compute for memory. Parameter names and
        generation are unchanged."""
        for block in self.modules():
            if isinstance(block, (Mamba2Block, Block)):
                if enabled:
                    block.forward = functools.partial(_checkpointed_forward, block)   # shadows the class's forward
                else:
                    vars(block).pop("forward", None)
        self.gradient_checkpointing = enabled

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, has_image=None, lengths=None, max_new_tokens=64,
                 temperature=0.0, top_k=None, top_p=None, seed=None, eos_id=None, callback=None, decoder=None):
        """New tokens for a batch of prompts (right-padded input_ids with lengths, with or without images, as for
        `forward`): a list per row, ending with eos_id where the row produced it.

        Each row is prefilled alone at its own length into its rows of one recurrent cache (the padding of a batched
        prefill would enter the state), then all rows step together. temperature 0 is greedy; otherwise sampling as
        `sample_next`, reproducible with seed. A row that has produced eos_id stops; generation ends when all have.
        callback(step, new_ids) gets each step's tokens (batch,), eos_id for the rows already finished.
        decoder: what allocates the cache and takes each step (`allocate_cache`, `step`), self.lm by default;
        generate.CUDAGraphDecoder replays the step from a CUDA graph."""
        embeds, text_start, lengths = self.embed(input_ids, pixel_values, has_image, lengths)
        ends = (text_start + lengths).tolist()                                      # each row's prompt length
        if min(ends, default=1) == 0:
            raise ValueError(f"MLMamba.generate: row {ends.index(0)} has neither an image nor any text to start from")
        batch = len(ends)
        decoder = self.lm if decoder is None else decoder
        cache = decoder.allocate_cache(batch)
        logits = []
        for i, end in enumerate(ends):
            row = Mamba2Cache(cache.conv_state[:, i:i + 1], cache.ssm_state[:, i:i + 1])   # views into `cache`
            logits.append(self.lm(inputs_embeds=embeds[i:i + 1, :end], cache=row)[:, -1])
        logits = torch.cat(logits)                                                  # (batch, padded_vocab)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        new_tokens = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits[:, :self.config.lm.vocab_size], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(done, eos_id)
            for tokens, token, finished in zip(new_tokens, next_ids.tolist(), done.tolist()):
                if not finished:
                    tokens.append(token)
            if callback is not None:
                callback(step, next_ids)
            if eos_id is not None:
                done |= next_ids == eos_id
                if bool(done.all()):
                    break
            if step < max_new_tokens - 1:
                logits = decoder.step(next_ids, cache)
        return new_tokens

    # -- weights ---------------------------------------------------------------------------------------------------

    @classmethod
    def load_release(cls, path, vision_path, dinov2_path=None, dtype=torch.float32, device="cpu"):
        """The authors' released ML-Mamba: a run directory (config.json, checkpoints/latest-checkpoint.pt; see section
        7) and the vision towers it names, from local folders (timm's hub layout, as the released code loads them,
        or transformers'): `vision_path` the SigLIP tower, `dinov2_path` the DINOv2 one for a "dinosiglip" run.
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
            model = cls(config)
        model.vision = vision
        parts = nn.ModuleDict({"lm": model.lm, "connector": model.connector})
        _check_state_dict(parts, state, f"{checkpoint} does not fit the model its sizes give (our names)")
        parts.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                              assign=True)
        return model


    @classmethod
    def from_pretrained(cls, lm_path, vision_path, connector, dinov2_path=None, dtype=torch.float32, device="cpu",
                        image_resize_strategy="resize-naive"):
        """Pretrained parts and a new connector, as ML-Mamba starts training: the Mamba-2 LM of `load_mamba2(lm_path)`,
        the SigLIP (or any) tower of `load_vision(vision_path, dinov2_path)` (DINOv2 fused in front when given), and a
        randomly initialised connector of ConnectorConfig `connector`. Local paths only."""
        lm = load_mamba2(lm_path, dtype=dtype, device=device)
        vision = load_vision(vision_path, dinov2_path=dinov2_path, dtype=dtype, device=device)
        towers = vision.towers if isinstance(vision, FusedVisionEncoder) else None
        config = MLMambaConfig(vision=[t.config for t in towers] if towers is not None else vision.config,
                               connector=connector, lm=lm.config, image_resize_strategy=image_resize_strategy)
        with torch.device("meta"):
            model = cls(config)                                     # the skeleton: no memory, no init, replaced below
        model.vision, model.lm = vision, lm
        model.connector = Connector(connector, vision.out_dim, lm.config).to(device=device, dtype=dtype)
        return model

    def save_pretrained(self, directory):
        """config.json and model.safetensors in `directory`, which is replaced as a whole (anything else in it goes):
        written to a temporary folder beside it and renamed into place, so it never holds half a checkpoint."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"MLMamba.save_pretrained: {directory} exists and is not a directory")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)

    @classmethod
    def load_pretrained(cls, directory, dtype=torch.float32, device="cpu"):
        """A model written by `save_pretrained`. Every tensor must be there with its shape: anything missing,
        unexpected or mis-shaped is a ValueError that lists it; a bad config.json one that names it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"MLMamba.load_pretrained: {directory} is not a directory")
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
                model = cls(config)
        except (RuntimeError, TypeError) as e:                           # torch's errors for sizes past int64
            raise ValueError(f"{config_path}: sizes too large to build ({str(e).splitlines()[0]})") from None
        _check_state_dict(model, state, f"{weights} does not fit the model of {config_path}")
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
        return model


# ----------------------------------------------------------------------------------------------------------------------
# 7. The released ML-Mamba (WenjunHuang94/ML-Mamba): its run directory and checkpoint
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
