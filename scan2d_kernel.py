"""2D selective scans over the patch grid: scan orders, cross-scan and cross-merge.

A causal scan (Mamba-2's SSD) reads a 1D sequence, but a vision encoder gives an H×W grid of patches. The connectors
of VL-Mamba (arXiv 2403.13600, the Vision Selective Scan module: Bidirectional-Scan and Cross-Scan Mechanisms) and
ML-Mamba (arXiv 2407.19832, the Mamba-2 Scan Connector) follow VMamba's SS2D (arXiv 2401.10166): read the grid in K
orders, scan each of the K sequences, and merge the K results back onto the grid (ML-Mamba's released code averages
them: `cross_merge(..., reduce="mean")`, as mlmamba.Mamba2ScanMixer does).

Cells are numbered row-major, g = h·W + w. A scan order is a permutation π of {0, …, H·W−1}: position l of the
sequence reads cell π(l). With K orders π_1 … π_K:

    cross_scan:   ys[k, :, l] = x[:, π_k(l)]                       grid → K sequences
    cross_merge:  out[:, g]   = Σ_k ys[k, :, π_k⁻¹(g)]             K sequences → grid   (or the mean over k)

- `register_scan`          adds an order: a small function (H, W) → π; `SCAN_ORDERS` holds them, `SCAN_SETS` names
                           the groups a connector uses ("cross": the 4 routes of SS2D, "bidirectional": forward + back).
- `cross_scan_reference`, `cross_merge_reference`   the definitions above in PyTorch (index_select and a sum).
- `cross_scan`, `cross_merge`   the same as Triton kernels, one pass over memory each, differentiable (on tensors off
                           a GPU, without TRITON_INTERPRET=1, the references run, with a warning).
- `draw_scans`             pictures of the orders (pillow); `python scan2d_kernel.py --draw cross --grid 6x8`.

Layout: the grid is x (batch, H, W, channels); the sequences are ys (K, batch, H·W, channels). Direction-major, so
ys[k] is one contiguous (batch, seqlen, channels) sequence for direction k's Mamba-2 block, and
rearrange(ys, "k b l c -> (k b) l c") folds the directions into the batch without a copy when one block serves all.
"""
import argparse
import colorsys
import functools

import torch
import triton
import triton.language as tl
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from ssd_kernel import cdiv, next_pow2, reference_off_gpu

# ----------------------------------------------------------------------------------------------------------------------
# 1. Scan orders: each a function (H, W) -> π, a LongTensor of length H·W; π[l] is the cell that position l reads.

SCAN_ORDERS = {}

# The orders a connector config names: VMamba's four SS2D routes, and VL-Mamba's bidirectional scan.
SCAN_SETS = {
    "cross": ("row", "column", "row_reverse", "column_reverse"),
    "bidirectional": ("row", "row_reverse"),
}


def register_scan(name):
    """Decorator: registers `fn(H, W) -> LongTensor (H·W,)` as the scan order `name`."""
    def add(fn):
        if name in SCAN_ORDERS or name in SCAN_SETS:
            raise ValueError(f"register_scan: the name {name!r} is taken (by {_where(SCAN_ORDERS.get(name))}); "
                             f"pick another")
        SCAN_ORDERS[name] = fn
        return fn
    return add


@register_scan("row")
def row_major(H, W):
    """Left to right along each row, rows top to bottom: the raster order of a ViT's patch sequence."""
    return torch.arange(H * W)


@register_scan("column")
def column_major(H, W):
    """Top to bottom along each column, columns left to right: the raster order of the transposed grid."""
    return rearrange(torch.arange(H * W), "(h w) -> (w h)", h=H)


@register_scan("row_reverse")
def row_major_reversed(H, W):
    """The row-major path walked backwards, from the bottom-right corner."""
    return row_major(H, W).flip(0)


@register_scan("column_reverse")
def column_major_reversed(H, W):
    """The column-major path walked backwards, from the bottom-right corner."""
    return column_major(H, W).flip(0)


@register_scan("snake")
def snake(H, W):
    """Row by row, turning back at the end of each row (boustrophedon): every step goes to a neighbouring cell."""
    grid = torch.arange(H * W).reshape(H, W)
    grid[1::2] = grid[1::2].flip(1)                                        # odd rows right to left
    return grid.flatten()

# Your own order goes here: a function of (H, W) returning a permutation of range(H * W), under @register_scan("name").
# Look at it with `python scan2d_kernel.py --draw name --grid 5x7`, check it with `python -m pytest -q -k every_order`.


def _where(fn):
    return f"{fn.__qualname__} at {fn.__code__.co_filename}:{fn.__code__.co_firstlineno}" if fn else "a scan set"


def resolve_orders(orders):
    """The order names behind `orders`: a set name ("cross"), one order name ("row"), or a list of order names."""
    names = SCAN_SETS.get(orders, (orders,)) if isinstance(orders, str) else tuple(orders)
    if not names:
        raise ValueError("resolve_orders: no scan orders given")
    for name in names:
        if name not in SCAN_ORDERS:
            raise ValueError(f"resolve_orders: unknown scan order {name!r}; registered orders: {sorted(SCAN_ORDERS)}, "
                             f"sets: {sorted(SCAN_SETS)}")
    return names


def scan_permutation(name, H, W):
    """π for the registered order `name` on an H×W grid, checked to be a permutation of the H·W cells."""
    fn = SCAN_ORDERS.get(name)
    if fn is None:
        raise ValueError(f"scan_permutation: {name!r} is not a registered scan order: {sorted(SCAN_ORDERS)}")
    if H < 1 or W < 1:
        raise ValueError(f"scan_permutation: the grid must be at least 1x1, got {H}x{W}")
    perm = fn(H, W)
    problem = None
    if not isinstance(perm, torch.Tensor):
        problem = f"returned a {type(perm).__name__}, expected a 1-D integer tensor (torch.tensor(...) makes one)"
    elif perm.dim() != 1 or perm.dtype not in (torch.int32, torch.int64):
        problem = f"returned a {perm.dtype} tensor of shape {tuple(perm.shape)}, expected a 1-D integer tensor"
    elif perm.numel() != H * W:
        problem = f"returned {perm.numel()} cells, expected H*W = {H * W}"
    elif not torch.equal(perm.sort().values, torch.arange(H * W, device=perm.device, dtype=perm.dtype)):
        problem = "does not visit every cell exactly once (not a permutation of 0 .. H*W-1)"
    if problem:
        raise ValueError(f"scan order {name!r} ({_where(fn)}) on a {H}x{W} grid {problem}")
    return perm.long().cpu()


@functools.lru_cache(maxsize=64)
def _positions(fns, names, H, W, device):
    # keyed on the functions too, so that a name registered again (in a test) never reads a stale table
    perms = torch.stack([scan_permutation(name, H, W) for name in names])          # (K, H*W): π_k
    return torch.argsort(perms, dim=1).to(device=device, dtype=torch.int32)        # (K, H*W): π_k⁻¹


def _scan_positions(orders, H, W, device):
    """The table the kernels read: positions[k, g] = π_k⁻¹(g), where cell g sits in sequence k. (K, H·W) int32."""
    names = resolve_orders(orders)
    return _positions(tuple(SCAN_ORDERS[n] for n in names), names, H, W, torch.device(device))


# ----------------------------------------------------------------------------------------------------------------------
# 2. The definitions in PyTorch


def cross_scan_reference(x, orders):
    """Grid (batch, H, W, channels) → K sequences (K, batch, H·W, channels): ys[k, :, l] = x[:, π_k(l)]."""
    _, H, W, _ = _check_grid(x, "cross_scan_reference")
    seq = rearrange(x, "b h w c -> b (h w) c")
    return torch.stack([seq.index_select(1, scan_permutation(name, H, W).to(x.device))
                        for name in resolve_orders(orders)])


def cross_merge_reference(ys, orders, H, W, reduce="sum"):
    """K sequences (K, batch, H·W, channels) → grid (batch, H, W, channels): out[:, g] = Σ_k ys[k, :, π_k⁻¹(g)].

    reduce="mean" divides by K. Summed in float32 (or wider), returned in ys's dtype."""
    names = resolve_orders(orders)
    _check_sequences(ys, len(names), H, W, reduce, "cross_merge_reference")
    dtype = torch.promote_types(ys.dtype, torch.float32)
    out = sum(y.to(dtype).index_select(1, torch.argsort(scan_permutation(name, H, W)).to(ys.device))
              for y, name in zip(ys, names))                                          # (batch, H*W, channels)
    if reduce == "mean":
        out = out / len(names)
    return rearrange(out.to(ys.dtype), "b (h w) c -> b h w c", h=H)


def _check_grid(x, fn):
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be a grid (batch, H, W, channels), got shape {tuple(x.shape)}; "
                         f"for patch tokens (batch, H*W, channels) use rearrange(x, 'b (h w) c -> b h w c', h=H)")
    if 0 in x.shape[1:]:
        raise ValueError(f"{fn}: the grid and the channels must not be empty, got shape {tuple(x.shape)}")
    return x.shape


def _check_kernel_dtype(t, fn):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{fn}: the kernels take float32, float16 or bfloat16, got {t.dtype} "
                         f"({fn}_reference takes any dtype)")


def _check_sequences(ys, K, H, W, reduce, fn):
    if ys.dim() != 4 or ys.shape[0] != K or ys.shape[2] != H * W:
        raise ValueError(f"{fn}: ys must be (K={K}, batch, H*W={H * W}, channels) for {K} orders on a {H}x{W} grid, "
                         f"got shape {tuple(ys.shape)}")
    if ys.shape[3] == 0:
        raise ValueError(f"{fn}: ys has no channels, shape {tuple(ys.shape)}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"{fn}: reduce must be 'sum' or 'mean', got {reduce!r}")


# ----------------------------------------------------------------------------------------------------------------------
# 3. The Triton kernels
#
# Both walk the grid in tiles of (cells, channels) and read one table, positions[k, g] = π_k⁻¹(g), for the whole batch.
# The scan reads a tile of x once and writes it to K places; the merge reads K tiles and writes one: each element
# crosses memory once in each direction. Channels are the contiguous axis, so each row of a tile is one run of
# 16-byte vectors. The gradient of a gather is the matching scatter-add and vice versa, so each kernel is the other's
# backward.


@triton.jit
def _cross_scan_kernel(
    x_ptr, pos_ptr, ys_ptr,
    L, C, scale,
    stride_x_b, stride_x_g,
    stride_y_k, stride_y_b, stride_y_l,
    K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """ys[k, b, π_k⁻¹(g), c] = scale · x[b, g, c] for a tile of cells g and channels c, every k.

    scale = 1 is the forward of cross_scan (must match cross_scan_reference); scale = 1/K the backward of
    cross_merge with reduce="mean"."""
    pid_gc, b = tl.program_id(0), tl.program_id(1)
    c_blocks = tl.cdiv(C, BLOCK_C)
    offs_g = (pid_gc // c_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = (pid_gc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_g = offs_g < L
    mask = in_g[:, None] & (offs_c[None, :] < C)

    x = tl.load(x_ptr + b.to(tl.int64) * stride_x_b + offs_g[:, None] * stride_x_g + offs_c[None, :], mask=mask)
    x = (x.to(tl.float32) * scale).to(ys_ptr.dtype.element_ty)                          # (BLOCK_G, BLOCK_C)
    ys_ptr += b.to(tl.int64) * stride_y_b
    for k in tl.static_range(K):
        pos = tl.load(pos_ptr + k * L + offs_g, mask=in_g, other=0)                     # π_k⁻¹(g)
        tl.store(ys_ptr + pos[:, None] * stride_y_l + offs_c[None, :], x, mask=mask)
        ys_ptr += stride_y_k


@triton.jit
def _cross_merge_kernel(
    ys_ptr, pos_ptr, out_ptr,
    L, C, scale,
    stride_y_k, stride_y_b, stride_y_l,
    stride_o_b, stride_o_g,
    K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, g, c] = scale · Σ_k ys[k, b, π_k⁻¹(g), c] for a tile of cells g and channels c, summed in float32.

    scale = 1 (sum) or 1/K (mean) is the forward of cross_merge (must match cross_merge_reference); scale = 1 the
    backward of cross_scan."""
    pid_gc, b = tl.program_id(0), tl.program_id(1)
    c_blocks = tl.cdiv(C, BLOCK_C)
    offs_g = (pid_gc // c_blocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_c = (pid_gc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_g = offs_g < L
    mask = in_g[:, None] & (offs_c[None, :] < C)

    ys_ptr += b.to(tl.int64) * stride_y_b
    acc = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(pos_ptr + k * L + offs_g, mask=in_g, other=0)                     # π_k⁻¹(g)
        acc += tl.load(ys_ptr + pos[:, None] * stride_y_l + offs_c[None, :], mask=mask).to(tl.float32)
        ys_ptr += stride_y_k
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b.to(tl.int64) * stride_o_b + offs_g[:, None] * stride_o_g + offs_c[None, :], out, mask=mask)


def _tiles(L, C):
    """Tiles of up to 4096 elements: whole rows of up to 256 channels (8 KB of bfloat16), as many cells as fit."""
    block_c = min(256, next_pow2(C))
    return dict(BLOCK_G=min(next_pow2(L), 4096 // block_c), BLOCK_C=block_c)


def _channels_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _scan(x, pos, scale):
    """(batch, L, C) → (K, batch, L, C); see _cross_scan_kernel."""
    x = _channels_contiguous(x)
    (K, L), (batch, _, C) = pos.shape, x.shape
    ys = torch.empty(K, batch, L, C, device=x.device, dtype=x.dtype)
    tiles = _tiles(L, C)
    grid = (cdiv(L, tiles["BLOCK_G"]) * cdiv(C, tiles["BLOCK_C"]), batch)
    _cross_scan_kernel[grid](x, pos, ys, L, C, scale, x.stride(0), x.stride(1), *ys.stride()[:3], K=K, **tiles)
    return ys


def _merge(ys, pos, scale):
    """(K, batch, L, C) → (batch, L, C); see _cross_merge_kernel."""
    ys = _channels_contiguous(ys)
    (K, L), (_, batch, _, C) = pos.shape, ys.shape
    out = torch.empty(batch, L, C, device=ys.device, dtype=ys.dtype)
    tiles = _tiles(L, C)
    grid = (cdiv(L, tiles["BLOCK_G"]) * cdiv(C, tiles["BLOCK_C"]), batch)
    _cross_merge_kernel[grid](ys, pos, out, L, C, scale, *ys.stride()[:3], *out.stride()[:2], K=K, **tiles)
    return out


class _CrossScan(torch.autograd.Function):
    """ys = gather(x) forward; dx = Σ_k scatter(dys_k), the merge kernel, backward."""

    @staticmethod
    def forward(ctx, x, pos):
        ctx.save_for_backward(pos)
        return _scan(x, pos, 1.0)

    @staticmethod
    def backward(ctx, dys):
        pos, = ctx.saved_tensors
        return _merge(dys, pos, 1.0), None


class _CrossMerge(torch.autograd.Function):
    """out = scale · Σ_k scatter(ys_k) forward; dys_k = scale · gather(dout), the scan kernel, backward."""

    @staticmethod
    def forward(ctx, ys, pos, scale):
        ctx.save_for_backward(pos)
        ctx.scale = scale
        return _merge(ys, pos, scale)

    @staticmethod
    def backward(ctx, dout):
        pos, = ctx.saved_tensors
        return _scan(dout, pos, ctx.scale), None, None


@reference_off_gpu(cross_scan_reference)
def cross_scan(x, orders):
    """Grid → K sequences with a Triton kernel, differentiable. Matches `cross_scan_reference`.

    x (batch, H, W, channels): float32, float16 or bfloat16, any strides; orders: a set name ("cross", "bidirectional"), an order
    name, or a list of order names. Returns ys (K, batch, H·W, channels), contiguous, in x's dtype: ys[k] is the
    sequence for direction k. Runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (elsewhere cross_scan_reference
    runs, with a warning)."""
    batch, H, W, C = _check_grid(x, "cross_scan")
    _check_kernel_dtype(x, "cross_scan")
    pos = _scan_positions(orders, H, W, x.device)
    return _CrossScan.apply(rearrange(x, "b h w c -> b (h w) c"), pos)


@reference_off_gpu(cross_merge_reference)
def cross_merge(ys, orders, H, W, reduce="sum"):
    """K sequences → grid with a Triton kernel, differentiable. Matches `cross_merge_reference`.

    ys (K, batch, H·W, channels), any strides; reduce: "sum" or "mean" over the K directions, accumulated in float32.
    Returns (batch, H, W, channels) in ys's dtype; cross_merge(cross_scan(x, o), o, H, W, "mean") gives x back."""
    names = resolve_orders(orders)
    _check_sequences(ys, len(names), H, W, reduce, "cross_merge")
    _check_kernel_dtype(ys, "cross_merge")
    scale = 1.0 / len(names) if reduce == "mean" else 1.0
    out = _CrossMerge.apply(ys, _scan_positions(names, H, W, ys.device), scale)
    return rearrange(out, "b (h w) c -> b h w c", h=H)


# ----------------------------------------------------------------------------------------------------------------------
# 4. A picture of each order, for the classroom


def draw_scans(orders, H, W, cell=48):
    """One panel per order, side by side: the grid, each cell numbered with its position in the sequence, and the
    path from a dot at the start to an arrowhead at the end, coloured blue → red. Steps to a neighbouring cell are
    thick, jumps across the grid thin. Each panel is (W + 1)·cell wide and (H + 2)·cell high. Returns a PIL image."""
    names = resolve_orders(orders)
    panel_w, panel_h = (W + 1) * cell, (H + 2) * cell
    image = Image.new("RGB", (len(names) * panel_w, panel_h), "white")
    draw = ImageDraw.Draw(image)
    title_font = ImageFont.load_default(size=max(8, cell * 2 // 5))
    number_font = ImageFont.load_default(size=max(6, cell // 4))
    thick = max(2, cell // 10)
    for i, name in enumerate(names):
        left, top = i * panel_w + cell / 2, 1.5 * cell                                 # the grid's top-left corner
        draw.text((left, 0.75 * cell), name, fill="black", font=title_font, anchor="lm")
        for h in range(H + 1):
            draw.line([(left, top + h * cell), (left + W * cell, top + h * cell)], fill=(210, 210, 210))
        for w in range(W + 1):
            draw.line([(left + w * cell, top), (left + w * cell, top + H * cell)], fill=(210, 210, 210))

        perm = scan_permutation(name, H, W).tolist()
        centre = [(left + (g % W + 0.5) * cell, top + (g // W + 0.5) * cell) for g in range(H * W)]
        colour = [tuple(round(255 * v) for v in colorsys.hsv_to_rgb(2 / 3 * (1 - l / max(1, H * W - 1)), 0.9, 0.9))
                  for l in range(H * W)]                                        # hue: blue at l = 0, red at the end
        for l, g in enumerate(perm):
            draw.text((centre[g][0] - 0.45 * cell, centre[g][1] - 0.45 * cell), str(l), fill=(90, 90, 90),
                      font=number_font)
        for l, (a, b) in enumerate(zip(perm, perm[1:])):
            neighbours = abs(a // W - b // W) + abs(a % W - b % W) == 1
            draw.line([centre[a], centre[b]], fill=colour[l], width=thick if neighbours else 1)
        (x0, y0), r = centre[perm[0]], cell / 8
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour[0])
        _arrowhead(draw, centre[perm[-2]] if len(perm) > 1 else (x0 - 1, y0), centre[perm[-1]], cell / 4, colour[-1])
    return image


def _arrowhead(draw, tail, tip, size, fill):
    """A filled triangle at `tip`, pointing away from `tail`."""
    (tx, ty), (hx, hy) = tail, tip
    norm = max(1e-9, ((hx - tx) ** 2 + (hy - ty) ** 2) ** 0.5)
    ux, uy = (hx - tx) / norm, (hy - ty) / norm                                         # unit vector along the step
    back_x, back_y = hx - size * ux, hy - size * uy
    draw.polygon([(hx, hy), (back_x - size / 2 * uy, back_y + size / 2 * ux),
                  (back_x + size / 2 * uy, back_y - size / 2 * ux)], fill=fill)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw registered scan orders over a grid as a PNG.")
    parser.add_argument("--draw", default="all",
                        help="'all' (every registered order), a set (cross, bidirectional), an order, or a,b,c")
    parser.add_argument("--grid", default="6x8", help="HxW, rows by columns")
    parser.add_argument("--cell", type=int, default=48, help="pixels per grid cell")
    parser.add_argument("--out", default="scans.png")
    args = parser.parse_args(argv)
    try:
        H, W = (int(n) for n in args.grid.lower().split("x"))
    except ValueError:
        parser.error(f"--grid must look like 6x8 (rows x columns), got {args.grid!r}")
    orders = tuple(SCAN_ORDERS) if args.draw == "all" else args.draw.split(",") if "," in args.draw else args.draw
    draw_scans(orders, H, W, args.cell).save(args.out)
    print(f"wrote {args.out}: {', '.join(resolve_orders(orders))} on a {H}x{W} grid")


if __name__ == "__main__":
    main()
