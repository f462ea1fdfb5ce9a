"""The Mamba-2 mixer's small operations: RMSNorm, gated RMSNorm and the causal convolution, each a PyTorch reference
beside its Triton kernels.

Around the SSD scan and the two projections, a mixer is a handful of element-wise steps. Written as PyTorch ops they
are many kernels each (casts, powers, means, cat, copy, SiLU...), each reading and writing the whole activation, and
in training their backward passes as many again; at batch 1 in generation their launches, not the weights' bytes, set
the time per token. Here each is one kernel forward and one backward:

- `rms_norm`        x / rms(x) · w, the pre-norm of every block and the final norm
- `gated_rms_norm`  RMSNorm(y ⊙ SiLU(z)) over groups of channels (SSD paper §7.1, the norm before out_proj)
- `causal_conv1d`   the causal depthwise convolution + SiLU over a sequence
- `conv_step`       one token of it, shifting the conv state in place (forward only, for decoding)

and, for decoding, the two projections with the norms and the conv step fused in (§3: `norm_in_proj_conv`,
`gated_norm_out_proj`), so that a block is three kernels per token; for a forward without a cache (training,
evaluation), `mixer_scan` (§4): the conv, the SSD scan and the gated norm as one autograd node.

On tensors off a GPU, without TRITON_INTERPRET=1, each runs its reference, warning once (reference_off_gpu).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from ssd_kernel import (_check_chunking, _check_inputs, _ssd_bwd, _ssd_fwd, cdiv, next_pow2, reference_off_gpu,
                        ssd_reference)


# ----------------------------------------------------------------------------------------------------------------------
# 1. References


def rms_norm_reference(x, weight, eps):
    """x / rms(x) · weight over the last dimension, in float32 (float64 for float64), returned in the weight's dtype
    (mamba_ssm's RMSNorm)."""
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


def causal_conv1d_reference(xBC, weight, bias=None, initial_state=None):
    """Causal depthwise convolution, then SiLU: out_t = SiLU(bias + Σ_k weight[:, 0, k] ⊙ in_{t-d_conv+1+k}).

    xBC (batch, seqlen, channels); weight (channels, 1, d_conv) as nn.Conv1d stores it. Returns (batch, seqlen,
    channels), a transposed view. The inputs before the sequence are zeros or, with initial_state (batch, channels,
    d_conv), the conv state of a cache: the last d_conv inputs seen so far (`conv_state_after` gives the next one)."""
    batch, seqlen, channels = xBC.shape
    d_conv = weight.shape[-1]
    if initial_state is None:
        past = xBC.new_zeros(batch, channels, d_conv - 1)
    else:
        past = initial_state[..., 1:].to(xBC.dtype)
    window = torch.cat([past, rearrange(xBC, "b l c -> b c l")], dim=-1)    # (batch, channels, d_conv - 1 + seqlen)
    out = F.conv1d(window, weight, bias, groups=channels)                   # (batch, channels, seqlen)
    return rearrange(F.silu(out), "b c l -> b l c")


def conv_state_after(conv_state, xBC, lengths=None):
    """The conv state once xBC (batch, seqlen, channels) has followed conv_state (batch, channels, d_conv): the last
    d_conv inputs, (batch, channels, d_conv) in conv_state's dtype. With lengths (batch,), values in 0..seqlen, row b
    stops after its first lengths[b] inputs (the rest is padding)."""
    (batch, seqlen, channels), d_conv = xBC.shape, conv_state.shape[-1]
    ends = lengths if lengths is not None else torch.full((batch,), seqlen, device=xBC.device)
    t = ends[:, None] + torch.arange(-d_conv, 0, device=xBC.device)         # (batch, d_conv): the times kept
    # t ≥ 0 from xBC, t < 0 from the old state, whose column j holds time j - d_conv (only those d_conv are read)
    new = xBC.gather(1, t.clamp(min=0)[..., None].expand(-1, -1, channels))           # (batch, d_conv, channels)
    old = conv_state.gather(-1, (t + d_conv).clamp(max=d_conv - 1)[:, None].expand(-1, channels, -1))
    return torch.where(t[:, None] < 0, old, rearrange(new, "b k c -> b c k").to(conv_state.dtype))


def conv_step_reference(x, conv_state, weight, bias=None):
    """One token of causal_conv1d, with conv_step's arguments: x (batch, channels) -> (batch, channels), conv_state
    advanced in place."""
    out = causal_conv1d_reference(x[:, None], weight, bias, conv_state)[:, 0].contiguous()
    conv_state.copy_(conv_state_after(conv_state, x[:, None]))
    return out


def norm_in_proj_conv_reference(h, norm_weight, eps, in_proj, conv_state, conv_weight, conv_bias=None, conv_start=0):
    """One token into a Mamba-2 block: p = in_proj(RMSNorm(h)), with p's xBC channels [conv_start, conv_start +
    conv_dim) replaced by conv_step's output (conv_state advanced in place). h (batch, d_model) is the residual
    stream; in_proj an nn.Linear; returns p (batch, d_in_proj) in in_proj's dtype."""
    conv_dim = conv_state.shape[1]
    p = F.linear(rms_norm_reference(h, norm_weight, eps).to(in_proj.weight.dtype), in_proj.weight, in_proj.bias)
    xBC = conv_step_reference(p[:, conv_start:conv_start + conv_dim], conv_state, conv_weight, conv_bias)
    return torch.cat([p[:, :conv_start], xBC, p[:, conv_start + conv_dim:]], dim=-1)


def gated_norm_out_proj_reference(y, z, norm_weight, group_size, eps, out_proj, h):
    """One token out of a Mamba-2 block: h ← h + out_proj(RMSNorm(y ⊙ SiLU(z))), in place, the sum rounded once to
    h's dtype (the residual stream's). y, z (batch, d_inner); out_proj an nn.Linear; h (batch, d_model). Returns h."""
    out = F.linear(gated_rms_norm_reference(y, z, norm_weight, group_size, eps).to(out_proj.weight.dtype),
                   out_proj.weight, out_proj.bias)
    wide = torch.promote_types(torch.promote_types(h.dtype, out.dtype), torch.float32)
    return h.copy_(h.to(wide) + out.to(wide))


# ----------------------------------------------------------------------------------------------------------------------
# 2. Triton kernels


@triton.jit
def _rms_norm_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr,
    group_size, ngroups, eps,
    stride_y, stride_z, stride_out,
    HAS_Z: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One group of one row: out = h / rms(h) · w with h = y ⊙ SiLU(z), or h = y; with STORE_RSTD, 1 / rms(h) for
    the backward pass.

    Must match gated_rms_norm_reference (with z) and rms_norm_reference (one group)."""
    row, g = tl.program_id(0), tl.program_id(1)
    offs = g * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    h = tl.load(y_ptr + row.to(tl.int64) * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row.to(tl.int64) * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row * ngroups + g, rstd)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + offs, h * rstd * w, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr,
    rows, rows_per_program, group_size, ngroups,
    stride_y, stride_z, stride_dout, stride_dy, stride_dz,
    HAS_Z: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradients of _rms_norm_kernel for one group over a run of rows. With n = h · rstd and
    out = n ⊙ w:

        dn = dout ⊙ w,   dh = rstd · (dn − n · mean(dn ⊙ n)),   dw = Σ_rows dout ⊙ n
        h = y ⊙ SiLU(z):  dy = dh ⊙ SiLU(z),  dz = dh ⊙ y ⊙ σ(z)(1 + z(1 − σ(z)))

    Each program writes its partial dw to its own row of dw_ptr; the caller sums them. Must match the autograd
    gradients of gated_rms_norm_reference (with z) and rms_norm_reference."""
    pid, g = tl.program_id(0), tl.program_id(1)
    offs = g * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program                  # int64: so is the loop's row, for large offsets
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
        h = y
        if HAS_Z:
            z = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            h = y * z * sig
        rstd = tl.load(rstd_ptr + row * ngroups + g)
        n = h * rstd
        dout = tl.load(dout_ptr + row * stride_dout + offs, mask=mask, other=0.0).to(tl.float32)
        dw += dout * n
        dn = dout * w
        dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / group_size))
        if HAS_Z:
            tl.store(dz_ptr + row * stride_dz + offs, dh * y * sig * (1 + z * (1 - sig)), mask=mask)
            dh = dh * z * sig
        tl.store(dy_ptr + row * stride_dy + offs, dh, mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * ngroups * group_size + offs, dw, mask=mask)


def _num_warps(block):
    return min(max(block // 512, 1), 16)


def _as_rows(dim, *tensors):
    """(rows, dim) views of the tensors (None stays None), copied only where the last dimension is strided."""
    rows = [t.reshape(-1, dim) if t is not None else None for t in tensors]
    if any(t is not None and t.stride(-1) != 1 for t in rows):
        rows = [t.contiguous() if t is not None else None for t in rows]
    return rows


def _check_norm_inputs(caller, y, z, weight):
    if z is not None and z.shape != y.shape:
        raise ValueError(f"{caller}: z has shape {tuple(z.shape)}, the input {tuple(y.shape)}")
    if tuple(weight.shape) != (y.shape[-1],):
        raise ValueError(f"{caller}: weight has shape {tuple(weight.shape)}, expected ({y.shape[-1]},)")


def _norm_fwd(y2, z2, weight, group_size, eps, out_dtype, store_rstd):
    """Launch _rms_norm_kernel on (rows, dim) inputs: (out, rstd (rows, groups) or None)."""
    (n_rows, dim), ngroups = y2.shape, y2.shape[1] // group_size
    out = torch.empty(y2.shape, dtype=out_dtype, device=y2.device)
    rstd = torch.empty(n_rows, ngroups, dtype=torch.float32, device=y2.device) if store_rstd else None
    BLOCK = next_pow2(group_size)
    _rms_norm_kernel[(n_rows, ngroups)](
        y2, z2 if z2 is not None else y2, weight, out, rstd if rstd is not None else out,
        group_size, ngroups, eps, y2.stride(0), z2.stride(0) if z2 is not None else 0, out.stride(0),
        HAS_Z=z2 is not None, STORE_RSTD=store_rstd, BLOCK=BLOCK, num_warps=_num_warps(BLOCK))
    return out, rstd


# Rows per backward program: each program sums its rows' dw, then the caller sums the programs'. 16 was the best of
# 4, 16 and 64 on an H200 for the 130M shapes (the gated norm of 1536 channels, the block's norm of 768).
_NORM_BWD_ROWS = 16


class _RMSNorm(torch.autograd.Function):
    """RMSNorm of y, or of y ⊙ SiLU(z), over groups: _rms_norm_kernel forward, _rms_norm_bwd_kernel backward. Inputs
    as (rows, dim); keeps y, z and 1/rms per row and group (not the output) for the backward pass."""

    @staticmethod
    def forward(ctx, y2, z2, weight, group_size, eps, out_dtype):
        out, rstd = _norm_fwd(y2, z2, weight, group_size, eps, out_dtype, any(ctx.needs_input_grad))
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        return (*_norm_bwd(dout, y2, z2, weight, rstd, ctx.group_size), None, None, None)


def _norm_bwd(dout, y2, z2, weight, rstd, group_size, dz=None):
    """Launch _rms_norm_bwd_kernel on (rows, dim) tensors: (dy, dz or None, dweight). dz is written into the tensor
    given ((rows, dim), rows strided as z2's may be: `mixer_scan` gives a slice of in_proj's gradient), else a new
    one."""
    n_rows, dim = y2.shape
    dout = dout.contiguous()
    dy = torch.empty(y2.shape, dtype=y2.dtype, device=y2.device)
    if z2 is not None and dz is None:
        dz = torch.empty(z2.shape, dtype=z2.dtype, device=z2.device)
    programs = cdiv(n_rows, _NORM_BWD_ROWS)
    dw = torch.empty(programs, dim, dtype=torch.float32, device=y2.device)
    BLOCK = next_pow2(group_size)
    _rms_norm_bwd_kernel[(programs, dim // group_size)](
        y2, z2 if z2 is not None else y2, weight, rstd, dout, dy, dz if dz is not None else dy, dw,
        n_rows, _NORM_BWD_ROWS, group_size, dim // group_size, y2.stride(0),
        z2.stride(0) if z2 is not None else 0, dout.stride(0), dy.stride(0), dz.stride(0) if dz is not None else 0,
        HAS_Z=z2 is not None, BLOCK=BLOCK, num_warps=_num_warps(BLOCK))
    return dy, dz, dw.sum(0).to(weight.dtype)


@reference_off_gpu(rms_norm_reference)
def rms_norm(x, weight, eps):
    """As rms_norm_reference: one kernel forward, one backward."""
    _check_norm_inputs("rms_norm", x, None, weight)
    dim = x.shape[-1]
    return _RMSNorm.apply(*_as_rows(dim, x, None), weight, dim, eps, weight.dtype).view(x.shape)


@reference_off_gpu(gated_rms_norm_reference)
def gated_rms_norm(y, z, weight, group_size, eps):
    """As gated_rms_norm_reference: one kernel forward, one backward. z may be a strided view (a slice of in_proj's
    output)."""
    if y.shape[-1] % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide {y.shape[-1]} channels")
    _check_norm_inputs("gated_rms_norm", y, z, weight)
    y2, z2 = _as_rows(y.shape[-1], y, z)
    return _RMSNorm.apply(y2, z2, weight, group_size, eps, y.dtype).view(y.shape)


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, state_ptr, b, offs_l, offs_c, in_c, seqlen, stride_x_b, stride_x_l,
              stride_s_b, stride_s_c, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, D_CONV: tl.constexpr,
              X_ALIGN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """pre_t = bias + Σ_k w[:, k] ⊙ x_{t-D_CONV+1+k} for positions offs_l and channels offs_c, float32: the
    convolution before SiLU, shared by the forward and the backward (which recomputes it). Before t = 0: zeros, or
    with HAS_STATE the conv state (batch, channels, D_CONV), whose column j holds x_{j-D_CONV}. X_ALIGN, a power of two
    dividing both of x's strides, lets x's rows load as vectors when xBC is a slice of a wider projection."""
    pre = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(D_CONV):
        t = offs_l - (D_CONV - 1) + k
        x_rows = tl.multiple_of(b * stride_x_b + t * stride_x_l, X_ALIGN)
        x = tl.load(x_ptr + x_rows[:, None] + offs_c[None, :],
                    mask=((t >= 0) & (t < seqlen))[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            x += tl.load(state_ptr + b * stride_s_b + offs_c[None, :] * stride_s_c + (t + D_CONV)[:, None],
                         mask=(t < 0)[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_c * D_CONV + k, mask=in_c, other=0.0)
        pre += x * w.to(tl.float32)[None, :]
    return pre


@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr,
    seqlen, channels,
    stride_x_b, stride_x_l, stride_s_b, stride_s_c, stride_out_b, stride_out_l,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, D_CONV: tl.constexpr, X_ALIGN: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A (BLOCK_L, BLOCK_C) tile of out_t = SiLU(pre_t) (_conv_pre).

    Must match causal_conv1d_reference."""
    b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < channels
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, state_ptr, b, offs_l, offs_c, in_c, seqlen, stride_x_b, stride_x_l,
                    stride_s_b, stride_s_c, HAS_BIAS, HAS_STATE, D_CONV, X_ALIGN, BLOCK_L, BLOCK_C)
    tl.store(out_ptr + b * stride_out_b + offs_l[:, None] * stride_out_l + offs_c[None, :], pre * tl.sigmoid(pre),
             mask=(offs_l < seqlen)[:, None] & in_c[None, :])


@triton.jit
def _causal_conv1d_bwd_dpre_kernel(
    x_ptr, w_ptr, bias_ptr, dout_ptr, dpre_ptr, dbias_ptr,
    seqlen, channels,
    stride_x_b, stride_x_l, stride_dout_b, stride_dout_l, stride_dpre_b, stride_dpre_l,
    HAS_BIAS: tl.constexpr, D_CONV: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The first half of _causal_conv1d_fwd_kernel's gradients, for one tile, pre recomputed (_conv_pre) rather than
    stored:

        dpre_t = dout_t ⊙ σ(pre_t)(1 + pre_t(1 − σ(pre_t)))      stored in dout's dtype
        dbias  = Σ_t dpre_t                                      this tile's positions: one partial row per L-block

    _causal_conv1d_bwd_dx_kernel then takes dpre to dx and dw. Together they must match the autograd gradients of
    causal_conv1d_reference without a conv_state."""
    b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < channels
    in_tile = (offs_l < seqlen)[:, None] & in_c[None, :]
    # no conv state: training starts from zeros (x_ptr stands in for the state's pointer, unread)
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, x_ptr, b, offs_l, offs_c, in_c, seqlen, stride_x_b, stride_x_l, 0, 0,
                    HAS_BIAS, False, D_CONV, X_ALIGN, BLOCK_L, BLOCK_C)
    dout = tl.load(dout_ptr + b * stride_dout_b + offs_l[:, None] * stride_dout_l + offs_c[None, :], mask=in_tile,
                   other=0.0)
    sig = tl.sigmoid(pre)
    dpre = dout.to(tl.float32) * sig * (1 + pre * (1 - sig))
    tl.store(dpre_ptr + b * stride_dpre_b + offs_l[:, None] * stride_dpre_l + offs_c[None, :], dpre.to(dout.dtype),
             mask=in_tile)
    if HAS_BIAS:
        part = b * tl.num_programs(1) + pid_l                                 # this (batch, L-block)
        tl.store(dbias_ptr + part * channels + offs_c, tl.sum(dpre, axis=0), mask=in_c)     # 0 where dout is masked


@triton.jit
def _causal_conv1d_bwd_dx_kernel(
    dpre_ptr, w_ptr, x_ptr, dx_ptr, dw_ptr,
    seqlen, channels,
    stride_dpre_b, stride_dpre_l, stride_x_b, stride_x_l, stride_dx_b, stride_dx_l,
    D_CONV: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The second half of the gradients, after _causal_conv1d_bwd_dpre_kernel, for one tile of input positions s:
    each input x_s feeds the next D_CONV outputs, through the taps reversed, so with j = D_CONV-1-k

        dx_s = Σ_j w[:, D_CONV-1-j] ⊙ dpre_{s+j}
        dw_k = Σ_s dpre_{s+j} ⊙ x_s                  this tile's positions: one partial (D_CONV, channels) per L-block

    (dw_k = Σ_t dpre_t ⊙ x_{t-D_CONV+1+k} with s = t-D_CONV+1+k; the x_s before 0 are zeros.) dw is summed from dpre
    as stored, in dout's dtype, where dbias took it in float32: in bfloat16 dw's error grows a little (0.45% against
    0.32% of its largest entry at the tests' shape), for half the bytes of a float32 dpre."""
    b, pid_l, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < channels
    in_tile = (offs_l < seqlen)[:, None] & in_c[None, :]
    x_rows = tl.multiple_of(b * stride_x_b + offs_l * stride_x_l, X_ALIGN)
    x = tl.load(x_ptr + x_rows[:, None] + offs_c[None, :], mask=in_tile, other=0.0).to(tl.float32)
    part = b * tl.num_programs(1) + pid_l                                     # this (batch, L-block)
    dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(D_CONV):
        t = offs_l + j
        dpre = tl.load(dpre_ptr + b * stride_dpre_b + t[:, None] * stride_dpre_l + offs_c[None, :],
                       mask=(t < seqlen)[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_c * D_CONV + (D_CONV - 1 - j), mask=in_c, other=0.0)
        dx += dpre * w.to(tl.float32)[None, :]
        tl.store(dw_ptr + (part * D_CONV + D_CONV - 1 - j) * channels + offs_c, tl.sum(dpre * x, axis=0), mask=in_c)
    tl.store(dx_ptr + b * stride_dx_b + offs_l[:, None] * stride_dx_l + offs_c[None, :], dx, mask=in_tile)


# Tiles: the forward's within 10% of its best at 32 positions x 128 channels, from a sweep of it and of the former
# dx-only backward kernel on an H200 at the 130M training shape; the backward's two kernels reuse it, untimed. Their
# partial sums are one row of (D_CONV + 1) x channels floats per (batch, L-block): 53 MB at the paper step's shape,
# 5% of the backward's other bytes. (The backward before 2026-12-07 summed dw in (D_CONV, L, C) float32 tiles in
# one kernel, which held its tiles to 8 x 64: 790-830 µs at the paper step's shape on an H100, against 160 µs for
# the forward.)
_CONV_BLOCK_L, _CONV_BLOCK_C = 32, 128


def _conv_grid(batch, seqlen, channels):
    return batch, cdiv(seqlen, _CONV_BLOCK_L), cdiv(channels, _CONV_BLOCK_C)


def _conv_fwd(xBC, weight, bias, initial_state):
    """_causal_conv1d_fwd_kernel over the whole sequence: (batch, seqlen, channels), contiguous."""
    batch, seqlen, channels = xBC.shape
    out = torch.empty(batch, seqlen, channels, dtype=xBC.dtype, device=xBC.device)
    state = initial_state if initial_state is not None else out                # a pointer the kernel never reads
    _causal_conv1d_fwd_kernel[_conv_grid(batch, seqlen, channels)](
        xBC, weight, bias if bias is not None else weight, state, out, seqlen, channels, xBC.stride(0),
        xBC.stride(1), state.stride(0), state.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
        HAS_STATE=initial_state is not None, D_CONV=weight.shape[1], X_ALIGN=_row_align(xBC), BLOCK_L=_CONV_BLOCK_L,
        BLOCK_C=_CONV_BLOCK_C)
    return out


def _row_align(x):
    """The largest power of two ≤ 16 dividing x's batch and position strides: xBC is a slice of in_proj's wider
    output, whose rows start at multiples of 8 elements (3352 at the 130M shape) but not always of 16."""
    strides = x.stride(0) | x.stride(1) | 16
    return strides & -strides


class _CausalConv1d(torch.autograd.Function):
    """causal_conv1d: _causal_conv1d_fwd_kernel forward; backward _causal_conv1d_bwd_dpre_kernel (to dpre and dbias),
    then _causal_conv1d_bwd_dx_kernel (to dx and dw). Keeps only its input: the pre-activation is recomputed in the
    backward pass.

    (One backward kernel recomputing pre at the D_CONV later positions each input feeds held D_CONV² shifted tiles
    live and spilled registers: 1 ms per call at the 130M shape on an H200, against 83 µs for the forward.)"""

    @staticmethod
    def forward(ctx, xBC, weight, bias):
        ctx.save_for_backward(xBC, weight, bias)
        return _conv_fwd(xBC, weight, bias, None)

    @staticmethod
    def backward(ctx, dout):
        return _conv_bwd(dout, *ctx.saved_tensors)


def _conv_bwd(dout, xBC, weight, bias, dx=None):
    """The two backward kernels: (dx, dweight (channels, d_conv), dbias or None). dx is written into the tensor given
    ((batch, seqlen, channels), contiguous in channels: `mixer_scan` gives a slice of in_proj's gradient), else a new
    one."""
    (batch, seqlen, channels), d_conv = xBC.shape, weight.shape[1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    grid = _conv_grid(batch, seqlen, channels)
    parts = batch * grid[1]                                            # partial sums, one row per (batch, L-block)
    dpre = torch.empty(batch, seqlen, channels, dtype=dout.dtype, device=xBC.device)
    dbias = torch.empty(parts, channels, dtype=torch.float32, device=xBC.device) if bias is not None else None
    _causal_conv1d_bwd_dpre_kernel[grid](
        xBC, weight, bias if bias is not None else weight, dout, dpre, dbias if dbias is not None else dpre,
        seqlen, channels, xBC.stride(0), xBC.stride(1), dout.stride(0), dout.stride(1), dpre.stride(0),
        dpre.stride(1), HAS_BIAS=bias is not None, D_CONV=d_conv, X_ALIGN=_row_align(xBC), BLOCK_L=_CONV_BLOCK_L,
        BLOCK_C=_CONV_BLOCK_C)
    dx = torch.empty(batch, seqlen, channels, dtype=xBC.dtype, device=xBC.device) if dx is None else dx
    dw = torch.empty(parts, d_conv, channels, dtype=torch.float32, device=xBC.device)
    _causal_conv1d_bwd_dx_kernel[grid](
        dpre, weight, xBC, dx, dw, seqlen, channels, dpre.stride(0), dpre.stride(1), xBC.stride(0), xBC.stride(1),
        dx.stride(0), dx.stride(1), D_CONV=d_conv, X_ALIGN=_row_align(xBC), BLOCK_L=_CONV_BLOCK_L,
        BLOCK_C=_CONV_BLOCK_C)
    dbias = dbias.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw.sum(0).T.to(weight.dtype), dbias


@reference_off_gpu(causal_conv1d_reference)
def causal_conv1d(xBC, weight, bias=None, initial_state=None):
    """As causal_conv1d_reference: one kernel forward, two backward. xBC (batch, seqlen, channels) may be a strided
    view (a slice of in_proj's output) if contiguous in channels; weight (channels, 1, d_conv). Returns (batch,
    seqlen, channels), contiguous, in xBC's dtype. With an initial_state (a cache's conv state, for a prefill) the
    kernel is forward only (the reference that runs off a GPU is differentiable)."""
    batch, seqlen, channels = xBC.shape
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f"causal_conv1d: weight has shape {tuple(weight.shape)}, expected ({channels}, 1, d_conv)")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d: bias has shape {tuple(bias.shape)}, expected ({channels},)")
    if xBC.stride(-1) != 1:
        xBC = xBC.contiguous()
    weight = weight.reshape(channels, -1).contiguous()
    if initial_state is None:
        return _CausalConv1d.apply(xBC, weight, bias)
    if tuple(initial_state.shape) != (batch, channels, weight.shape[1]) or initial_state.stride(-1) != 1:
        raise ValueError(f"causal_conv1d: initial_state must be ({batch}, {channels}, {weight.shape[1]}) and "
                         f"contiguous in its last dimension, got {tuple(initial_state.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xBC, weight, bias, initial_state)):
        raise ValueError("causal_conv1d: with an initial_state it is forward only (prefill into a cache)")
    return _conv_fwd(xBC, weight, bias, initial_state)


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
    _conv_step_kernel[(batch, cdiv(channels, BLOCK_C))](
        x, conv_state, weight, bias if bias is not None else weight, out, channels, d_conv,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_K=next_pow2(d_conv))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 3. One token through a block in three kernels (decoding)
#
# At batch 1 a block reads its weights once per token, and the time is those bytes plus one launch per kernel. The
# norms and the conv step are small enough to ride along with the two projections that read the weights:
#     norm_in_proj_conv     p = in_proj(RMSNorm(h)), the conv step on p's xBC channels
#     ssd_step              (ssd_kernel.py) the SSM recurrence, one token
#     gated_norm_out_proj   h ← h + out_proj(RMSNorm(y ⊙ SiLU(z)))    (the extra norm of SSD §7.1)
# Each program computes BLOCK_N output channels of one row: a matrix-vector product, whose time is its weight bytes.
# The norm's 1 / rms is one number per row (and group), so it factors out of the dot product: the loop over the input
# channels sums the squares beside the products, and scales once at the end. Every program reads the whole (small)
# input row rather than wait for another. Each row reads the weights again (L2 catches only some of the repeats), so
# above one row cuBLAS's matrix products are faster: `Mamba2LM._decode_step` takes these at batch 1 only.


@triton.jit
def _norm_in_proj_conv_kernel(
    h_ptr, norm_w_ptr, w_ptr, bias_ptr, state_ptr, conv_w_ptr, conv_b_ptr, out_ptr,
    N, K, conv_start, conv_dim, eps,
    stride_h, stride_s_b, stride_s_c, stride_out,
    HAS_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, D_CONV: tl.constexpr, K_POW2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """p = RMSNorm(h) Wᵀ + bias for BLOCK_N output channels of one row (W (N, K), in_proj's weight), as
    p = (1 / rms(h)) · ((h ⊙ norm_w) Wᵀ) + bias; then on p's channels in [conv_start, conv_start + conv_dim), the
    conv step: window = [state[:, 1:], p] → state, p ← SiLU(Σ_k conv_w[:, k] window[:, k] + conv_bias).

    Must match norm_in_proj_conv_reference."""
    row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)                  # summed over the input channels at the end
    squares = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        h = tl.load(h_ptr + row * stride_h + offs_k, mask=in_k, other=0.0).to(tl.float32)
        squares += h * h
        # h ⊙ norm_w stays float32: the reference rounds the normalised input to the weight's dtype, but unscaled
        # values of the residual stream could overflow float16
        u = h * tl.load(norm_w_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=in_n[:, None] & in_k[None, :],
                    other=0.0)
        products += w.to(tl.float32) * u[None, :]
    acc = tl.sum(products, axis=1) / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    p = acc.to(out_ptr.dtype.element_ty)                                   # rounded as F.linear's output
    if (pid_n * BLOCK_N < conv_start + conv_dim) & (pid_n * BLOCK_N + BLOCK_N > conv_start):
        c = offs_n - conv_start                                            # conv channel of each output channel
        is_conv = (c >= 0) & (c < conv_dim)
        k = tl.arange(0, K_POW2)
        in_window = is_conv[:, None] & (k[None, :] < D_CONV)
        s_ptrs = state_ptr + row * stride_s_b + c[:, None] * stride_s_c + k[None, :]
        older = tl.load(s_ptrs + 1, mask=is_conv[:, None] & (k[None, :] + 1 < D_CONV), other=0.0)
        window = tl.where(k[None, :] == D_CONV - 1, p[:, None].to(older.dtype), older)     # (BLOCK_N, K_POW2)
        conv = tl.sum(window.to(tl.float32) * tl.load(conv_w_ptr + c[:, None] * D_CONV + k[None, :], mask=in_window,
                                                      other=0.0).to(tl.float32), axis=1)
        # threads holding copies of the same state column: all read it before any overwrites it
        tl.debug_barrier()
        tl.store(s_ptrs, window, mask=in_window)
        if HAS_CONV_BIAS:
            conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)
        p = tl.where(is_conv, (conv * tl.sigmoid(conv)).to(p.dtype), p)
    tl.store(out_ptr + row * stride_out + offs_n, p, mask=in_n)


@triton.jit
def _gated_norm_out_proj_kernel(
    y_ptr, z_ptr, norm_w_ptr, w_ptr, bias_ptr, h_ptr,
    N, K, group_size, eps,
    stride_y, stride_z, stride_h,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """h ← h + RMSNorm(y ⊙ SiLU(z)) Wᵀ + bias for BLOCK_N of h's channels of one row (W (N, K), out_proj's weight),
    the norm over groups of group_size input channels: per group, (1 / rms(g)) · ((g ⊙ norm_w) Wᵀ) with
    g = y ⊙ SiLU(z).

    Must match gated_norm_out_proj_reference."""
    row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(0, K, group_size):
        products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in tl.range(g0, g0 + group_size, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < g0 + group_size
            y = tl.load(y_ptr + row * stride_y + offs_k, mask=in_k, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + row * stride_z + offs_k, mask=in_k, other=0.0).to(tl.float32)
            g = y * z * tl.sigmoid(z)
            squares += g * g
            u = g * tl.load(norm_w_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32)       # float32, as above
            w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=in_n[:, None] & in_k[None, :], other=0.0)
            products += w.to(tl.float32) * u[None, :]
        acc += tl.sum(products, axis=1) / tl.sqrt(tl.sum(squares, axis=0) / group_size + eps)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    out = acc.to(w_ptr.dtype.element_ty)                                   # rounded as F.linear's output
    h_ptrs = h_ptr + row * stride_h + offs_n
    h = tl.load(h_ptrs, mask=in_n, other=0.0)
    tl.store(h_ptrs, (h.to(tl.float32) + out.to(tl.float32)).to(h.dtype), mask=in_n)


# Tiles (BLOCK_N, BLOCK_K, num_stages, num_warps), the best of 8 and 6 in a sweep on an H200 at the Mamba-2 2.7B shapes
# (in_proj 10576 x 2560, out_proj 2560 x 5120), timed as the whole batch-1 decoding step in a CUDA graph: 2.27-3.01 and
# 2.52-2.68 ms/token; 17.0 and 11.9 µs per call under the profiler, against 12.8 and 6.2 µs for their bytes.
_IN_PROJ_TILE = (16, 256, 3, 4)
_OUT_PROJ_TILE = (16, 512, 1, 8)


def _check_decode_inputs(caller, x, norm_weight, linear, *others):
    """x is the projection's input: (batch, in_features), contiguous in channels."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, norm_weight, linear.weight, linear.bias, *others)):
        raise ValueError(f"{caller}: forward only (decoding); under autograd use {caller}_reference")
    in_features = linear.weight.shape[1]
    if x.dim() != 2 or x.shape[1] != in_features or x.stride(-1) != 1:
        raise ValueError(f"{caller}: the input must be (batch, {in_features}), contiguous in channels, got "
                         f"{tuple(x.shape)}")
    if not (linear.weight.is_contiguous() and norm_weight.is_contiguous()) or norm_weight.shape != (in_features,):
        raise ValueError(f"{caller}: the projection's weight and the norm's weight ({in_features},) must be "
                         f"contiguous; got {tuple(linear.weight.shape)} and {tuple(norm_weight.shape)}")


@reference_off_gpu(norm_in_proj_conv_reference)
def norm_in_proj_conv(h, norm_weight, eps, in_proj, conv_state, conv_weight, conv_bias=None, conv_start=0):
    """As norm_in_proj_conv_reference, one kernel (forward only): h (batch, d_model), contiguous in channels;
    conv_state (batch, conv_dim, d_conv), contiguous in d_conv; conv_weight (conv_dim, 1, d_conv)."""
    _check_decode_inputs("norm_in_proj_conv", h, norm_weight, in_proj, conv_weight, conv_bias)
    batch, K = h.shape
    N = in_proj.weight.shape[0]
    if conv_state.dim() != 3 or conv_state.shape[0] != batch or conv_state.stride(-1) != 1:
        raise ValueError(f"norm_in_proj_conv: conv_state must be ({batch}, conv_dim, d_conv), contiguous in d_conv; "
                         f"got {tuple(conv_state.shape)}")
    conv_dim, d_conv = conv_state.shape[1:]
    if not 0 <= conv_start <= N - conv_dim or conv_weight.numel() != conv_dim * d_conv or (
            conv_bias is not None and conv_bias.shape != (conv_dim,)):
        raise ValueError(f"norm_in_proj_conv: the conv's {conv_dim} channels must lie within in_proj's {N} outputs "
                         f"(from conv_start {conv_start}), with weight ({conv_dim}, 1, {d_conv}) and bias "
                         f"({conv_dim},); got {tuple(conv_weight.shape)} and "
                         f"{tuple(conv_bias.shape) if conv_bias is not None else None}")
    out = torch.empty(batch, N, dtype=in_proj.weight.dtype, device=h.device)
    bn, bk, stages, warps = _IN_PROJ_TILE
    bias = in_proj.bias
    _norm_in_proj_conv_kernel[(batch, cdiv(N, bn))](
        h, norm_weight, in_proj.weight, bias if bias is not None else h, conv_state,
        conv_weight.reshape(conv_dim, d_conv).contiguous(), conv_bias if conv_bias is not None else h, out,
        N, K, conv_start, conv_dim, eps, h.stride(0), conv_state.stride(0), conv_state.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, HAS_CONV_BIAS=conv_bias is not None, D_CONV=d_conv, K_POW2=next_pow2(d_conv),
        BLOCK_N=bn, BLOCK_K=min(bk, next_pow2(K)), STAGES=stages, num_warps=warps)
    return out


@reference_off_gpu(gated_norm_out_proj_reference)
def gated_norm_out_proj(y, z, norm_weight, group_size, eps, out_proj, h):
    """As gated_norm_out_proj_reference, one kernel (forward only): y, z (batch, d_inner), contiguous in channels
    (z may be a slice of in_proj's output); h (batch, d_model), contiguous, updated in place and returned."""
    _check_decode_inputs("gated_norm_out_proj", y, norm_weight, out_proj, z, h)
    batch, K = y.shape
    if z.shape != y.shape or z.stride(-1) != 1 or group_size <= 0 or K % group_size:
        raise ValueError(f"gated_norm_out_proj: z must be y's shape {tuple(y.shape)}, contiguous in channels, and "
                         f"the {K} channels in groups of {group_size}; got z {tuple(z.shape)}")
    N = out_proj.weight.shape[0]
    if h.shape != (batch, N) or not h.is_contiguous():
        raise ValueError(f"gated_norm_out_proj: h must be ({batch}, {N}) and contiguous, got {tuple(h.shape)}")
    bn, bk, stages, warps = _OUT_PROJ_TILE
    bias = out_proj.bias
    _gated_norm_out_proj_kernel[(batch, cdiv(N, bn))](
        y, z, norm_weight, out_proj.weight, bias if bias is not None else h, h, N, K, group_size, eps,
        y.stride(0), z.stride(0), h.stride(0), HAS_BIAS=bias is not None, BLOCK_N=bn,
        BLOCK_K=min(bk, next_pow2(group_size)), STAGES=stages, num_warps=warps)
    return h


# ----------------------------------------------------------------------------------------------------------------------
# 4. The mixer between its projections in one autograd node (training, evaluation)


def _split_in_proj(zxbcdt, d_inner, nheads):
    """in_proj's output (batch, seqlen, d_inner + conv_dim + nheads) -> views z, xBC, dt."""
    return torch.split(zxbcdt, [d_inner, zxbcdt.shape[-1] - d_inner - nheads, nheads], dim=-1)


def _split_xBC(xBC, d_inner, headdim, ngroups):
    """The conv's output (batch, seqlen, conv_dim) -> views x (batch, seqlen, nheads, headdim), B and C (batch, seqlen,
    ngroups, dstate)."""
    d_state = (xBC.shape[-1] - d_inner) // (2 * ngroups)
    x, B, C = torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    return (rearrange(x, "b l (h p) -> b l h p", p=headdim), rearrange(B, "b l (g n) -> b l g n", g=ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=ngroups))


def mixer_scan_reference(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, headdim, ngroups, chunk_size,
                         group_size, eps):
    """Mamba2Mixer.forward without a cache (the Mamba-2 block, SSD paper §7.1), from in_proj's output zxbcdt = [z, x,
    B, C, dt] to out_proj's input:

        x, B, C = SiLU(conv1d(xBC));   y = SSD(x, Δ = softplus(dt + dt_bias), A, B, C) + D x;   RMSNorm(y ⊙ SiLU(z))

    composed of the references. zxbcdt (batch, seqlen, d_inner + conv_dim + nheads); conv_weight (conv_dim, 1,
    d_conv); A, D, dt_bias (nheads,); norm_weight (d_inner,). Returns (batch, seqlen, d_inner) in zxbcdt's dtype."""
    d_inner = norm_weight.shape[0]
    z, xBC, dt = _split_in_proj(zxbcdt, d_inner, dt_bias.shape[0])
    x, B, C = _split_xBC(causal_conv1d_reference(xBC, conv_weight, conv_bias), d_inner, headdim, ngroups)
    y = ssd_reference(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
    return gated_rms_norm_reference(rearrange(y, "b l h p -> b l (h p)"), z, norm_weight, group_size, eps)


class _MixerScan(torch.autograd.Function):
    """The conv, SSD and gated-norm kernels as one autograd node. Apart, each backward returns its own gradient (dz,
    dxBC, ddt; dx, dB, dC) and autograd concatenates them for the splits of in_proj's and the conv's outputs: two
    copies of the widest activations, which took 0.5 ms a layer at the paper step's shape on an H100 (profiled
    2026-12-07, before this node). Here each backward writes its part of one buffer in place, as mamba_ssm's
    `mamba_split_conv1d_scan_combined` does (mamba_ssm/ops/triton/ssd_combined.py). Keeps what the three Functions
    kept: in_proj's output, the conv's output, y and the norm's 1/rms."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, headdim, ngroups, chunk, group_size,
                eps):
        d_inner = norm_weight.shape[0]
        z, xBC, dt = _split_in_proj(zxbcdt, d_inner, dt_bias.shape[0])
        xBC_out = _conv_fwd(xBC, conv_weight, conv_bias, None)                 # (batch, seqlen, conv_dim)
        x, B, C = _split_xBC(xBC_out, d_inner, headdim, ngroups)
        y, _, delta, a_cumsum = _ssd_fwd(x, dt, A, dt_bias, B, C, D, None, chunk, True)
        y2, z2 = _as_rows(d_inner, y, z)                                          # (rows, d_inner)
        out, rstd = _norm_fwd(y2, z2, norm_weight, group_size, eps, y.dtype, any(ctx.needs_input_grad))
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, xBC_out, delta, a_cumsum,
                              y2, rstd)
        ctx.dims = headdim, ngroups, group_size
        return out.view(*zxbcdt.shape[:2], d_inner)

    @staticmethod
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, xBC_out, delta, a_cumsum, y2,
         rstd) = ctx.saved_tensors
        headdim, ngroups, group_size = ctx.dims
        d_inner, nheads = norm_weight.shape[0], dt_bias.shape[0]
        # in_proj's gradient, written in three parts; contiguous, so that dz's rows are a view
        dzxbcdt = torch.empty(zxbcdt.shape, dtype=zxbcdt.dtype, device=zxbcdt.device)
        (z, xBC, dt), (dz, dxBC, ddt) = (_split_in_proj(t, d_inner, nheads) for t in (zxbcdt, dzxbcdt))
        dy2, _, dnorm_weight = _norm_bwd(dout.reshape(-1, d_inner), y2, _as_rows(d_inner, z)[0], norm_weight, rstd,
                                         group_size, dz=dz.view(-1, d_inner))
        dxBC_out = torch.empty_like(xBC_out)                      # the conv output's gradient: dx, dB, dC
        (x, B, C), (dx, dB, dC) = (_split_xBC(t, d_inner, headdim, ngroups) for t in (xBC_out, dxBC_out))
        _, ddt_heads, dA, ddt_bias, _, _, dD, _ = _ssd_bwd(dy2.view(x.shape), None, x, dt, A, dt_bias, delta,
                                                           a_cumsum, B, C, D, None, True, dx=dx, dB=dB, dC=dC)
        ddt.copy_(ddt_heads)
        _, dconv_weight, dconv_bias = _conv_bwd(dxBC_out, xBC, conv_weight, conv_bias, dx=dxBC)
        return (dzxbcdt, dconv_weight, dconv_bias, ddt_bias, dA, dD, dnorm_weight) + (None,) * 5


@reference_off_gpu(mixer_scan_reference)
def mixer_scan(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, headdim, ngroups, chunk_size, group_size,
               eps):
    """As mixer_scan_reference: causal_conv1d's, ssd_scan's and gated_rms_norm's kernels, differentiable in every
    input, with one gradient buffer for in_proj's output (_MixerScan). zxbcdt contiguous in channels; chunk_size a
    power of two ≥ 16."""
    d_inner, nheads = norm_weight.shape[0], dt_bias.shape[0]
    _check_chunking("mixer_scan", zxbcdt.shape[1], chunk_size)
    if conv_weight.dim() != 3 or conv_weight.shape[1] != 1:
        raise ValueError(f"mixer_scan: conv_weight has shape {tuple(conv_weight.shape)}, expected (conv_dim, 1, "
                         f"d_conv)")
    if d_inner % group_size or d_inner % headdim or conv_weight.shape[0] + d_inner + nheads != zxbcdt.shape[-1]:
        raise ValueError(f"mixer_scan: zxbcdt's {zxbcdt.shape[-1]} channels must be d_inner {d_inner} (norm_weight's, "
                         f"a multiple of headdim {headdim} and group_size {group_size}) + conv_dim "
                         f"{conv_weight.shape[0]} (conv_weight's) + nheads {nheads} (dt_bias's)")
    _, xBC, dt = _split_in_proj(zxbcdt, d_inner, nheads)
    x, B, C = _split_xBC(xBC, d_inner, headdim, ngroups)
    _check_inputs(x, dt, A, B, C, D, None)                              # heads, groups, A and D agree
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    conv_weight = conv_weight.reshape(conv_weight.shape[0], -1).contiguous()
    D = D.contiguous() if D is not None else None
    return _MixerScan.apply(zxbcdt, conv_weight, conv_bias, dt_bias.contiguous(), A.contiguous(), D, norm_weight,
                            headdim, ngroups, chunk_size, group_size, eps)
