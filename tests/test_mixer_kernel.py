"""mixer_kernel.py: each Triton kernel against its PyTorch reference (float64 where the reference allows), values and
gradients, on fresh random inputs whose sizes do not divide the kernels' blocks; the conv step against the parallel
convolution."""
import pytest
import torch

from conftest import DEVICE, check_references_run_off_gpu
import mixer_kernel
from mixer_kernel import (causal_conv1d, causal_conv1d_reference, conv_state_after, conv_step, conv_step_reference,
                          gated_norm_out_proj, gated_norm_out_proj_reference, gated_rms_norm, gated_rms_norm_reference,
                          mixer_scan, mixer_scan_reference, norm_in_proj_conv, norm_in_proj_conv_reference, rms_norm,
                          rms_norm_reference)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("dim", [40, 300])
def test_rms_norm(x_dtype, w_dtype, dim):
    torch.manual_seed(dim)
    x = (torch.randn(3, 5, dim, device=DEVICE) * 3 + 1).to(x_dtype)     # a mean and a scale the norm must remove
    w = (torch.rand(dim, device=DEVICE) + 0.5).to(w_dtype)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == w_dtype and out.shape == x.shape
    exact = rms_norm_reference(x.double(), w.double(), 1e-5)
    tol = 1e-5 if w_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


def _linear(n_in, n_out, bias, dtype):
    torch.manual_seed(n_in + n_out)
    return torch.nn.Linear(n_in, n_out, bias=bias).to(device=DEVICE, dtype=dtype)


def _linear_as(lin, dtype):
    """lin's copy in dtype (the float64 reference's)."""
    copy = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=DEVICE, dtype=dtype)
    copy.load_state_dict(lin.state_dict())
    return copy


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 input channels, so that the loops over them run several times and end in a partial tile."""
    monkeypatch.setattr(mixer_kernel, "_IN_PROJ_TILE", (16, 16, 2, 4))
    monkeypatch.setattr(mixer_kernel, "_OUT_PROJ_TILE", (16, 16, 2, 4))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_norm_in_proj_conv(batch, bias, dtype, small_tiles):
    """The decoding step's way into a block against the float64 reference: in_proj(RMSNorm(h)) with the conv step on
    the xBC channels, and the conv state after it. 40 input channels and 199 outputs divide no tile; the xBC channels
    (72 to 172) start and end inside tiles; h is the float32 residual stream."""
    d_model, conv_start, conv_dim, d_conv = 40, 72, 100, 4
    lin = _linear(d_model, conv_start + conv_dim + 27, bias, dtype)
    h = torch.randn(batch, d_model, device=DEVICE) * 3 + 1
    norm_w = (torch.rand(d_model, device=DEVICE) + 0.5).to(dtype)
    state = torch.randn(batch, conv_dim, d_conv, device=DEVICE).to(dtype)
    conv_w = torch.randn(conv_dim, 1, d_conv, device=DEVICE).to(dtype)
    conv_b = torch.randn(conv_dim, device=DEVICE).to(dtype) if bias else None
    state_exact = state.double()
    exact = norm_in_proj_conv_reference(h.double(), norm_w.double(), 1e-5, _linear_as(lin, torch.float64),
                                        state_exact, conv_w.double(), conv_b.double() if bias else None, conv_start)
    out = norm_in_proj_conv(h, norm_w, 1e-5, lin, state, conv_w, conv_b, conv_start)
    assert out.dtype == dtype and out.shape == exact.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    # the state holds the inputs rounded to the model's dtype: its newest column is the projection's output
    torch.testing.assert_close(state.double(), state_exact, rtol=tol, atol=tol * state_exact.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ngroups,group_size", [(1, 72), (3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.no_grad()
def test_gated_norm_out_proj(batch, ngroups, group_size, dtype, small_tiles):
    """The decoding step's way out of a block against the float64 reference: h + out_proj(RMSNorm(y ⊙ SiLU(z))) over
    groups, h updated in place; z a strided slice of a wider projection, as in_proj's output gives it."""
    d_inner, d_model = ngroups * group_size, 40
    lin = _linear(d_inner, d_model, True, dtype)
    y = torch.randn(batch, d_inner, device=DEVICE).to(dtype)
    z = (torch.randn(batch, d_inner + 9, device=DEVICE) * 2).to(dtype)[:, 9:]
    norm_w = (torch.rand(d_inner, device=DEVICE) + 0.5).to(dtype)
    h = torch.randn(batch, d_model, device=DEVICE) * 4
    exact = gated_norm_out_proj_reference(y.double(), z.double(), norm_w.double(), group_size, 1e-5,
                                          _linear_as(lin, torch.float64), h.double())
    got = gated_norm_out_proj(y, z, norm_w, group_size, 1e-5, lin, h)
    assert got is h and h.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(h.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


def test_fused_projections_say_what_is_wrong():
    lin, out_proj = _linear(40, 199, False, torch.float32), _linear(72, 40, False, torch.float32)
    h, w, y = torch.randn(2, 40, device=DEVICE), torch.ones(40, device=DEVICE), torch.randn(2, 72, device=DEVICE)
    state, conv_w = torch.zeros(2, 100, 4, device=DEVICE), torch.ones(100, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="forward only"):          # autograd is on, and lin's weight needs a gradient
        norm_in_proj_conv(h, w, 1e-5, lin, state, conv_w)
    into = [(dict(conv_start=150), "must lie within in_proj's 199 outputs"),   # (the arguments changed, the error)
            (dict(conv_bias=torch.ones(99, device=DEVICE)), "must lie within"),
            (dict(conv_state=state[:1]), "conv_state must be"),
            (dict(h=h[:, :30]), "input must be"),
            (dict(norm_weight=w[:30]), "norm's weight")]
    out_of = [(dict(group_size=25), "in groups of 25"), (dict(group_size=0), "in groups of 0"),
              (dict(h=h[:, :30]), "h must be"), (dict(y=y[:, :48], z=y[:, :48]), "input must be")]
    with torch.no_grad():
        for change, message in into:
            with pytest.raises(ValueError, match=message):
                norm_in_proj_conv(**{**dict(h=h, norm_weight=w, eps=1e-5, in_proj=lin, conv_state=state,
                                            conv_weight=conv_w), **change})
        for change, message in out_of:
            with pytest.raises(ValueError, match=message):
                gated_norm_out_proj(**{**dict(y=y, z=y, norm_weight=torch.ones(72, device=DEVICE), group_size=24,
                                              eps=1e-5, out_proj=out_proj, h=h), **change})


@pytest.mark.parametrize("ngroups,group_size", [(1, 24), (2, 24), (4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_rms_norm(ngroups, group_size, dtype):
    torch.manual_seed(ngroups)
    dim = ngroups * group_size
    proj = torch.randn(2, 7, 2 * dim + 5, device=DEVICE).to(dtype)      # z is a slice of a wider projection
    y, z = torch.randn(2, 7, dim, device=DEVICE).to(dtype), proj[..., 3:3 + dim]
    y[0, 0, :group_size] = 0                                            # a group of zeros: eps keeps it finite
    w = torch.rand(dim, device=DEVICE).to(dtype) + 0.5
    out = gated_rms_norm(y, z, w, group_size, 1e-5)
    assert out.dtype == dtype and out.shape == y.shape and torch.isfinite(out).all()
    exact = gated_rms_norm_reference(y.double(), z.double(), w.double(), group_size, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="does not divide"):
        gated_rms_norm(y, z, w, group_size + 1, 1e-5)
    with pytest.raises(ValueError, match="z has shape"):
        gated_rms_norm(y, z.transpose(0, 1), w, group_size, 1e-5)
    with pytest.raises(ValueError, match=r"weight has shape \(12,\)"):
        gated_rms_norm(y, z, w[:12], group_size, 1e-5)


def test_norms_of_inputs_strided_in_the_last_dimension():
    torch.manual_seed(2)
    x = torch.randn(4, 30, 6, device=DEVICE).transpose(1, 2)                 # (4, 6, 30), stride 6 along the norm
    w = torch.rand(30, device=DEVICE) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    z = torch.randn(4, 30, 6, device=DEVICE).transpose(1, 2)
    torch.testing.assert_close(gated_rms_norm(x, z, w, 15, 1e-5), gated_rms_norm_reference(x, z, w, 15, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_conv", [4, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_steps_equal_the_parallel_convolution(d_conv, bias, dtype):
    """Token by token from an empty state, the conv step gives the causal convolution of the whole sequence, and the
    state ends holding the last d_conv inputs."""
    torch.manual_seed(d_conv)
    batch, seqlen, channels = 2, 6, 300                                 # 300: two channel blocks, the second partial
    proj = torch.randn(batch, seqlen, channels + 8, device=DEVICE, dtype=torch.float64)
    xBC = proj[..., 8:]                                                 # a slice of in_proj's output, as in the mixer
    weight = torch.randn(channels, 1, d_conv, device=DEVICE, dtype=torch.float64)
    b = torch.randn(channels, device=DEVICE, dtype=torch.float64) if bias else None
    exact = causal_conv1d_reference(xBC, weight, b)                     # (batch, seqlen, channels), float64

    state = torch.zeros(batch, channels, d_conv, device=DEVICE, dtype=dtype)
    args = [t.to(dtype) if t is not None else None for t in (xBC, weight, b)]
    steps = [conv_step(args[0][:, t], state, args[1], args[2]) for t in range(seqlen)]
    got = torch.stack(steps, dim=1)
    assert got.dtype == dtype and got.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    torch.testing.assert_close(state, xBC[:, -d_conv:].transpose(1, 2).to(dtype), rtol=0, atol=0)


def test_conv_step_equals_the_reference_from_a_full_state():
    torch.manual_seed(0)
    x, state = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, 4, device=DEVICE)
    weight, b = torch.randn(50, 1, 4, device=DEVICE), torch.randn(50, device=DEVICE)
    state_ref = state.clone()
    out = conv_step(x, state, weight, b)
    torch.testing.assert_close(out, conv_step_reference(x, state_ref, weight, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="conv_state must be"):
        conv_step(x, state[..., :3], weight, b)


@pytest.mark.parametrize("seqlen", [1, 3, 70])
def test_conv_from_a_cache_state_equals_the_steps(seqlen):
    """A prefill continuing a cache: the convolution from its conv state (the kernel's HAS_STATE path), and the state
    after it (conv_state_after, each row stopping at its own length or not), against the conv step token by token in
    float64."""
    torch.manual_seed(seqlen)
    batch, channels, d_conv = 3, 300, 4                                 # a partial channel block; 70: three L tiles
    x = torch.randn(batch, seqlen, channels, device=DEVICE, dtype=torch.float64)
    state = torch.randn(batch, channels, d_conv, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(channels, 1, d_conv, device=DEVICE, dtype=torch.float64)
    b = torch.randn(channels, device=DEVICE, dtype=torch.float64)
    states = [state.clone()]                                            # states[t]: after t tokens
    steps = []
    for t in range(seqlen):
        states.append(states[-1].clone())
        steps.append(conv_step_reference(x[:, t], states[-1], weight, b))
    exact = torch.stack(steps, dim=1)
    got = causal_conv1d(*(t.float() for t in (x, weight, b)), initial_state=state.float())
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_conv1d_reference(x, weight, b, state), exact, rtol=1e-12, atol=1e-12)
    assert torch.equal(conv_state_after(state, x), states[-1])
    lengths = torch.tensor([seqlen, 0, seqlen // 2], device=DEVICE)
    after = conv_state_after(state, x, lengths)
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(after[row], states[n][row]), row
    with pytest.raises(ValueError, match="forward only"):
        causal_conv1d(x.float().requires_grad_(), weight.float(), b.float(), initial_state=state.float())


def test_cpu_tensors_without_the_interpreter_run_the_references():
    """The entry points on CPU tensors without TRITON_INTERPRET: the references run (saying so), not a crash."""
    setup = ("x, z = torch.randn(3, 64), torch.randn(3, 64)\n"
             "w, state, cw = torch.randn(64), torch.randn(3, 64, 4), torch.randn(64, 1, 4)\n"
             "lin = torch.nn.Linear(64, 64)\n"
             "zx, cw96, b96 = torch.randn(1, 5, 64 + 96 + 2), torch.randn(96, 1, 4), torch.randn(96)")
    check_references_run_off_gpu("mixer_kernel", setup, {
        "rms_norm": ("rms_norm_reference", "x, w, 1e-5"),
        "gated_rms_norm": ("gated_rms_norm_reference", "x, z, w, 16, 1e-5"),
        "causal_conv1d": ("causal_conv1d_reference", "x[None], cw, w"),
        "conv_step": ("conv_step_reference", "x, state.clone(), cw, w"),
        "norm_in_proj_conv": ("norm_in_proj_conv_reference", "x, w, 1e-5, lin, state.clone(), cw, w"),
        "gated_norm_out_proj": ("gated_norm_out_proj_reference", "x, z, w, 16, 1e-5, lin, x.clone()"),
        "mixer_scan": ("mixer_scan_reference", "zx, cw96, b96, w[:2], -w[:2].exp(), None, w, 32, 1, 16, 64, 1e-5")})


def _grads(fn, inputs, grad_out):
    """fn(*inputs) and its gradients w.r.t. every input that is not None, for the upstream gradient grad_out."""
    leaves = [t for t in inputs if t is not None]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("gated,ngroups,group_size", [(False, 1, 300), (True, 1, 300), (True, 4, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_gradients(gated, ngroups, group_size, dtype):
    """Forward and backward kernels against autograd through the float64 reference: dy, dz and dweight, with z a
    strided slice of a wider projection, 2 x 37 rows (not a multiple of the rows each backward program takes) and an
    all-zero group that eps keeps finite."""
    torch.manual_seed(group_size + ngroups)
    dim = ngroups * group_size
    y = torch.randn(2, 37, dim, device=DEVICE, dtype=torch.float64)
    y[0, 0, :group_size] = 0
    proj = torch.randn(2, 37, dim + 7, device=DEVICE, dtype=torch.float64) * 2
    w = torch.rand(dim, device=DEVICE, dtype=torch.float64) + 0.5
    grad_out = torch.randn(2, 37, dim, device=DEVICE, dtype=torch.float64)
    if gated:
        kernel = lambda y, proj, w: gated_rms_norm(y, proj[..., 7:], w, group_size, 1e-5)
        reference = lambda y, proj, w: gated_rms_norm_reference(y, proj[..., 7:], w, group_size, 1e-5)
    else:
        kernel, reference = (lambda y, proj, w: rms_norm(y, w, 1e-5)), (lambda y, proj, w: rms_norm_reference(y, w, 1e-5))
    leaves = [t.requires_grad_() for t in (y, proj, w)]
    exact, exact_grads = _grads(reference, leaves, grad_out)
    inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out, grads = _grads(kernel, inputs, grad_out)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    for name, got, want in zip(("dy", "dproj", "dweight"), grads, exact_grads):
        assert got.dtype == dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("d_conv", [4, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_conv1d(d_conv, bias, dtype):
    """The convolution kernels against autograd through the float64 reference: the output and the gradients of the
    input, the weight and the bias, with the input a strided slice of a wider projection and sizes that do not divide
    the kernels' blocks (seqlen 37 = 32 + 5 positions, 200 = 128 + 72 channels)."""
    torch.manual_seed(d_conv + bias)
    batch, seqlen, channels = 2, 37, 200
    proj = torch.randn(batch, seqlen, channels + 9, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(channels, 1, d_conv, device=DEVICE, dtype=torch.float64) * 0.5
    b = torch.randn(channels, device=DEVICE, dtype=torch.float64) if bias else None
    grad_out = torch.randn(batch, seqlen, channels, device=DEVICE, dtype=torch.float64)
    leaves = [t.requires_grad_() if t is not None else None for t in (proj, weight, b)]
    exact, exact_grads = _grads(lambda p, w, b: causal_conv1d_reference(p[..., 9:], w, b), leaves, grad_out)
    inputs = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in leaves]
    out, grads = _grads(lambda p, w, b: causal_conv1d(p[..., 9:], w, b), inputs, grad_out)
    assert out.dtype == dtype and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    for name, got, want in zip(("dinput", "dweight", "dbias"), grads, exact_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)
    with pytest.raises(ValueError, match="weight has shape"):
        causal_conv1d(proj[..., 9:], weight[:10], b)


def test_row_align_is_the_largest_power_of_two_dividing_the_strides():
    """The kernels' X_ALIGN hint (the interpreter ignores it, so a wrong one would pass the gradient tests): in_proj's
    output sliced at row strides of 216 and 209 elements, and contiguous rows of the 130M shape's 3352."""
    proj = torch.empty(2, 5, 216)
    assert mixer_kernel._row_align(proj[..., 16:]) == 8
    assert mixer_kernel._row_align(torch.empty(2, 5, 209)[..., 9:]) == 1
    assert mixer_kernel._row_align(torch.empty(2, 5, 3352)) == 8
    assert mixer_kernel._row_align(torch.empty(2, 5, 64)) == 16


@pytest.mark.parametrize("d_conv,dtype", [(4, torch.float32), (3, torch.float32), (4, torch.bfloat16),
                                          (3, torch.bfloat16)], ids=str)
def test_causal_conv1d_backward_sums_partial_rows(d_conv, dtype):
    """The backward's dw and dbias summed from one partial row per (batch, L-block): 7 L-blocks, the last partial,
    and 2 C-blocks, the last partial; taps that reach back across a block's start. The input is a slice of a
    projection whose row stride is a multiple of 8, not 16 (as at the 130M shape, where x's rows load as vectors only
    through the kernels' X_ALIGN hint)."""
    batch, seqlen = 2, 6 * mixer_kernel._CONV_BLOCK_L + 3                 # 7 L-blocks
    channels = mixer_kernel._CONV_BLOCK_C + 72
    torch.manual_seed(d_conv)
    proj = torch.randn(batch, seqlen, channels + 16, device=DEVICE, dtype=torch.float64)        # row stride 216
    weight = torch.randn(channels, 1, d_conv, device=DEVICE, dtype=torch.float64) * 0.5
    b = torch.randn(channels, device=DEVICE, dtype=torch.float64)
    grad_out = torch.randn(batch, seqlen, channels, device=DEVICE, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (proj, weight, b)]
    _, exact_grads = _grads(lambda p, w, b: causal_conv1d_reference(p[..., 16:], w, b), leaves, grad_out)
    inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    _, grads = _grads(lambda p, w, b: causal_conv1d(p[..., 16:], w, b), inputs, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, got, want in zip(("dinput", "dweight", "dbias"), grads, exact_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("ngroups,conv_bias,has_D", [(1, True, True), (3, False, True), (1, True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + [torch.bfloat16] * (DEVICE == "cuda"), ids=str)
def test_mixer_scan(ngroups, conv_bias, has_D, dtype):
    """The conv, SSD and gated-norm kernels as one autograd node against autograd through the float64 references
    composed: the output and the gradients of in_proj's output (written in three parts into one contiguous buffer,
    while zxbcdt is a slice of a wider tensor, so that strides taken from the wrong one fail) and of every parameter.
    2 x 37 positions (two chunks of 16 and a partial one), 6 heads of 8 channels, dstate 16; zxbcdt in
    dtype, the parameters float32, as under autocast (bfloat16 on a GPU only: the interpreter has no bfloat16 tl.dot,
    triton#11584)."""
    torch.manual_seed(ngroups)
    batch, seqlen, nheads, headdim, d_state, d_conv = 2, 37, 6, 8, 16, 4
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    width = d_inner + conv_dim + nheads
    zxbcdt = torch.randn(batch, seqlen, width, device=DEVICE, dtype=torch.float64)
    params = dict(conv_weight=torch.randn(conv_dim, 1, d_conv, device=DEVICE, dtype=torch.float64) * 0.5,
                  conv_bias=torch.randn(conv_dim, device=DEVICE, dtype=torch.float64) if conv_bias else None,
                  dt_bias=torch.randn(nheads, device=DEVICE, dtype=torch.float64) - 1,
                  A_log=torch.log(torch.rand(nheads, device=DEVICE, dtype=torch.float64) * 15 + 1),
                  D=torch.randn(nheads, device=DEVICE, dtype=torch.float64) if has_D else None,
                  norm_weight=torch.rand(d_inner, device=DEVICE, dtype=torch.float64) + 0.5)
    grad_out = torch.randn(batch, seqlen, d_inner, device=DEVICE, dtype=torch.float64)

    def run(fn, zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight):
        return fn(zxbcdt, conv_weight, conv_bias, dt_bias, -torch.exp(A_log), D, norm_weight, headdim, ngroups, 16,
                  d_inner // ngroups, 1e-5)

    leaves = [t.requires_grad_() if t is not None else None for t in (zxbcdt, *params.values())]
    exact, exact_grads = _grads(lambda *a: run(mixer_scan_reference, *a), leaves, grad_out)
    wide = torch.zeros(batch, seqlen, width + 8, device=DEVICE, dtype=dtype)
    wide[..., :width] = zxbcdt.detach()
    inputs = [wide[..., :width].requires_grad_()] + [t.detach().float().requires_grad_() if t is not None else None
                                                     for t in leaves[1:]]
    out, grads = _grads(lambda *a: run(mixer_scan, *a), inputs, grad_out)
    assert out.dtype == dtype and out.shape == (batch, seqlen, d_inner)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
    names = ["dzxbcdt"] + [f"d{name}" for name, t in params.items() if t is not None]
    for name, got, want in zip(names, grads, exact_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)
