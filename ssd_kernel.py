"""Mamba-2's state-space duality (SSD) scan, four ways.

Per head, with a scalar decay rate A < 0, a step size Δ_t > 0, an input x_t ∈ R^P and B_t, C_t ∈ R^N
(SSD paper, Dao & Gu 2024, arXiv 2405.21060, §3 with the scalar-times-identity A of §3.2):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ        the state, (P, N)
    y_t = h_t C_t + D x_t

- `ssd_naive`      the recurrence above, one step at a time: the definition.
- `ssd_reference`  the chunked SSD algorithm of §6 in PyTorch: quadratic inside a chunk, linear across chunks.
- `ssd_scan`       the same algorithm as Triton kernels, forward and backward (an autograd Function).
- `ssd_step`       one step of the recurrence, for generation (Triton), beside `ssd_step_reference`.

Shapes follow mamba_ssm's `mamba_chunk_scan_combined`:
    x (batch, seqlen, nheads, headdim)   dt (batch, seqlen, nheads)   A (nheads,)
    B, C (batch, seqlen, ngroups, dstate)   D (nheads,) or (nheads, headdim)   state (batch, nheads, headdim, dstate)
Heads share B and C in groups: head h reads group h // (nheads // ngroups).
Δ = softplus(dt + dt_bias) when dt_softplus, else dt + dt_bias.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange, repeat


def _delta(dt, dt_bias, dt_softplus):
    """Δ from the raw dt (the model's in_proj output): add the bias, then softplus. Returned in float32 or wider."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


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
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"ssd: D has shape {tuple(D.shape)}, expected ({nheads},) or ({nheads}, {headdim})")


def _d_term(D, x):
    """The skip connection D x_t, for D of shape (nheads,) or (nheads, headdim)."""
    return x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# 1. The definition: one step at a time


def ssd_naive(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
              return_final_state=False):
    """The recurrence h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t + D x_t, one token at a time.

    Slow (a Python loop over seqlen) and obviously right; computes in float32, or float64 for float64 inputs."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    delta = _delta(dt, dt_bias, dt_softplus).to(dtype)                            # (batch, seqlen, nheads)
    x_, A_ = x.to(dtype), A.to(dtype)
    B_ = repeat(B.to(dtype), "b l g n -> b l (g r) n", r=nheads // B.shape[2])    # (batch, seqlen, nheads, dstate)
    C_ = repeat(C.to(dtype), "b l g n -> b l (g r) n", r=nheads // C.shape[2])
    h = x_.new_zeros(batch, nheads, headdim, B.shape[3]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(delta[:, t] * A_)                                        # (batch, nheads)
        h = decay[:, :, None, None] * h + torch.einsum(
            "bh,bhp,bhn->bhpn", delta[:, t], x_[:, t], B_[:, t])                   # (batch, nheads, headdim, dstate)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_[:, t]))
    y = torch.stack(ys, dim=1)                                                     # (batch, seqlen, nheads, headdim)
    if D is not None:
        y = y + _d_term(D.to(dtype), x_)
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 2. The chunked algorithm in PyTorch (SSD paper §6, "Listing 1")


def segsum(a):
    """Segment sums: out[..., i, j] = a_{j+1} + … + a_i for j ≤ i, -inf above the diagonal.

    exp(segsum(ΔA)) is the 1-semiseparable mask L of the paper (§3, eq. (4)): L_ij = exp(Δ_{j+1}A + … + Δ_iA).
    Summed per column rather than as a difference of cumsums, which would cancel catastrophically in float32."""
    T = a.shape[-1]
    a = repeat(a, "... t -> ... t s", s=T)                                         # a[..., k, j] = a_k
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(a.masked_fill(~below, 0), dim=-2)                           # Σ_{j<k≤i} a_k
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~causal, -torch.inf)


def ssd_reference(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                  return_final_state=False):
    """The chunked SSD algorithm (SSD paper §6) in pure PyTorch: the readable definition that `ssd_scan` implements.

    The sequence is cut into chunks of `chunk_size`. The matrix y = M x (M_ts = C_tᵀ exp(Δ_{s+1}A+…+Δ_tA) B_s Δ_s)
    splits into diagonal blocks, computed as masked attention, and off-diagonal blocks, low rank through the state.
    Any seqlen: the tail is padded with Δ = 0, which neither decays nor feeds the state. Differentiable by autograd."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    pad = -seqlen % chunk_size
    delta = F.pad(_delta(dt, dt_bias, dt_softplus).to(dtype), (0, 0, 0, pad))     # (batch, padded_len, nheads)
    x_, B_, C_ = (F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    B_ = repeat(B_, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=nheads // B.shape[2])
    C_ = repeat(C_, "b (c l) g n -> b c l (g r) n", l=chunk_size, r=nheads // C.shape[2])
    x_ = rearrange(x_, "b (c l) h p -> b c l h p", l=chunk_size)                   # (batch, nchunks, chunk, nheads, headdim)
    delta = rearrange(delta, "b (c l) h -> b h c l", l=chunk_size)                 # (batch, nheads, nchunks, chunk)
    a = delta * A.to(dtype)[:, None, None]                                         # log-decay per step, Δ_t A
    a_cumsum = torch.cumsum(a, dim=-1)                                             # (batch, nheads, nchunks, chunk)

    # 1. Diagonal blocks (§6.1): inside a chunk, y = (L ∘ C Bᵀ) (Δ x), the quadratic "attention" form (§4).
    L = torch.exp(segsum(a))                                                       # (batch, nheads, nchunks, chunk, chunk)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bhcs,bcshp->bclhp", C_, B_, L, delta, x_)

    # 2. Chunk states (§6.2, right factors): each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)                       # (batch, nheads, nchunks, chunk)
    states = torch.einsum("bclhn,bhcl,bhcl,bclhp->bchpn", B_, decay_to_end, delta, x_)

    # 3. State passing (§6.2, center factors): h_c = exp(ΣΔA over chunk c) h_{c-1} + states_c, across chunks.
    if initial_state is None:
        initial_state = x_.new_zeros(batch, nheads, headdim, B.shape[3])
    states = torch.cat([initial_state.to(dtype)[:, None], states], dim=1)        # (batch, nchunks+1, nheads, headdim, dstate)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))            # (batch, nheads, nchunks+1, nchunks+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    prev_states, final_state = states[:, :-1], states[:, -1]                     # state entering each chunk; the last

    # 4. State to output (§6.2, left factors): y_t += exp(Σ_{s≤t} Δ_s A) h_{c-1} C_t.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_, prev_states, torch.exp(a_cumsum))

    y = rearrange(y_diag + y_off, "b c l h p -> b (c l) h p")[:, :seqlen]
    if D is not None:
        y = y + _d_term(D.to(dtype), x.to(dtype))
    y = y.to(x.dtype)
    return (y, final_state) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 3. The chunked algorithm as Triton kernels
#
# The wrapper turns dt into Δ and a_cumsum = cumsum(Δ A) per chunk with PyTorch (tiny tensors, autograd takes the
# gradient through softplus, bias, A and the cumsum), then three kernels do the forward (steps 2, 3, then 1+4 fused)
# and four do the backward. Δ and a_cumsum are padded to whole chunks with Δ = 0, so the kernels mask only x, B, C.


@triton.jit
def _chunk_state_kernel(
    u_ptr, v_ptr, delta_ptr, acs_ptr, out_ptr,
    seqlen, heads_per_group, P, N,
    stride_u_b, stride_u_l, stride_u_h, stride_u_p,
    stride_v_b, stride_v_l, stride_v_g, stride_v_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_o_b, stride_o_c, stride_o_h, stride_o_p,
    CHUNK: tl.constexpr, TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out[b, c, h] = Σ_{s in chunk c} w_s u_s v_sᵀ, a (P, N) summary of one chunk for one head. Used twice:

    TO_END=True:  chunk states, u = x, v = B, w_s = exp(a_cumsum_end − a_cumsum_s) Δ_s.   Must match ssd_reference step 2.
    TO_END=False: gradient of step 4 w.r.t. the state entering the chunk, u = dy, v = C, w_s = exp(a_cumsum_s).
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
    acs_end = tl.load(acs_ptr + a_off + CHUNK - 1)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, chunk_len, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        in_l = offs_l < chunk_len
        u = tl.load(u_ptr + offs_l[None, :] * stride_u_l + offs_p[:, None] * stride_u_p,
                    mask=in_l[None, :] & (offs_p[:, None] < P), other=0.0)                  # (BLOCK_P, BLOCK_L)
        v = tl.load(v_ptr + offs_l[:, None] * stride_v_l + offs_n[None, :] * stride_v_n,
                    mask=in_l[:, None] & (offs_n[None, :] < N), other=0.0)                  # (BLOCK_L, BLOCK_N)
        acs = tl.load(acs_ptr + a_off + offs_l)
        if TO_END:
            w = tl.exp(acs_end - acs) * tl.load(delta_ptr + a_off + offs_l)
        else:
            w = tl.exp(acs)
        acc += tl.dot(u, (v * w[:, None]).to(u.dtype), input_precision=DOT_PRECISION)

    out_ptr += b.to(tl.int64) * stride_o_b + c * stride_o_c + pid_h * stride_o_h
    tl.store(out_ptr + offs_p[:, None] * stride_o_p + offs_n[None, :], acc,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_passing_kernel(
    states_ptr, acs_end_ptr, init_ptr, final_ptr,
    nchunks, dim,
    stride_s_b, stride_s_c, stride_s_h,
    stride_a_b, stride_a_h, stride_a_c,
    stride_i_b, stride_i_h,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The linear recurrence across chunks, in place: R ← exp(a_c) R + s_c, with a_c = Σ Δ A over chunk c.

    On entry states[c] holds s_c, on exit the R that entered chunk c; final gets the last R.  Forward: s_c are the chunk
    states and R the SSM state (must match ssd_reference step 3). REVERSE walks the chunks backwards: with s_c the
    output gradients of step 4 it carries ∂L/∂state from the end of the sequence to the start."""
    pid, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    states_ptr += b.to(tl.int64) * stride_s_b + h * stride_s_h + offs
    acs_end_ptr += b * stride_a_b + h * stride_a_h
    if HAS_INIT:
        R = tl.load(init_ptr + b.to(tl.int64) * stride_i_b + h * stride_i_h + offs, mask=mask, other=0.0)
    else:
        R = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i if REVERSE else i
        s = tl.load(states_ptr + c * stride_s_c, mask=mask, other=0.0)
        tl.store(states_ptr + c * stride_s_c, R, mask=mask)
        R = tl.exp(tl.load(acs_end_ptr + c * stride_a_c)) * R + s
    tl.store(final_ptr + b.to(tl.int64) * stride_i_b + h * stride_i_h + offs, R, mask=mask)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, delta_ptr, acs_ptr, B_ptr, C_ptr, states_ptr, D_ptr, y_ptr,
    seqlen, heads_per_group, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Outputs of a block of rows t of one chunk and head:

        y_t = Σ_{s ≤ t in chunk} (C_t·B_s) exp(acs_t − acs_s) Δ_s x_s   +   exp(acs_t) R_c C_t   +   D x_t
              (step 1: diagonal block)                                     (step 4: state to output)

    with acs = a_cumsum and R_c the state entering the chunk.  Must match ssd_reference steps 1 and 4 (plus D)."""
    pid_mp, pid_bc, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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

    x_ptr += b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l + pid_h * stride_x_h
    bc_off = b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + (pid_h // heads_per_group) * stride_bc_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N

    C_t = tl.load(C_ptr + bc_off + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0)                           # (BLOCK_M, BLOCK_N)
    acs_t = tl.load(acs_ptr + a_off + offs_m)

    # step 4: the state entering the chunk, read out by C_t and decayed to t
    R = tl.load(states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + pid_h * stride_s_h
                + offs_n[:, None] + offs_p[None, :] * stride_s_p,
                mask=in_n[:, None] & in_p[None, :], other=0.0)                             # (BLOCK_N, BLOCK_P) = R_cᵀ
    acc = tl.dot(C_t, R.to(C_t.dtype), input_precision=DOT_PRECISION) * tl.exp(acs_t)[:, None]

    # step 1: the causal diagonal block, only s-blocks at or before this row block
    for k0 in range(0, tl.minimum(m0 + BLOCK_M, chunk_len), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < chunk_len
        B_s = tl.load(B_ptr + bc_off + offs_k[None, :] * stride_bc_l + offs_n[:, None] * stride_bc_n,
                      mask=in_k[None, :] & in_n[:, None], other=0.0)                       # (BLOCK_N, BLOCK_K)
        CB = tl.dot(C_t, B_s, input_precision=DOT_PRECISION)                               # (BLOCK_M, BLOCK_K)
        acs_s = tl.load(acs_ptr + a_off + offs_k)
        delta_s = tl.load(delta_ptr + a_off + offs_k)
        causal = offs_m[:, None] >= offs_k[None, :]
        w = tl.where(causal, tl.exp(acs_t[:, None] - acs_s[None, :]), 0.0) * delta_s[None, :]
        x_s = tl.load(x_ptr + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                      mask=in_k[:, None] & in_p[None, :], other=0.0)                       # (BLOCK_K, BLOCK_P)
        acc += tl.dot((CB * w).to(x_s.dtype), x_s, input_precision=DOT_PRECISION)

    x_t_ptrs = x_ptr + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p
    if HAS_D:
        if D_HAS_HDIM:
            Dv = tl.load(D_ptr + pid_h * P + offs_p, mask=in_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + pid_h).to(tl.float32)
        acc += Dv * tl.load(x_t_ptrs, mask=in_m[:, None] & in_p[None, :], other=0.0).to(tl.float32)
    y_ptr += b.to(tl.int64) * stride_y_b + (c * CHUNK) * stride_y_l + pid_h * stride_y_h
    tl.store(y_ptr + offs_m[:, None] * stride_y_l + offs_p[None, :] * stride_y_p, acc,
             mask=in_m[:, None] & in_p[None, :])


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, delta_ptr, acs_ptr, B_ptr, C_ptr, dy_ptr, dstates_ptr, D_ptr,
    dx_ptr, ddelta_ptr, dB_ptr, bdb_ptr,
    seqlen, heads_per_group, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_db_b, stride_db_l, stride_db_h,
    CHUNK: tl.constexpr, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients that flow out of a block of rows s of one chunk and head, given G_c = ∂L/∂(state at the chunk's end):

        dx'_s = Σ_{t ≥ s} (C_t·B_s) exp(acs_t − acs_s) dy_t  +  exp(acs_end − acs_s) G_c B_s
        dx_s  = Δ_s dx'_s + D dy_s           ∂L/∂Δ_s = x_s·dx'_s   (the part through the Δ_s x_s factor)
        dB_s  = Δ_s [Σ_{t ≥ s} exp(acs_t − acs_s) (dy_t·x_s) C_t  +  exp(acs_end − acs_s) G_cᵀ x_s]   (this head's share)
        bdb_s = B_s·dB_s, which is this head's −∂L/∂acs_s from steps 1 and 2 (see _SSDScan.backward).

    Must match the autograd gradients of ssd_reference."""
    pid_m, pid_bc, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    row_off = b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l + pid_h * stride_x_h
    dy_ptr += b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l + pid_h * stride_dy_h
    bc_off = b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + (pid_h // heads_per_group) * stride_bc_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N

    B_s = tl.load(B_ptr + bc_off + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0)                           # (BLOCK_M, BLOCK_N)
    x_s = tl.load(x_ptr + row_off + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                  mask=in_m[:, None] & in_p[None, :], other=0.0)                           # (BLOCK_M, BLOCK_P)
    acs_s = tl.load(acs_ptr + a_off + offs_m)
    delta_s = tl.load(delta_ptr + a_off + offs_m)
    decay_end = tl.exp(tl.load(acs_ptr + a_off + CHUNK - 1) - acs_s)

    # through the chunk's end state (step 2)
    G = tl.load(dstates_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + pid_h * stride_s_h
                + offs_p[:, None] * stride_s_p + offs_n[None, :],
                mask=in_p[:, None] & in_n[None, :], other=0.0)                             # (BLOCK_P, BLOCK_N)
    dxp = tl.dot(B_s, tl.trans(G).to(B_s.dtype), input_precision=DOT_PRECISION) * decay_end[:, None]
    dB = tl.dot(x_s, G.to(x_s.dtype), input_precision=DOT_PRECISION) * (decay_end * delta_s)[:, None]

    # through the later outputs of the same chunk (step 1), t ≥ s
    for k0 in range(m0, chunk_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < chunk_len
        C_t = tl.load(C_ptr + bc_off + offs_k[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)                       # (BLOCK_K, BLOCK_N)
        dy_t = tl.load(dy_ptr + offs_k[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                       mask=in_k[:, None] & in_p[None, :], other=0.0)                      # (BLOCK_K, BLOCK_P)
        acs_t = tl.load(acs_ptr + a_off + offs_k)
        w = tl.where(offs_k[None, :] >= offs_m[:, None], tl.exp(acs_t[None, :] - acs_s[:, None]), 0.0)
        BC = tl.dot(B_s, tl.trans(C_t), input_precision=DOT_PRECISION)                    # (BLOCK_M, BLOCK_K)
        dxp += tl.dot((BC * w).to(dy_t.dtype), dy_t, input_precision=DOT_PRECISION)
        xdy = tl.dot(x_s, tl.trans(dy_t), input_precision=DOT_PRECISION)                  # (BLOCK_M, BLOCK_K)
        dB += tl.dot((xdy * w * delta_s[:, None]).to(C_t.dtype), C_t, input_precision=DOT_PRECISION)

    dx = dxp * delta_s[:, None]
    if HAS_D:
        if D_HAS_HDIM:
            Dv = tl.load(D_ptr + pid_h * P + offs_p, mask=in_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + pid_h).to(tl.float32)
        dy_s = tl.load(dy_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                       mask=in_m[:, None] & in_p[None, :], other=0.0)
        dx += Dv * dy_s.to(tl.float32)
    dx_ptr += b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l + pid_h * stride_dy_h
    tl.store(dx_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, dx,
             mask=in_m[:, None] & in_p[None, :])
    tl.store(ddelta_ptr + a_off + offs_m, tl.sum(dxp * x_s.to(tl.float32), axis=1), mask=in_m)
    tl.store(bdb_ptr + a_off + offs_m, tl.sum(dB * B_s.to(tl.float32), axis=1), mask=in_m)
    dB_ptr += b.to(tl.int64) * stride_db_b + (c * CHUNK) * stride_db_l + pid_h * stride_db_h
    tl.store(dB_ptr + offs_m[:, None] * stride_db_l + offs_n[None, :], dB, mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr, delta_ptr, acs_ptr, B_ptr, C_ptr, dy_ptr, states_ptr,
    dC_ptr, cdc_ptr,
    seqlen, heads_per_group, P, N,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_a_b, stride_a_h, stride_a_c,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_dc_b, stride_dc_l, stride_dc_h,
    CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradient w.r.t. C for a block of rows t of one chunk and head (this head's share):

        dC_t = Σ_{s ≤ t} exp(acs_t − acs_s) Δ_s (dy_t·x_s) B_s  +  exp(acs_t) R_cᵀ dy_t
        cdc_t = C_t·dC_t = dy_t·(y_t − D x_t), this head's ∂L/∂acs_t from steps 1 and 4.

    Must match the autograd gradients of ssd_reference."""
    pid_m, pid_bc, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    if m0 >= chunk_len:
        return

    row_off = b.to(tl.int64) * stride_x_b + (c * CHUNK) * stride_x_l + pid_h * stride_x_h
    dy_ptr += b.to(tl.int64) * stride_dy_b + (c * CHUNK) * stride_dy_l + pid_h * stride_dy_h
    bc_off = b.to(tl.int64) * stride_bc_b + (c * CHUNK) * stride_bc_l + (pid_h // heads_per_group) * stride_bc_g
    a_off = b * stride_a_b + pid_h * stride_a_h + c * stride_a_c
    in_m, in_p, in_n = offs_m < chunk_len, offs_p < P, offs_n < N

    dy_t = tl.load(dy_ptr + offs_m[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                   mask=in_m[:, None] & in_p[None, :], other=0.0)                          # (BLOCK_M, BLOCK_P)
    acs_t = tl.load(acs_ptr + a_off + offs_m)

    # through the state entering the chunk (step 4)
    R = tl.load(states_ptr + b.to(tl.int64) * stride_s_b + c * stride_s_c + pid_h * stride_s_h
                + offs_p[:, None] * stride_s_p + offs_n[None, :],
                mask=in_p[:, None] & in_n[None, :], other=0.0)                             # (BLOCK_P, BLOCK_N)
    dC = tl.dot(dy_t, R.to(dy_t.dtype), input_precision=DOT_PRECISION) * tl.exp(acs_t)[:, None]

    # through the diagonal block (step 1), s ≤ t
    for k0 in range(0, tl.minimum(m0 + BLOCK_M, chunk_len), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < chunk_len
        x_s = tl.load(x_ptr + row_off + offs_k[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                      mask=in_k[None, :] & in_p[:, None], other=0.0)                       # (BLOCK_P, BLOCK_K)
        B_s = tl.load(B_ptr + bc_off + offs_k[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)                       # (BLOCK_K, BLOCK_N)
        acs_s = tl.load(acs_ptr + a_off + offs_k)
        delta_s = tl.load(delta_ptr + a_off + offs_k)
        w = tl.where(offs_m[:, None] >= offs_k[None, :], tl.exp(acs_t[:, None] - acs_s[None, :]), 0.0)
        dyx = tl.dot(dy_t, x_s, input_precision=DOT_PRECISION)                             # (BLOCK_M, BLOCK_K)
        dC += tl.dot((dyx * w * delta_s[None, :]).to(B_s.dtype), B_s, input_precision=DOT_PRECISION)

    C_t = tl.load(C_ptr + bc_off + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                  mask=in_m[:, None] & in_n[None, :], other=0.0)
    tl.store(cdc_ptr + a_off + offs_m, tl.sum(dC * C_t.to(tl.float32), axis=1), mask=in_m)
    dC_ptr += b.to(tl.int64) * stride_dc_b + (c * CHUNK) * stride_dc_l + pid_h * stride_dc_h
    tl.store(dC_ptr + offs_m[:, None] * stride_dc_l + offs_n[None, :], dC, mask=in_m[:, None] & in_n[None, :])


def _blocks(chunk, P, N):
    """Tile sizes: row tiles of at most 64 inside a chunk; headdim and dstate whole (tl.dot needs ≥ 16)."""
    block_m = min(64, chunk)
    return dict(BLOCK_M=block_m, BLOCK_K=block_m, BLOCK_P=max(16, triton.next_power_of_2(P)),
                BLOCK_N=max(16, triton.next_power_of_2(N)))


def _dot_precision(dtype):
    # float32 inputs get true float32 products (not tf32), so the float32 path is as exact as the reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk_state(u, v, delta, acs, to_end):
    """(batch, nchunks, nheads, P, N) float32 chunk summaries; see _chunk_state_kernel."""
    batch, seqlen, nheads, P = u.shape
    N = v.shape[-1]
    chunk = delta.shape[-1]
    nchunks = delta.shape[2]
    out = torch.empty(batch, nchunks, nheads, P, N, device=u.device, dtype=torch.float32)
    block_p, block_n = min(64, max(16, triton.next_power_of_2(P))), min(64, max(16, triton.next_power_of_2(N)))
    grid = (triton.cdiv(P, block_p) * triton.cdiv(N, block_n), batch * nchunks, nheads)
    _chunk_state_kernel[grid](
        u, v, delta, acs, out, seqlen, nheads // v.shape[2], P, N,
        *u.stride(), *v.stride(), *delta.stride()[:3], *out.stride()[:4],
        CHUNK=chunk, TO_END=to_end, DOT_PRECISION=_dot_precision(u.dtype),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_L=min(64, chunk))
    return out


def _state_passing(states, acs, initial, reverse=False):
    """Runs the chunk recurrence in place on `states` (see _state_passing_kernel); returns the last R."""
    batch, nchunks, nheads, P, N = states.shape
    final = torch.empty(batch, nheads, P, N, device=states.device, dtype=torch.float32)
    acs_end = acs[..., -1]                                                  # (batch, nheads, nchunks)
    if initial is not None:
        initial = initial.float().contiguous()
    BLOCK = min(1024, triton.next_power_of_2(P * N))
    grid = (triton.cdiv(P * N, BLOCK), batch, nheads)
    _state_passing_kernel[grid](
        states, acs_end, initial if initial is not None else final, final, nchunks, P * N,
        states.stride(0), states.stride(1), states.stride(2), *acs_end.stride(), final.stride(0), final.stride(1),
        HAS_INIT=initial is not None, REVERSE=reverse, BLOCK=BLOCK)
    return final


class _SSDScan(torch.autograd.Function):
    """The kernels' forward and backward. Inputs: Δ and a_cumsum already chunked, (batch, nheads, nchunks, chunk).

    Backward notes. Besides the gradients of the matmuls, the loss depends on a_cumsum (acs) through every decay
    factor exp(acs_t − acs_s). Per head, summing those terms by position gives
        ∂L/∂acs_t = C_t·dC_t − B_t·dB_t   (+ ⟨G_c, h_c⟩ at each chunk's last position, for the decay of the state)
    since each term of y_t that C_t·dC_t collects grows with exp(acs_t) and each term that B_s·dB_s collects shrinks
    with exp(−acs_s). PyTorch then takes that through the cumsum to Δ and A."""

    @staticmethod
    def forward(ctx, x, delta, acs, B, C, D, initial_state):
        batch, seqlen, nheads, P = x.shape
        N = B.shape[-1]
        chunk, nchunks = delta.shape[-1], delta.shape[2]
        states = _chunk_state(x, B, delta, acs, to_end=True)                       # step 2
        final_state = _state_passing(states, acs, initial_state)                   # step 3: states[c] = R_c
        y = torch.empty_like(x)
        blocks = _blocks(chunk, P, N)
        block_p = min(64, blocks["BLOCK_P"])
        grid = (triton.cdiv(chunk, blocks["BLOCK_M"]) * triton.cdiv(P, block_p), batch * nchunks, nheads)
        _chunk_scan_fwd_kernel[grid](                                              # steps 1 + 4
            x, delta, acs, B, C, states, D if D is not None else x, y, seqlen, nheads // B.shape[2], P, N,
            *x.stride(), *B.stride(), *delta.stride()[:3], *states.stride()[:4], *y.stride(),
            CHUNK=chunk, HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2,
            DOT_PRECISION=_dot_precision(x.dtype), **{**blocks, "BLOCK_P": block_p})
        ctx.save_for_backward(x, delta, acs, B, C, D, initial_state)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, delta, acs, B, C, D, initial_state = ctx.saved_tensors
        batch, seqlen, nheads, P = x.shape
        ngroups, N = B.shape[2], B.shape[3]
        chunk, nchunks = delta.shape[-1], delta.shape[2]
        dy = dy.contiguous()
        dx = torch.empty_like(dy)                                                  # dx and dy share strides
        # Recompute the states entering each chunk: cheaper than keeping (batch, nchunks, nheads, P, N) per layer.
        states = _chunk_state(x, B, delta, acs, to_end=True)
        final_state = _state_passing(states, acs, initial_state)
        # ∂L/∂(state at the end of chunk c): the output gradients of step 4, carried backwards through step 3.
        dstates = _chunk_state(dy, C, delta, acs, to_end=False)
        dinitial = _state_passing(dstates, acs, dfinal, reverse=True)

        ddelta, bdb, cdc = (torch.zeros_like(delta) for _ in range(3))          # the padding stays 0
        dB = torch.empty(batch, seqlen, nheads, N, device=x.device, dtype=torch.float32)
        dC = torch.empty_like(dB)
        blocks = _blocks(chunk, P, N)
        grid = (triton.cdiv(chunk, blocks["BLOCK_M"]), batch * nchunks, nheads)
        common = (seqlen, nheads // ngroups, P, N, *x.stride(), *dy.stride(), *B.stride(), *delta.stride()[:3])
        _chunk_scan_bwd_dx_kernel[grid](
            x, delta, acs, B, C, dy, dstates, D if D is not None else x, dx, ddelta, dB, bdb,
            *common, *dstates.stride()[:4], *dB.stride()[:3],
            CHUNK=chunk, HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2,
            DOT_PRECISION=_dot_precision(x.dtype), **blocks)
        _chunk_scan_bwd_dc_kernel[grid](
            x, delta, acs, B, C, dy, states, dC, cdc,
            *common, *states.stride()[:4], *dC.stride()[:3],
            CHUNK=chunk, DOT_PRECISION=_dot_precision(x.dtype), **blocks)

        # ∂L/∂acs (see the class docstring); the state at the end of chunk c is R_{c+1}, or the final state.
        dacs = cdc - bdb
        end_states = torch.cat([states[:, 1:], final_state[:, None]], dim=1)      # (batch, nchunks, nheads, P, N)
        dacs[..., -1] += rearrange(torch.einsum("bchpn,bchpn->bch", dstates, end_states), "b c h -> b h c")
        dB = rearrange(dB, "b l (g r) n -> b l g r n", g=ngroups).sum(3).to(B.dtype)
        dC = rearrange(dC, "b l (g r) n -> b l g r n", g=ngroups).sum(3).to(C.dtype)
        dD = None
        if D is not None:
            dD = torch.einsum("blhp,blhp->hp", dy.float(), x.float())
            dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
        dinitial = dinitial.to(initial_state.dtype) if initial_state is not None else None
        return dx, ddelta, dacs, dB, dC, dD, dinitial


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
             return_final_state=False):
    """The chunked SSD scan with Triton kernels, differentiable in every input. Matches `ssd_reference`.

    x (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A (nheads,); B, C (batch, seqlen, ngroups, dstate);
    D (nheads,) or (nheads, headdim); dt_bias (nheads,); initial_state (batch, nheads, headdim, dstate).
    Returns y like x, and the final state (batch, nheads, headdim, dstate) in float32 when return_final_state.
    chunk_size: a power of two ≥ 16. Runs on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    _check_inputs(x, dt, A, B, C, D, initial_state)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd_scan: chunk_size must be a power of two >= 16, got {chunk_size}")
    if x.shape[1] == 0:
        raise ValueError("ssd_scan: seqlen is 0")
    B, C = B.to(x.dtype), C.to(x.dtype)
    if B.stride() != C.stride():                                                  # the kernels share B's strides
        B, C = B.contiguous(), C.contiguous()
    if D is not None:
        D = D.contiguous()
    pad = -x.shape[1] % chunk_size
    delta = F.pad(_delta(dt, dt_bias, dt_softplus).float(), (0, 0, 0, pad))       # Δ = 0 on the padding
    delta = rearrange(delta, "b (c l) h -> b h c l", l=chunk_size).contiguous()   # (batch, nheads, nchunks, chunk)
    acs = torch.cumsum(delta * A.float()[:, None, None], dim=-1)                  # a_cumsum: Σ_{s≤t} Δ_s A per chunk
    y, final_state = _SSDScan.apply(x, delta, acs, B, C, D, initial_state)
    return (y, final_state) if return_final_state else y


# ----------------------------------------------------------------------------------------------------------------------
# 4. One step of the recurrence, for generation


def ssd_step_reference(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False):
    """One token of the recurrence in PyTorch; updates `state` in place and returns y.

    state (batch, nheads, headdim, dstate); x (batch, nheads, headdim); dt (batch, nheads); B, C (batch, ngroups, dstate)."""
    nheads = x.shape[1]
    delta = _delta(dt, dt_bias, dt_softplus).to(state.dtype)                      # (batch, nheads)
    B_ = repeat(B.to(state.dtype), "b g n -> b (g r) n", r=nheads // B.shape[1])
    C_ = repeat(C.to(state.dtype), "b g n -> b (g r) n", r=nheads // C.shape[1])
    x_ = x.to(state.dtype)
    decay = torch.exp(delta * A.to(state.dtype))
    state.mul_(decay[:, :, None, None]).add_(torch.einsum("bh,bhp,bhn->bhpn", delta, x_, B_))
    y = torch.einsum("bhpn,bhn->bhp", state, C_)
    if D is not None:
        y = y + _d_term(D.to(state.dtype), x_)
    return y.to(x.dtype)


@triton.jit
def _softplus(x):
    # log(1 + e^x) as torch's softplus (x above 20 passes through); log1p by Goldberg's trick, exact for e^x ≪ 1
    u = tl.exp(x)
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr,
    nheads, heads_per_group, P, N,
    stride_s_b, stride_s_h, stride_s_p,
    stride_x_b, stride_x_h,
    stride_dt_b,
    stride_bc_b, stride_bc_g,
    stride_y_b, stride_y_h,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h ← exp(Δ A) h + Δ x Bᵀ, y = h C + D x for one token of one head, the state updated in place.

    Must match ssd_step_reference."""
    pid_bh, pid_p = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // nheads, pid_bh % nheads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    in_p, in_n = offs_p < P, offs_n < N

    delta = tl.load(dt_ptr + b * stride_dt_b + h).to(tl.float32)
    if HAS_DT_BIAS:
        delta += tl.load(dt_bias_ptr + h).to(tl.float32)
    if DT_SOFTPLUS:
        delta = _softplus(delta)
    decay = tl.exp(delta * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * stride_x_b + h * stride_x_h + offs_p, mask=in_p, other=0.0).to(tl.float32)
    bc_off = b * stride_bc_b + (h // heads_per_group) * stride_bc_g + offs_n
    Bv = tl.load(B_ptr + bc_off, mask=in_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc_off, mask=in_n, other=0.0).to(tl.float32)

    s_ptrs = state_ptr + b.to(tl.int64) * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :]
    mask = in_p[:, None] & in_n[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)                        # (BLOCK_P, BLOCK_N)
    s = s * decay + (delta * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s, mask=mask)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_HAS_HDIM:
            y += tl.load(D_ptr + h * P + offs_p, mask=in_p, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * stride_y_b + h * stride_y_h + offs_p, y, mask=in_p)


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False):
    """One token of the recurrence (Triton): updates `state` in place and returns y (batch, nheads, headdim).

    state (batch, nheads, headdim, dstate), contiguous in dstate; x (batch, nheads, headdim); dt (batch, nheads);
    B, C (batch, ngroups, dstate). Matches ssd_step_reference; repeated over a sequence it matches ssd_scan."""
    batch, nheads, P = x.shape
    N = state.shape[-1]
    if tuple(state.shape) != (batch, nheads, P, N) or state.stride(-1) != 1:
        raise ValueError(f"ssd_step: state must be ({batch}, {nheads}, {P}, dstate) and contiguous in dstate, "
                         f"got {tuple(state.shape)}")
    if x.stride(-1) != 1 or dt.stride(-1) != 1 or B.stride() != C.stride() or B.stride(-1) != 1:
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    y = torch.empty_like(x)
    BLOCK_N = max(16, triton.next_power_of_2(N))
    BLOCK_P = max(1, min(triton.next_power_of_2(P), 4096 // BLOCK_N))
    grid = (batch * nheads, triton.cdiv(P, BLOCK_P))
    D_ = D.contiguous() if D is not None else x
    _ssd_step_kernel[grid](
        state, x, dt, A, B, C, D_, dt_bias if dt_bias is not None else A, y,
        nheads, nheads // B.shape[1], P, N,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    return y
