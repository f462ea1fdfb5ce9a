"""ML-Mamba (Huang & Hu 2024, arXiv 2407.19832): a multimodal LLM on a pretrained Mamba-2 language model.

An image goes through a ViT (vision.py), its patch grid through the connector, and the resulting tokens into a
Mamba-2 language model (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060) in front of the text. The LM is
mamba_ssm's `MambaLMHeadModel` with `Mamba2` mixers, so that its public checkpoints load into it: checkpoints.py reads
those, and writes and reads ours.

1. Mixer          `Mamba2Mixer`, the Mamba-2 block of SSD paper §7 (Figure 6): in_proj, causal conv, Δ, SSD scan,
                  gated RMSNorm, out_proj; its sizes in `Mamba2Config`
2. Language model `Mamba2Block` (h = h + Mixer(RMSNorm(h))) and `Mamba2LM`: embedding, blocks, final norm, LM head;
                  recurrent cache, step, generate; `linear_cross_entropy`, the loss without the whole logits
3. Connector      `Connector`: ML-Mamba's Mamba-2 Scan Connector (`Mamba2ScanMixer` in K scan orders, SwiGLU, MLP)
4. ML-Mamba       `MLMamba`: vision + connector + LM; training forward, batched generation

Shapes: the residual stream h (batch, seqlen, d_model) between blocks; inside a mixer x (batch, seqlen, nheads,
headdim) and B, C (batch, seqlen, ngroups, dstate) as ssd_kernel.py takes them, and the SSM state ssm_h (batch,
nheads, headdim, dstate); the patch grid (batch, H, W, channels).
"""
import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from mixer_kernel import (causal_conv1d, causal_conv1d_reference, conv_state_after, conv_step, conv_step_reference,
                          gated_norm_out_proj, gated_rms_norm, gated_rms_norm_reference, mixer_scan, norm_in_proj_conv,
                          rms_norm, rms_norm_reference)
from scan2d_kernel import cross_merge, cross_merge_reference, cross_scan, cross_scan_reference, resolve_orders
from ssd_kernel import ssd_reference, ssd_scan, ssd_step, ssd_step_reference
from vision import RESIZE_STRATEGIES, Block, FusedVisionEncoder, VisionConfig, VisionEncoder


# ----------------------------------------------------------------------------------------------------------------------
# 1. The Mamba-2 mixer (SSD paper §7.1, Figure 6), as mamba_ssm's `Mamba2` module


@dataclass
class Mamba2Config:
    """A Mamba-2 LM's sizes. Names and defaults are mamba_ssm's (`MambaConfig` and the `Mamba2` module); its
    config.json and transformers' are read by checkpoints.py."""
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


def _epsilon(value):
    """A number between 0 and 1, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block (SSD §7.1): Δ, B, C and x all come at once from the input, through one projection.

        z, xBC, dt = in_proj(u)             z gate, xBC = [x, B, C] convolved together, dt one per head
        x, B, C    = SiLU(conv1d(xBC))      causal depthwise convolution over time
        Δ, A       = softplus(dt + dt_bias), -exp(A_log)
        y          = SSD(x, Δ, A, B, C) + D x
        out        = out_proj(RMSNorm(y ⊙ SiLU(z)))

    SSD runs the recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t (SSD §3) over the SSM state h
    (`ssm_h` here), (nheads, headdim, dstate) per sequence."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        # in_proj's output, side by side: [z, x, B, C, dt]
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_dim + c.nheads, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(c.nheads))
        self.A_log = nn.Parameter(init_A_log(c.nheads))
        self.D = nn.Parameter(torch.ones(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(self, u, conv_state=None, ssm_h=None, lengths=None):
        """u (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With conv_state and ssm_h (one layer's part of a `Mamba2Cache`) the sequence continues the one they hold, and
        they are updated in place; one token then takes the recurrent `step` instead of the chunked scan. With lengths
        (batch,) too, values in 0..seqlen, row b's positions from lengths[b] on are padding: the cache is left as it
        was after its first lengths[b] tokens, so that prompts of different lengths prefill together."""
        if ssm_h is not None and u.shape[1] == 1 and lengths is None:
            return self.step(u[:, 0], conv_state, ssm_h)[:, None]
        c = self.config
        A = -torch.exp(self.A_log.float())                          # (nheads,), A < 0
        if _use_kernels(u) and conv_state is None and ssm_h is None and lengths is None:
            # no cache (training, evaluation): the lines below as one autograd node, whose backward writes
            # in_proj's gradient in place instead of concatenating its parts (mixer_kernel.mixer_scan)
            y = mixer_scan(self.in_proj(u), self.conv1d.weight, self.conv1d.bias, self.dt_bias, A, self.D,
                           self.norm.weight, c.headdim, c.ngroups, c.chunk_size, self.norm.group_size, self.norm.eps)
            return self.out_proj(y)
        z, xBC, dt = torch.split(self.in_proj(u), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        # xBC (batch, seqlen, conv_dim), starting from zeros or from a cache's conv_state (forward only)
        kernel = _use_kernels(u) and (conv_state is None or not torch.is_grad_enabled())
        conv = causal_conv1d if kernel else causal_conv1d_reference
        xBC, xBC_in = conv(xBC, self.conv1d.weight, self.conv1d.bias, conv_state), xBC
        if conv_state is not None:
            conv_state.copy_(conv_state_after(conv_state, xBC_in, lengths))
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        # x (batch, seqlen, nheads, headdim); B, C (batch, seqlen, ngroups, dstate)
        x = rearrange(x, "b l (h p) -> b l h p", p=c.headdim)
        B = rearrange(B, "b l (g n) -> b l g n", g=c.ngroups)
        C = rearrange(C, "b l (g n) -> b l g n", g=c.ngroups)
        # Δ = softplus(dt + dt_bias) > 0, a step size per token and head, from the input: the SSM's discretisation,
        # Ā = exp(ΔA) by zero-order hold and B̄ ≈ ΔB, so that h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ (SSD §3;
        # Mamba-2). The scan computes Δ from dt (dt_softplus), in float32, inside its first kernel.
        if lengths is not None:
            # Δ = 0 on the padding (softplus(-inf) = 0): h_t = exp(0·A) h_{t-1} + 0 = h_{t-1} there (SSD §3's
            # recurrence), so the final state is each row's own
            padding = torch.arange(u.shape[1], device=u.device) >= lengths[:, None]
            dt = dt.masked_fill(padding[..., None], -torch.inf)
        scan = ssd_scan if _use_kernels(u) else ssd_reference
        y, ssm_h_last = scan(x, dt, A, B, C, chunk_size=c.chunk_size, D=self.D, dt_bias=self.dt_bias,
                             dt_softplus=True, initial_state=ssm_h, return_final_state=True)
        if ssm_h is not None:
            ssm_h.copy_(ssm_h_last)
        y = rearrange(y, "b l h p -> b l (h p)")                    # (batch, seqlen, d_inner)
        return self.out_proj(self.norm(y, z))

    def step(self, u, conv_state, ssm_h):
        """One token: u (batch, d_model) -> (batch, d_model), conv_state and ssm_h advanced in place (SSD §3's
        recurrence, one step).

        On a GPU without autograd, one kernel each for the conv, the SSM step and the gated norm, around in_proj and
        out_proj (at batch 1 generation fuses further: `Mamba2Block.step_`). With autograd, the references, which it
        differentiates."""
        c = self.config
        z, xBC, dt = torch.split(self.in_proj(u), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        step = conv_step if _inference_kernels(u) else conv_step_reference
        xBC = step(xBC, conv_state, self.conv1d.weight, self.conv1d.bias)          # (batch, conv_dim)
        return self.out_proj(self.norm(self.ssm_step(xBC, dt, ssm_h), z))

    def ssm_step(self, xBC, dt, ssm_h):
        """y (batch, d_inner) of one token from the conv's output xBC (batch, conv_dim) and in_proj's dt (batch,
        nheads); ssm_h advances in place."""
        c = self.config
        x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        # x (batch, nheads, headdim); B, C (batch, ngroups, dstate)
        x = rearrange(x, "b (h p) -> b h p", p=c.headdim)
        B = rearrange(B, "b (g n) -> b g n", g=c.ngroups)
        C = rearrange(C, "b (g n) -> b g n", g=c.ngroups)
        step = ssd_step if _inference_kernels(xBC) else ssd_step_reference
        # Δ = softplus(dt + dt_bias) as in forward, but computed inside ssd_step's kernel: one launch fewer per layer
        # and token, which is what a decoding step's time is made of
        y = step(ssm_h, x, dt, None, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, A_log=self.A_log)
        return rearrange(y, "b h p -> b (h p)")


class GatedRMSNorm(nn.Module):
    """RMSNorm(y ⊙ SiLU(z)) over groups of `group_size` channels: the extra normalisation before out_proj of SSD §7.1,
    as mamba_ssm's RMSNormGated with norm_before_gate=False. One group per B/C group, so that the norm never mixes
    heads of different groups (what tensor parallelism needs, §8)."""

    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        norm = gated_rms_norm if _use_kernels(y) else gated_rms_norm_reference
        return norm(y, z, self.weight, self.group_size, self.eps)


def init_dt_bias(*shape):
    """mamba_ssm's initialisation of Δ: log-uniform in [1e-3, 0.1], stored as dt_bias = softplus⁻¹(Δ)."""
    dt = torch.exp(math.log(1e-3) + torch.rand(*shape) * (math.log(0.1) - math.log(1e-3))).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def init_A_log(*shape):
    """mamba_ssm's initialisation of A: -A uniform in [1, 16], stored as A_log = log(-A)."""
    return torch.log(torch.empty(*shape).uniform_(1, 16))


def _use_kernels(t):
    """The Triton kernels on a GPU; elsewhere, and for float64 (which they do not take), the PyTorch references: under
    the interpreter the kernels would be correct but slow."""
    return t.is_cuda and t.dtype != torch.float64


def _inference_kernels(t):
    """The decoding step's forward-only kernels (conv_step and ssd_step; at batch 1 `Mamba2LM._decode_step`'s fused
    projections): on a GPU when autograd is off (generation, evaluation)."""
    return _use_kernels(t) and not torch.is_grad_enabled()


# ----------------------------------------------------------------------------------------------------------------------
# 2. The language model


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 and returned in the weight's dtype (mamba_ssm's RMSNorm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        norm = rms_norm if _use_kernels(x) else rms_norm_reference
        return norm(x, self.weight, self.eps)


class Mamba2Block(nn.Module):
    """Pre-norm residual block, as mamba_ssm's `Block`: h ← h + Mixer(RMSNorm(h))."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config)

    def forward(self, h, conv_state=None, ssm_h=None, lengths=None):
        """h (batch, seqlen, d_model), the residual stream -> the same after this block; conv_state, ssm_h, lengths:
        the mixer's, as Mamba2Mixer.forward takes them. The sum keeps h's dtype (float32 with residual_in_fp32),
        rounded once, as mamba_ssm's fused add + norm keeps its residual."""
        return (h + self.mixer(self.norm(h), conv_state, ssm_h, lengths)).to(h.dtype)

    def step_(self, h, conv_state, ssm_h):
        """h ← h + mixer(norm(h)) for one token, in place: h (batch, d_model) the residual stream, conv_state and
        ssm_h advanced as by Mamba2Mixer.step. On a GPU without autograd (generation), three kernels: the norm and
        the conv step ride along with in_proj, the gated norm and the residual add with out_proj (mixer_kernel.py
        §3), ssd_step between them."""
        m, c = self.mixer, self.mixer.config
        p = norm_in_proj_conv(h, self.norm.weight, self.norm.eps, m.in_proj, conv_state, m.conv1d.weight,
                              m.conv1d.bias, conv_start=c.d_inner)                 # [z, SiLU(conv(xBC)), dt]
        z, xBC, dt = torch.split(p, [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        return gated_norm_out_proj(m.ssm_step(xBC, dt, ssm_h), z, m.norm.weight, m.norm.group_size, m.norm.eps,
                                   m.out_proj, h)


@dataclass
class Mamba2Cache:
    """Everything a Mamba-2 LM needs to continue a sequence: a fixed-size state per layer, whatever the length so far.

    Updated in place by `Mamba2LM.forward(..., cache=)` and `Mamba2LM.step`, so the tensors keep their addresses.
    The field names are mamba_ssm's (`Mamba2.allocate_inference_cache` returns conv_state, ssm_state); the mixers
    call the SSM state ssm_h, the h of SSD §3."""
    # (n_layer, batch, conv_dim, d_conv), model dtype: each layer's last d_conv conv inputs
    conv_state: torch.Tensor
    # (n_layer, batch, nheads, headdim, dstate), float32: the SSM state h_t (SSD §3)
    ssm_state: torch.Tensor

    def reset(self):
        """Back to the empty sequence."""
        self.conv_state.zero_()
        self.ssm_state.zero_()


class Mamba2LM(nn.Module):
    """Embedding, n_layer Mamba-2 blocks, final RMSNorm, LM head (tied to the embedding or not).

    The residual stream h stays in float32 with residual_in_fp32 and each norm reads it at full precision, as
    mamba_ssm's fused add + norm does (the public checkpoints set fused_add_norm). Logits cover the padded
    vocabulary."""

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

    @property
    def _stream_dtype(self):
        """The residual stream's dtype: float32 with residual_in_fp32, else the weights'."""
        return torch.float32 if self.config.residual_in_fp32 else self.embedding.weight.dtype

    @property
    def _head(self):
        """The LM head's weight: the embedding matrix when tied."""
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids=None, inputs_embeds=None, cache=None):
        """input_ids (batch, seqlen), or inputs_embeds (batch, seqlen, d_model) -> logits (batch, seqlen, padded_vocab).

        With a cache the tokens continue the sequence it holds (an empty one from `allocate_cache` for a prefill), and
        it is updated in place to hold them too."""
        return F.linear(self.hidden_states(input_ids, inputs_embeds, cache), self._head)

    def hidden_states(self, input_ids=None, inputs_embeds=None, cache=None, lengths=None):
        """`forward` up to the LM head: (batch, seqlen, d_model) after the final norm. The training loss multiplies
        them by the head chunk by chunk (`linear_cross_entropy`) instead of holding all the logits. lengths: with a
        cache, as `prefill` takes them, on the device."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Mamba2LM.forward: pass exactly one of input_ids and inputs_embeds")
        # h, the residual stream: (batch, seqlen, d_model)
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 3 or h.shape[-1] != self.config.d_model:
            raise ValueError(f"Mamba2LM.forward: inputs_embeds must be (batch, seqlen, {self.config.d_model}), "
                             f"got {tuple(h.shape)}")
        _check_cache(cache, h.shape[0])
        if lengths is not None and (cache is None or tuple(lengths.shape) != h.shape[:1]):
            raise ValueError(f"Mamba2LM: lengths, one per row ({h.shape[0]},), go with a cache")
        h = h.to(self._stream_dtype)
        for i, layer in enumerate(self.layers):
            states = (cache.conv_state[i], cache.ssm_state[i], lengths) if cache is not None else ()
            h = layer(h, *states)
        return self.norm_f(h)

    def prefill(self, inputs_embeds, lengths, cache):
        """Prompts of different lengths into a cache at once: inputs_embeds (batch, T, d_model) right-padded, row b's
        prompt its first lengths[b] positions (lengths (batch,) on the device, values in 1..T; not checked here,
        which would wait for the GPU). Returns the logits (batch, padded_vocab) after each row's last prompt token;
        the cache then holds each row's state after its own prompt, as if it had been prefilled alone."""
        h = self.hidden_states(inputs_embeds=inputs_embeds, cache=cache, lengths=lengths)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]          # (batch, d_model)
        return F.linear(last, self._head)

    def allocate_cache(self, batch):
        """An empty cache (zeros: the state before any token) on the model's device."""
        c, w = self.config, self.embedding.weight
        return Mamba2Cache(
            conv_state=torch.zeros(c.n_layer, batch, c.conv_dim, c.d_conv, device=w.device, dtype=w.dtype),
            ssm_state=torch.zeros(c.n_layer, batch, c.nheads, c.headdim, c.d_state, device=w.device,
                                  dtype=torch.float32))

    def step(self, input_ids, cache):
        """One token per sequence: input_ids (batch,) -> logits (batch, padded_vocab); the cache advances in place.

        Fixed shapes, in-place state updates, no data-dependent Python branches: capturable in a CUDA graph. On a GPU
        without autograd it takes `_decode_step`, elsewhere `forward` with one token."""
        if _inference_kernels(self.embedding.weight):
            return self._decode_step(input_ids, cache)
        return self(input_ids[:, None], cache=cache)[:, 0]

    def _decode_step(self, input_ids, cache):
        """`step` on a GPU: forward's arithmetic for one token. At batch 1 three kernels per block
        (`Mamba2Block.step_`): a token reads every weight once, and the launches between those reads are what the
        fused kernels save."""
        _check_cache(cache, input_ids.shape[0])
        h = self.embedding(input_ids).to(self._stream_dtype)            # (batch, d_model), the residual stream
        for i, layer in enumerate(self.layers):
            if h.shape[0] == 1:
                layer.step_(h, cache.conv_state[i], cache.ssm_state[i])
            else:   # cuBLAS's matrix products read the weights once for all rows; the fused kernels, once per row
                h = layer(h[:, None], cache.conv_state[i], cache.ssm_state[i])[:, 0]
        return F.linear(self.norm_f(h), self._head)

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
        # prefill: (batch, padded_vocab)
        logits = F.linear(self.hidden_states(input_ids, cache=cache)[:, -1], self._head)
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


def _check_cache(cache, batch):
    if cache is not None and cache.ssm_state.shape[1] != batch:
        raise ValueError(f"Mamba2LM: the cache holds batch {cache.ssm_state.shape[1]}, the input {batch}")


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


LOGITS_PER_CHUNK = 2 ** 26          # linear_cross_entropy's default chunk: 64M logits, 128 MB in bfloat16


def linear_cross_entropy(hidden, weight, targets, chunk_size=None):
    """Σ_i CE(W h_i, y_i): the summed cross-entropy of the logits F.linear(hidden, weight) against targets, a float32
    scalar (float64 for float64 inputs), without ever holding all the logits.

    hidden (N, d_model), the supervised rows only; weight (vocab, d_model), the LM head; targets (N,) int64 token ids
    in 0..vocab-1 (no IGNORE_INDEX: leave those rows out). Equal, values and gradients, to
    F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum") (all float64 for float64 inputs),
    autocast included: the logits are computed in autocast's dtype when it is on, as F.linear's would be, and their
    log-sum-exp in float32.

    Why: at batch 8 x 2048 tokens and a 50k vocabulary the logits take 1.6 GB in bfloat16 and 3.3 GB more in float32,
    and their gradients as much again. Here only chunk_size rows of them exist at a time (by default LOGITS_PER_CHUNK
    logits): for each chunk the forward pass computes the logits z = W h, the loss logsumexp(z) - z_y and right away
    its gradient, d z = softmax(z) - onehot(y), so d h = d z W and d W += d zᵀ h. It keeps only d h and d W, which
    the backward pass scales by the loss's incoming gradient."""
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1] or targets.dtype != torch.long):
        raise ValueError(f"linear_cross_entropy: expected hidden (N, d_model), weight (vocab, d_model), int64 targets "
                         f"(N,), got {tuple(hidden.shape)}, {tuple(weight.shape)}, {targets.dtype} "
                         f"{tuple(targets.shape)}")
    vocab = weight.shape[0]
    # Checked off the GPU only: there the check would make the CPU wait for the forward pass to finish (MLMamba.forward
    # checks its labels before the LM runs); an id out of range fails the gather there with a device-side assert.
    if not targets.is_cuda and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"linear_cross_entropy: targets must be token ids in 0..{vocab - 1}, got values from "
                         f"{int(targets.min())} to {int(targets.max())}; leave the unsupervised rows out")
    device = hidden.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(hidden.dtype, weight.dtype))
    if not torch.is_grad_enabled():     # the Function's needs_input_grad reads requires_grad only, not no_grad
        hidden, weight = hidden.detach(), weight.detach()
    chunk_size = max(1, LOGITS_PER_CHUNK // vocab) if chunk_size is None else chunk_size
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """`linear_cross_entropy`'s loss, gradients computed in the forward pass chunk by chunk; dtype: the logits'."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_size):
        need_dh, need_dw = ctx.needs_input_grad[:2]              # frozen head (stage 1), evaluation: less to do
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        W = weight.to(dtype)                                     # (vocab, d_model), cast once as autocast would
        loss = hidden.new_zeros((), dtype=acc)
        d_hidden = torch.empty_like(hidden) if need_dh else None                 # (N, d_model)
        d_weight = torch.zeros_like(weight, dtype=acc) if need_dw else None      # (vocab, d_model)
        for i in range(0, len(targets), chunk_size):
            h, y = hidden[i:i + chunk_size].to(dtype), targets[i:i + chunk_size]  # (chunk, d_model), (chunk,)
            z = F.linear(h, W).to(acc)                                            # (chunk, vocab) logits
            lse = z.logsumexp(-1)                                                 # (chunk,)
            loss += (lse - z.gather(1, y[:, None])[:, 0]).sum()
            if need_dh or need_dw:
                dz = z.sub_(lse[:, None]).exp_()                                  # softmax, over z's memory
                dz[torch.arange(len(y), device=y.device), y] -= 1
                dz = dz.to(dtype)                  # F.linear's backward gets d z in the logits' dtype, as in autograd
                if need_dh:
                    d_hidden[i:i + chunk_size] = dz @ W
                if need_dw:
                    d_weight += dz.T @ h
        ctx.save_for_backward(d_hidden, None if d_weight is None else d_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        d_hidden, d_weight = ctx.saved_tensors
        return (None if d_hidden is None else d_loss * d_hidden,
                None if d_weight is None else d_loss * d_weight, None, None, None)


# ----------------------------------------------------------------------------------------------------------------------
# 3. The connector: the vision encoder's patch grid -> tokens for the LM (ML-Mamba §3.2.3, Eq. 6-8)


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
        # in_proj's output, side by side: [z, x, B, C, dt]
        self.in_proj = nn.Linear(c.d_model, c.d_inner + c.conv_dim + c.nheads, bias=c.bias)
        # the K directions' convolutions side by side: channels k·conv_dim … (k+1)·conv_dim - 1 are direction k's
        self.conv1d = nn.Conv1d(K * c.conv_dim, K * c.conv_dim, c.d_conv, groups=K * c.conv_dim, bias=c.conv_bias)
        # (K, nheads) each; as the released code, every direction starts from the first one's Δ and A (it clones them
        # for the backward)
        self.dt_bias = nn.Parameter(init_dt_bias(c.nheads).repeat(K, 1))
        self.A_log = nn.Parameter(init_A_log(c.nheads).repeat(K, 1))
        self.D = nn.Parameter(torch.ones(K, c.nheads))
        # eps: the LM's norm_eps, 1e-5 in the public configs, which is what the released code hard-codes here
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_eps)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(self, u):
        """u (batch, H, W, d_model) -> (batch, H, W, d_model)."""
        c, K = self.config, len(self.orders)
        _, H, W, _ = u.shape
        scan, merge, conv, ssd = ((cross_scan, cross_merge, causal_conv1d, ssd_scan) if _use_kernels(u)
                                  else (cross_scan_reference, cross_merge_reference, causal_conv1d_reference,
                                        ssd_reference))
        zxBCdt = scan(self.in_proj(u), self.orders)                # (K, batch, H*W, d_in_proj)
        z, xBC, dt = torch.split(zxBCdt, [c.d_inner, c.conv_dim, c.nheads], dim=-1)
        xBC = conv(rearrange(xBC, "k b l c -> b l (k c)"), self.conv1d.weight, self.conv1d.bias)
        x, B, C = torch.split(rearrange(xBC, "b l (k c) -> b l k c", k=K),
                              [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        # One SSD call for the K directions: direction k's heads are heads k·nheads … (k+1)·nheads - 1 of the call,
        # reading its own B/C groups. x (batch, H*W, K*nheads, headdim); B, C (batch, H*W, K*ngroups, d_state)
        x = rearrange(x, "b l k (h p) -> b l (k h) p", p=c.headdim)
        B = rearrange(B, "b l k (g n) -> b l (k g) n", g=c.ngroups)
        C = rearrange(C, "b l k (g n) -> b l (k g) n", g=c.ngroups)
        dt = rearrange(dt, "k b l h -> b l (k h)")                 # (batch, H*W, K*nheads)
        A = -torch.exp(self.A_log.float()).flatten()               # A_k < 0, (K*nheads,)
        # Δ = softplus(dt + dt_bias_k), as in Mamba2Mixer.forward, each direction with its own dt_bias
        y = ssd(x, dt, A, B, C, chunk_size=c.chunk_size, D=self.D.flatten(), dt_bias=self.dt_bias.flatten(),
                dt_softplus=True)
        y = self.norm(rearrange(y, "b l (k h) p -> k b l (h p)", k=K), z)        # (K, batch, H*W, d_inner)
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

    def forward(self, h):
        """h (batch, H, W, d_model) -> the same."""
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


def _mixer_config(lm_config, width):
    """The LM's Mamba-2 sizes at another width (VSS-MLP scans the vision features)."""
    try:
        return dataclasses.replace(lm_config, d_model=width)
    except ValueError as e:
        raise ValueError(f"Connector: kind 'vss-mlp' scans the vision features ({width} channels) with the LM's "
                         f"Mamba-2 sizes: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# 4. ML-Mamba: vision encoder + connector + Mamba-2 LM

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


def build_vision(config):
    """A randomly initialised encoder for a VisionConfig, or a FusedVisionEncoder for a list of them."""
    if isinstance(config, list):
        return FusedVisionEncoder([VisionEncoder(c) for c in config])
    return VisionEncoder(config)


@dataclass
class MLMambaOutput:
    logits: torch.Tensor | None             # (batch, T, padded_vocab), T: see MLMamba.embed; None with labels,
                                            # whose loss never holds them all (linear_cross_entropy)
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

    The three parts are `vision`, `connector` and `lm`; training freezes or trains them by these names. Built from a
    config it has random weights; checkpoints.py fills it from pretrained parts (`from_pretrained`), from our own
    checkpoints (`load_pretrained`) or from the authors' release (`load_release`)."""

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
        # (n_images, H*W, vision_dim), row-major
        features = self.vision(pixel_values)
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

    def embed(self, input_ids, pixel_values=None, has_image=None, lengths=None, encode_images=None):
        """The LM's input sequence, each row [its visual tokens if it has an image][its text][padding].

        input_ids (batch, seqlen) right-padded, row i's text being input_ids[i, :lengths[i]]; pixel_values the images
        of the rows with has_image, in row order. Returns (embeds, text_start, lengths): embeds (batch, T, d_model)
        with T = num_visual_tokens + seqlen when any row has an image, else seqlen; text_start (batch,) where each
        row's text begins (num_visual_tokens or 0). The visual tokens come before all text, BOS included, as in
        ML-Mamba's code; Prismatic and Cobra put them after BOS. Right padding is harmless to a causal model.
        encode_images: what turns pixel_values into visual tokens, self.encode_images by default
        (generate.CUDAGraphed replays it from a CUDA graph)."""
        has_image, lengths = self._check_batch(input_ids, pixel_values, has_image, lengths)
        text = self.lm.embedding(input_ids)                             # (batch, seqlen, d_model)
        text_start = torch.zeros_like(lengths)
        if not bool(has_image.any()):
            return text, text_start, lengths
        visual = (encode_images or self.encode_images)(pixel_values)    # (n_images, V, d_model)
        (batch, seqlen), V = input_ids.shape, self.num_visual_tokens
        text_start = V * has_image.long()
        embeds = text.new_zeros(batch, V + seqlen, text.shape[-1])
        rows = torch.arange(batch, device=input_ids.device)[:, None]
        embeds[rows, text_start[:, None] + torch.arange(seqlen, device=input_ids.device)] = text
        embeds[has_image, :V] = visual.to(embeds.dtype)
        return embeds, text_start, lengths

    # -- training --------------------------------------------------------------------------------------------------

    def forward(self, input_ids, labels=None, pixel_values=None, has_image=None, lengths=None):
        """Logits; with labels instead the next-token cross-entropy over the supervised tokens, and no logits.

        input_ids, labels (batch, seqlen), right-padded, labels aligned with input_ids (IGNORE_INDEX where there is
        nothing to learn; positions past lengths are ignored whatever they hold): the model shifts them, so the output
        at each token is scored on the label of the next. See `embed` for pixel_values, has_image, lengths and T."""
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"MLMamba: labels {tuple(labels.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        embeds, text_start, lengths = self.embed(input_ids, pixel_values, has_image, lengths)
        if labels is None:
            return MLMambaOutput(self.lm(inputs_embeds=embeds))         # (batch, T, padded_vocab)
        (batch, seqlen), T = input_ids.shape, embeds.shape[1]
        positions = torch.arange(seqlen, device=labels.device)
        targets = labels.new_full((batch, T), IGNORE_INDEX)                          # labels on the T positions
        targets[torch.arange(batch, device=labels.device)[:, None], text_start[:, None] + positions] = (
            labels.masked_fill(positions >= lengths[:, None], IGNORE_INDEX))
        # Output t predicts token t + 1. The supervised rows are found, and their labels checked, before the LM runs:
        # the one wait for the GPU then comes while it has little queued, and the CPU runs ahead through the rest.
        targets = targets[:, 1:].flatten()
        rows = (targets != IGNORE_INDEX).nonzero()[:, 0]                            # (n_tokens,)
        targets = targets[rows]
        vocab = self.lm._head.shape[0]
        low, high = torch.stack(torch.aminmax(targets)).tolist() if len(rows) else (0, 0)
        if not 0 <= low <= high < vocab:
            raise ValueError(f"MLMamba: labels must be token ids in 0..{vocab - 1} or IGNORE_INDEX "
                             f"({IGNORE_INDEX}), got values from {low} to {high}")
        h = self.lm.hidden_states(inputs_embeds=embeds)[:, :-1]                      # (batch, T - 1, d_model)
        loss_sum = linear_cross_entropy(h.flatten(0, 1)[rows], self.lm._head, targets)
        n_tokens = torch.tensor(len(rows), device=labels.device)
        return MLMambaOutput(None, loss_sum / max(len(rows), 1), loss_sum, n_tokens)

    def set_gradient_checkpointing(self, enabled=True, keep_blocks=0):
        """Checkpoint each LM block and each vision block (torch.utils.checkpoint, non-reentrant): their activations
        are recomputed in the backward pass instead of kept, trading compute for memory. keep_blocks: the last that
        many LM blocks are not checkpointed, spending the memory a GPU has left on less recompute. Parameter names and
        generation are unchanged."""
        if not 0 <= keep_blocks <= len(self.lm.layers):
            raise ValueError(f"MLMamba: keep_blocks must be 0..{len(self.lm.layers)} (the LM's blocks), "
                             f"got {keep_blocks}")
        kept = set(self.lm.layers[len(self.lm.layers) - keep_blocks:]) if keep_blocks else set()
        for block in self.modules():
            if isinstance(block, (Mamba2Block, Block)):
                if enabled and block not in kept:
                    block.forward = functools.partial(_checkpointed_forward, block)   # shadows the class's forward
                else:
                    vars(block).pop("forward", None)
        self.gradient_checkpointing = enabled

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, has_image=None, lengths=None, max_new_tokens=64,
                 temperature=0.0, top_k=None, top_p=None, seed=None, eos_id=None, callback=None, decoder=None,
                 encode_images=None):
        """New tokens for a batch of prompts (right-padded input_ids with lengths, with or without images, as for
        `forward`): a list per row, ending with eos_id where the row produced it.

        The rows are prefilled together, each to its own length (`Mamba2LM.prefill`: the padding leaves the state
        alone), then step together. temperature 0 is greedy; otherwise sampling as `sample_next`, reproducible with
        seed. A row that has produced eos_id stops; generation ends when all have.
        callback(step, new_ids) gets each step's tokens (batch,), eos_id for the rows already finished.
        decoder: what allocates the cache, prefills it and takes each step (`allocate_cache`, `prefill`, `step`),
        self.lm by default; generate.CUDAGraphDecoder replays them from CUDA graphs. encode_images: a stand-in for
        self.encode_images, as `embed` takes it."""
        embeds, text_start, lengths = self.embed(input_ids, pixel_values, has_image, lengths, encode_images)
        ends = text_start + lengths                                                 # each row's prompt length
        if not bool(ends.all()):
            raise ValueError(f"MLMamba.generate: row {ends.tolist().index(0)} has neither an image nor any text to "
                             f"start from")
        batch = len(ends)
        decoder = self.lm if decoder is None else decoder
        cache = decoder.allocate_cache(batch)
        logits = decoder.prefill(embeds, ends, cache)                   # (batch, padded_vocab)
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
