"""Speed on a GPU, measured side by side: our kernels against the peers present in the same run and the hardware floor.

    python bench.py                 # every section
    python bench.py --only ssd      # one section (ssd)
    python bench.py --quick         # smaller shapes, for a smoke test

Prints one table of times and ratios and writes it as JSON (--json). Timings are medians of triton's do_bench (CUDA
events, warm-up first); floors are bytes that must move / measured device-to-device copy bandwidth.
Record each run in BENCHMARKS.md with the device, versions, date and this command.
"""
import argparse
import json
import os
import platform
import sys
import time
import types
from dataclasses import dataclass

import torch
import triton

from scan2d_kernel import cross_merge, cross_merge_reference, cross_scan, cross_scan_reference, resolve_orders
from ssd_kernel import ssd_reference, ssd_scan


@dataclass
class Row:
    section: str
    case: str
    ms: float
    note: str = ""


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (the memory floor's denominator)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def rel_err(a, ref):
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups=1, dtype=torch.bfloat16):
    """Random inputs shaped like a Mamba-2 layer's: dt pre-softplus around softplus⁻¹(0.01..0.1), A in [-16, -1]."""
    dev = "cuda"
    return dict(
        x=torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype),
        dt=(torch.randn(batch, seqlen, nheads, device=dev) * 0.5 - 3.0).to(dtype),
        A=-torch.empty(nheads, device=dev).uniform_(1, 16),
        B=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        D=torch.randn(nheads, device=dev), dt_bias=torch.randn(nheads, device=dev) * 0.1)


def official_scan(peers):
    """mamba_ssm's Triton path (mamba_chunk_scan_combined), imported from its source tree without building its CUDA
    extensions: `peers` is a folder holding the `mamba_ssm` package (e.g. unpacked from its PyPI sdist)."""
    if peers and os.path.isdir(os.path.join(peers, "mamba_ssm")) and "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")       # skips mamba_ssm/__init__.py, which imports the CUDA extensions
        package.__path__ = [os.path.join(os.path.abspath(peers), "mamba_ssm")]
        sys.modules["mamba_ssm"] = package
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined
    except Exception as e:                       # not there: report, don't fail
        print(f"mamba_ssm not importable ({type(e).__name__}: {e}); official kernels not measured")
        return None


def bench_ssd(args, bw):
    rows = []
    shapes = {"2.7B layer": (4, 2048, 80, 64, 128), "130M layer": (8, 2048, 24, 64, 128),
              "seqlen 8192": (1, 8192, 80, 64, 128)}
    if args.quick:
        shapes = {"small": (2, 512, 8, 64, 128)}
    official = official_scan(args.peers)
    chunk = 256
    for name, (batch, seqlen, nheads, headdim, dstate) in shapes.items():
        inp = ssd_inputs(batch, seqlen, nheads, headdim, dstate)
        leaves = [inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
        kw = dict(chunk_size=chunk, dt_softplus=True)
        xdtABC = lambda: (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
        ours = lambda: ssd_scan(*xdtABC(), D=inp["D"], dt_bias=inp["dt_bias"], **kw)
        ref = lambda: ssd_reference(*xdtABC(), D=inp["D"], dt_bias=inp["dt_bias"], **kw)
        gy = torch.randn_like(inp["x"])

        # correctness at this shape: bf16 kernels against the float32 reference on the same bf16 inputs
        y, y_ref = ours(), ref()
        g = torch.autograd.grad(y, leaves, gy)
        g_ref = torch.autograd.grad(y_ref, leaves, gy)
        errs = {"y": rel_err(y, y_ref), **{k: rel_err(a, b) for k, a, b in zip("x dt A B C D dt_bias".split(), g, g_ref)}}
        worst = max(errs.values())
        print(f"[ssd {name}] rel. error vs float32 reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        assert worst < 3e-2, f"ssd_scan disagrees with the reference at {name}: {errs}"
        if official is not None:
            y_off = official(*xdtABC(), chunk, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
            print(f"[ssd {name}] mamba_ssm rel. error vs float32 reference: y {rel_err(y_off, y_ref):.1e}")

        # floor: read x, dt, B, C once, write y (forward); backward also reads dy and writes dx, dB, dC, ddt
        xb = inp["x"].numel() * inp["x"].element_size()
        bcb = 2 * inp["B"].numel() * inp["B"].element_size()
        fwd_bytes = 2 * xb + bcb
        bwd_bytes = fwd_bytes + 3 * xb + 2 * bcb
        timings = {
            "ours fwd": (bench_ms(ours), fwd_bytes),
            "ours fwd+bwd": (bench_ms(lambda: torch.autograd.grad(ours(), leaves, gy)), fwd_bytes + bwd_bytes),
            "pytorch reference fwd": (bench_ms(ref), fwd_bytes),
            "pytorch reference fwd+bwd": (bench_ms(lambda: torch.autograd.grad(ref(), leaves, gy)),
                                          fwd_bytes + bwd_bytes)}
        if official is not None:
            off = lambda: official(*xdtABC(), chunk, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
            timings["mamba_ssm fwd"] = (bench_ms(off), fwd_bytes)
            timings["mamba_ssm fwd+bwd"] = (bench_ms(lambda: torch.autograd.grad(off(), leaves, gy)),
                                            fwd_bytes + bwd_bytes)
        for case, (ms, nbytes) in timings.items():
            floor = nbytes / bw * 1e3
            rows.append(Row("ssd", f"{name} {case}", ms, f"floor {floor:.3f} ms ({floor / ms:.0%})"))
        for kind in ("fwd", "fwd+bwd"):
            mine = timings[f"ours {kind}"][0]
            rows.append(Row("ssd", f"{name} {kind}: reference / ours", timings[f"pytorch reference {kind}"][0] / mine,
                            "speed-up (x)"))
            if official is not None:
                rows.append(Row("ssd", f"{name} {kind}: mamba_ssm / ours", timings[f"mamba_ssm {kind}"][0] / mine,
                                "speed-up (x)"))
        del inp, leaves, y, y_ref, g, g_ref
        torch.cuda.empty_cache()

    # memory is linear in seqlen: peak of one fwd+bwd at batch 1, seqlen L and 4L
    peaks = {}
    for seqlen in (2048, 8192):
        torch.cuda.reset_peak_memory_stats()
        inp = ssd_inputs(1, seqlen, 80, 64, 128)
        leaves = [inp[k].requires_grad_() for k in ("x", "dt", "B", "C")]
        base = torch.cuda.memory_allocated()
        y = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=chunk, dt_softplus=True)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
        peaks[seqlen] = (torch.cuda.max_memory_allocated() - base) / 2**20
    rows.append(Row("ssd", "peak extra MiB fwd+bwd, seqlen 8192 / 2048", peaks[8192] / peaks[2048],
                    f"{peaks[2048]:.0f} MiB -> {peaks[8192]:.0f} MiB (4.0 = linear)"))
    return rows


def bench_scan2d(args, bw):
    """cross_scan and cross_merge in bfloat16 against their PyTorch references, at connector shapes (batch 32, a
    SigLIP-sized grid). Floor: each call moves (K + 1)·N elements (scan: read N, write K·N; merge: read K·N, write N;
    N = batch·H·W·C), forward + backward of scan then merge moves 4·(K + 1)·N."""
    rows = []
    shapes = {"b32 24x24x1024": (32, 24, 1024), "b32 27x27x1152": (32, 27, 1152), "b32 24x24x2048": (32, 24, 2048)}
    if args.quick:
        shapes = {"b4 9x9x256": (4, 9, 256)}
    for name, (batch, H, C) in shapes.items():
        x = torch.randn(batch, H, H, C, device="cuda", dtype=torch.bfloat16)
        gout = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        for orders in ("cross", "bidirectional"):
            K = len(resolve_orders(orders))
            ys = cross_scan(x, orders)
            assert torch.equal(ys, cross_scan_reference(x, orders)), f"cross_scan disagrees at {name} {orders}"
            err = rel_err(cross_merge(ys, orders, H, H), cross_merge_reference(ys, orders, H, H))
            assert err < 1e-2, f"cross_merge disagrees at {name} {orders}: rel. error {err:.1e}"

            def fwd_bwd(scan, merge):
                return lambda: torch.autograd.grad(merge(scan(xg, orders), orders, H, H), xg, gout)

            nbytes = (K + 1) * x.numel() * x.element_size()
            timings = {
                "cross_scan": (bench_ms(lambda: cross_scan(x, orders)), nbytes),
                "cross_scan reference": (bench_ms(lambda: cross_scan_reference(x, orders)), nbytes),
                "cross_merge": (bench_ms(lambda: cross_merge(ys, orders, H, H)), nbytes),
                "cross_merge reference": (bench_ms(lambda: cross_merge_reference(ys, orders, H, H)), nbytes),
                "scan+merge fwd+bwd": (bench_ms(fwd_bwd(cross_scan, cross_merge)), 4 * nbytes),
                "scan+merge fwd+bwd reference": (bench_ms(fwd_bwd(cross_scan_reference, cross_merge_reference)),
                                                 4 * nbytes)}
            for case, (ms, n) in timings.items():
                floor = n / bw * 1e3
                rows.append(Row("scan2d", f"{name} {orders} {case}", ms, f"floor {floor:.3f} ms ({floor / ms:.0%})"))
            for op in ("cross_scan", "cross_merge", "scan+merge fwd+bwd"):
                rows.append(Row("scan2d", f"{name} {orders} {op}: reference / ours",
                                timings[f"{op} reference"][0] / timings[op][0], "speed-up (x)"))
        del x, xg, gout, ys
        torch.cuda.empty_cache()
    return rows


def wall_ms(fn, reps):
    """Mean wall-clock ms per call, synchronised: for loops of many small launches that do_bench would hide."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def lm_config(quick):
    from mlmamba import Mamba2Config
    # mamba2-2.7b: d_model 2560, 64 layers, vocab 50277 padded to 50288
    return Mamba2Config(d_model=2560, n_layer=4 if quick else 64, vocab_size=50277, pad_vocab_size_multiple=16,
                        d_state=128, headdim=64, expand=2, ngroups=1)


def hf_mamba2(config, dtype):
    """transformers' Mamba2ForCausalLM of the same shape (its pure-PyTorch path: no mamba_ssm or causal_conv1d here)."""
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM
    hf_config = HFConfig(vocab_size=config.padded_vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
                         state_size=config.d_state, expand=config.expand, head_dim=config.headdim,
                         num_heads=config.nheads, n_groups=config.ngroups, chunk_size=config.chunk_size,
                         tie_word_embeddings=True)
    with torch.device("cuda"):
        return Mamba2ForCausalLM(hf_config).to(dtype).eval()


@torch.no_grad()
def bench_lm(args, bw):
    """The Mamba-2 2.7B shape (random weights, bf16, batch 1): a 2048-token prefill and greedy decoding by `step`.
    Decode floor: every parameter read once per token."""
    from mlmamba import Mamba2LM
    config = lm_config(args.quick)
    with torch.device("cuda"):
        model = Mamba2LM(config).to(torch.bfloat16).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, 2048), device="cuda")
    prefill = bench_ms(lambda: model(ids))
    cache = model.allocate_cache(1)
    token = model(ids, cache=cache)[:, -1, :config.vocab_size].argmax(-1)
    step = wall_ms(lambda: model.step(token, cache), 100)
    floor = param_bytes / bw * 1e3
    rows = [Row("lm", f"2.7B shape ({config.n_layer} layers) prefill 2048, ms", prefill,
                f"{2048 / prefill * 1e3:,.0f} tokens/s"),
            Row("lm", "decode step (eager), ms/token", step,
                f"{1e3 / step:,.1f} tokens/s; floor {floor:.3f} ms ({floor / step:.0%})")]
    try:
        hf = hf_mamba2(config, torch.bfloat16)
    except Exception as e:
        print(f"transformers not usable ({type(e).__name__}: {e}); its decode not measured")
        return rows
    short = ids[:, :32]
    gen = lambda n: lambda: hf.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    hf_step = (wall_ms(gen(33), 2) - wall_ms(gen(1), 2)) / 32
    rows.append(Row("lm", "transformers Mamba2 decode, ms/token", hf_step, f"{1e3 / hf_step:,.1f} tokens/s"))
    rows.append(Row("lm", "decode: transformers / ours (eager)", hf_step / step, "speed-up (x)"))
    return rows


@torch.no_grad()
def bench_vision(args, bw):
    """SigLIP so400m-patch14-384 shape (random weights, bf16, batch 32): our VisionEncoder (every block + post norm)
    against transformers' SiglipVisionModel (sdpa) with the same weights, forward only."""
    import tempfile
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from checkpoints import load_vision
    batch, width, depth, heads, mlp, patch, image = 32, 1152, 27, 16, 4304, 14, 384
    if args.quick:
        batch, depth = 4, 2
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                                num_attention_heads=heads, patch_size=patch, image_size=image, vision_use_head=False)
    with torch.device("cuda"):
        hf = SiglipVisionModel(config).to(torch.bfloat16).eval()
    print(f"[vision] transformers attention: {hf.config._attn_implementation}")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_vision(folder, dtype=torch.bfloat16, device="cuda", feature_layer=None)
    n = (image // patch) ** 2
    per_block = 2 * n * width * 4 * width + 2 * 2 * n * n * width + 2 * 2 * n * width * mlp
    flops = batch * (2 * n * 3 * patch * patch * width + depth * per_block)
    pixels = torch.rand(batch, 3, image, image, device="cuda")
    err = rel_err(ours(pixels), hf((pixels - 0.5) / 0.5).last_hidden_state)
    print(f"[vision] rel. error ours vs transformers: {err:.1e}")
    rows = []
    times = {"ours": bench_ms(lambda: ours(pixels)),
             "transformers SiglipVisionModel (sdpa)": bench_ms(lambda: hf((pixels - 0.5) / 0.5))}
    for name, ms in times.items():
        rows.append(Row("vision", f"so400m b{batch} {name}, ms", ms,
                        f"{batch / ms * 1e3:,.0f} images/s, {flops / ms / 1e9:.0f} TFLOP/s"))
    rows.append(Row("vision", "transformers / ours", times["transformers SiglipVisionModel (sdpa)"] / times["ours"],
                    "speed-up (x)"))
    return rows


@torch.no_grad()
def bench_generate(args, bw):
    """Issue 7's targets: batch-1 decode at the Mamba-2 2.7B shape through generate.py's CUDA-graph decoder (floor:
    the LM's parameter bytes / copy bandwidth per token), and the time to first token of an image (so400m-shaped
    encoder, 729 visual tokens) + a 32-token prompt through MLMamba.generate."""
    from generate import CUDAGraphDecoder
    from mlmamba import ConnectorConfig, MLMamba, MLMambaConfig
    from vision import VisionConfig
    config = lm_config(args.quick)
    vision = VisionConfig(image_size=384, patch_size=14, width=1152, depth=2 if args.quick else 27, heads=16,
                          mlp_dim=4304)
    with torch.device("cuda"):
        model = MLMamba(MLMambaConfig(vision=vision, connector=ConnectorConfig(), lm=config))
    model = model.to(torch.bfloat16).eval()
    lm, vocab = model.lm, config.vocab_size
    floor = sum(p.numel() * p.element_size() for p in lm.parameters()) / bw * 1e3
    ids = torch.randint(0, vocab, (1, 32), device="cuda")

    def decode_ms(decoder, n):
        cache = decoder.allocate_cache(1)
        token = lm(ids, cache=cache)[:, -1, :vocab].argmax(-1)

        def steps():
            nonlocal token
            for _ in range(n):
                token = decoder.step(token, cache)[:, :vocab].argmax(-1)
        return wall_ms(steps, 1) / n

    eager, graph = decode_ms(lm, 32), decode_ms(CUDAGraphDecoder(lm), 256)
    rows = [Row("generate", "2.7B shape decode, eager, ms/token", eager, f"{1e3 / eager:,.1f} tokens/s"),
            Row("generate", "2.7B shape decode, CUDA graph, ms/token", graph,
                f"{1e3 / graph:,.1f} tokens/s; floor {floor:.3f} ms ({floor / graph:.0%})")]
    pixels = torch.rand(1, 3, 384, 384, device="cuda")
    decoder = CUDAGraphDecoder(lm)
    ttft = wall_ms(lambda: model.generate(ids, pixels, max_new_tokens=1, decoder=decoder), 5)
    rows.append(Row("generate", "time to first token, image + 32-token prompt, ms", ttft,
                    f"{model.num_visual_tokens + 32} prompt positions"))
    return rows


def bench_train_step(args, bw):
    """One optimizer step of the full model at a small real size: the 130M LM shape (d_model 768, 24 layers), a
    SigLIP-base-shaped encoder (224 px, patch 16: 196 visual tokens), the cross connector; batch 8, 128 text
    tokens, bf16 autocast, everything trained. Random weights."""
    from mlmamba import ConnectorConfig, Mamba2Config, MLMamba, MLMambaConfig
    from vision import VisionConfig
    lm = Mamba2Config(d_model=768, n_layer=2 if args.quick else 24, vocab_size=50277, pad_vocab_size_multiple=16)
    vision = VisionConfig(image_size=224, patch_size=16, width=768, depth=2 if args.quick else 12, heads=12,
                          mlp_dim=3072)
    with torch.device("cuda"):
        model = MLMamba(MLMambaConfig(vision=vision, connector=ConnectorConfig(), lm=lm))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, lm.vocab_size, (8, 128), device="cuda")
    pixels = torch.rand(8, 3, 224, 224, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, pixel_values=pixels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ms = wall_ms(step, 10)
    tokens = 8 * (model.num_visual_tokens + 128)
    return [Row("train", "130M LM + SigLIP-base + cross connector, batch 8 step, ms", ms,
                f"{tokens / ms * 1e3:,.0f} tokens/s")]


def profile_ssd(args, bw):
    """Per-kernel CUDA times of one ssd_scan forward + backward at the 2.7B layer shape (torch.profiler)."""
    inp = ssd_inputs(4, 2048, 80, 64, 128)
    leaves = [inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
    gy = torch.randn_like(inp["x"])
    step = lambda: torch.autograd.grad(ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"],
                                                dt_bias=inp["dt_bias"], dt_softplus=True), leaves, gy)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))

    # the state passing kernel alone, at a few tile sizes: one read and one write of the (4, 8, 80, 64, 128) states
    from ssd_kernel import _state_passing_kernel
    states = torch.randn(4, 8, 80, 64 * 128, device="cuda")
    a_cumsum_end = -torch.rand(4, 80, 8, device="cuda")
    final = torch.empty(4, 80, 64 * 128, device="cuda")
    rows = []
    for block, warps in ((256, 2), (512, 4), (1024, 4), (1024, 8), (2048, 8)):
        run = lambda: _state_passing_kernel[(triton.cdiv(64 * 128, block), 4, 80)](
            states, a_cumsum_end, final, final, states, final, 8, 64 * 128, *states.stride()[:3],
            *a_cumsum_end.stride(), final.stride(0), final.stride(1), HAS_INITIAL_STATE=False, REVERSE=False,
            BLOCK=block, num_warps=warps)
        ms = bench_ms(run)
        floor = 2 * states.numel() * 4 / bw * 1e3
        rows.append(Row("profile", f"state passing BLOCK {block} warps {warps}", ms, f"floor {floor:.3f} ({floor / ms:.0%})"))
    return rows


SECTIONS = {"ssd": bench_ssd, "scan2d": bench_scan2d, "lm": bench_lm, "vision": bench_vision,
            "generate": bench_generate, "train": bench_train_step, "profile_ssd": profile_ssd}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ssd,scan2d,vision,lm,generate,train", help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test, not a measurement")
    ap.add_argument("--json", default="bench.json", help="where to write the rows")
    ap.add_argument("--peers", default=".peers", help="folder with peers' source trees (mamba_ssm/) to measure against")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py measures GPU speed; no CUDA device is visible")
    bw = copy_bandwidth()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d"), copy_GBps=round(bw / 1e9))
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    rows = []
    for name in args.only.split(","):
        rows += SECTIONS[name](args, bw)
    print(f"\n{'section':8} {'case':58} {'value':>10}  note")
    for r in rows:
        print(f"{r.section:8} {r.case:58} {r.ms:10.3f}  {r.note}")
    with open(args.json, "w") as f:
        json.dump({"env": env, "rows": [r.__dict__ for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
