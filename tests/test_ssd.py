"""ssd_kernel.py: the naive recurrence, the chunked reference and the Triton kernels agree, values and gradients."""
import pytest
import torch

import ssd_kernel
from conftest import DEVICE, check_references_run_off_gpu
from ssd_kernel import ssd_naive, ssd_reference, ssd_scan, ssd_step, ssd_step_reference

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def make_inputs(batch=2, seqlen=37, nheads=4, headdim=16, ngroups=2, dstate=16, init=True, dtype=torch.float64,
                device="cpu", seed=None):
    """Fresh random inputs shaped like a Mamba-2 layer's (dt is pre-softplus, dt_bias as in the checkpoints)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    inputs = dict(
        x=r(batch, seqlen, nheads, headdim), dt=r(batch, seqlen, nheads) - 1.0,
        A=-torch.exp(r(nheads) * 0.5), B=r(batch, seqlen, ngroups, dstate), C=r(batch, seqlen, ngroups, dstate),
        D=r(nheads), dt_bias=r(nheads) * 0.5,
        initial_state=r(batch, nheads, headdim, dstate) if init else None)
    return {k: v.to(dtype=dtype, device=device) if v is not None else None for k, v in inputs.items()}


def call(fn, inp, **kw):
    return fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True,
              initial_state=inp["initial_state"], return_final_state=True, **kw)


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def grads(fn, inp, gy, gs, **kw):
    """Output values and the gradients of ⟨y, gy⟩ + ⟨final_state, gs⟩ w.r.t. every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    y, final = call(fn, {**inp, **leaves}, **kw)
    (y.double() * gy).sum().backward(retain_graph=True)
    (final.double() * gs).sum().backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("seqlen,chunk", [(1, 8), (7, 8), (9, 8), (37, 8), (40, 5)])
def test_reference_matches_naive(seqlen, chunk):
    """The chunked algorithm is the recurrence: forward, final state and every gradient, in float64."""
    inp = make_inputs(seqlen=seqlen)
    gy, gs = torch.randn(2, seqlen, 4, 16, dtype=torch.float64), torch.randn(2, 4, 16, 16, dtype=torch.float64)
    y_n, f_n, g_n = grads(ssd_naive, inp, gy, gs)
    y_r, f_r, g_r = grads(ssd_reference, inp, gy, gs, chunk_size=chunk)
    assert rel_err(y_r, y_n) < 1e-12 and rel_err(f_r, f_n) < 1e-12
    for k in g_n:
        assert rel_err(g_r[k], g_n[k]) < 1e-10, k


CHUNK = 16
SHAPES = [  # (seqlen, ngroups, headdim, dstate): seqlen 1, chunk-1, chunk+1, odd; dims that do not fill the blocks
    (1, 1, 16, 16), (CHUNK - 1, 2, 16, 16), (CHUNK + 1, 1, 12, 20), (3 * CHUNK + 5, 2, 16, 16)]


@pytest.mark.parametrize("seqlen,ngroups,headdim,dstate", SHAPES)
def test_scan_matches_reference_fp32(seqlen, ngroups, headdim, dstate):
    """Triton forward and all gradients (x, dt, A, B, C, D, dt_bias, initial state) against the float64 reference."""
    inp = make_inputs(seqlen=seqlen, ngroups=ngroups, headdim=headdim, dstate=dstate)
    gy = torch.randn(2, seqlen, 4, headdim, dtype=torch.float64)
    gs = torch.randn(2, 4, headdim, dstate, dtype=torch.float64)
    y_r, f_r, g_r = grads(ssd_reference, inp, gy, gs, chunk_size=CHUNK)
    inp32 = {k: v.float().to(DEVICE) if v is not None else None for k, v in inp.items()}
    y_t, f_t, g_t = grads(ssd_scan, inp32, gy.to(DEVICE), gs.to(DEVICE), chunk_size=CHUNK)
    assert y_t.dtype == torch.float32 and f_t.dtype == torch.float32
    assert rel_err(y_t.cpu(), y_r) < 1e-5 and rel_err(f_t.cpu(), f_r) < 1e-5
    for k in NAMES:
        assert g_t[k].shape == inp[k].shape and g_t[k].dtype == torch.float32, k
        assert rel_err(g_t[k].cpu(), g_r[k]) < 1e-5, k


@pytest.mark.parametrize("softplus,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_chunk_delta_kernel(softplus, bias):
    """Δ and a_cumsum from the raw dt (one kernel) equal ssd_reference's lines, float64: dt as a strided slice, 11 heads
    (not a multiple of the kernel's block of heads), a seqlen that ends inside a chunk (Δ = 0 there), and raw dt above
    softplus' threshold of 20."""
    batch, seqlen, nheads, chunk = 2, 2 * CHUNK + 5, 11, CHUNK
    dt_wide = torch.randn(batch, seqlen, 2 * nheads, dtype=torch.float64) * 3
    dt_wide[0, 3, :8:2] = torch.tensor([19.0, 21.0, 40.0, -30.0], dtype=torch.float64)
    dt = dt_wide[..., ::2]
    dt_bias = torch.randn(nheads, dtype=torch.float64) if bias else None
    A = -torch.rand(nheads, dtype=torch.float64) - 0.1
    pre = dt + dt_bias if bias else dt
    delta = torch.nn.functional.pad(torch.nn.functional.softplus(pre) if softplus else pre, (0, 0, 0, -seqlen % chunk))
    delta = delta.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2)                      # (batch, nheads, nchunks, chunk)
    a_cumsum = torch.cumsum(delta * A[:, None, None], -1)
    dev = lambda t: t.float().to(DEVICE) if t is not None else None
    delta_k, a_cumsum_k = ssd_kernel._chunk_delta(dev(dt_wide)[..., ::2], dev(dt_bias), dev(A), softplus, chunk)
    assert rel_err(delta_k.cpu(), delta) < 1e-6 and rel_err(a_cumsum_k.cpu(), a_cumsum) < 1e-6
    assert (delta_k[:, :, -1, seqlen % chunk:] == 0).all()


@pytest.mark.parametrize("softplus,bias", [(True, False), (False, True)])
def test_scan_without_softplus_or_bias(softplus, bias):
    """The dt gradients when Δ skips the softplus or the bias, against the float64 reference."""
    inp = make_inputs(seqlen=CHUNK + 3, ngroups=1)
    inp["dt"] = inp["dt"].abs() * 0.3 if not softplus else inp["dt"]                  # Δ must stay positive
    inp["dt_bias"] = inp["dt_bias"].abs() if bias else None
    names = ("x", "dt", "A", "dt_bias") if bias else ("x", "dt", "A")
    leaves = {k: inp[k].clone().requires_grad_() for k in names}
    run = lambda fn, t, lv: fn(lv["x"], lv["dt"], lv["A"], t(inp["B"]), t(inp["C"]), D=t(inp["D"]),
                               dt_bias=lv.get("dt_bias"), dt_softplus=softplus, chunk_size=CHUNK)
    y_r = run(ssd_reference, lambda v: v, leaves)
    g_r = torch.autograd.grad(y_r.sum(), list(leaves.values()))
    leaves32 = {k: v.detach().float().to(DEVICE).requires_grad_() for k, v in leaves.items()}
    y_t = run(ssd_scan, lambda v: v.float().to(DEVICE), leaves32)
    g_t = torch.autograd.grad(y_t.sum(), list(leaves32.values()))
    assert rel_err(y_t.cpu(), y_r) < 1e-5
    for k, a, b in zip(leaves, g_t, g_r):
        assert rel_err(a.cpu(), b) < 1e-5, k


@pytest.mark.parametrize("min_programs", [1, 4096])
def test_scan_tiling(monkeypatch, min_programs):
    """Several row tiles per chunk (the causal tile loops), and the dB/dC kernels with one program walking all the
    heads of a group (min_programs=1) or one head each (4096)."""
    monkeypatch.setattr(ssd_kernel, "_BLOCK_M", 16)
    monkeypatch.setattr(ssd_kernel, "_MIN_PROGRAMS", min_programs)
    chunk, seqlen = 64, 64 + 37
    inp = make_inputs(batch=1, seqlen=seqlen, nheads=6, ngroups=2)
    gy = torch.randn(1, seqlen, 6, 16, dtype=torch.float64)
    gs = torch.randn(1, 6, 16, 16, dtype=torch.float64)
    y_r, f_r, g_r = grads(ssd_reference, inp, gy, gs, chunk_size=chunk)
    inp32 = {k: v.float().to(DEVICE) for k, v in inp.items()}
    y_t, f_t, g_t = grads(ssd_scan, inp32, gy.to(DEVICE), gs.to(DEVICE), chunk_size=chunk)
    assert rel_err(y_t.cpu(), y_r) < 1e-5 and rel_err(f_t.cpu(), f_r) < 1e-5
    for k in NAMES:
        assert rel_err(g_t[k].cpu(), g_r[k]) < 1e-5, k


HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])   # interpreter: no bf16 tl.dot (triton#11584)


@pytest.mark.parametrize("dtype", HALF)
def test_scan_half_precision(dtype):
    """16-bit inputs: the same function within half-precision rounding; the final state stays float32."""
    inp = make_inputs(seqlen=2 * CHUNK + 3, ngroups=1, init=False)
    gy = torch.randn(2, 2 * CHUNK + 3, 4, 16, dtype=torch.float64)
    gs = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    inp_h = {k: v.to(dtype).to(DEVICE) if v is not None else None for k, v in inp.items()}
    # the reference sees the same rounded inputs, so only the kernel's arithmetic is compared
    y_r, f_r, g_r = grads(ssd_reference, {k: v.cpu().double() if v is not None else None for k, v in inp_h.items()},
                          gy, gs, chunk_size=CHUNK)
    y_t, f_t, g_t = grads(ssd_scan, inp_h, gy.to(DEVICE), gs.to(DEVICE), chunk_size=CHUNK)
    assert y_t.dtype == dtype and f_t.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(y_t.cpu(), y_r) < tol and rel_err(f_t.cpu(), f_r) < tol
    for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"):
        assert g_t[k].dtype == dtype and rel_err(g_t[k].cpu(), g_r[k]) < tol, k


def test_scan_noncontiguous_views():
    """x, B, C, dt as slices of one projection (as the Mamba-2 mixer passes them): no copies needed, same answer and
    gradient (dx has x's shape, its own strides)."""
    batch, seqlen, nheads, headdim, dstate = 2, CHUNK + 5, 4, 16, 16
    xBCdt = torch.randn(batch, seqlen, nheads * headdim + 2 * dstate + nheads, device=DEVICE)
    A = -torch.rand(nheads, device=DEVICE) - 0.5
    dy = torch.randn(batch, seqlen, nheads, headdim, device=DEVICE)

    def run(scan, xBCdt, contiguous):
        x = xBCdt[..., :nheads * headdim].unflatten(-1, (nheads, headdim))
        B = xBCdt[..., nheads * headdim:nheads * headdim + dstate].unflatten(-1, (1, dstate))
        C = xBCdt[..., nheads * headdim + dstate:-nheads].unflatten(-1, (1, dstate))
        views = [t.contiguous() if contiguous else t for t in (x, xBCdt[..., -nheads:], B, C)]
        y = scan(views[0], views[1], A, *views[2:], chunk_size=CHUNK, dt_softplus=True)
        return y, torch.autograd.grad(y, xBCdt, dy)[0]

    y, grad = run(ssd_scan, xBCdt.requires_grad_(), False)
    y_ref, grad_ref = run(ssd_reference, xBCdt, True)
    assert rel_err(y.cpu(), y_ref.cpu()) < 1e-5
    assert rel_err(grad.cpu(), grad_ref.cpu()) < 1e-5


def test_state_carried_across_calls():
    """Two calls, the second starting from the first's final state, equal one call (values and gradients)."""
    inp = {k: v.float().to(DEVICE) if v is not None else None
           for k, v in make_inputs(seqlen=2 * CHUNK + 7, ngroups=2).items()}
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y, final = call(ssd_scan, leaves, chunk_size=CHUNK)
    (y.sum() + final.sum()).backward()
    whole = {k: v.grad.clone() for k, v in leaves.items()}

    for v in leaves.values():
        v.grad = None
    cut = CHUNK + 3          # mid-chunk, so the two calls chunk the sequence differently from the single call
    first = {**leaves, "x": leaves["x"][:, :cut], "dt": leaves["dt"][:, :cut], "B": leaves["B"][:, :cut],
             "C": leaves["C"][:, :cut]}
    y1, s1 = call(ssd_scan, first, chunk_size=CHUNK)
    second = {**leaves, "x": leaves["x"][:, cut:], "dt": leaves["dt"][:, cut:], "B": leaves["B"][:, cut:],
              "C": leaves["C"][:, cut:], "initial_state": s1}
    y2, s2 = call(ssd_scan, second, chunk_size=CHUNK)
    assert rel_err(torch.cat([y1, y2], 1).cpu(), y.cpu()) < 1e-5 and rel_err(s2.cpu(), final.cpu()) < 1e-5
    (y1.sum() + y2.sum() + s2.sum()).backward()
    for k, v in leaves.items():
        assert rel_err(v.grad.cpu(), whole[k].cpu()) < 1e-5, k


@pytest.mark.parametrize("ngroups,A_log", [(1, False), (2, True)])
def test_step_repeated_equals_scan(ngroups, A_log):
    """ssd_step applied token by token gives the scan's outputs and final state; the kernel equals its reference.
    With A_log, the step takes A = -exp(A_log) itself, as the mixer calls it."""
    seqlen = CHUNK + 3
    inp = {k: v.float().to(DEVICE) if v is not None else None
           for k, v in make_inputs(seqlen=seqlen, ngroups=ngroups, headdim=12, dstate=20).items()}
    y_scan, final_scan = call(ssd_scan, inp, chunk_size=CHUNK)
    state, state_ref = inp["initial_state"].clone(), inp["initial_state"].clone()
    for t in range(seqlen):
        args = (inp["x"][:, t], inp["dt"][:, t], None if A_log else inp["A"], inp["B"][:, t], inp["C"][:, t])
        kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True,
                  A_log=torch.log(-inp["A"]) if A_log else None)
        y_t = ssd_step(state, *args, **kw)
        y_ref = ssd_step_reference(state_ref, *args, **kw)
        assert rel_err(y_t.cpu(), y_ref.cpu()) < 1e-6 and rel_err(state.cpu(), state_ref.cpu()) < 1e-6
        assert rel_err(y_t.cpu(), y_scan[:, t].cpu()) < 1e-5, t
    assert rel_err(state.cpu(), final_scan.cpu()) < 1e-5


def test_step_softplus_precision():
    """The kernel's softplus matches torch's over the whole range, including Δ ≪ 1 and the linear tail above 20."""
    raw = torch.tensor([-30.0, -9.0, -4.5, -1.0, 0.0, 0.7, 19.0, 21.0, 60.0], device=DEVICE)
    nheads = raw.numel()
    state, state_ref = (torch.zeros(1, nheads, 1, 16, device=DEVICE) for _ in range(2))
    args = (torch.ones(1, nheads, 1, device=DEVICE), raw[None], -torch.ones(nheads, device=DEVICE) * 1e-3,
            torch.ones(1, 1, 16, device=DEVICE), torch.ones(1, 1, 16, device=DEVICE))
    y, y_ref = ssd_step(state, *args, dt_softplus=True), ssd_step_reference(state_ref, *args, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=0)   # a naive log(1 + e^x) is off by 5e-4 at x = -9


def test_bad_inputs_are_named():
    inp = {k: v.float().to(DEVICE) if v is not None else None for k, v in make_inputs(seqlen=5, ngroups=2).items()}
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        call(ssd_scan, inp, chunk_size=24)
    with pytest.raises(ValueError, match="exactly one of A and A_log"):
        ssd_step(torch.zeros(2, 4, 8, 16, device=DEVICE), inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0],
                 inp["C"][:, 0], A_log=inp["A"])
    with pytest.raises(ValueError, match="B has shape"):
        call(ssd_reference, {**inp, "B": inp["B"][:, :4]})
    with pytest.raises(ValueError, match="ngroups=3 must divide nheads=4"):
        bad = torch.randn(2, 5, 3, 16, device=DEVICE)
        call(ssd_naive, {**inp, "B": bad, "C": bad})
    D_per_channel = torch.randn(4, 16, device=DEVICE)          # mamba_ssm's D_has_hdim: one D per head and channel
    for fn in (ssd_naive, ssd_reference, ssd_scan):
        with pytest.raises(ValueError, match=r"D has shape \(4, 16\), expected \(4,\)"):
            call(fn, {**inp, "D": D_per_channel})
    for step in (ssd_step, ssd_step_reference):
        with pytest.raises(ValueError, match=r"D has shape \(4, 16\), expected \(4,\)"):
            step(torch.zeros(2, 4, 16, 16, device=DEVICE), inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0],
                 inp["C"][:, 0], D=D_per_channel)


def test_cpu_tensors_without_the_interpreter_run_the_references():
    """ssd_scan and ssd_step on CPU tensors without TRITON_INTERPRET: the references run (saying so), not a crash."""
    setup = ("x, dt, A, D = torch.randn(2, 37, 4, 16), torch.randn(2, 37, 4), -torch.rand(4) - 0.5, torch.randn(4)\n"
             "B, C, state = torch.randn(2, 37, 2, 16), torch.randn(2, 37, 2, 16), torch.randn(2, 4, 16, 16)")
    check_references_run_off_gpu("ssd_kernel", setup, {
        "ssd_scan": ("ssd_reference", "x, dt, A, B, C, 16, D=D, dt_softplus=True, initial_state=state, "
                                      "return_final_state=True"),
        "ssd_step": ("ssd_step_reference", "state.clone(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D, "
                                           "dt_softplus=True")})
