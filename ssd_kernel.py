"""Mamba-2's state-space duality (SSD) scan, four ways.

Per head, with a scalar decay rate A < 0, a step size Δ_t > 0, an input x_t ∈ R^P and B_t, C_t ∈ R^N
(SSD paper, Dao & Gu 2024, arXiv 2405.21060, §3 with the scalar-times-identity A of §3.2):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ        the state, (P, N)
    y_t = h_t C_t + D x_t

- `ssd_naive`      the recurrence above, one step at a time: the definition.
- `ssd_reference`  the chunked SSD algorithm of §6 in PyTorch: quadratic inside a chunk, linear across chunks.
- `ssd_scan`       the same algorithm as Triton kernels, forward and backward (an autograd Function).
- `ssd_step`       one step of the recurrence, for generation (Triton), beside `ssd_step_reference`.
On tensors off a GPU, without TRITON_INTERPRET=1, `ssd_scan` and `ssd_step` run their references, warning once
(`reference_off_gpu`, which scan2d_kernel.py and mixer_kernel.py use too).

Shapes follow mamba_ssm's `mamba_chunk_scan_combined`:
    x (batch, seqlen, nheads, headdim)   dt (batch, seqlen, nheads)   A (nheads,)
    B, C (batch, seqlen, ngroups, dstate)   D (nheads,)   state (batch, nheads, headdim, dstate)
Heads share B and C in groups: head i reads group i // (nheads // ngroups).
Δ = softplus(dt + dt_bias) when dt_softplus, else dt + dt_bias.

One name for each quantity, from ssd_naive through ssd_reference to the kernels (Listing 1's where it has one):
    P, N          headdim, dstate
    delta         Δ_t, the step size
    a             a_t = Δ_t A, the log-decay of step t (Listing 1's discretized A)
    a_cumsum      a_cumsum_t = Σ_{s≤t} a_s within a chunk (Listing 1's A_cumsum)
    L             L_ts = exp(a_cumsum_t − a_cumsum_s) for s ≤ t, else 0: the 1-semiseparable mask
    cb            C_t·B_s;   M_ts = C_t·B_s L_ts Δ_s, the matrix of y = M x + D x
    h             the state; `state`, `initial_state`, `final_state` where a signature names it; h_c at the end of
                  chunk c, so the state entering chunk c is h_{c-1}
    chunk_states  per chunk, the state that the chunk's own inputs leave at its end (step 2)
    prev_states   per chunk, the state h_{c-1} entering it (step 3's output, read by step 4)
    dX            ∂ℓ/∂X, the gradient of the loss ℓ with respect to X
"""
import functools
import os
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange, repeat


_REFERENCE_RAN = set()                 # the entry points that have warned that their reference ran


def cdiv(a, b):
    """⌈a / b⌉, for launch sizes in host code: triton.cdiv is a constexpr function there, about 3 µs a call from
    Python (Triton 3.9), and a training step makes hundreds of such calls."""
    return -(-a // b)


def next_pow2(n):
    """The smallest power of two ≥ n (n ≥ 1), for host code, as triton.next_power_of_2 without its call cost."""
    return 1 << (n - 1).bit_length()


def reference_off_gpu(reference):
    """Decorator for a kernel's public entry point: on tensors that are not on a GPU, with TRITON_INTERPRET unset,
    Triton has no device to launch on, so `reference` (the PyTorch function beside the kernel, same arguments, same
    results) runs instead, with a one-time warning saying so. On a GPU, or under TRITON_INTERPRET=1, the kernel runs."""
    def wrap(kernel_fn):
        @functools.wraps(kernel_fn)
        def run(*args, **kwargs):
            t = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
                return kernel_fn(*args, **kwargs)
            if kernel_fn.__name__ not in _REFERENCE_RAN:
                _REFERENCE_RAN.add(kernel_fn.__name__)
                warnings.warn(f"{kernel_fn.__name__}: the tensors are on the {t.device.type.upper()}, where Triton "
                              f"cannot launch, so the PyTorch reference {reference.__name__} ran (same results); "
                              f"set TRITON_INTERPRET=1 to run the Triton kernel under the interpreter", stacklevel=2)
            return reference(*args, **kwargs)
        return run
    return wrap


def _delta(dt, dt_bias, dt_softplus):
    """Δ from the raw dt (the model's in_proj output): add the bias, then softplus. Returned in float32 or wider."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _check_D(D, nheads):
    if D is not None and tuple(D.shape) != (nheads,):
        raise ValueError(f"ssd: D has shape {tuple(D.shape)}, expected ({nheads},): one skip weight per head "
                         f"(a D per head and channel, mamba_ssm's D_has_hdim, is not supported)")


def _check_inputs(x, dt, A, B, C, D, initial_state):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    expected = {"dt": (dt, (batch, seqlen, nheads)), "A": (A, (nheads,)),
                "B": (B, (batch, seqlen, ngroups, dstate)), "C": (C, (batch, seqlen, ngroups, dstate))}
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, nheads, headdim, dstate))
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"ssd: {name} has shape {tuple(t.shape)}, expected {shape} (x is {tuple(x.shape)})")
    if nheads % ngroups:
        raise ValueError(f"ssd: ngroups={ngroups} must divide nheads={nheads}")
    _check_D(D, nheads)


def _check_chunking(caller, seqlen, chunk_size):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{caller}: chunk_size must be a power of two >= 16, got {chunk_size}")
    if seqlen == 0:
        raise ValueError(f"{caller}: seqlen is 0")


# ----------------------------------------------------------------------------------------------------------------------
# 1. The definition: one step at a time


def ssd_naive(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
              return_final_state=False):
    """The recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t + D x_t, one token at a time.

    Slow (a Python loop over seqlen) and obviously right; computes in float32, or float64 for float64 inputs."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    delta = _delta(dt, dt_bias, dt_softplus).to(dtype)                   # (batch, seqlen, nheads)
    x_, A_ = x.to(dtype), A.to(dtype)
    B_ = repeat(B.to(dtype), "b l g n -> b l (g r) n", r=nheads // B.shape[2])   # each head its group's
    C_ = repeat(C.to(dtype), "b l g n -> b l (g r) n", r=nheads // C.shape[2])
    h = x_.new_zeros(batch, nheads, headdim, B.shape[3]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, t] * A_)                              # exp(a_t), (batch, nheads)
        # h: (batch, nheads, headdim, dstate)
        h = decay[:, :, None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", delta[:, t], x_[:, t], B_[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_[:, t]))
    y = torch.stack(ys, dim=1)                                           # like x
    if D is not None:
        y = y + x_ * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 2. The chunked algorithm in PyTorch (SSD paper §6, "Listing 1")


def segsum(a):
    """Segment sums: out[..., i, j] = a_{j+1} + … + a_i for j ≤ i, -inf above the diagonal.

    With a_t = Δ_t A, exp(segsum(a)) is the 1-semiseparable mask L of the paper (§3, eq. (4)):
    L_ij = exp(a_{j+1} + … + a_i). Summed per column rather than as a difference of cumsums, which would cancel
    catastrophically in float32."""
    T = a.shape[-1]
    a = repeat(a, "... t -> ... t s", s=T)                                         # a[..., k, j] = a_k
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)                           # Σ_{j<k≤i} a_k
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~causal, -torch.inf)


def ssd_reference(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                  return_final_state=False):
    """The chunked SSD algorithm (SSD paper §6) in pure PyTorch: the readable definition that `ssd_scan` implements.

    The sequence is cut into chunks of `chunk_size`. The matrix y = M x (M_ts = C_t·B_s L_ts Δ_s, with
    L_ts = exp(a_{s+1} + … + a_t), a_t = Δ_t A) splits into diagonal blocks, computed as masked attention, and
    off-diagonal blocks, low rank through the state. Any seqlen: the tail is padded with Δ = 0, which neither decays
    nor feeds the state. Differentiable by autograd."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    pad = -seqlen % chunk_size
    delta = F.pad(_delta(dt, dt_bias, dt_softplus).to(dtype), (0, 0, 0, pad))     # Δ = 0 on the padding
    x_, B_, C_ = (F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    # x_ (batch, nchunks, chunk, nheads, headdim); B_, C_ (batch, nchunks, chunk, nheads, dstate), each head its
    # group's; delta, a, a_cumsum (batch, nheads, nchunks, chunk)
    B_ = repeat(B_, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=nheads // B.shape[2])
    C_ = repeat(C_, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=nheads // C.shape[2])
    x_ = rearrange(x_, "b (c l) h p -> b c l h p", l=chunk_size)
    delta = rearrange(delta, "b (c l) h -> b h c l", l=chunk_size)
    a = delta * A.to(dtype)[:, None, None]                                         # log-decay per step, Δ_t A
    a_cumsum = torch.cumsum(a, dim=-1)                                             # within each chunk

    # 1. Diagonal blocks (§6.1): inside a chunk, y = (L ∘ C Bᵀ) (Δ x), the quadratic "attention" form (§4).
    # L, M: (batch, nheads, nchunks, chunk, chunk)
    L = torch.exp(segsum(a))
    M = torch.einsum("bclhn,bcshn->bhcls", C_, B_) * L * delta[..., None, :]      # M_ts = C_t·B_s L_ts Δ_s
    y_diag = torch.einsum("bhcls,bcshp->bclhp", M, x_)

    # 2. Chunk states (§6.2, right factors): each chunk's own contribution to the state at its end,
    # chunk_states (batch, nchunks, nheads, headdim, dstate).
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)                       # exp(a_{s+1} + … + a_end)
    B_weighted = B_ * rearrange(decay_to_end * delta, "b h c l -> b c l h 1")     # decay_to_end_s Δ_s B_s
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", B_weighted, x_)

    # 3. State passing (§6.2, center factors): h_c = exp(a_cumsum_end of chunk c) h_{c-1} + chunk_states_c, across
    # chunks. boundary_states: h at every chunk boundary, initial_state first, (batch, nchunks+1, nheads, P, N).
    if initial_state is None:
        initial_state = x_.new_zeros(batch, nheads, headdim, B.shape[3])
    boundary_states = torch.cat([initial_state.to(dtype)[:, None], chunk_states], dim=1)
    # chunk_decay: (batch, nheads, nchunks+1, nchunks+1)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))
    boundary_states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, boundary_states)
    prev_states, final_state = boundary_states[:, :-1], boundary_states[:, -1]   # h_{c-1} per chunk; the last h

    # 4. State to output (§6.2, left factors): y_t += exp(a_cumsum_t) h_{c-1} C_t.
    y_off = torch.einsum("bclhn,bchpn->bclhp", C_, prev_states) * rearrange(torch.exp(a_cumsum), "b h c l -> b c l h 1")

    y = rearrange(y_diag + y_off, "b c l h p -> b (c l) h p")[:, :seqlen]
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 3. The chunked algorithm as Triton kernels
#
# Δ and a_cumsum = cumsum(Δ A) per chunk come from one small kernel, laid out (batch, nheads, nchunks, chunk) and
# padded to whole chunks with Δ = 0, so the other kernels mask only x, B and C, and the padding neither decays nor
# feeds the state. Their gradients go back to dt, dt_bias and A in PyTorch (_chunk_delta_backward).
#   forward:  Δ and a_cumsum                                                (_chunk_delta_kernel)
#             cb = C Bᵀ per chunk and group, shared by the group's heads   (_chunk_cb_kernel)
#             step 2, chunk_states                                         (_chunk_state_kernel)
#             step 3, state passing: chunk_states -> prev_states           (_state_passing_kernel)
#             steps 1 + 4, the outputs                                     (_chunk_scan_fwd_kernel)
#   backward: steps 2 and 3 again, then the same two kernels carry the state's gradient backwards (dprev_states ->
#             dchunk_states); dx and dΔ per head (_chunk_scan_bwd_dx_kernel); dB and dC per group, summing the
#             group's heads before the matmul with C or B, which the heads share (_chunk_scan_bwd_db_kernel,
#             _chunk_scan_bwd_dc_kernel).


@triton.jit
def _softplus(x):
    # log(1 + e^x) as torch's softplus (x above 20 passes through); log1p by Goldberg's trick, exact for e^x ≪ 1
    u = tl.exp(tl.minimum(x, 20.0))                    # the branch above 20 is x itself; keeps inf/inf out
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _chunk_delta_kernel(
    dt_ptr, dt_bias_ptr, A_ptr, delta_ptr, a_cumsum_ptr,
    seqlen, nheads,
    stride_dt_b, stride_dt_l, stride_dt_h,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Δ_t = softplus(dt_t + dt_bias) (the bias and the softplus where HAS_DT_BIAS and DT_SOFTPLUS say) and
    a_cumsum_t = Σ_{s ≤ t in the chunk} Δ_s A for one chunk and a block of heads, stored (batch, nheads, nchunks,
    chunk) with Δ = 0 past seqlen. Must match ssd_reference's Δ and a_cumsum (its `delta`, `a` and `a_cumsum` lines)."""
    pid_bc, pid_h = tl.program_id(0), tl.program_id(1)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    offs_l, offs_h = tl.arange(0, CHUNK), pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_l, in_h = c * CHUNK + offs_l < seqlen, offs_h < nheads
    # dt (CHUNK, BLOCK_H): a row of heads is contiguous in memory
    dt = tl.load(dt_ptr + b.to(tl.int64) * stride_dt_b + (c * CHUNK + offs_l[:, None]) * stride_dt_l
                 + offs_h[None, :] * stride_dt_h, mask=in_l[:, None] & in_h[None, :], other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)[None, :]
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    delta = tl.where(in_l[:, None], dt, 0.0)
    A = tl.load(A_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)
    a_cumsum = tl.cumsum(delta * A[None, :], axis=0)
    out = ((b * nheads + offs_h[None, :]) * nchunks + c).to(tl.int64) * CHUNK + offs_l[:, None]
    tl.store(delta_ptr + out, delta, mask=in_h[None, :])
    tl.store(a_cumsum_ptr + out, a_cumsum, mask=in_h[None, :])


class _Tuned(triton.runtime.KernelInterface):
    """A kernel tuned over warps and pipeline depth once per shape key (P, N and the tile constexprs it has) and
    dtype on a GPU (the interpreter runs one setting), then launched with that pick directly: Triton's autotuner redoes
    its bookkeeping at every launch, about 50 µs of host time with these kernels' ~40 arguments (H200 host, Triton
    3.6), longer than some of the kernels run. Only for kernels that just store their outputs, since tuning runs them
    several times."""

    def __init__(self, fn):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]
        self.configs = configs[:1] if interpreted else configs
        names = [name for name in ("P", "N", "CHUNK", "BLOCK_M", "TO_END") if name in fn.arg_names]
        self.fn, self.tuner = fn, triton.autotune(self.configs, key=names)(fn)
        self.key_args = {name: fn.arg_names.index(name) for name in names}
        self.picks = {}

    def run(self, *args, grid, warmup, **kwargs):
        key = (*(kwargs[n] if n in kwargs else args[i] for n, i in self.key_args.items()), args[0].dtype)
        pick = self.picks.get(key)
        if pick is None:
            out = self.tuner.run(*args, grid=grid, warmup=warmup, **kwargs)
            self.picks[key] = self.tuner.best_config
            return out
        return self.fn.run(*args, grid=grid, warmup=warmup, num_warps=pick.num_warps, num_stages=pick.num_stages,
                           **kwargs)


@triton.jit
def _chunk_cb_kernel(
    C_ptr, B_ptr, cb_ptr,
    seqlen, N,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_cb_b, stride_cb_c, stride_cb_g,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """cb[b, c, g, t, s] = C_t·B_s inside chunk c: the diagonal block's M_ts = cb_ts L_ts Δ_s (ssd_reference step 1)
    before the mask L and Δ. Only the tiles on or below the diagonal (s-tile ≤ t-tile) are written; positions past
    the sequence's end are 0."""
    pid_mk, pid_bc, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles = CHUNK // BLOCK_M
    m0, k0 = (pid_mk // tiles) * BLOCK_M, (pid_mk % tiles) * BLOCK_M
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if k0 > m0:
        return
    offs_m, offs_k = m0 + tl.arange(0, BLOCK_M), k0 + tl.arange(0, BLOCK_M)
    bc_off = b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + g * stride_bc_g
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # C_t (BLOCK_M, BLOCK_N), B_s transposed (BLOCK_N, BLOCK_M)
        C_t = tl.load(C_ptr + bc_off + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                      mask=(offs_m[:, None] < chunk_len) & (offs_n[None, :] < N), other=0.0)
        B_s = tl.load(B_ptr + bc_off + offs_k[None, :] * stride_bc_l + offs_n[:, None] * stride_bc_n,
                      mask=(offs_k[None, :] < chunk_len) & (offs_n[:, None] < N), other=0.0)
        acc += tl.dot(C_t, B_s, input_precision=DOT_PRECISION)
    cb_ptr += b.to(tl.int64) * stride_cb_b + c * stride_cb_c + g * stride_cb_g
    tl.store(cb_ptr + offs_m[:, None] * CHUNK + offs_k[None, :], acc)


@_Tuned
@triton.jit
def _chunk_state_kernel(
    u_ptr, v_ptr, delta_ptr, a_cumsum_ptr, out_ptr,
    seqlen, heads_per_group, P, N,
    stride_u_b, stride_u_l, stride_u_h, stride_u_p,
    stride_v_b, stride_v_l, stride_v_g, stride_v_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_o_b, stride_o_c, stride_o_h, stride_o_p,
    CHUNK: tl.constexpr, TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out[b, c, head] = Σ_{s in chunk c} w_s u_s v_sᵀ, a (P, N) summary of one chunk for one head. Used twice:

    TO_END=True:  chunk_states, u = x, v = B, w_s = exp(a_cumsum_end − a_cumsum_s) Δ_s. Must match ssd_reference
                  step 2.
    TO_END=False: dprev_states, the gradient of step 4 w.r.t. h_{c-1}, u = dy, v = C, w_s = exp(a_cumsum_s).
    """
    pid_pn, pid_bc, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_p = (pid_pn // n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)

    u_ptr += b.to(tl.int64) * stride_u_b + (c * CHUNK) * stride_u_l + pid_h * stride_u_h
    v_ptr += b.to(tl.int64) * stride_v_b + (c * CHUNK) * stride_v_l + (pid_h // heads_per_group) * stride_v_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    a_cumsum_end = tl.load(a_cumsum_ptr + a_off + CHUNK - 1)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, chunk_len, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < chunk_len
        # u transposed (BLOCK_P, BLOCK_L), v (BLOCK_L, BLOCK_N)
        u = tl.load(u_ptr + offs_l[None, :] * stride_u_l + offs_p[:, None] * stride_u_p,
                    mask=in_l[None, :] & (offs_p[:, None] < P), other=0.0)
        v = tl.load(v_ptr + offs_l[:, None] * stride_v_l + offs_n[None, :] * stride_v_n,
                    mask=in_l[:, None] & (offs_n[None, :] < N), other=0.0)
        a_cumsum = tl.load(a_cumsum_ptr + a_off + offs_l)
        if TO_END:
            w = tl.exp(a_cumsum_end - a_cumsum) * tl.load(delta_ptr + a_off + offs_l)
        else:
            w = tl.exp(a_cumsum)
        acc += tl.dot(u, (v * w[:, None]).to(u.dtype), input_precision=DOT_PRECISION)

    out_ptr += b.to(tl.int64) * stride_o_b + c * stride_o_c + pid_h * stride_o_h
    tl.store(out_ptr + offs_p[:, None] * stride_o_p + offs_n[None, :], acc,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_kernel(
    states_ptr, a_cumsum_end_ptr, initial_state_ptr, final_state_ptr, out_ptr, prev_states_ptr, da_carried_ptr,
    nchunks, dim,
    stride_s_b, stride_s_c, stride_s_h,
    stride_a_b, stride_a_h, stride_a_c,
    stride_i_b, stride_i_h,
    HAS_INITIAL_STATE: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The linear recurrence across chunks on one block of one head's flattened (P, N) state:
    h ← exp(a_cumsum_end_c) h + u_c, with a_cumsum_end_c = Σ a over chunk c.

    states[c] holds u_c; out[c] (states itself, in place, or a 16-bit buffer with the same strides) gets the h that
    entered chunk c; h starts from initial_state (or 0) and final_state gets the last h. Forward: u_c =
    chunk_states[c], and out holds prev_states (must match ssd_reference step 3). REVERSE walks the chunks backwards
    through the gradients, in place: h stands for ∂ℓ/∂h, from ∂ℓ/∂final_state (in initial_state) to
    ∂ℓ/∂initial_state (in final_state), and u_c = dprev_states[c], the gradient through step 4, which become
    dchunk_states (∂ℓ/∂h_c). The kernel then also writes this block's share of
    exp(a_cumsum_end_c) ⟨∂ℓ/∂h_c, prev_states[c]⟩, the gradient of the decay that step 3 applies to the state
    carried through chunk c, to da_carried[b, head, c, block]."""
    pid, b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    s_off = b.to(tl.int64) * stride_s_b + pid_h * stride_s_h + offs
    a_cumsum_end_ptr += b * stride_a_b + pid_h * stride_a_h
    if HAS_INITIAL_STATE:
        h = tl.load(initial_state_ptr + b.to(tl.int64) * stride_i_b + pid_h * stride_i_h + offs, mask=mask, other=0.0)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.load(states_ptr + s_off + (nchunks - 1 if REVERSE else 0) * stride_s_c, mask=mask, other=0.0)
    for i in range(nchunks):
        c = nchunks - 1 - i if REVERSE else i
        # the next chunk's u is requested before this chunk is written: the loop is a chain of loads otherwise
        u_next = tl.load(states_ptr + s_off + (c - 1 if REVERSE else c + 1) * stride_s_c,
                         mask=offs < tl.where(i + 1 < nchunks, dim, 0), other=0.0)
        chunk_decay = tl.exp(tl.load(a_cumsum_end_ptr + c * stride_a_c))
        tl.store(out_ptr + s_off + c * stride_s_c, h.to(out_ptr.dtype.element_ty), mask=mask)
        if REVERSE:
            carried = chunk_decay * tl.load(prev_states_ptr + s_off + c * stride_s_c, mask=mask, other=0.0)
            tl.store(da_carried_ptr + ((b * tl.num_programs(2) + pid_h) * nchunks + c) * tl.num_programs(0) + pid,
                     tl.sum(h * carried))
        h = chunk_decay * h + u
        u = u_next
    tl.store(final_state_ptr + b.to(tl.int64) * stride_i_b + pid_h * stride_i_h + offs, h, mask=mask)


@_Tuned
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, delta_ptr, a_cumsum_ptr, C_ptr, cb_ptr, prev_states_ptr, D_ptr, y_ptr,
    seqlen, heads_per_group, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_cb_b, stride_cb_c, stride_cb_g,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Outputs of a block of rows t of one chunk and head:

        y_t = Σ_{s ≤ t in chunk} cb_ts L_ts Δ_s x_s   +   exp(a_cumsum_t) h_{c-1} C_t   +   D x_t
              (step 1: diagonal block, M_ts x_s)        (step 4: state to output)

    with cb_ts = C_t·B_s read from cb, L_ts = exp(a_cumsum_t − a_cumsum_s) and h_{c-1} = prev_states[c], the state
    entering the chunk. Must match ssd_reference steps 1 and 4 (plus D)."""
    pid_h, pid_mp, pid_bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    p_blocks = tl.cdiv(P, BLOCK_P)
    m0 = (pid_mp // p_blocks) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = (pid_mp % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    g = pid_h // heads_per_group
    x_ptr += b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l + pid_h * stride_x_h
    cb_ptr += b.to(tl.int64) * stride_cb_b + c * stride_cb_c + g * stride_cb_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N
    a_cumsum_t = tl.load(a_cumsum_ptr + a_off + offs_m)

    # step 4: the state entering the chunk, read out by C_t and decayed to t;
    # C_t (BLOCK_M, BLOCK_N), h_{c-1} transposed (BLOCK_N, BLOCK_P)
    C_t = tl.load(C_ptr + b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + g * stride_bc_g
                  + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0)
    h = tl.load(prev_states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + pid_h * stride_s_h
                + offs_n[:, None] + offs_p[None, :] * stride_s_p,
                mask=in_n[:, None] & in_p[None, :], other=0.0)
    acc = tl.dot(C_t, h.to(C_t.dtype), input_precision=DOT_PRECISION) * tl.exp(a_cumsum_t)[:, None]

    # step 1: the causal diagonal block, only s-blocks at or before this row block
    for k0 in range(0, m0 + BLOCK_M, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        cb = tl.load(cb_ptr + offs_m[:, None] * CHUNK + offs_k[None, :])   # (BLOCK_M, BLOCK_M)
        a_cumsum_s = tl.load(a_cumsum_ptr + a_off + offs_k)
        delta_s = tl.load(delta_ptr + a_off + offs_k)
        causal = offs_m[:, None] >= offs_k[None, :]
        L = tl.exp(tl.where(causal, a_cumsum_t[:, None] - a_cumsum_s[None, :], -float("inf")))
        # x_s (BLOCK_M, BLOCK_P)
        x_s = tl.load(x_ptr + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                      mask=(offs_k[:, None] < chunk_len) & in_p[None, :], other=0.0)
        acc += tl.dot((cb * L * delta_s[None, :]).to(x_s.dtype), x_s, input_precision=DOT_PRECISION)

    if HAS_D:
        D = tl.load(D_ptr + pid_h).to(tl.float32)
        x_t = tl.load(x_ptr + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                      mask=in_m[:, None] & in_p[None, :], other=0.0)
        acc += D * x_t.to(tl.float32)
    y_ptr += b.to(tl.int64) * stride_y_b + (c * CHUNK) * stride_y_l + pid_h * stride_y_h
    tl.store(y_ptr + offs_m[:, None] * stride_y_l + offs_p[None, :] * stride_y_p, acc,
             mask=in_m[:, None] & in_p[None, :])


@_Tuned
@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, delta_ptr, a_cumsum_ptr, B_ptr, cb_ptr, dy_ptr, dchunk_states_ptr, D_ptr,
    dx_ptr, ddelta_ptr, dD_ptr, da_state_ptr, da_pairs_ptr,
    seqlen, heads_per_group, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_cb_b, stride_cb_c, stride_cb_g,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_pair_b, stride_pair_h, stride_pair_c, stride_pair_m,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients that flow out of a block of rows s of one chunk and head, given dh_c = dchunk_states[c], the
    gradient w.r.t. h_c, the state at the chunk's end:

        dx'_s = Σ_{t ≥ s} cb_ts L_ts dy_t  +  exp(a_cumsum_end − a_cumsum_s) dh_c B_s
        dx_s  = Δ_s dx'_s + D dy_s          ddelta_s = x_s·dx'_s   (the part of dΔ_s through the Δ_s x_s factor)

    and two parts of da_τ, a_τ = Δ_τ A the log-decay of step τ, which every L_ts with s < τ ≤ t holds:
        da_pairs[.., m, τ] = Σ_{s in this block, s < τ} Σ_{t ≥ τ} M_ts dy_t·x_s,  M_ts = cb_ts L_ts Δ_s
        da_state[s]        = Δ_s x_s·(exp(a_cumsum_end − a_cumsum_s) dh_c B_s), the caller sums it over s < τ (step 2)
    Summing only the pairs that straddle τ keeps these sums free of cancellation. Also this block's share of
    dD = Σ_s dy_s·x_s, per channel (the caller sums the channels). Must match the autograd gradients of
    ssd_reference."""
    pid_h, pid_m, pid_bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    g = pid_h // heads_per_group
    x_ptr += b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l + pid_h * stride_x_h
    dy_ptr += b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l + pid_h * stride_dy_h
    cb_ptr += b.to(tl.int64) * stride_cb_b + c * stride_cb_c + g * stride_cb_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N
    mask_mp = in_m[:, None] & in_p[None, :]

    x_s = tl.load(x_ptr + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mask_mp, other=0.0)
    a_cumsum_s = tl.load(a_cumsum_ptr + a_off + offs_m)
    delta_s = tl.load(delta_ptr + a_off + offs_m)

    # through the chunk's end state (step 2): B_s (BLOCK_M, BLOCK_N), dh_c transposed (BLOCK_N, BLOCK_P)
    B_s = tl.load(B_ptr + b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + g * stride_bc_g
                  + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0)
    dh = tl.load(dchunk_states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + pid_h * stride_s_h
                 + offs_n[:, None] + offs_p[None, :] * stride_s_p,
                 mask=in_n[:, None] & in_p[None, :], other=0.0)
    decay_to_end = tl.exp(tl.load(a_cumsum_ptr + a_off + CHUNK - 1) - a_cumsum_s)
    dxp = tl.dot(B_s, dh.to(B_s.dtype), input_precision=DOT_PRECISION) * decay_to_end[:, None]
    tl.store(da_state_ptr + a_off + offs_m, delta_s * tl.sum(dxp * x_s.to(tl.float32), axis=1), mask=in_m)

    # through the later outputs of the same chunk (step 1), t ≥ s: t-blocks from the last back to this one, so that
    # `later` holds Σ_{t in the blocks after this one} M_ts dy_t·x_s for each row s
    later = tl.zeros((BLOCK_M,), dtype=tl.float32)
    last = (chunk_len - 1) // BLOCK_M
    da_pairs_ptr += b * stride_pair_b + pid_h * stride_pair_h + c * stride_pair_c + pid_m * stride_pair_m
    for i in range(0, last - pid_m + 1):
        offs_k = (last - i) * BLOCK_M + tl.arange(0, BLOCK_M)
        # cb_T and L_T hold cb_ts and L_ts at [s, t], (BLOCK_M, BLOCK_M); dy_t (BLOCK_M, BLOCK_P)
        cb_T = tl.load(cb_ptr + offs_k[None, :] * CHUNK + offs_m[:, None])
        a_cumsum_t = tl.load(a_cumsum_ptr + a_off + offs_k)
        causal = offs_k[None, :] >= offs_m[:, None]
        L_T = tl.exp(tl.where(causal, a_cumsum_t[None, :] - a_cumsum_s[:, None], -float("inf")))
        dy_t = tl.load(dy_ptr + offs_k[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                       mask=(offs_k[:, None] < chunk_len) & in_p[None, :], other=0.0)
        dxp += tl.dot((cb_T * L_T).to(dy_t.dtype), dy_t, input_precision=DOT_PRECISION)
        # pairs[s, t] = M_ts dy_t·x_s
        pairs = tl.dot(x_s, tl.trans(dy_t), input_precision=DOT_PRECISION) * cb_T * L_T * delta_s[:, None]
        straddle = tl.cumsum(pairs, axis=1, reverse=True) + later[:, None]   # Σ_{t ≥ τ} pairs[s, t]
        tl.store(da_pairs_ptr + offs_k, tl.sum(tl.where(offs_m[:, None] < offs_k[None, :], straddle, 0.0), axis=0))
        later += tl.sum(pairs, axis=1)

    dx = dxp * delta_s[:, None]
    if HAS_D:
        dy_s = tl.load(dy_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                       mask=mask_mp, other=0.0).to(tl.float32)
        dx += tl.load(D_ptr + pid_h).to(tl.float32) * dy_s
        dD_ptr += ((pid_bc * tl.num_programs(1) + pid_m) * tl.num_programs(0) + pid_h) * P
        tl.store(dD_ptr + offs_p, tl.sum(dy_s * x_s.to(tl.float32), axis=0), mask=in_p)
    dx_ptr += b.to(tl.int64) * stride_dx_b + (c * CHUNK) * stride_dx_l + pid_h * stride_dx_h
    tl.store(dx_ptr + offs_m[:, None] * stride_dx_l + offs_p[None, :] * stride_dx_p, dx, mask=mask_mp)
    tl.store(ddelta_ptr + a_off + offs_m, tl.sum(dxp * x_s.to(tl.float32), axis=1), mask=in_m)


@triton.jit
def _head_slice(pid_gs, heads_per_group, heads_per_program):
    """(group g, slice j, first head, last head + 1) of a program that walks a slice of one group's heads."""
    slices = tl.cdiv(heads_per_group, heads_per_program)
    g, j = pid_gs // slices, pid_gs % slices
    head_first = g * heads_per_group + j * heads_per_program
    return g, j, head_first, tl.minimum(head_first + heads_per_program, (g + 1) * heads_per_group)


@_Tuned
@triton.jit
def _chunk_scan_bwd_db_kernel(
    x_ptr, delta_ptr, a_cumsum_ptr, C_ptr, dy_ptr, dchunk_states_ptr, dB_ptr,
    seqlen, heads_per_group, heads_per_program, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_dbc_b, stride_dbc_l, stride_dbc_split, stride_dbc_g,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dB for a block of rows s of one chunk, summed over a slice of one group's heads i:

        dB_s = Σ_i Δ_s^i exp(a_cumsum_end^i − a_cumsum_s^i) dh_c^iᵀ x_s^i  +  Σ_{t ≥ s} dcb_ts C_t
        dcb_ts = Σ_i Δ_s^i L_ts^i dy_t^i·x_s^i, the gradient w.r.t. cb_ts = C_t·B_s, which the heads share

    with dh_c = dchunk_states[c]. dcb is summed over the heads before the one matmul with C_t. Written per head slice
    (dB[:, :, slice]), summed by the caller. Must match the autograd gradients of ssd_reference."""
    pid_m, pid_bc, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    g, j, head_first, head_last = _head_slice(pid_gs, heads_per_group, heads_per_program)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    row = b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l
    row_dy = b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N
    x_s_ptrs = x_ptr + row + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p

    # through each head's chunk end state (step 2)
    dB = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for head in range(head_first, head_last):
        a_off = b * stride_a_b + head * stride_a_h + c * stride_a_c
        x_s = tl.load(x_s_ptrs + head * stride_x_h, mask=in_m[:, None] & in_p[None, :], other=0.0)
        # dh_c (BLOCK_P, BLOCK_N)
        dh = tl.load(dchunk_states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + head * stride_s_h
                     + offs_p[:, None] * stride_s_p + offs_n[None, :],
                     mask=in_p[:, None] & in_n[None, :], other=0.0)
        a_cumsum_s = tl.load(a_cumsum_ptr + a_off + offs_m)
        w = tl.exp(tl.load(a_cumsum_ptr + a_off + CHUNK - 1) - a_cumsum_s) * tl.load(delta_ptr + a_off + offs_m)
        dB += tl.dot(x_s, dh.to(x_s.dtype), input_precision=DOT_PRECISION) * w[:, None]

    # through the later outputs of the same chunk (step 1), t ≥ s
    for k0 in range(m0, chunk_len, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        in_k = offs_k < chunk_len
        causal = offs_k[None, :] >= offs_m[:, None]
        dcb_T = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)   # dcb_ts at [s, t]
        for head in range(head_first, head_last):
            a_off = b * stride_a_b + head * stride_a_h + c * stride_a_c
            x_s = tl.load(x_s_ptrs + head * stride_x_h, mask=in_m[:, None] & in_p[None, :], other=0.0)
            dy_t = tl.load(dy_ptr + row_dy + head * stride_dy_h + offs_k[None, :] * stride_dy_l
                           + offs_p[:, None] * stride_dy_p, mask=in_k[None, :] & in_p[:, None], other=0.0)
            a_cumsum_s = tl.load(a_cumsum_ptr + a_off + offs_m)
            a_cumsum_t = tl.load(a_cumsum_ptr + a_off + offs_k)
            L_T = tl.exp(tl.where(causal, a_cumsum_t[None, :] - a_cumsum_s[:, None], -float("inf")))
            delta_s = tl.load(delta_ptr + a_off + offs_m)
            dcb_T += tl.dot(x_s, dy_t, input_precision=DOT_PRECISION) * (L_T * delta_s[:, None])
        # C_t (BLOCK_M, BLOCK_N)
        C_t = tl.load(C_ptr + b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + g * stride_bc_g
                      + offs_k[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)
        dB += tl.dot(dcb_T.to(C_t.dtype), C_t, input_precision=DOT_PRECISION)

    dB_ptr += b.to(tl.int64) * stride_dbc_b + (c * CHUNK) * stride_dbc_l + j * stride_dbc_split + g * stride_dbc_g
    tl.store(dB_ptr + offs_m[:, None] * stride_dbc_l + offs_n[None, :], dB, mask=in_m[:, None] & in_n[None, :])


@_Tuned
@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr, delta_ptr, a_cumsum_ptr, B_ptr, C_ptr, dy_ptr, prev_states_ptr, dC_ptr, da_out_ptr,
    seqlen, heads_per_group, heads_per_program, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_dbc_b, stride_dbc_l, stride_dbc_split, stride_dbc_g,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dC for a block of rows t of one chunk, summed over a slice of one group's heads i:

        dC_t = Σ_i exp(a_cumsum_t^i) h_{c-1}^iᵀ dy_t^i  +  Σ_{s ≤ t} dcb_ts B_s
        dcb_ts = Σ_i Δ_s^i L_ts^i dy_t^i·x_s^i, the gradient w.r.t. cb_ts = C_t·B_s, which the heads share

    with h_{c-1} = prev_states[c], written per head slice, summed by the caller; and, per head, da_out[t] =
    exp(a_cumsum_t) dy_t·h_{c-1} C_t, the gradient w.r.t. a_cumsum_t of step 4 (the caller sums it over t ≥ τ into
    da_τ). Must match the autograd gradients of ssd_reference."""
    pid_m, pid_bc, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    g, j, head_first, head_last = _head_slice(pid_gs, heads_per_group, heads_per_program)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    row = b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l
    dy_t_ptrs = dy_ptr + b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l \
        + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p
    bc_off = b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + g * stride_bc_g
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N
    # C_t (BLOCK_M, BLOCK_N)
    C_t = tl.load(C_ptr + bc_off + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0).to(tl.float32)

    # through each head's state entering the chunk (step 4)
    dC = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for head in range(head_first, head_last):
        a_off = b * stride_a_b + head * stride_a_h + c * stride_a_c
        dy_t = tl.load(dy_t_ptrs + head * stride_dy_h, mask=in_m[:, None] & in_p[None, :], other=0.0)
        # h_{c-1} (BLOCK_P, BLOCK_N)
        h = tl.load(prev_states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + head * stride_s_h
                    + offs_p[:, None] * stride_s_p + offs_n[None, :],
                    mask=in_p[:, None] & in_n[None, :], other=0.0)
        dC_head = tl.dot(dy_t, h.to(dy_t.dtype), input_precision=DOT_PRECISION) \
            * tl.exp(tl.load(a_cumsum_ptr + a_off + offs_m))[:, None]
        dC += dC_head
        tl.store(da_out_ptr + a_off + offs_m, tl.sum(dC_head * C_t, axis=1), mask=in_m)

    # through the diagonal block (step 1), s ≤ t
    for k0 in range(0, m0 + BLOCK_M, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        in_k = offs_k < chunk_len
        causal = offs_m[:, None] >= offs_k[None, :]
        dcb = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)   # dcb_ts at [t, s]
        for head in range(head_first, head_last):
            a_off = b * stride_a_b + head * stride_a_h + c * stride_a_c
            dy_t = tl.load(dy_t_ptrs + head * stride_dy_h, mask=in_m[:, None] & in_p[None, :], other=0.0)
            # x_s transposed, (BLOCK_P, BLOCK_M)
            x_s = tl.load(x_ptr + row + head * stride_x_h + offs_k[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                          mask=in_k[None, :] & in_p[:, None], other=0.0)
            a_cumsum_t = tl.load(a_cumsum_ptr + a_off + offs_m)
            a_cumsum_s = tl.load(a_cumsum_ptr + a_off + offs_k)
            L = tl.exp(tl.where(causal, a_cumsum_t[:, None] - a_cumsum_s[None, :], -float("inf")))
            delta_s = tl.load(delta_ptr + a_off + offs_k)
            dcb += tl.dot(dy_t, x_s, input_precision=DOT_PRECISION) * (L * delta_s[None, :])
        # B_s (BLOCK_M, BLOCK_N)
        B_s = tl.load(B_ptr + bc_off + offs_k[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)
        dC += tl.dot(dcb.to(B_s.dtype), B_s, input_precision=DOT_PRECISION)

    dC_ptr += b.to(tl.int64) * stride_dbc_b + (c * CHUNK) * stride_dbc_l + j * stride_dbc_split + g * stride_dbc_g
    tl.store(dC_ptr + offs_m[:, None] * stride_dbc_l + offs_n[None, :], dC, mask=in_m[:, None] & in_n[None, :])


# Row tiles inside a chunk; the dB/dC kernels take a slice of a group's heads each, sliced finely enough to launch at
# least this many programs (a module constant so that tests can make one program walk several heads).
# The chunk scan's forward and its backward to dx put the heads on the grid's first axis, so that the programs running
# together share (batch, chunk) and find C Bᵀ, B and C in L2: at the paper step's SSD shape (16 x 985 tokens, 80 heads
# of 64, dstate 128, bf16; H100, 2026-12-08) ssd_scan's forward took 0.738 ms, against 0.774 with the heads last, and
# forward + backward 4.503 against 4.563 ms.
_BLOCK_M = 64
_MIN_PROGRAMS = 2048


def _dot_precision(dtype):
    # float32 inputs get true float32 products (not tf32), so the float32 path is as exact as the reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n):
    return max(16, next_pow2(n))                                   # tl.dot needs every side ≥ 16


def _chunk_cb(C, B, chunk):
    """(batch, nchunks, ngroups, chunk, chunk) float32 C_t·B_s per chunk; see _chunk_cb_kernel."""
    batch, seqlen, ngroups, N = B.shape
    nchunks = cdiv(seqlen, chunk)
    cb = torch.empty(batch, nchunks, ngroups, chunk, chunk, device=B.device, dtype=torch.float32)
    block_m = min(_BLOCK_M, chunk)
    grid = ((chunk // block_m) ** 2, batch * nchunks, ngroups)
    _chunk_cb_kernel[grid](C, B, cb, seqlen, N, *B.stride(), *cb.stride()[:3], CHUNK=chunk,
                           DOT_PRECISION=_dot_precision(B.dtype), BLOCK_M=block_m, BLOCK_N=min(128, _pow2(N)))
    return cb


def _chunk_state(u, v, delta, a_cumsum, to_end):
    """(batch, nchunks, nheads, P, N) float32 summaries of each chunk: chunk_states when to_end, else dprev_states;
    see _chunk_state_kernel."""
    batch, seqlen, nheads, P = u.shape
    N = v.shape[-1]
    nchunks, chunk = delta.shape[2], delta.shape[3]
    out = torch.empty(batch, nchunks, nheads, P, N, device=u.device, dtype=torch.float32)
    block_p, block_n = min(64, _pow2(P)), min(128, _pow2(N))       # dstate ≤ 128 at once: x is read once
    grid = (cdiv(P, block_p) * cdiv(N, block_n), batch * nchunks, nheads)
    _chunk_state_kernel[grid](
        u, v, delta, a_cumsum, out, seqlen, nheads // v.shape[2], P, N,
        *u.stride(), *v.stride(), *delta.stride()[:3], *out.stride()[:4],
        CHUNK=chunk, TO_END=to_end, DOT_PRECISION=_dot_precision(u.dtype),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_L=min(64, chunk))
    return out


def _chunk_delta(dt, dt_bias, A, dt_softplus, chunk):
    """Δ and a_cumsum, each (batch, nheads, nchunks, chunk) float32; see _chunk_delta_kernel."""
    batch, seqlen, nheads = dt.shape
    nchunks = cdiv(seqlen, chunk)
    delta = torch.empty(batch, nheads, nchunks, chunk, device=dt.device, dtype=torch.float32)
    a_cumsum = torch.empty_like(delta)
    block_h = max(1, min(8, next_pow2(nheads), 2048 // chunk))        # at most 2048 positions x heads a program
    _chunk_delta_kernel[(batch * nchunks, cdiv(nheads, block_h))](
        dt, dt_bias if dt_bias is not None else A, A, delta, a_cumsum, seqlen, nheads, *dt.stride(),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, CHUNK=chunk, BLOCK_H=block_h)
    return delta, a_cumsum


def _chunk_delta_backward(ddelta, da, delta, dt, dt_bias, A, dt_softplus):
    """∂ℓ/∂dt, ∂ℓ/∂A and ∂ℓ/∂dt_bias from ∂ℓ/∂Δ and ∂ℓ/∂a, (batch, nheads, nchunks, chunk), through a = Δ A and
    Δ = softplus(dt + dt_bias): the chain rule of _chunk_delta_kernel, in PyTorch (small tensors)."""
    dA = (da * delta).sum((0, 2, 3))
    ddt = rearrange(ddelta + da * A.float()[:, None, None], "b h c l -> b (c l) h")[:, :dt.shape[1]]
    if dt_softplus:                                  # softplus' = sigmoid, and 1 above torch's threshold of 20
        pre = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        ddt = ddt * torch.where(pre > 20.0, 1.0, torch.sigmoid(pre))
    ddt_bias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    return ddt.to(dt.dtype), dA.to(A.dtype), ddt_bias


def _state_passing(states, a_cumsum, initial_state, out=None, prev_states=None):
    """Runs step 3's recurrence over `states` (see _state_passing_kernel): chunk_states become prev_states, in place
    or in `out` (16-bit, for the forward's step 4), and the final state is returned.

    With prev_states (the forward pass's) it runs backwards, in place: `states` holds dprev_states, which become
    dchunk_states, initial_state is ∂ℓ/∂final_state, and it returns ∂ℓ/∂initial_state and da_carried, per chunk the
    gradient of the decay that step 3 applies to the carried state, (batch, nheads, nchunks)."""
    batch, nchunks, nheads, P, N = states.shape
    final_state = torch.empty(batch, nheads, P, N, device=states.device, dtype=torch.float32)
    a_cumsum_end = a_cumsum[..., -1]                                   # (batch, nheads, nchunks)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    BLOCK = min(512, next_pow2(P * N))
    blocks = cdiv(P * N, BLOCK)
    reverse = prev_states is not None
    da_carried = (torch.empty(batch, nheads, nchunks, blocks, device=states.device, dtype=torch.float32)
                  if reverse else final_state)
    _state_passing_kernel[(blocks, batch, nheads)](
        states, a_cumsum_end, initial_state if initial_state is not None else final_state, final_state,
        out if out is not None else states, prev_states if reverse else states, da_carried,
        nchunks, P * N, states.stride(0), states.stride(1), states.stride(2), *a_cumsum_end.stride(),
        final_state.stride(0), final_state.stride(1), HAS_INITIAL_STATE=initial_state is not None,
        REVERSE=reverse, BLOCK=BLOCK)
    return (final_state, da_carried.sum(-1)) if reverse else final_state


def _ssd_fwd(x, dt, A, dt_bias, B, C, D, initial_state, chunk, dt_softplus):
    """The forward kernels, steps 1-4: (y like x, final_state, delta, a_cumsum). The kernels read Δ and a_cumsum =
    cumsum(a) within each chunk, a = Δ A the log-decay of each step, which the backward pass takes back."""
    batch, seqlen, nheads, P = x.shape
    ngroups, N = B.shape[2], B.shape[3]
    delta, a_cumsum = _chunk_delta(dt, dt_bias, A, dt_softplus, chunk)   # (batch, nheads, nchunks, chunk)
    nchunks = delta.shape[2]
    cb = _chunk_cb(C, B, chunk)                                               # step 1's C Bᵀ
    chunk_states = _chunk_state(x, B, delta, a_cumsum, to_end=True)            # step 2
    # step 3: h_{c-1} in x's dtype, as step 4's matmul reads it (half the bytes of float32 for 16-bit x)
    prev_states = chunk_states if x.element_size() > 2 else torch.empty_like(chunk_states, dtype=x.dtype)
    final_state = _state_passing(chunk_states, a_cumsum, initial_state, out=prev_states)
    y = torch.empty_like(x)
    block_m, block_p = min(_BLOCK_M, chunk), min(64, _pow2(P))
    grid = (nheads, cdiv(chunk, block_m) * cdiv(P, block_p), batch * nchunks)      # heads first: see _BLOCK_M
    _chunk_scan_fwd_kernel[grid](                                              # steps 1 + 4
        x, delta, a_cumsum, C, cb, prev_states, D if D is not None else x, y, seqlen, nheads // ngroups, P, N,
        *x.stride(), *C.stride(), *cb.stride()[:3], *delta.stride()[:3], *prev_states.stride()[:4], *y.stride(),
        CHUNK=chunk, HAS_D=D is not None, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_N=_pow2(N))
    return y, final_state, delta, a_cumsum


def _ssd_bwd(dy, dfinal_state, x, dt, A, dt_bias, delta, a_cumsum, B, C, D, initial_state, dt_softplus,
             dx=None, dB=None, dC=None):
    """The backward kernels: (dx, ddt, dA, ddt_bias, dB, dC, dD, dinitial_state). dx, dB and dC are written into the
    tensors given (views of one buffer in mixer_kernel's `mixer_scan`), else into new ones.

    Besides the matmuls' gradients, the loss ℓ depends on every a_τ through the decays that span step τ:
    L_ts = exp(a_cumsum_t − a_cumsum_s) for s < τ ≤ t (step 1), exp(a_cumsum_end − a_cumsum_s) for s < τ (step 2),
    exp(a_cumsum_t) for τ ≤ t (step 4) and exp(a_cumsum_end) for the state carried across the chunk (step 3). da_τ
    adds up those terms directly, each one once, rather than da_cumsum followed by a reverse cumsum, in which the
    +M_ts and −M_ts of each pair cancel and the rounding does not. PyTorch takes da and dΔ on to dt, dt_bias and A
    (_chunk_delta_backward)."""
    batch, seqlen, nheads, P = x.shape
    ngroups, N = B.shape[2], B.shape[3]
    nchunks, chunk = delta.shape[2], delta.shape[3]
    heads_per_group = nheads // ngroups
    dy = dy.contiguous()
    # Recompute C Bᵀ and prev_states: cheaper than keeping (batch, nchunks, nheads, P, N) from the forward pass.
    cb = _chunk_cb(C, B, chunk)
    chunk_states = _chunk_state(x, B, delta, a_cumsum, to_end=True)
    _state_passing(chunk_states, a_cumsum, initial_state)
    prev_states = chunk_states                                                 # step 3 ran in place
    # dchunk_states[c] = ∂ℓ/∂h_c: step 4's gradients w.r.t. each h_{c-1}, carried backwards through step 3.
    dprev_states = _chunk_state(dy, C, delta, a_cumsum, to_end=False)
    dinitial_state, da_carried = _state_passing(dprev_states, a_cumsum, dfinal_state, prev_states=prev_states)
    dchunk_states = dprev_states                                               # step 3 ran in place

    block_m = min(_BLOCK_M, chunk)
    m_blocks = cdiv(chunk, block_m)
    dims = dict(DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_P=_pow2(P), BLOCK_N=_pow2(N))
    strides = (*x.stride(), *dy.stride(), *B.stride())
    dx = torch.empty_like(dy) if dx is None else dx
    ddelta, da_state, da_out = (torch.zeros_like(delta) for _ in range(3))   # the padding stays 0
    da_pairs = torch.zeros(batch, nheads, nchunks, m_blocks, chunk, device=x.device, dtype=torch.float32)
    dD_parts = torch.zeros(batch * nchunks * m_blocks, nheads, P, device=x.device, dtype=torch.float32)
    _chunk_scan_bwd_dx_kernel[(nheads, m_blocks, batch * nchunks)](               # heads first: see _BLOCK_M
        x, delta, a_cumsum, B, cb, dy, dchunk_states, D if D is not None else x, dx, ddelta, dD_parts, da_state,
        da_pairs, seqlen, heads_per_group, P, N, *strides, *dx.stride(), *cb.stride()[:3], *delta.stride()[:3],
        *dchunk_states.stride()[:4], *da_pairs.stride()[:4], CHUNK=chunk, HAS_D=D is not None, **dims)

    slices = min(heads_per_group, cdiv(_MIN_PROGRAMS, m_blocks * batch * nchunks * ngroups))
    heads_per_program = cdiv(heads_per_group, slices)
    slices = cdiv(heads_per_group, heads_per_program)
    grid = (m_blocks, batch * nchunks, ngroups * slices)
    dB_parts = torch.empty(batch, seqlen, slices, ngroups, N, device=x.device, dtype=torch.float32)
    dC_parts = torch.empty_like(dB_parts)
    _chunk_scan_bwd_db_kernel[grid](
        x, delta, a_cumsum, C, dy, dchunk_states, dB_parts, seqlen, heads_per_group, heads_per_program, P, N,
        *strides, *delta.stride()[:3], *dchunk_states.stride()[:4], *dB_parts.stride()[:4], CHUNK=chunk, **dims)
    _chunk_scan_bwd_dc_kernel[grid](
        x, delta, a_cumsum, B, C, dy, prev_states, dC_parts, da_out, seqlen, heads_per_group, heads_per_program, P,
        N, *strides, *delta.stride()[:3], *prev_states.stride()[:4], *dC_parts.stride()[:4], CHUNK=chunk, **dims)

    # da_τ: step 1's straddling pairs, step 2 (s < τ), step 4 (t ≥ τ), step 3 (the whole chunk)
    da = (da_pairs.sum(3) + (torch.cumsum(da_state, -1) - da_state)
          + torch.flip(torch.cumsum(torch.flip(da_out, [-1]), -1), [-1]) + da_carried[..., None])
    dD = dD_parts.sum(0).sum(-1).to(D.dtype) if D is not None else None
    dinitial_state = dinitial_state.to(initial_state.dtype) if initial_state is not None else None
    ddt, dA, ddt_bias = _chunk_delta_backward(ddelta, da, delta, dt, dt_bias, A, dt_softplus)
    dB, dC = (_sum_slices(parts, out, B.dtype) for parts, out in ((dB_parts, dB), (dC_parts, dC)))
    return dx, ddt, dA, ddt_bias, dB, dC, dD, dinitial_state


def _sum_slices(parts, out, dtype):
    """(batch, seqlen, slices, ngroups, N) float32 partial sums, summed over the slices into out or a new tensor."""
    return parts.sum(2).to(dtype) if out is None else out.copy_(parts.sum(2))


class _SSDScan(torch.autograd.Function):
    """_ssd_fwd forward, _ssd_bwd backward, from the raw dt."""

    @staticmethod
    def forward(ctx, x, dt, A, dt_bias, B, C, D, initial_state, chunk, dt_softplus):
        y, final_state, delta, a_cumsum = _ssd_fwd(x, dt, A, dt_bias, B, C, D, initial_state, chunk, dt_softplus)
        ctx.save_for_backward(x, dt, A, dt_bias, delta, a_cumsum, B, C, D, initial_state)
        ctx.dt_softplus = dt_softplus
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal_state):
        return (*_ssd_bwd(dy, dfinal_state, *ctx.saved_tensors, ctx.dt_softplus), None, None)


@reference_off_gpu(ssd_reference)
def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
             return_final_state=False):
    """The chunked SSD scan with Triton kernels, differentiable in every input. Matches `ssd_reference`.

    x (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A (nheads,); B, C (batch, seqlen, ngroups, dstate);
    D (nheads,); dt_bias (nheads,); initial_state (batch, nheads, headdim, dstate).
    Returns y like x, and the final state (batch, nheads, headdim, dstate) in float32 when return_final_state.
    chunk_size: a power of two ≥ 16. Runs on a GPU, or on the CPU under TRITON_INTERPRET=1
    (elsewhere ssd_reference runs)."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    _check_chunking("ssd_scan", x.shape[1], chunk_size)
    B, C = B.to(x.dtype), C.to(x.dtype)
    if B.stride() != C.stride():                                                  # the kernels share B's strides
        B, C = B.contiguous(), C.contiguous()
    if D is not None:
        D = D.contiguous()
    y, final_state = _SSDScan.apply(x, dt, A.contiguous(), dt_bias.contiguous() if dt_bias is not None else None,
                                    B, C, D, initial_state, chunk_size, dt_softplus)
    return (y, final_state) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 4. One step of the recurrence, for generation


def ssd_step_reference(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, A_log=None):
    """One token of the recurrence in PyTorch; updates the state h (`state`) in place and returns y.

    state (batch, nheads, headdim, dstate); x (batch, nheads, headdim); dt (batch, nheads);
    B, C (batch, ngroups, dstate); D (nheads,); A (nheads,), or None with A_log: A = -exp(A_log), as Mamba-2 stores
    it."""
    nheads = x.shape[1]
    _check_A(A, A_log)
    _check_D(D, nheads)
    A = -torch.exp(A_log.float()) if A is None else A
    delta = _delta(dt, dt_bias, dt_softplus).to(state.dtype)                      # (batch, nheads)
    B_ = repeat(B.to(state.dtype), "b g n -> b (g r) n", r=nheads // B.shape[1])
    C_ = repeat(C.to(state.dtype), "b g n -> b (g r) n", r=nheads // C.shape[1])
    x_ = x.to(state.dtype)
    decay = torch.exp(delta * A.to(state.dtype))
    state.mul_(decay[:, :, None, None]).add_(torch.einsum("bh,bhp,bhn->bhpn", delta, x_, B_))
    y = torch.einsum("bhpn,bhn->bhp", state, C_)
    if D is not None:
        y = y + x_ * D.to(state.dtype)[:, None]
    return y.to(x.dtype)


def _check_A(A, A_log):
    if (A is None) == (A_log is None):
        raise ValueError("ssd_step: pass exactly one of A and A_log")


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr,
    nheads, heads_per_group, P, N,
    stride_s_b, stride_s_h, stride_s_p,
    stride_x_b, stride_x_h,
    stride_dt_b,
    stride_bc_b, stride_bc_g,
    stride_y_b, stride_y_h,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    A_IS_LOG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h ← exp(Δ A) h + Δ x Bᵀ, y = h C + D x for one token of one head, the state h updated in place. With A_IS_LOG,
    A_ptr holds A_log and A = -exp(A_log).

    Must match ssd_step_reference."""
    pid_bh, pid_p = tl.program_id(0), tl.program_id(1)
    b, head = pid_bh // nheads, pid_bh % nheads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    in_p, in_n = offs_p < P, offs_n < N

    delta = tl.load(dt_ptr + b * stride_dt_b + head).to(tl.float32)
    if HAS_DT_BIAS:
        delta += tl.load(dt_bias_ptr + head).to(tl.float32)
    if DT_SOFTPLUS:
        delta = _softplus(delta)
    A = tl.load(A_ptr + head).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    decay = tl.exp(delta * A)
    x = tl.load(x_ptr + b * stride_x_b + head * stride_x_h + offs_p, mask=in_p, other=0.0).to(tl.float32)
    bc_off = b * stride_bc_b + (head // heads_per_group) * stride_bc_g + offs_n
    Bv = tl.load(B_ptr + bc_off, mask=in_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc_off, mask=in_n, other=0.0).to(tl.float32)

    h_ptrs = (state_ptr + b.to(tl.int64) * stride_s_b + head * stride_s_h
              + offs_p[:, None] * stride_s_p + offs_n[None, :])
    mask = in_p[:, None] & in_n[None, :]
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)           # (BLOCK_P, BLOCK_N)
    h = h * decay + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h, mask=mask)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + head).to(tl.float32) * x
    tl.store(y_ptr + b * stride_y_b + head * stride_y_h + offs_p, y, mask=in_p)


_STEP_TILE = 4096         # state elements per program (BLOCK_P x BLOCK_N); bench.py's sweep_decode times others


@reference_off_gpu(ssd_step_reference)
def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, A_log=None):
    """One token of the recurrence (Triton): updates the state h (`state`) in place and returns y (batch, nheads,
    headdim).

    state (batch, nheads, headdim, dstate), contiguous in dstate; x (batch, nheads, headdim); dt (batch, nheads);
    B, C (batch, ngroups, dstate); D (nheads,); A (nheads,), or None with A_log, A = -exp(A_log) then taken inside the
    kernel (when decoding, the launches of that little computation would cost more than the kernel). Matches
    ssd_step_reference; repeated over a sequence it matches ssd_scan."""
    _check_A(A, A_log)
    batch, nheads, P = x.shape
    _check_D(D, nheads)
    N = state.shape[-1]
    if tuple(state.shape) != (batch, nheads, P, N) or state.stride(-1) != 1:
        raise ValueError(f"ssd_step: state must be ({batch}, {nheads}, {P}, dstate) and contiguous in dstate, "
                         f"got {tuple(state.shape)}")
    if x.stride(-1) != 1 or dt.stride(-1) != 1 or B.stride() != C.stride() or B.stride(-1) != 1:
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    y = torch.empty_like(x)
    BLOCK_N = max(16, next_pow2(N))
    BLOCK_P = max(1, min(next_pow2(P), _STEP_TILE // BLOCK_N))
    grid = (batch * nheads, cdiv(P, BLOCK_P))
    D_ = D.contiguous() if D is not None else x
    _ssd_step_kernel[grid](
        state, x, dt, A if A is not None else A_log, B, C, D_, dt_bias if dt_bias is not None else x, y,
        nheads, nheads // B.shape[1], P, N,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, A_IS_LOG=A is None,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    return y
