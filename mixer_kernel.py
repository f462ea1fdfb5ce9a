"""The Mamba-2 mixer's small operations: RMSNorm, gated RMSNorm and the causal convolution, each a PyTorch reference
beside a Triton kernel for inference.

During generation a token costs two matrix-vector products per layer (in_proj, out_proj) and a handful of tiny
element-wise steps. Written as PyTorch ops, the tiny steps are ~29 kernels per layer (casts, powers, means, cat,
copy, SiLU...), each reading and writing a few kilobytes, and at batch 1 their launches, not the weights' bytes,
set the time per token. Here each is one kernel:

- `rms_norm`        x / rms(x) · w, the pre-norm of every block and the final norm, fused with the residual add
- `gated_rms_norm`  RMSNorm(y ⊙ SiLU(z)) over groups of channels (SSD paper §7.1, the norm before out_proj)
- `conv_step`       one token of the causal depthwise convolution + SiLU, shifting the conv state in place

The kernels compute forward only (no autograd): training goes through the references, which autograd differentiates.
On tensors off a GPU, without TRITON_INTERPRET=1, the three run their references, warning once (reference_off_gpu).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from ssd_kernel import reference_off_gpu


# ----------------------------------------------------------------------------------------------------------------------
# 1. References


def rms_norm_reference(x, weight, eps, residual=None):
    """x / rms(x) · weight over the last dimension, in float32 (float64 for float64), returned in the weight's dtype
    (mamba_ssm's RMSNorm).

    With a residual, the norm of s = x + residual (in residual's dtype) and s itself: (norm, s), the residual stream's
    add fused with the next block's norm (mamba_ssm's fused add + norm)."""
    if residual is not None:
        wide = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
        s = (residual.to(wide) + x.to(wide)).to(residual.dtype)             # one rounding, as mamba_ssm's
        return rms_norm_reference(s, weight, eps), s
    wide = torch.promote_types(x.dtype, torch.float32)                     # float32, or float64 for float64
    x = x.to(wide)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight.to(wide)).to(weight.dtype)


def gated_rms_norm_reference(y, z, weight, group_size, eps):
    """RMSNorm(y ⊙ SiLU(z)) over each group of `group_size` channels, returned in y's dtype (mamba_ssm's RMSNormGated
    with norm_before_gate=False)."""
    wide = torch.promote_types(y.dtype, torch.float32)                     # float32, or float64 for float64
    h = y.to(wide) * F.silu(z.to(wide))
    h = rearrange(h, "... (g d) -> ... g d", d=group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (rearrange(h, "... g d -> ... (g d)") * weight.to(wide)).to(y.dtype)


def causal_conv1d(xBC, weight, bias=None, conv_state=None):
    """Causal depthwise convolution, then SiLU: out_t = SiLU(bias + Σ_k weight[:, 0, k] ⊙ in_{t-d_conv+1+k}).

    xBC (batch, seqlen, channels); weight (channels, 1, d_conv) as nn.Conv1d stores it. Returns (batch, seqlen,
    channels), a transposed view. The inputs before the sequence are zeros or, with conv_state (batch, channels,
    d_conv), the last d_conv inputs seen so far; conv_state then gets the new last d_conv, in place."""
    batch, seqlen, channels = xBC.shape
    d_conv = weight.shape[-1]
    if conv_state is None:
        past = xBC.new_zeros(batch, channels, d_conv - 1)
    else:
        past = conv_state[..., 1:].to(xBC.dtype)
    window = torch.cat([past, rearrange(xBC, "b l c -> b c l")], dim=-1)    # (batch, channels, d_conv - 1 + seqlen)
    if conv_state is not None:
        conv_state.copy_(window[..., -d_conv:])
    out = F.conv1d(window, weight, bias, groups=channels)                   # (batch, channels, seqlen)
    return rearrange(F.silu(out), "b c l -> b l c")


def conv_step_reference(x, conv_state, weight, bias=None):
    """One token of causal_conv1d, with conv_step's arguments: x (batch, channels) -> (batch, channels)."""
    return causal_conv1d(x[:, None], weight, bias, conv_state)[:, 0].contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels


@triton.jit
def _rms_norm_kernel(
    y_ptr, z_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr,
    group_size, eps,
    stride_y, stride_z, stride_r, stride_out,
    HAS_Z: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One group of one row: out = h / rms(h) · w with h = y ⊙ SiLU(z), h = y + r (also stored to r_out, in r's
    dtype), or h = y.

    Must match gated_rms_norm_reference (with z) and rms_norm_reference (with or without residual, one group)."""
    row, g = tl.program_id(0), tl.program_id(1)
    offs = g * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    h = tl.load(y_ptr + row.to(tl.int64) * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row.to(tl.int64) * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * z * tl.sigmoid(z)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row.to(tl.int64) * stride_r + offs, mask=mask, other=0.0)
        s = (h + r.to(tl.float32)).to(r.dtype)                # rounded as the reference's sum, where r is bfloat16
        tl.store(r_out_ptr + row.to(tl.int64) * stride_r + offs, s, mask=mask)
        h = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + offs, h * rstd * w, mask=mask)


def _norm_launch(caller, y, z, residual, weight, group_size, eps, out_dtype):
    dim = y.shape[-1]
    for name, t in (("z", z), ("residual", residual)):
        if t is not None and t.shape != y.shape:
            raise ValueError(f"{caller}: {name} has shape {tuple(t.shape)}, the input {tuple(y.shape)}")
    if tuple(weight.shape) != (dim,):
        raise ValueError(f"{caller}: weight has shape {tuple(weight.shape)}, expected ({dim},)")
    rows = lambda t: t.reshape(-1, dim) if t is not None else None     # (rows, dim); a view where it can be
    y2, z2, r2 = rows(y), rows(z), rows(residual)
    if any(t is not None and t.stride(-1) != 1 for t in (y2, z2, r2)):
        y2, z2, r2 = (t.contiguous() if t is not None else None for t in (y2, z2, r2))
    if r2 is not None:
        r2 = r2.contiguous()                                            # r_out gets the same strides
    out = torch.empty(y2.shape, dtype=out_dtype, device=y.device)
    r_out = torch.empty_like(r2) if r2 is not None else None
    BLOCK = triton.next_power_of_2(group_size)
    _rms_norm_kernel[(y2.shape[0], dim // group_size)](
        y2, z2 if z2 is not None else y2, r2 if r2 is not None else y2, weight, out, r_out if r_out is not None else out,
        group_size, eps, y2.stride(0), z2.stride(0) if z2 is not None else 0, r2.stride(0) if r2 is not None else 0,
        out.stride(0), HAS_Z=z is not None, HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
        num_warps=min(max(BLOCK // 512, 1), 16))
    return out.view(y.shape), r_out.view(y.shape) if r_out is not None else None


@reference_off_gpu(rms_norm_reference)
def rms_norm(x, weight, eps, residual=None):
    """As rms_norm_reference, one kernel (forward only)."""
    out, s = _norm_launch("rms_norm", x, None, residual, weight, x.shape[-1], eps, weight.dtype)
    return (out, s) if residual is not None else out


@reference_off_gpu(gated_rms_norm_reference)
def gated_rms_norm(y, z, weight, group_size, eps):
    """As gated_rms_norm_reference, one kernel (forward only). z may be a strided view (a slice of in_proj's output)."""
    if y.shape[-1] % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide {y.shape[-1]} channels")
    return _norm_launch("gated_rms_norm", y, z, None, weight, group_size, eps, y.dtype)[0]


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    channels, d_conv,
    stride_x_b, stride_s_b, stride_s_c, stride_out_b,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token: window = [state[:, 1:], x] → state, out = SiLU(Σ_k w[:, k] window[:, k] + bias), for a block of
    channels of one sequence.

    Must match causal_conv1d with seqlen 1 and a conv_state."""
    b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    in_c = offs_c < channels
    b = b.to(tl.int64)
    x = tl.load(x_ptr + b * stride_x_b + offs_c, mask=in_c, other=0.0)
    s_ptrs = state_ptr + b * stride_s_b + offs_c[:, None] * stride_s_c + offs_k[None, :]
    older = tl.load(s_ptrs + 1, mask=in_c[:, None] & (offs_k[None, :] + 1 < d_conv), other=0.0)
    window = tl.where(offs_k[None, :] == d_conv - 1, x[:, None].to(older.dtype), older)     # (BLOCK_C, BLOCK_K)
    tl.store(s_ptrs, window, mask=in_c[:, None] & (offs_k[None, :] < d_conv))
    w = tl.load(w_ptr + offs_c[:, None] * d_conv + offs_k[None, :],
                mask=in_c[:, None] & (offs_k[None, :] < d_conv), other=0.0)
    out = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out_b + offs_c, out * tl.sigmoid(out), mask=in_c)


@reference_off_gpu(conv_step_reference)
def conv_step(x, conv_state, weight, bias=None):
    """One token of causal_conv1d (forward only): x (batch, channels), a row-contiguous view is fine; conv_state
    (batch, channels, d_conv), contiguous in d_conv, shifted in place; weight (channels, 1, d_conv). Returns (batch,
    channels), contiguous, in x's dtype."""
    batch, channels = x.shape
    d_conv = weight.shape[-1]
    if tuple(conv_state.shape) != (batch, channels, d_conv) or conv_state.stride(-1) != 1:
        raise ValueError(f"conv_step: conv_state must be ({batch}, {channels}, {d_conv}) and contiguous in d_conv, "
                         f"got {tuple(conv_state.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.reshape(channels, d_conv).contiguous()
    out = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
    BLOCK_C = 256
    _conv_step_kernel[(batch, triton.cdiv(channels, BLOCK_C))](
        x, conv_state, weight, bias if bias is not None else weight, out, channels, d_conv,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_K=triton.next_power_of_2(d_conv))
    return out
