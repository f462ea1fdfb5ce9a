"""The connector of mlmamba.py: the VSS block's K-direction scan against a slow per-direction definition (each order
gathered by hand, the SSD recurrence token by token), the Triton path against the PyTorch path, the dependence on
the scan order, and shapes and gradients of every kind.

The tests named test_every_order_* run once for each registered scan order, a student's new one included:
`python -m pytest -q -k every_order` checks an order in scan2d_kernel.py and through the connector."""
import pytest
import torch
from einops import rearrange

import mlmamba
from conftest import DEVICE
from mlmamba import Connector, ConnectorConfig, VSSBlock
from scan2d_kernel import SCAN_ORDERS, register_scan, scan_permutation
from ssd_kernel import ssd_naive

VISION_DIM, LM_DIM = 24, 40
SIZES = dict(d_state=8, headdim=8, expand=2, chunk_size=16)          # 6 heads per direction; grids of 15+ cells


def tiny(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    return Connector(ConnectorConfig(kind=kind, **{**SIZES, **overrides}), VISION_DIM, LM_DIM).to(DEVICE)


@torch.no_grad()
def randomise(module, seed):
    """Move the parameters off their neutral init (norm weights 1, D 1), so that a swapped one would show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device)
        p.add_(0.3 * noise if not name.endswith("A_log") else 0.2 * noise)


def per_direction_scan(block, x):
    """The definition of VSSBlock.scan, one direction at a time: gather the grid in order π_k with the permutation
    itself, project with direction k's weights, run the SSD recurrence token by token (ssd_naive) with direction k's
    A, dt_bias and D, and add the outputs back at the cells they came from."""
    batch, H, W, d_inner = x.shape
    c, nheads = block.config, block.nheads
    grid = rearrange(x, "b h w c -> b (h w) c")
    out = torch.zeros_like(grid)
    for k, name in enumerate(block.orders):
        perm = scan_permutation(name, H, W).to(x.device)
        seq = grid[:, perm]                                                       # (batch, L, d_inner)
        dt, B, C = torch.split(seq @ block.x_proj[k].T, [nheads, c.d_state, c.d_state], dim=-1)
        A = -torch.exp(block.A_log[k].float())                                   # float32, as Mamba2Mixer's
        y = ssd_naive(rearrange(seq, "b l (h p) -> b l h p", p=c.headdim), dt, A,
                      B[:, :, None], C[:, :, None], D=block.D[k], dt_bias=block.dt_bias[k], dt_softplus=True)
        out[:, perm] += rearrange(y, "b l h p -> b l (h p)")
    return rearrange(out, "b (h w) c -> b h w c", h=H)


def use_kernels(monkeypatch, triton):
    """Make the connector take the Triton kernels (on a CPU: interpreted) or the PyTorch definitions on any device."""
    monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: triton and t.dtype != torch.float64)


@pytest.mark.parametrize("kind", ["mlp", "bidirectional", "cross"])
def test_output_shape_and_gradient_flow(kind):
    """(batch, H*W, lm_dim) on an odd 3x5 grid, and every parameter gets a gradient."""
    connector = tiny(kind)
    grid = torch.randn(2, 3, 5, VISION_DIM, device=DEVICE)
    out = connector(grid)
    assert out.shape == (2, 15, LM_DIM)
    out.square().sum().backward()
    for name, p in connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and p.grad.isfinite().all(), name
    expected_params = {"mlp": 4, "bidirectional": 14, "cross": 14}[kind]
    assert len(list(connector.parameters())) == expected_params
    if kind == "mlp":                                   # LLaVA's MLP on the patches in row-major order
        flat = grid.flatten(1, 2)
        torch.testing.assert_close(out, connector.fc2(torch.nn.functional.gelu(connector.fc1(flat))))
    else:
        assert connector.vss.x_proj.shape[0] == {"bidirectional": 2, "cross": 4}[kind]


@pytest.mark.parametrize("name", sorted(SCAN_ORDERS))
def test_every_order_runs_through_the_connector(name):
    """The order as a connector kind of its own, and beside "row": the block's scan equals the per-direction
    definition (float64, a 5x3 grid that fills no chunk), and the connector's gradient reaches every parameter."""
    for kind in (name, f"row,{name}"):
        connector = tiny(kind, seed=1).double()
        randomise(connector, seed=2)
        x = torch.randn(2, 5, 3, 2 * VISION_DIM, device=DEVICE, dtype=torch.float64)
        torch.testing.assert_close(connector.vss.scan(x), per_direction_scan(connector.vss, x))
        grid = torch.randn(2, 5, 3, VISION_DIM, device=DEVICE, dtype=torch.float64)
        connector(grid).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters()), kind


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
    """Registered in a test, the order is a connector kind by name, alone or in a list, and scans as defined."""
    connector = tiny(f"row,column,{diagonal}", seed=3).double()
    randomise(connector, seed=4)
    assert connector.vss.orders == ("row", "column", diagonal)
    x = torch.randn(1, 4, 5, 2 * VISION_DIM, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(connector.vss.scan(x), per_direction_scan(connector.vss, x))
    out = tiny(diagonal)(torch.randn(2, 4, 5, VISION_DIM, device=DEVICE))
    assert out.shape == (2, 20, LM_DIM) and out.isfinite().all()


def test_kernels_equal_the_reference(monkeypatch):
    """The same connector through the Triton kernels (under the interpreter on a CPU) and through the PyTorch
    definitions, float32: output and every parameter's gradient. A 5x7 grid: 35 cells, three chunks of 16."""
    connector = tiny("cross", seed=5)
    randomise(connector, seed=6)
    grid = torch.randn(2, 5, 7, VISION_DIM, device=DEVICE)
    gout = torch.randn(2, 35, LM_DIM, device=DEVICE)
    results = []
    for triton in (False, True):
        use_kernels(monkeypatch, triton)
        connector.zero_grad()
        leaf = grid.clone().requires_grad_()
        out = connector(leaf)
        (out * gout).sum().backward()
        results.append((out.detach(), leaf.grad, {n: p.grad.clone() for n, p in connector.named_parameters()}))
    (out_ref, dgrid_ref, grads_ref), (out_tri, dgrid_tri, grads_tri) = results
    # both float32 paths sit about 1e-5 of the largest value away from a float64 run: allow twice that
    close = lambda got, ref, name: torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item(),
                                                              msg=lambda m: f"{name}: {m}")
    close(out_tri, out_ref, "output")
    close(dgrid_tri, dgrid_ref, "grid gradient")
    for name in grads_ref:
        close(grads_tri[name], grads_ref[name], name)


def test_scan_depends_on_the_order():
    """Direction k's parameters scan direction k's order: the same weights with the orders swapped give another
    output; a reversed order on the grid is the forward order on the grid turned by 180° (flipped in H and W)."""
    x = torch.randn(2, 4, 5, 2 * VISION_DIM, device=DEVICE, dtype=torch.float64)
    forward = tiny("row,column", seed=7).double().vss
    randomise(forward, seed=8)

    def same_weights(kind):
        block = VSSBlock(ConnectorConfig(kind=kind, **SIZES), VISION_DIM).to(DEVICE).double()
        block.load_state_dict(forward.state_dict())
        return block

    assert not torch.allclose(same_weights("column,row").scan(x), forward.scan(x), atol=1e-3)
    assert not torch.allclose(same_weights("row,snake").scan(x), forward.scan(x), atol=1e-3)
    reverse = same_weights("row_reverse,column_reverse")
    turn = lambda t: t.flip(1, 2)
    torch.testing.assert_close(reverse.scan(x), turn(forward.scan(turn(x))))


def test_bad_config_and_input_get_clear_errors():
    with pytest.raises(ValueError, match="kind='spiral' is not 'mlp', a scan set or scan orders.*unknown scan order"):
        ConnectorConfig(kind="spiral")
    with pytest.raises(ValueError, match="unknown scan order 'colum'"):
        ConnectorConfig(kind="row,colum")
    with pytest.raises(ValueError, match="d_conv must be odd"):
        ConnectorConfig(d_conv=4)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        ConnectorConfig(chunk_size=48)
    with pytest.raises(ValueError, match="d_state must be a positive integer"):
        ConnectorConfig(d_state=0)
    with pytest.raises(ValueError, match=r"headdim=32 must divide d_inner = expand \* vision width = 2 \* 24 = 48"):
        Connector(ConnectorConfig(headdim=32), VISION_DIM, LM_DIM)
    with pytest.raises(ValueError, match=r"expected the patch grid \(batch, H, W, 24\), got \(2, 15, 24\)"):
        tiny("cross")(torch.randn(2, 15, VISION_DIM, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 kernels at a realistic size: GPU only")
def test_bfloat16_autocast_at_connector_scale():
    """SigLIP-so400m's 27x27 grid of 1152 channels into a 2560-wide LM, under autocast: as close to the float32
    result as bfloat16 allows, and the backward runs."""
    torch.manual_seed(0)
    connector = Connector(ConnectorConfig(kind="cross"), 1152, 2560).to(DEVICE)
    grid = torch.randn(2, 27, 27, 1152, device=DEVICE)
    exact = connector(grid)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = connector(grid)
    assert out.dtype == torch.bfloat16
    err = (out.float() - exact).abs().max().item()
    assert err < 0.05 * exact.abs().max().item(), err
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in connector.parameters())
