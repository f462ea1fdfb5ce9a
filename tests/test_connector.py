"""The connector of mlmamba.py: ML-Mamba's Mamba-2 Scan Connector (MSC) against slow independent definitions.

- The two-direction mixer against the released code's computation written out in float64 (forward direction;
  backward direction's parameters on the flipped sequence; flip back; mean; out_proj), the SSD by its recurrence.
- K directions equal K one-direction mixers averaged; every registered order through the MSC (values, gradients,
  odd and one-row grids); the Triton path against the PyTorch path; the state dict in the released layout.

The tests named test_every_order_* run once for each registered scan order, a student's new one included:
`python -m pytest -q -k every_order` checks an order in scan2d_kernel.py and through the connector."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import mlmamba
from checkpoints import connector_state_from_release
from conftest import DEVICE
from mlmamba import Connector, ConnectorConfig, Mamba2Config, Mamba2ScanMixer
from scan2d_kernel import SCAN_ORDERS, register_scan, scan_permutation
from ssd_kernel import ssd_naive

VISION_DIM = 24
# the LM whose Mamba-2 sizes the connector's scans take: 8 heads of 8 channels, one group of 8 states, chunks of 16
LM = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=8, chunk_size=16)
LM_2_GROUPS = dataclasses.replace(LM, ngroups=2)          # heads 0-3 read B/C group 0, heads 4-7 group 1


def tiny(seed=0, **config):
    torch.manual_seed(seed)
    return Connector(ConnectorConfig(**config), VISION_DIM, LM).to(DEVICE)


def mixer(orders, seed=0, dtype=torch.float64, lm=LM):
    torch.manual_seed(seed)
    m = Mamba2ScanMixer(lm, orders).to(DEVICE, dtype)
    randomise(m, seed + 100)
    return m


@torch.no_grad()
def randomise(module, seed):
    """Move the parameters off their init (norm weights 1, D 1, the directions' equal Δ and A), so that a swapped one
    would show; A_log stays in a range that keeps exp(ΔA) away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + 2 * torch.rand(p.shape, generator=g)).to(p.device, p.dtype))
        else:
            p.add_(0.3 * noise)


def one_direction(m, k, seq):
    """Direction k of mixer m on a sequence already in its scan order, written out as mamba_ssm's Mamba2 (no fused
    paths): in_proj, causal depthwise conv1d + SiLU, the SSD recurrence token by token, the gated RMSNorm.
    seq (batch, L, d_model) -> (batch, L, d_inner)."""
    c = m.config
    z, xBC, dt = torch.split(m.in_proj(seq), [c.d_inner, c.conv_dim, c.nheads], dim=-1)
    w = m.conv1d.weight[k * c.conv_dim:(k + 1) * c.conv_dim]                     # direction k's channels
    b = m.conv1d.bias[k * c.conv_dim:(k + 1) * c.conv_dim]
    xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (c.d_conv - 1, 0)), w, b, groups=c.conv_dim)).transpose(1, 2)
    x, B, C = torch.split(xBC, [c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
    A = -torch.exp(m.A_log[k].float())                                          # float32, as mamba_ssm (and we) do
    y = ssd_naive(rearrange(x, "b l (h p) -> b l h p", p=c.headdim), dt, A,
                  rearrange(B, "b l (g n) -> b l g n", g=c.ngroups), rearrange(C, "b l (g n) -> b l g n", g=c.ngroups),
                  D=m.D[k], dt_bias=m.dt_bias[k], dt_softplus=True)
    gated = rearrange(rearrange(y, "b l h p -> b l (h p)") * F.silu(z), "b l (g d) -> b l g d", g=c.ngroups)
    normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + c.norm_eps)   # RMSNorm within each group
    return rearrange(normed, "b l g d -> b l (g d)") * m.norm.weight


def per_direction(m, u):
    """The mixer's definition on the grid u (batch, H, W, d_model): each direction reads the grid in its order (the
    permutation itself), runs alone, and its outputs go back to the cells they came from; the mean, then out_proj."""
    batch, H, W, _ = u.shape
    grid = rearrange(u, "b h w c -> b (h w) c")
    out = 0
    for k, name in enumerate(m.orders):
        perm = scan_permutation(name, H, W).to(u.device)
        y = torch.empty(batch, H * W, m.config.d_inner, dtype=u.dtype, device=u.device)
        y[:, perm] = one_direction(m, k, grid[:, perm])
        out = out + y / len(m.orders)
    return rearrange(m.out_proj(out), "b (h w) c -> b h w c", h=H)


def use_kernels(monkeypatch, triton):
    """Make the connector take the Triton kernels (on a CPU: interpreted) or the PyTorch definitions on any device."""
    monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: triton and t.dtype != torch.float64)


@pytest.mark.parametrize("lm", [LM, LM_2_GROUPS], ids=["1-group", "2-groups"])
def test_bidirectional_mixer_is_the_released_computation(lm):
    """K = 2, "bidirectional": the released Mamba2 with bimamba_type "v2" (WenjunHuang94/mamba, Mamba2.forward),
    written out: the forward direction on the row-major sequence; the backward direction's conv1d_b, dt_bias_b,
    A_log_b, D_b on in_proj's output flipped along the sequence; each gated-normed with the shared weight; the
    backward one flipped back; (out + out_b) / 2; out_proj. float64, a 3x5 grid (15 cells, one partial chunk)."""
    m = mixer("bidirectional", lm=lm)
    assert m.orders == ("row", "row_reverse")
    u = torch.randn(2, 3, 5, lm.d_model, device=DEVICE, dtype=torch.float64)
    seq = rearrange(u, "b h w c -> b (h w) c")
    forward = one_direction(m, 0, seq)
    backward = one_direction(m, 1, seq.flip(1)).flip(1)
    expected = rearrange(m.out_proj((forward + backward) / 2), "b (h w) c -> b h w c", h=3)
    torch.testing.assert_close(m(u), expected)


@pytest.mark.parametrize("lm", [LM, LM_2_GROUPS], ids=["1-group", "2-groups"])
def test_k_directions_equal_k_one_direction_mixers(lm):
    """A mixer with K orders is the mean of K one-order mixers holding direction k's conv, dt_bias, A_log and D (and
    the shared in_proj, norm and out_proj): the directions do not mix before the merge."""
    orders = ("row", "column_reverse", "snake")
    m = mixer(orders, seed=1, lm=lm)
    u = torch.randn(2, 4, 5, lm.d_model, device=DEVICE, dtype=torch.float64)
    mean = 0
    for k, name in enumerate(orders):
        single = Mamba2ScanMixer(lm, (name,)).to(DEVICE, torch.float64)
        state = dict(m.state_dict())
        conv = slice(k * lm.conv_dim, (k + 1) * lm.conv_dim)
        state.update({"conv1d.weight": m.conv1d.weight[conv], "conv1d.bias": m.conv1d.bias[conv],
                      "dt_bias": m.dt_bias[k:k + 1], "A_log": m.A_log[k:k + 1], "D": m.D[k:k + 1]})
        single.load_state_dict(state)
        mean = mean + single(u) / len(orders)
    torch.testing.assert_close(m(u), mean)


@pytest.mark.parametrize("name", sorted(SCAN_ORDERS))
def test_every_order_runs_through_the_msc(name):
    """The order alone and beside "row", on an odd 5x3 grid and a one-row 1x7 grid: the mixer equals the
    per-direction definition (float64), and the whole connector's gradient reaches every parameter."""
    for scan in (name, f"row,{name}"):
        m = mixer(scan.split(","), seed=2)
        for H, W in ((5, 3), (1, 7)):
            u = torch.randn(2, H, W, LM.d_model, device=DEVICE, dtype=torch.float64)
            torch.testing.assert_close(m(u), per_direction(m, u))
        connector = tiny(seed=3, scan=scan).double()
        connector(torch.randn(2, 5, 3, VISION_DIM, device=DEVICE, dtype=torch.float64)).square().sum().backward()
        for p_name, p in connector.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (scan, p_name)


def test_every_order_gradients_equal_the_definition():
    """The mixer's gradients (input and every parameter) equal those of the per-direction definition, for all the
    registered orders at once (float64, 3x5 grid)."""
    m = mixer(sorted(SCAN_ORDERS), seed=4)
    u = torch.randn(2, 3, 5, LM.d_model, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(2, 3, 5, LM.d_model, device=DEVICE, dtype=torch.float64)
    grads = []
    for fn in (m, lambda t: per_direction(m, t)):
        params = [u, *m.parameters()]
        grads.append(torch.autograd.grad((fn(u) * gout).sum(), params))
    for (name, _), got, want in zip([("input", u), *m.named_parameters()], *grads):
        # A = -exp(A_log) is float32 in both (mamba_ssm's choice), so float32 rounding reaches the gradients
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item(),
                                   msg=lambda msg: f"{name}: {msg}")


@pytest.fixture
def diagonal():
    """A scan order the library does not have, registered as a student would write it, and removed afterwards."""
    @register_scan("test_connector_diagonal")
    def diagonal_order(H, W):
        """Anti-diagonals h + w = 0, 1, 2, …, each walked from the top row down."""
        return torch.tensor(sorted(range(H * W), key=lambda g: (g // W + g % W, g // W)))
    yield "test_connector_diagonal"
    del SCAN_ORDERS["test_connector_diagonal"]


def test_new_order_works_end_to_end(diagonal):
    """Registered in a test, the order is a direction of the MSC by name, alone or in a list, and scans as defined."""
    connector = tiny(seed=5, scan=f"row,column,{diagonal}").double()
    assert connector.msc.layers[0].mixer.orders == ("row", "column", diagonal)
    m = mixer(("row", diagonal), seed=6)
    u = torch.randn(1, 4, 5, LM.d_model, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(m(u), per_direction(m, u))
    out = tiny(scan=diagonal)(torch.randn(2, 4, 5, VISION_DIM, device=DEVICE))
    assert out.shape == (2, 20, LM.d_model) and out.isfinite().all()


@pytest.mark.parametrize("kind", ["msc", "mlp", "vss-mlp", "vss-l2"])
def test_every_kind_by_its_equation(kind):
    """(batch, H*W, d_model) on an odd 3x5 grid in row-major order, each kind equal to its equation written with the
    module's own parts, and every parameter gets a gradient."""
    connector = tiny(seed=7, kind=kind, scan="cross").double()
    randomise(connector, 8)
    grid = torch.randn(2, 3, 5, VISION_DIM, device=DEVICE, dtype=torch.float64)
    out = connector(grid)
    assert out.shape == (2, 15, LM.d_model)
    c = connector
    if kind == "msc":                                                 # Eq. 8, SwiGLU inside each block (the code)
        h = c.mlp(grid)
        for block in c.msc.layers:
            h = h + block.mixer(h)
            h = h + block.mlp.w3(F.silu(block.mlp.w1(block.norm(h))) * block.mlp.w2(block.norm(h)))
        expected = c.projector(c.msc.norm_f(h))
    elif kind == "mlp":                                               # Eq. 6
        expected = c.projector(grid)
    elif kind == "vss-mlp":
        expected = c.projector(c.norm(c.vss(grid) + grid))
    else:
        v = c.linear1(grid)
        expected = c.linear2(c.norm(c.vss(F.gelu(v)) + v))
    torch.testing.assert_close(out, rearrange(expected, "b h w c -> b (h w) c"))
    out.square().sum().backward()
    for name, p in connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name


def test_initialisation_is_the_released_codes():
    """As the released `_init_weights(n_layer=2)` and `Mamba2.__init__`: zero Linear biases (not the conv's), out_proj
    scaled by 1/√n_blocks, every direction starting from the first one's Δ and A, D = 1; the projector xavier-normal
    with zero biases."""
    connector = tiny(seed=13, scan="cross", n_blocks=2)
    for block in connector.msc.layers:
        m = block.mixer
        assert all(torch.equal(m.dt_bias[k], m.dt_bias[0]) and torch.equal(m.A_log[k], m.A_log[0]) for k in range(4))
        assert torch.equal(m.D, torch.ones_like(m.D)) and m.conv1d.bias.abs().sum() > 0
        bound = 1 / LM.d_inner ** 0.5 / 2 ** 0.5                               # nn.Linear's init, then 1/√2
        assert m.out_proj.weight.abs().max() <= bound < 1.2 * m.out_proj.weight.abs().max()
        assert all(torch.equal(w.bias, torch.zeros_like(w.bias)) for w in (block.mlp.w1, block.mlp.w2, block.mlp.w3))
    linears = [m for m in connector.projector if isinstance(m, torch.nn.Linear)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert all(0.5 < m.weight.std() * ((m.in_features + m.out_features) / 2) ** 0.5 < 1.5 for m in linears)


def test_ablations_are_config_values():
    """Table 6's rows and the block count: the MLP alone has no scan; the "Basic" MSC (swiglu=False, Eq. 7) has
    blocks without SwiGLU; n_blocks sets the depth; the MLP projector is three layers with a 4x hidden width."""
    assert not hasattr(tiny(kind="mlp"), "msc")
    basic = tiny(swiglu=False)
    assert all(block.mlp is None and block.norm is None for block in basic.msc.layers)
    assert len(tiny(n_blocks=3).msc.layers) == 3
    widths = [(m.in_features, m.out_features) for m in tiny().projector if isinstance(m, torch.nn.Linear)]
    assert widths == [(32, 128), (128, 32), (32, 32)]


def test_kernels_equal_the_reference(monkeypatch):
    """The same connector through the Triton kernels (under the interpreter on a CPU) and through the PyTorch
    definitions, float32: output and every parameter's gradient. A 5x7 grid: 35 cells, three chunks of 16; two
    directions and one block, which keep the interpreter's time down."""
    connector = tiny(seed=9, scan="column,snake", n_blocks=1)
    randomise(connector, 10)
    grid = torch.randn(2, 5, 7, VISION_DIM, device=DEVICE)
    gout = torch.randn(2, 35, LM.d_model, device=DEVICE)
    results = []
    for triton in (False, True):
        use_kernels(monkeypatch, triton)
        connector.zero_grad()
        leaf = grid.clone().requires_grad_()
        out = connector(leaf)
        (out * gout).sum().backward()
        results.append((out.detach(), leaf.grad, {n: p.grad.clone() for n, p in connector.named_parameters()}))
    (out_ref, dgrid_ref, grads_ref), (out_tri, dgrid_tri, grads_tri) = results
    # both float32 paths sit about 1e-5 of the largest value away from a float64 run: allow a few times that
    close = lambda got, ref, name: torch.testing.assert_close(got, ref, rtol=0, atol=5e-5 * ref.abs().max().item(),
                                                              msg=lambda m: f"{name}: {m}")
    close(out_tri, out_ref, "output")
    close(dgrid_tri, dgrid_ref, "grid gradient")
    for name in grads_ref:
        close(grads_tri[name], grads_ref[name], name)


def test_scan_depends_on_the_order():
    """Direction k's parameters scan direction k's order: the same weights with the orders swapped give another
    output; reversed orders on the grid are the forward orders on the grid turned by 180° (flipped in H and W)."""
    u = torch.randn(2, 4, 5, LM.d_model, device=DEVICE, dtype=torch.float64)
    forward = mixer(("row", "column"), seed=11)

    def same_weights(orders):
        m = Mamba2ScanMixer(LM, orders).to(DEVICE, torch.float64)
        m.load_state_dict(forward.state_dict())
        return m

    assert not torch.allclose(same_weights(("column", "row"))(u), forward(u), atol=1e-3)
    assert not torch.allclose(same_weights(("row", "snake"))(u), forward(u), atol=1e-3)
    turn = lambda t: t.flip(1, 2)
    torch.testing.assert_close(same_weights(("row_reverse", "column_reverse"))(u), turn(forward(turn(u))))


def released_state(connector, K=2):
    """A state dict in the released checkpoint's layout (`mlp`, `bidirectional_mamba`, `projector`; key names and
    shapes as WenjunHuang94/ML-Mamba and its mamba_ssm fork build them), from random tensors."""
    c, d = LM, LM.d_model
    state = {"mlp.0.weight": (d, VISION_DIM), "mlp.0.bias": (d,)}
    for i in range(2):
        mixer = f"bidirectional_mamba.layers.{i}.mixer."
        state.update({mixer + "in_proj.weight": (c.d_inner + c.conv_dim + c.nheads, d),
                      mixer + "norm.weight": (c.d_inner,), mixer + "out_proj.weight": (d, c.d_inner)})
        for suffix in ("", "_b"):
            state.update({f"{mixer}conv1d{suffix}.weight": (c.conv_dim, 1, c.d_conv),
                          f"{mixer}conv1d{suffix}.bias": (c.conv_dim,), f"{mixer}dt_bias{suffix}": (c.nheads,),
                          f"{mixer}A_log{suffix}": (c.nheads,), f"{mixer}D{suffix}": (c.nheads,)})
        block = f"bidirectional_mamba.layers.{i}."
        state.update({block + "norm.weight": (d,), block + "norm.bias": (d,)})
        state.update({f"{block}mlp.w{j}.{p}": (d, d) if p == "weight" else (d,) for j in (1, 2, 3)
                      for p in ("weight", "bias")})
    state.update({"bidirectional_mamba.norm_f.weight": (d,), "bidirectional_mamba.norm_f.bias": (d,)})
    for j, (rows, cols) in zip((0, 2, 4), ((4 * d, d), (d, 4 * d), (d, d))):
        state.update({f"projector.projector.{j}.weight": (rows, cols), f"projector.projector.{j}.bias": (rows,)})
    return {k: torch.randn(shape, device=DEVICE) for k, shape in state.items()}


def test_state_dict_follows_the_released_layout():
    """Every tensor of a released-layout connector maps onto ours by name alone (the backward direction's conv1d_b,
    dt_bias_b, A_log_b, D_b stacked after the forward one's), every one of ours is filled, and the loaded connector
    runs the released computation with those tensors."""
    connector = tiny(seed=12).double()
    release = released_state(connector)
    ours = connector_state_from_release(release)
    assert sorted(ours) == sorted(connector.state_dict())
    connector.load_state_dict(ours, strict=True)
    mixer0 = connector.msc.layers[0].mixer
    torch.testing.assert_close(mixer0.dt_bias[1].float(), release["bidirectional_mamba.layers.0.mixer.dt_bias_b"])
    conv_b = release["bidirectional_mamba.layers.0.mixer.conv1d_b.weight"]
    torch.testing.assert_close(mixer0.conv1d.weight[LM.conv_dim:].float(), conv_b)
    torch.testing.assert_close(connector.projector[2].weight.float(), release["projector.projector.2.weight"])
    grid = torch.randn(1, 3, 3, VISION_DIM, device=DEVICE, dtype=torch.float64)
    h = connector.mlp(grid)
    for block in connector.msc.layers:
        seq = rearrange(h, "b h w c -> b (h w) c")
        mixed = (one_direction(block.mixer, 0, seq) + one_direction(block.mixer, 1, seq.flip(1)).flip(1)) / 2
        h = h + rearrange(block.mixer.out_proj(mixed), "b (h w) c -> b h w c", h=3)
        h = h + block.mlp(block.norm(h))
    expected = rearrange(connector.projector(connector.msc.norm_f(h)), "b h w c -> b (h w) c")
    torch.testing.assert_close(connector(grid), expected)
    for gone in ("bidirectional_mamba.layers.1.mixer.A_log_b", "bidirectional_mamba.layers.0.mixer.conv1d.weight"):
        with pytest.raises(ValueError, match=f"lacks one direction of 1 tensors: {gone}"):
            connector_state_from_release({k: v for k, v in release.items() if k != gone})


def test_bad_config_and_input_get_clear_errors():
    with pytest.raises(ValueError, match="kind must be one of msc, mlp, vss-mlp, vss-l2, got 'cross'"):
        ConnectorConfig(kind="cross")
    with pytest.raises(ValueError, match="scan='spiral' is not a scan set or scan orders.*unknown scan order"):
        ConnectorConfig(scan="spiral")
    with pytest.raises(ValueError, match="unknown scan order 'colum'"):
        ConnectorConfig(scan="row,colum")
    with pytest.raises(ValueError, match="n_blocks must be a positive integer"):
        ConnectorConfig(n_blocks=0)
    with pytest.raises(ValueError, match=r"'vss-mlp' scans the vision features \(26 channels\).*headdim=8 must"):
        Connector(ConnectorConfig(kind="vss-mlp"), 26, LM)
    with pytest.raises(ValueError, match=r"expected the patch grid \(batch, H, W, 24\), got \(2, 15, 24\)"):
        tiny()(torch.randn(2, 15, VISION_DIM, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 kernels at the paper's size: GPU only")
def test_bfloat16_autocast_at_the_papers_size():
    """DINOv2-L + SigLIP-so400m (2176 channels) on SigLIP's 27x27 grid into Mamba-2 2.7B (2560 wide, d_state 128,
    headdim 64, chunk 256), under autocast: as close to the float32 result as bfloat16 allows; the backward runs."""
    torch.manual_seed(0)
    lm = Mamba2Config(d_model=2560, n_layer=64, vocab_size=50277)
    connector = Connector(ConnectorConfig(), 2176, lm).to(DEVICE)
    grid = torch.randn(2, 27, 27, 2176, device=DEVICE)
    exact = connector(grid)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = connector(grid)
    assert out.dtype == torch.bfloat16
    err = (out.float() - exact).abs().max().item()
    assert err < 0.05 * exact.abs().max().item(), err
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in connector.parameters())
