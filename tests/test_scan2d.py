"""scan2d_kernel.py: every scan order is a permutation, merge after scan gives the grid back, the Triton kernels equal
the PyTorch definitions in values and gradients, a new order works end to end, and the drawing writes a PNG.

The tests named test_every_order_* run once for each registered order, a student's new one included."""
import pytest
import torch
from PIL import Image

from conftest import DEVICE, check_references_run_off_gpu
from scan2d_kernel import (SCAN_ORDERS, SCAN_SETS, cross_merge, cross_merge_reference, cross_scan,
                           cross_scan_reference, draw_scans, main, register_scan, resolve_orders, snake)

ORDERS = sorted(SCAN_ORDERS)
GRIDS = [(1, 1), (1, 6), (5, 1), (3, 3), (5, 7), (8, 6)]                 # (H, W): single cells, lines, odd, even
DTYPES = [torch.float32, torch.float16, torch.bfloat16]   # no tl.dot in these kernels: bfloat16 works interpreted too


@pytest.mark.parametrize("name", ORDERS)
def test_every_order_is_a_permutation(name):
    """The order visits each of the H·W cells exactly once, on square, odd, and one-row or one-column grids."""
    for H, W in GRIDS:
        perm = SCAN_ORDERS[name](H, W)
        assert isinstance(perm, torch.Tensor) and perm.dim() == 1 and not perm.is_floating_point(), (name, H, W)
        assert sorted(perm.tolist()) == list(range(H * W)), (name, H, W)


@pytest.mark.parametrize("name", ORDERS + sorted(SCAN_SETS))
def test_every_order_scans_and_merges_back(name):
    """merge∘scan is K times the grid for "sum" and the grid for "mean", through the reference and the kernels."""
    K, (H, W) = len(resolve_orders(name)), (5, 7)
    x = torch.randn(2, H, W, 19, device=DEVICE)
    for scan, merge in [(cross_scan_reference, cross_merge_reference), (cross_scan, cross_merge)]:
        ys = scan(x, name)
        assert ys.shape == (K, 2, H * W, 19)
        torch.testing.assert_close(merge(ys, name, H, W, reduce="sum"), K * x)
        torch.testing.assert_close(merge(ys, name, H, W, reduce="mean"), x)
    torch.testing.assert_close(cross_scan(x, name), cross_scan_reference(x, name), rtol=0, atol=0)


@pytest.mark.parametrize("name", ORDERS)
def test_every_order_draws(name):
    """The picture of the order has one panel of the documented size."""
    assert draw_scans(name, 3, 5, cell=20).size == ((5 + 1) * 20, (3 + 2) * 20)


def test_builtin_orders_are_the_cross_scan_routes():
    """The "cross" set is VMamba's four routes: flatten, transpose-then-flatten, and both flipped; snake turns back
    at the end of each row. Checked on a non-square grid, where a transposition mistake shows."""
    H, W = 4, 5
    x = torch.randn(2, H, W, 3)
    rows, columns = x.flatten(1, 2), x.transpose(1, 2).flatten(1, 2)            # (batch, H*W, channels)
    for ys, expected in zip(cross_scan_reference(x, "cross"), [rows, columns, rows.flip(1), columns.flip(1)]):
        assert torch.equal(ys, expected)
    assert snake(H, W).tolist() == [h * W + (w if h % 2 == 0 else W - 1 - w) for h in range(H) for w in range(W)]
    assert resolve_orders("bidirectional") == ("row", "row_reverse")


def grads(fn, inputs, gout):
    """Output and the gradient of ⟨out, gout⟩ w.r.t. the first input."""
    leaf = inputs[0].detach().requires_grad_()                          # a view: keeps the input's strides
    out = fn(leaf, *inputs[1:])
    (out.double() * gout).sum().backward()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,H,W,C", [(2, 5, 7, 37), (1, 1, 9, 3), (2, 1, 1, 8), (3, 4, 4, 300)])   # 300: 2 tiles
def test_cross_scan_matches_reference(batch, H, W, C, dtype):
    """Values exactly (a gather is a copy); gradients (a sum of K scattered rows) against the float64 reference.
    x is a channel slice of a wider tensor, so the kernel must follow the row stride."""
    x = torch.randn(batch, H, W, C + 5, device=DEVICE).to(dtype)[..., :C]
    assert x.stride(2) == C + 5
    gout = torch.randn(4, batch, H * W, C, device=DEVICE).to(dtype).double()     # exact in dtype, as autograd passes it
    ys, dx = grads(cross_scan, (x, "cross"), gout)
    ys_ref, dx_ref = grads(cross_scan_reference, (x.double(), "cross"), gout)
    assert ys.dtype == dtype and ys.is_contiguous() and dx.dtype == dtype
    assert torch.equal(ys, ys_ref.to(dtype))
    torch.testing.assert_close(dx, dx_ref.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("orders,reduce,batch,H,W,C", [
    ("cross", "sum", 2, 5, 7, 37), ("bidirectional", "mean", 3, 3, 1, 260),
    (("snake", "column", "row_reverse"), "mean", 1, 6, 5, 8)])
def test_cross_merge_matches_reference(orders, reduce, batch, H, W, C, dtype):
    """Values and gradients against the float64 reference, for sum and mean (K = 3: a scale 1/K that rounds).
    ys is batch-major in memory, as torch.stack(outputs, dim=1).transpose(0, 1) would give it."""
    K = len(resolve_orders(orders))
    ys = torch.randn(batch, K, H * W, C, device=DEVICE).to(dtype).transpose(0, 1)
    gout = torch.randn(batch, H, W, C, device=DEVICE).to(dtype).double()
    out, dys = grads(cross_merge, (ys, orders, H, W, reduce), gout)
    out_ref, dys_ref = grads(cross_merge_reference, (ys.double(), orders, H, W, reduce), gout)
    assert out.dtype == dtype and dys.dtype == dtype
    torch.testing.assert_close(out, out_ref.to(dtype))
    torch.testing.assert_close(dys, dys_ref.to(dtype))


@pytest.fixture
def diagonal():
    """A scan order the library does not have, registered as a student would write it, and removed afterwards."""
    @register_scan("test_diagonal")
    def diagonal_order(H, W):
        """Anti-diagonals h + w = 0, 1, 2, …, each walked from the top row down."""
        return torch.tensor(sorted(range(H * W), key=lambda g: (g // W + g % W, g // W)))
    yield "test_diagonal"
    del SCAN_ORDERS["test_diagonal"]


def test_new_order_works_end_to_end(diagonal):
    """Registered in a test, the order runs through both kernels, forward and backward, beside the built-in ones."""
    H, W = 5, 3
    x = torch.randn(2, H, W, 10, device=DEVICE, requires_grad=True)
    orders = ["row", diagonal]
    ys = cross_scan(x, orders)
    assert torch.equal(ys[1, :, :4], x.detach().flatten(1, 2)[:, [0, 1, 3, 2]])   # (0,0), (0,1), (1,0), (0,2)
    assert torch.equal(ys, cross_scan_reference(x.detach(), orders))
    gout = torch.randn_like(x)
    (cross_merge(ys, orders, H, W, reduce="mean") * gout).sum().backward()
    assert torch.equal(x.grad, gout)                                    # merge(mean)∘scan is the identity
    assert draw_scans(orders, H, W, cell=16).size == (2 * (W + 1) * 16, (H + 2) * 16)


def test_bad_input_gets_a_clear_error():
    x = torch.randn(2, 3, 4, 8, device=DEVICE)

    @register_scan("test_broken")
    def broken(H, W):
        return torch.zeros(H * W, dtype=torch.long)

    try:
        with pytest.raises(ValueError, match="'test_broken'.*test_scan2d.py.*not a permutation"):
            cross_scan(x, "test_broken")
    finally:
        del SCAN_ORDERS["test_broken"]
    with pytest.raises(ValueError, match="'row' is taken"):
        register_scan("row")(lambda H, W: torch.arange(H * W))
    with pytest.raises(ValueError, match="'cross' is taken"):
        register_scan("cross")(lambda H, W: torch.arange(H * W))
    with pytest.raises(ValueError, match="unknown scan order 'spiral'"):
        cross_scan(x, ["row", "spiral"])
    with pytest.raises(ValueError, match=r"grid \(batch, H, W, channels\)"):
        cross_scan(x.flatten(1, 2), "cross")
    with pytest.raises(ValueError, match="must not be empty"):
        cross_scan(x[..., :0], "cross")
    with pytest.raises(ValueError, match="float64"):
        cross_scan(x.double(), "cross")
    ys = cross_scan(x, "cross")
    with pytest.raises(ValueError, match=r"K=2.*got shape \(4, 2, 12, 8\)"):
        cross_merge(ys, "bidirectional", 3, 4)
    with pytest.raises(ValueError, match="H\\*W=15"):
        cross_merge(ys, "cross", 3, 5)
    with pytest.raises(ValueError, match="reduce"):
        cross_merge(ys, "cross", 3, 4, reduce="max")


def test_draw_command_writes_the_png(tmp_path):
    """The command line draws each order of the set; the start dots sit where the orders begin."""
    path = tmp_path / "scans.png"
    main(["--draw", "cross", "--grid", "3x5", "--cell", "20", "--out", str(path)])
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (4 * (5 + 1) * 20, (3 + 2) * 20)
    image = image.convert("RGB")
    panel, left, top = (5 + 1) * 20, 10, 30                                    # panel width; the grid's corner
    r, g, b = image.getpixel((left + 10, top + 10))                            # "row" starts at the top-left cell
    assert b > 150 and r < 100, (r, g, b)                                      # its blue start dot
    r, g, b = image.getpixel((2 * panel + left + 90, top + 50))                # "row_reverse": the bottom-right cell
    assert b > 150 and r < 100, (r, g, b)
    assert image.getpixel((2 * panel + left + 10, top + 10)) != (r, g, b)      # and not at the top-left


@pytest.mark.skipif(DEVICE != "cuda", reason="a realistic connector shape, quick only on a GPU")
@pytest.mark.parametrize("H,C", [(24, 1024), (27, 1000)])
def test_kernels_at_connector_scale(H, C):
    """bfloat16 at the size of a SigLIP grid: the vectorised path over many channel tiles."""
    x = torch.randn(4, H, H, C, device=DEVICE, dtype=torch.bfloat16)
    ys = cross_scan(x, "cross")
    assert torch.equal(ys, cross_scan_reference(x, "cross"))
    torch.testing.assert_close(cross_merge(ys, "cross", H, H, "mean"), x, rtol=0, atol=0)
    torch.testing.assert_close(cross_merge(ys, "cross", H, H), cross_merge_reference(ys, "cross", H, H))


def test_cpu_tensors_without_the_interpreter_run_the_references():
    """README's exercise on a CPU: cross_scan(x, ["row", "diagonal"]) runs the reference (saying so), not a crash."""
    setup = ("register_scan('diagonal')(lambda H, W: torch.tensor(sorted(range(H * W),\n"
             "                                                       key=lambda g: (g // W + g % W, g // W))))\n"
             "x, ys = torch.randn(2, 3, 5, 4), torch.randn(2, 2, 15, 4)")
    check_references_run_off_gpu("scan2d_kernel", setup, {
        "cross_scan": ("cross_scan_reference", "x, ['row', 'diagonal']"),
        "cross_merge": ("cross_merge_reference", "ys, ['row', 'diagonal'], 3, 5, 'mean'")})
