"""Speed on a GPU, measured side by side: our kernels against the peers present in the same run and the hardware floor.

    python bench.py                 # every section
    python bench.py --only ssd      # one section (ssd)
    python bench.py --only train    # training: the LM step against mamba_ssm's, the paper-scale stage-2 step
    python bench.py --quick         # smaller shapes, for a smoke test

Prints one table of times and ratios and writes it as JSON (--json). Timings are medians of triton's do_bench (CUDA
events, warm-up first), or for decoding and training steps mean synchronised wall times; floors are bytes that must
move / measured device-to-device copy bandwidth.
Record each run in BENCHMARKS.md with the device, versions, date and this command.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def _register_peer(peers):
    """`mamba_ssm` as a bare package over `peers`/mamba_ssm: its submodules import from that source tree, and its
    __init__.py, which imports the CUDA extensions, never runs."""
    if peers and os.path.isdir(os.path.join(peers, "mamba_ssm")) and "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [os.path.join(os.path.abspath(peers), "mamba_ssm")]
        sys.modules["mamba_ssm"] = package


def official_scan(peers):
    """mamba_ssm's Triton path (mamba_chunk_scan_combined), imported from its source tree without building its CUDA
    extensions: `peers` is a folder holding the `mamba_ssm` package (e.g. unpacked from its PyPI sdist)."""
    _register_peer(peers)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined
    except Exception as e:                       # not there: report, don't fail
        print(f"mamba_ssm not importable ({type(e).__name__}: {e}); official kernels not measured")
        return None


@contextlib.contextmanager
def _replaced(namespace, replacements):
    """Entries of a dict (sys.modules, or a module's globals via vars(module)) replaced while the body runs, the
    previous ones put back after, absent ones removed again. In sys.modules a module object stands in for an absent
    one, and None makes `import name` fail with ImportError."""
    missing = object()
    saved = {name: namespace.get(name, missing) for name in replacements}
    namespace.update(replacements)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = value


def official_lm(peers):
    """mamba_ssm's language model (MambaLMHeadModel, MambaConfig) from the same source tree, without its CUDA
    extensions: with ssm_cfg {"layer": "Mamba2", "use_mem_eff_path": False} every kernel it runs is Triton (the SSD
    scan, the gated RMSNorm, the fused add + RMSNorm of ops/triton/layer_norm.py) or PyTorch (nn.Conv1d, the linears).

    models/mixer_seq_simple.py imports modules/mamba_simple.py (Mamba-1) -> ops/selective_scan_interface.py, which
    imports the CUDA extension `selective_scan_cuda` unconditionally; only Mamba-1's selective scan calls it, so an
    empty module stands in for it. causal_conv1d (a CUDA extension, optional there) is kept out even where it is
    installed, so that Mamba2 convolves with nn.Conv1d as in a source install without extensions. transformers
    (utils/generation.py, utils/hf.py) and huggingface_hub (modules/mamba2.py) are imported for real.
    Returns (MambaLMHeadModel, MambaConfig), or None when not importable."""
    _register_peer(peers)
    blocked = {"selective_scan_cuda": types.ModuleType("selective_scan_cuda"), "causal_conv1d": None,
               "causal_conv1d.cpp_functions": None, "causal_conv1d.causal_conv1d_varlen": None}
    try:
        with _replaced(sys.modules, blocked):
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        return MambaLMHeadModel, MambaConfig
    except Exception as e:                       # not there: report, don't fail
        print(f"mamba_ssm's MambaLMHeadModel not importable ({type(e).__name__}: {e}); its LM not measured")
        return None


def ssd_shapes(quick):
    """(batch, seqlen, nheads, headdim, dstate) of the SSD sections: two Mamba-2 layers and a long sequence."""
    if quick:
        return {"small": (2, 512, 8, 64, 128)}
    return {"2.7B layer": (4, 2048, 80, 64, 128), "130M layer": (8, 2048, 24, 64, 128),
            "seqlen 8192": (1, 8192, 80, 64, 128)}


def bench_ssd(args, bw):
    rows = []
    shapes = ssd_shapes(args.quick)
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


def _autocast(fn):
    """fn under bf16 autocast, as the model runs in training."""
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()
    return run


def bench_mixer(args, bw):
    """mixer_kernel.py's training kernels, forward and forward + backward, against their PyTorch references at the
    130M layer's training shape (batch 8 x 2048, d_model 768, d_inner 1536, conv_dim 1792): bf16 activations, float32
    weights, as under autocast; the RMSNorm reads the float32 residual stream. Floor: each input read once and each
    output written once (backward: also dout read, the input gradients written)."""
    from mixer_kernel import (causal_conv1d, causal_conv1d_reference, gated_rms_norm, gated_rms_norm_reference,
                              rms_norm, rms_norm_reference)
    batch, seqlen = (2, 512) if args.quick else (8, 2048)
    d_model, d_inner, conv_dim = 768, 1536, 1792
    bf16, dev = torch.bfloat16, "cuda"
    proj = torch.randn(batch, seqlen, d_inner + conv_dim + 24, device=dev, dtype=bf16, requires_grad=True)
    conv_w = torch.randn(conv_dim, 1, 4, device=dev, requires_grad=True)
    conv_b = torch.randn(conv_dim, device=dev, requires_grad=True)
    y = torch.randn(batch, seqlen, d_inner, device=dev, dtype=bf16, requires_grad=True)
    h = torch.randn(batch, seqlen, d_model, device=dev, requires_grad=True)
    w_inner, w_model = (torch.rand(n, device=dev, requires_grad=True) for n in (d_inner, d_model))
    xBC, z = proj[..., d_inner:d_inner + conv_dim], proj[..., :d_inner]
    n_conv, n_gate, n_norm = batch * seqlen * conv_dim * 2, batch * seqlen * d_inner * 2, batch * seqlen * d_model * 4
    cases = {   # name: (ours, reference, leaves, forward bytes, backward bytes)
        "causal_conv1d": (lambda: causal_conv1d(xBC, conv_w, conv_b),
                          lambda: causal_conv1d_reference(xBC, conv_w, conv_b), (proj, conv_w, conv_b),
                          2 * n_conv, 3 * n_conv),
        "gated_rms_norm": (lambda: gated_rms_norm(y, z, w_inner, d_inner, 1e-5),
                           lambda: gated_rms_norm_reference(y, z, w_inner, d_inner, 1e-5), (y, proj, w_inner),
                           3 * n_gate, 5 * n_gate),
        "rms_norm": (lambda: rms_norm(h, w_model, 1e-5), lambda: rms_norm_reference(h, w_model, 1e-5), (h, w_model),
                     2 * n_norm, 3 * n_norm)}
    rows = []
    for name, (ours, ref, leaves, fwd_bytes, bwd_bytes) in cases.items():
        ours, ref = _autocast(ours), _autocast(ref)
        g = torch.randn_like(ref())
        grads = [torch.autograd.grad(f(), leaves, g) for f in (ours, ref)]
        errs = [rel_err(a, b) for a, b in zip(*grads)]
        print(f"[mixer {name}] rel. error vs reference: out {rel_err(ours(), ref()):.1e}, grads "
              + ", ".join(f"{e:.1e}" for e in errs))
        timings = {"ours fwd": (bench_ms(ours), fwd_bytes), "reference fwd": (bench_ms(ref), fwd_bytes)}
        for who, f in (("ours", ours), ("reference", ref)):
            timings[f"{who} fwd+bwd"] = (bench_ms(lambda: torch.autograd.grad(f(), leaves, g)), fwd_bytes + bwd_bytes)
        for case, (ms, nbytes) in timings.items():
            floor = nbytes / bw * 1e3
            rows.append(Row("mixer", f"{name} {case}", ms, f"floor {floor:.3f} ms ({floor / ms:.0%})"))
        for kind in ("fwd", "fwd+bwd"):
            rows.append(Row("mixer", f"{name} {kind}: reference / ours",
                            timings[f"reference {kind}"][0] / timings[f"ours {kind}"][0], "speed-up (x)"))
    return rows


def wall_ms(fn, reps):
    """Mean wall-clock ms per call, synchronised, after one call to warm up: for loops of many small launches that
    do_bench would hide. reps=0: the time of that first call alone."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if not reps:
        return (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def profiled(fn, n, cpu=False):
    """torch.profiler's per-op averages over n calls of fn (after the caller's warm-up), and the GPU's busy ms per
    call: the sum of the kernels' own times, which against the wall time shows how long the GPU waited for the host."""
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if cpu else [])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return events, busy / n / 1e3


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


def generate_model(quick):
    """The generate section's model: an so400m-shaped encoder at 384 px (729 visual tokens), the cross connector,
    the Mamba-2 2.7B shape; random weights, bf16."""
    from mlmamba import ConnectorConfig, MLMamba, MLMambaConfig
    from vision import VisionConfig
    vision = VisionConfig(image_size=384, patch_size=14, width=1152, depth=2 if quick else 27, heads=16, mlp_dim=4304)
    with torch.device("cuda"):
        model = MLMamba(MLMambaConfig(vision=vision, connector=ConnectorConfig(), lm=lm_config(quick)))
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def bench_generate(args, bw):
    """Issue 7's targets: batch-1 decode at the Mamba-2 2.7B shape through generate.py's CUDA-graph decoder (floor:
    the LM's parameter bytes / copy bandwidth per token), and the time to first token of an image (so400m-shaped
    encoder, 729 visual tokens) + a 32-token prompt through MLMamba.generate."""
    from generate import CUDAGraphDecoder, CUDAGraphed
    model = generate_model(args.quick)
    lm, vocab = model.lm, model.config.lm.vocab_size
    floor = sum(p.numel() * p.element_size() for p in lm.parameters()) / bw * 1e3
    ids = torch.randint(0, vocab, (1, 32), device="cuda")

    def decode_ms(decoder, n, batch=1):
        cache = decoder.allocate_cache(batch)
        token = lm(ids.expand(batch, -1), cache=cache)[:, -1, :vocab].argmax(-1)

        def steps():
            nonlocal token
            for _ in range(n):
                token = decoder.step(token, cache)[:, :vocab].argmax(-1)
        return wall_ms(steps, 1) / n

    eager, graph = decode_ms(lm, 32), decode_ms(CUDAGraphDecoder(lm), 256)
    rows = [Row("generate", "2.7B shape decode, eager, ms/token", eager, f"{1e3 / eager:,.1f} tokens/s"),
            Row("generate", "2.7B shape decode, CUDA graph, ms/token", graph,
                f"{1e3 / graph:,.1f} tokens/s; floor {floor:.3f} ms ({floor / graph:.0%})")]
    batch8 = decode_ms(CUDAGraphDecoder(lm), 128, batch=8)
    rows.append(Row("generate", "2.7B shape decode, CUDA graph, batch 8, ms/step", batch8,
                    f"{8e3 / batch8:,.1f} tokens/s; floor {floor:.3f} ms ({floor / batch8:.0%})"))
    pixels = torch.rand(1, 3, 384, 384, device="cuda")
    eager_ttft = wall_ms(lambda: model.generate(ids, pixels, max_new_tokens=1), 3)
    # generate.py's way: the vision tower, the prefill and the step replayed from CUDA graphs, captured on first use
    decoder, encoder = CUDAGraphDecoder(lm), CUDAGraphed(model.encode_images)
    first = wall_ms(lambda: model.generate(ids, pixels, max_new_tokens=1, decoder=decoder, encode_images=encoder), 0)
    ttft = wall_ms(lambda: model.generate(ids, pixels, max_new_tokens=1, decoder=decoder, encode_images=encoder), 5)
    positions = f"{model.num_visual_tokens + 32} prompt positions"
    rows += [Row("generate", "time to first token, image + 32-token prompt, eager, ms", eager_ttft, positions),
             Row("generate", "time to first token, CUDA graphs, ms", ttft, positions),
             Row("generate", "  the first call, capturing the graphs, ms", first, "")]
    # where the first token's time goes: the vision tower and connector, the LM's prefill into the cache
    tokens = wall_ms(lambda: encoder(pixels), 5)
    embeds = model.embed(ids, pixels)[0]
    lengths = torch.tensor([embeds.shape[1]], device="cuda")
    cache = decoder.allocate_cache(1)
    prefill = wall_ms(lambda: decoder.prefill(embeds, lengths, cache), 5)
    for part, ms in (("vision tower + connector", tokens), ("LM prefill", prefill),
                     ("the rest (embedding, batching, first sampling)", ttft - tokens - prefill)):
        rows.append(Row("generate", f"  of which {part}, ms", ms, ""))
    return rows


@torch.no_grad()
def profile_decode(args, bw):
    """Per-kernel CUDA times of the CUDA-graph decode step at the Mamba-2 2.7B shape, batch 1 (torch.profiler over
    replays): where the time above the memory floor goes."""
    from generate import CUDAGraphDecoder
    from mlmamba import Mamba2LM
    config = lm_config(args.quick)
    with torch.device("cuda"):
        lm = Mamba2LM(config).to(torch.bfloat16).eval()
    decoder = CUDAGraphDecoder(lm)
    cache = decoder.allocate_cache(1)
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(10):
        decoder.step(token, cache)
    n = 20
    events, busy = profiled(lambda: decoder.step(token, cache), n)
    print(f"[profile_decode] 2.7B shape ({config.n_layer} layers), batch 1, {n} replays")
    print(events.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    ms = wall_ms(lambda: decoder.step(token, cache), 100)
    return [Row("profile", "decode step (CUDA graph), wall ms", ms,
                f"GPU busy {busy:.3f} ms per step ({busy / ms:.0%})")]


@torch.no_grad()
def sweep_decode(args, bw):
    """Variants of the decoding kernels' tiles, one constant at a time, each timed as the whole batch-1 step through
    a freshly captured CUDA graph at the 2.7B shape: a sweep for mixer_kernel's _IN_PROJ_TILE and _OUT_PROJ_TILE
    (BLOCK_N, BLOCK_K, stages, warps) and ssd_kernel's _STEP_TILE, then each constant's winner together. A variant
    that fails is reported and skipped."""
    import mixer_kernel
    import ssd_kernel
    from generate import CUDAGraphDecoder
    from mlmamba import Mamba2LM
    with torch.device("cuda"):
        lm = Mamba2LM(lm_config(args.quick)).to(torch.bfloat16).eval()
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    today = {name: (module, vars(module)[name]) for module, name in
             ((ssd_kernel, "_STEP_TILE"), (mixer_kernel, "_IN_PROJ_TILE"), (mixer_kernel, "_OUT_PROJ_TILE"))}
    candidates = {"_STEP_TILE": (512, 1024, 2048),
                  "_OUT_PROJ_TILE": ((8, 512, 1, 8), (4, 512, 1, 4), (16, 512, 2, 8), (8, 1024, 2, 8), (32, 256, 1, 8)),
                  "_IN_PROJ_TILE": ((32, 256, 3, 8), (16, 512, 2, 4), (8, 256, 3, 4), (8, 512, 1, 4))}

    def step_ms(values):
        """ms per token with these constants in place of today's."""
        with contextlib.ExitStack() as stack:
            for name, value in values.items():
                stack.enter_context(_replaced(vars(today[name][0]), {name: value}))
            decoder = CUDAGraphDecoder(lm)
            cache = decoder.allocate_cache(1)
            for _ in range(3):
                decoder.step(token, cache)
            return wall_ms(lambda: decoder.step(token, cache), 200)

    base = step_ms({})
    rows = [Row("sweep", "decode step, today's tiles", base, "ms per token, batch 1, CUDA graph")]
    winners = {}
    for name, values in candidates.items():
        best = (base, today[name][1])
        for value in values:
            try:
                ms = step_ms({name: value})
            except Exception as e:                  # e.g. a tile that does not fit: the other variants still run
                print(f"[sweep_decode] {name} = {value}: {type(e).__name__}: {e}")
                continue
            rows.append(Row("sweep", f"decode step, {name} = {value}", ms, "ms per token"))
            best = min(best, (ms, value))
        if best[1] != today[name][1]:
            winners[name] = best[1]
    if winners:
        rows.append(Row("sweep", f"decode step, the winners together: {winners}", step_ms(winners), "ms per token"))
    return rows


def sweep_ssd(args, bw):
    """ssd_scan forward and forward + backward at bench_ssd's shapes under each row tile (ssd_kernel._BLOCK_M, shared
    by the forward and backward kernels; warps and stages are tuned per tile): a sweep for _BLOCK_M."""
    import ssd_kernel
    rows = []
    for block_m in (32, 64):
        with _replaced(vars(ssd_kernel), {"_BLOCK_M": block_m}):
            for name, shape in ssd_shapes(args.quick).items():
                inp = ssd_inputs(*shape)
                leaves = [inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]
                fwd = lambda: ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=256, D=inp["D"],
                                       dt_bias=inp["dt_bias"], dt_softplus=True)
                gy = torch.randn_like(inp["x"])
                rows.append(Row("sweep", f"ssd {name} fwd, BLOCK_M {block_m}", bench_ms(fwd), "ms"))
                rows.append(Row("sweep", f"ssd {name} fwd+bwd, BLOCK_M {block_m}",
                                bench_ms(lambda: torch.autograd.grad(fwd(), leaves, gy)), "ms"))
    return rows


def sweep_conv(args, bw):
    """causal_conv1d forward and backward at the paper step's LM shape (16 x 985 tokens, conv_dim 5376 sliced from
    in_proj's 10576 channels, bf16, float32 weights) under each tile (mixer_kernel's _CONV_BLOCK_L, _CONV_BLOCK_C,
    shared by the forward and the two backward kernels), against the floor of their bytes: a sweep for the tile."""
    import mixer_kernel
    batch, seqlen = (2, 128) if args.quick else (16, 985)
    d_inner, conv_dim = 5120, 5376
    proj = torch.randn(batch, seqlen, d_inner + conv_dim + 80, device="cuda", dtype=torch.bfloat16,
                       requires_grad=True)
    weight = torch.randn(conv_dim, 1, 4, device="cuda", requires_grad=True)
    bias = torch.randn(conv_dim, device="cuda", requires_grad=True)
    xBC = proj[..., d_inner:d_inner + conv_dim]
    grad = torch.randn(batch, seqlen, conv_dim, device="cuda", dtype=torch.bfloat16)
    n = batch * seqlen * conv_dim * 2                    # bytes of one bf16 activation
    rows = []
    for tile in ((32, 128), (16, 128), (64, 64), (32, 64), (16, 256), (64, 128), (8, 256)):
        with _replaced(vars(mixer_kernel), {"_CONV_BLOCK_L": tile[0], "_CONV_BLOCK_C": tile[1]}):
            fwd = lambda: mixer_kernel.causal_conv1d(xBC, weight, bias)
            for case, fn, nbytes in (("fwd", fwd, 2 * n),
                                     ("fwd+bwd", lambda: torch.autograd.grad(fwd(), (proj, weight, bias), grad),
                                      2 * n + 6 * n)):   # backward: x and dout read, dpre written, dpre and x read,
                                                         # dx written
                ms = bench_ms(fn)
                floor = nbytes / bw * 1e3
                rows.append(Row("sweep", f"causal_conv1d {case}, tile {tile}", ms,
                                f"floor {floor:.3f} ms ({floor / ms:.0%})"))
    return rows


@torch.no_grad()
def profile_prefill(args, bw):
    """Where the first token's time goes, part by part (vision tower, connector, the LM's prefill of 761 positions
    into a cache): wall time against GPU busy time (torch.profiler), and each part's largest kernels and host ops."""
    model = generate_model(args.quick)
    ids = torch.randint(0, model.config.lm.vocab_size, (1, 32), device="cuda")
    pixels = torch.rand(1, 3, 384, 384, device="cuda")
    embeds = model.embed(ids, pixels)[0]
    cache = model.lm.allocate_cache(1)
    parts = {"vision tower": lambda: model.vision(pixels),
             "vision tower + connector": lambda: model.encode_images(pixels),
             "LM prefill": lambda: model.lm(inputs_embeds=embeds, cache=cache)}
    rows, n = [], 3
    for name, fn in parts.items():
        fn()
        events, busy = profiled(fn, n, cpu=True)
        print(f"[profile_prefill] {name}, {n} calls")
        print(events.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        ms = wall_ms(fn, 5)
        rows.append(Row("profile", f"{name}, wall ms", ms, f"GPU busy {busy:.2f} ms ({busy / ms:.0%})"))
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


# The LM training targets' shapes: (d_model, n_layer, batch, seqlen). --quick keeps the widths, 2 layers, short rows.
TRAIN_LM_SHAPES = {"130M": (768, 24, 8, 2048), "2.7B": (2560, 64, 2, 2048)}
TRAIN_LM_QUICK = {"130M": (768, 2, 2, 512), "2.7B": (2560, 2, 1, 512)}
def train_lm_config(d_model, n_layer):
    from mlmamba import Mamba2Config
    return Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=50277, pad_vocab_size_multiple=16)


def mamba_ssm_config(MambaConfig, config):
    """mamba_ssm's MambaConfig with our Mamba2Config's sizes, the public mamba2 checkpoints' settings (RMSNorm,
    fused add + norm, float32 residual) and its Triton path (use_mem_eff_path=False: no causal_conv1d needed)."""
    c = config
    ssm = dict(layer="Mamba2", use_mem_eff_path=False, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand,
               headdim=c.headdim, ngroups=c.ngroups, chunk_size=c.chunk_size, bias=c.bias, conv_bias=c.conv_bias)
    return MambaConfig(d_model=c.d_model, n_layer=c.n_layer, vocab_size=c.vocab_size, ssm_cfg=ssm, rms_norm=True,
                       fused_add_norm=True, residual_in_fp32=c.residual_in_fp32,
                       pad_vocab_size_multiple=c.pad_vocab_size_multiple, tie_embeddings=c.tie_embeddings)


def ours_loss(model, ids, labels):
    """Mean cross-entropy of our Mamba2LM through linear_cross_entropy, which never holds the logits (as
    MLMamba.forward's loss); it returns the sum, so the mean divides by the number of tokens."""
    from mlmamba import linear_cross_entropy
    return linear_cross_entropy(model.hidden_states(ids).flatten(0, 1), model._head, labels.flatten()) / labels.numel()


def mamba_ssm_loss(model, ids, labels):
    """Mean cross-entropy over mamba_ssm's logits, as its users train it."""
    return F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())


def lm_train_step(model, loss_fn, ids, labels):
    """One LM training step without the optimizer: gradients dropped, forward and loss under bf16 autocast (float32
    weights), backward. The step returns the loss."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids, labels)
        loss.backward()
        return loss.detach()
    return step


def measure_train_step(step, reps):
    """(the first call's loss, mean wall ms per call over reps, peak GiB allocated during the second call).

    The first call autotunes the Triton kernels (and creates any optimizer state), so the peak is a steady step's. It
    counts everything allocated: weights, gradients, optimizer state, activations. Wall time, synchronised: a step is
    hundreds of kernels and do_bench's few repetitions at this length would add nothing but its cache flush."""
    loss = float(step())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    return loss, wall_ms(step, reps), peak


def release_memory():
    """Every unreferenced tensor freed (modules with gradient checkpointing hold reference cycles) and the allocator's
    cache emptied: the next measurement's peak is its own."""
    gc.collect()
    torch.cuda.empty_cache()


def measure_lm(build, loss_fn, ids, labels, reps):
    """(loss, ms, peak GiB, parameters) of one LM's training step; the model lives only inside this call."""
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    try:
        return (*measure_train_step(lm_train_step(model, loss_fn, ids, labels), reps), n_params)
    finally:
        del model
        release_memory()


def bench_train_lm(args, bw):
    """The LM's training step (forward, cross-entropy over the vocabulary, backward; no optimizer) against mamba_ssm
    2.3.2's MambaLMHeadModel of the same sizes (Mamba2 layers, its Triton path from source, use_mem_eff_path=False,
    no CUDA extensions: see `official_lm`), at the 130M (768 x 24 layers, batch 8 x 2048) and 2.7B (2560 x 64
    layers, batch 2 x 2048) shapes; random float32 weights, bf16 autocast. Ours takes its fastest loss path
    (`ours_loss`), mamba_ssm's is cross-entropy over its logits. Each model is built and measured alone, the other
    freed, so each peak is its own. Targets: mamba_ssm / ours >= 1.3 in time, ours <= mamba_ssm in peak memory."""
    from mlmamba import Mamba2LM
    official = official_lm(args.peers)
    reps = 3 if args.quick else 10
    rows = []
    for name, (d_model, n_layer, batch, seqlen) in (TRAIN_LM_QUICK if args.quick else TRAIN_LM_SHAPES).items():
        config = train_lm_config(d_model, n_layer)
        shape = f"{name} {n_layer}L b{batch}x{seqlen}"
        ids = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")
        labels = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")

        def ours():
            with torch.device("cuda"):
                return Mamba2LM(config)
        results = {"ours": measure_lm(ours, ours_loss, ids, labels, reps)}
        if official is not None:
            MambaLMHeadModel, MambaConfig = official
            try:
                results["mamba_ssm"] = measure_lm(
                    lambda: MambaLMHeadModel(mamba_ssm_config(MambaConfig, config), device="cuda"), mamba_ssm_loss,
                    ids, labels, reps)
            except Exception as e:                       # report, keep the other rows
                print(f"[train {shape}] mamba_ssm's step failed ({type(e).__name__}: {e}); its rows are left out")
            release_memory()
        losses = ", ".join(f"{who} {r[0]:.3f}" for who, r in results.items())
        print(f"[train {shape}] first-step loss (random weights, about ln(padded vocab) = "
              f"{math.log(config.padded_vocab_size):.2f}): {losses}")
        tokens = batch * seqlen
        for who, (loss, ms, peak, n_params) in results.items():
            rows.append(Row("train", f"LM {shape} fwd+bwd {who}, ms", ms, f"{tokens / ms * 1e3:,.0f} tokens/s"))
            rows.append(Row("train", f"LM {shape} fwd+bwd {who}, peak GiB", peak,
                            f"{n_params / 1e6:,.1f}M parameters"))
        if "mamba_ssm" in results:
            (_, our_ms, our_peak, _), (_, off_ms, off_peak, _) = results["ours"], results["mamba_ssm"]
            rows.append(Row("train", f"LM {shape}: mamba_ssm / ours", off_ms / our_ms, "speed-up (x); target >= 1.3"))
            rows.append(Row("train", f"LM {shape} peak: ours / mamba_ssm", our_peak / off_peak,
                            "memory ratio; target <= 1"))
        del ids, labels
    return rows


# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(); the first match counts
PEAK_BF16_DENSE = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))


def peak_bf16_flops(device_name):
    """The GPU's dense bf16 peak in FLOP/s, None when it is not in PEAK_BF16_DENSE."""
    return next((flops for key, flops in PEAK_BF16_DENSE if key in device_name), None)


def paper_config(quick):
    """ML-Mamba stage 2 as released (checkpoints.RELEASE_VISION's "dinosiglip-vit-so-384px"): DINOv2 ViT-L/14 with 4
    registers and SigLIP so400m/14 fused at 384 px (a 27 x 27 grid: 729 visual tokens, features of each tower's
    second-to-last block), the default connector (MSC), Mamba-2 2.7B. --quick: the same layout, tiny widths, 2
    layers."""
    from mlmamba import ConnectorConfig, Mamba2Config, MLMambaConfig
    from vision import IMAGENET_MEAN, IMAGENET_STD, VisionConfig
    if quick:
        dino, siglip = dict(width=128, depth=2, heads=2, mlp_dim=512), dict(width=128, depth=2, heads=2, mlp_dim=512)
        lm = Mamba2Config(d_model=256, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=16)
    else:   # the timm architectures vit_large_patch14_reg4_dinov2 and vit_so400m_patch14_siglip_384
        dino, siglip = dict(width=1024, depth=24, heads=16, mlp_dim=4096), dict(width=1152, depth=27, heads=16,
                                                                                mlp_dim=4304)
        lm = lm_config(False)
    towers = [VisionConfig(arch="dinov2", image_size=384, patch_size=14, registers=4, pos_antialias=True,
                           image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **dino),
              VisionConfig(arch="siglip", image_size=384, patch_size=14, pos_antialias=True, **siglip)]
    return MLMambaConfig(vision=towers, connector=ConnectorConfig(), lm=lm)


# The paper row's LM blocks not checkpointed (train.py --keep_blocks): as many as keep batch 16 under 70 GiB. On an
# H100 a kept block cost 0.85 GiB (2026-12-07: 56.6 GiB with none kept, 70.3 with 16); 14 took 68.5 GiB (2026-12-08),
# so 15 should take 69.4, not yet measured.
PAPER_KEEP_BLOCKS = 15


def paper_keep_blocks(quick):
    """--quick's LM has 2 blocks: one of each kind."""
    return 1 if quick else PAPER_KEEP_BLOCKS


def paper_phases(args, batch, text):
    """Build the paper-scale model as train.py's `--recipe paper --stage 2 --keep_blocks` (`paper_keep_blocks`) does
    (float32 weights, vision frozen, connector + LM trained, gradient checkpointing but for the last LM blocks, its
    fused AdamW with decay groups), with random weights, images and text, every text token supervised. Returns the
    three phases of its optimizer step, in order: forward with the loss (bf16 autocast), backward, update (gradient
    clipping, AdamW, zero_grad); then the loss of the last forward (a dict), the parameter counts (trained, frozen,
    and those of the kept LM blocks), and the visual tokens per image."""
    from mlmamba import MLMamba
    from train import RECIPES, STAGES, make_optimizer
    recipe = types.SimpleNamespace(**{**RECIPES["paper"]["common"], **RECIPES["paper"]["2"]})
    with torch.device("cuda"):
        model = MLMamba(paper_config(args.quick))
    for name in ("vision", "connector", "lm"):
        getattr(model, name).requires_grad_(name in STAGES["2"])
    model.set_gradient_checkpointing(recipe.grad_checkpointing, paper_keep_blocks(args.quick))
    model.train()
    optimizer = make_optimizer(model, recipe, torch.device("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    trained, frozen = sum(p.numel() for p in params), sum(p.numel() for p in model.vision.parameters())
    kept = sum(p.numel() for block in model.lm.layers[len(model.lm.layers) - paper_keep_blocks(args.quick):]
               for p in block.parameters())
    ids = torch.randint(0, model.config.lm.vocab_size, (batch, text), device="cuda")
    pixels = torch.rand(batch, 3, model.image_size, model.image_size, device="cuda")
    out = {}

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out["loss"] = model(ids, labels=ids, pixel_values=pixels).loss

    def backward():
        out["loss"].backward()
        out["loss"] = out["loss"].detach()                     # no graph kept into the next step

    def update():
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (forward, backward, update), out, (trained, frozen, kept), model.num_visual_tokens


def paper_step_stats(args, batch, text, reps):
    """The paper-scale optimizer step (`paper_phases`): (loss, ms, peak GiB, parameter counts, visual tokens)."""
    phases, out, counts, V = paper_phases(args, batch, text)

    def step():
        for phase in phases:
            phase()
        return out["loss"].detach()
    return (*measure_train_step(step, reps), counts, V)


def bench_train_paper(args, bw):
    """ML-Mamba's paper-scale stage-2 step (see `paper_config`, `paper_step_stats`) at batch 16 x (729 + 256)
    tokens: time per step, tokens/s, TFLOP/s counted as 8 x trained parameters x tokens (forward 2, backward 4, the
    checkpointed forward again 2) + 2 x frozen parameters x visual tokens (every vision parameter, though the last
    block of each tower, past the feature layer, does not run), its fraction of the GPU's dense bf16 peak by that
    count (issue 14's) and by the work done (the kept LM blocks' forward is not recomputed: 6 x their parameters), and
    the peak memory (target <= 70 GiB at batch 16)."""
    batch, text = (2, 32) if args.quick else (16, 256)
    try:
        stats = paper_step_stats(args, batch, text, 2 if args.quick else 5)
    except torch.cuda.OutOfMemoryError as e:
        print(f"[train paper] out of memory at batch {batch}: {str(e).splitlines()[0]}")
        stats = None
    release_memory()                                    # the model and its optimizer, reference cycles included
    if stats is None:
        return [Row("train", f"paper stage 2 b{batch}: out of memory", float("nan"), "target <= 70 GiB")]
    loss, ms, peak, (trained, frozen, kept), V = stats
    shape = f"paper stage 2 b{batch}x({V}+{text})"
    print(f"[train paper] first-step loss {loss:.3f}; trained (connector + LM) {trained / 1e9:.3f}B parameters, "
          f"frozen (vision) {frozen / 1e9:.3f}B")
    tokens = batch * (V + text)
    counted = 8 * trained * tokens + 2 * frozen * batch * V          # issue 14's count: every LM block recomputed
    done = counted - 2 * kept * tokens                                # the kept blocks run their forward once
    tflops = counted / (ms * 1e-3) / 1e12
    device = torch.cuda.get_device_name()
    peak_flops = peak_bf16_flops(device)
    fraction, fraction_done = (float("nan") if peak_flops is None else flops / (ms * 1e-3) / peak_flops
                               for flops in (counted, done))
    unknown = "unknown: device not in PEAK_BF16_DENSE"
    peak_note = lambda f: unknown if peak_flops is None else f"{f:.1%} of {device}'s {peak_flops / 1e12:.0f} TFLOP/s"
    keep = paper_keep_blocks(args.quick)
    return [Row("train", f"{shape} step, ms", ms, f"{tokens / ms * 1e3:,.0f} tokens/s; the last {keep} LM blocks "
                                                 f"not checkpointed"),
            Row("train", f"{shape} tokens/s", tokens / ms * 1e3, f"{tokens} tokens per step"),
            Row("train", f"{shape} TFLOP/s", tflops, f"8 x {trained / 1e9:.2f}B x {tokens} tokens + 2 x "
                                                        f"{frozen / 1e9:.2f}B x {batch * V} visual tokens"),
            Row("train", f"{shape} fraction of bf16 dense peak", fraction, peak_note(fraction)),
            Row("train", f"{shape} fraction of bf16 dense peak, work done", fraction_done,
                f"{peak_note(fraction_done)}; the {keep} kept blocks' {kept / 1e9:.2f}B parameters counted 6 x"),
            Row("train", f"{shape} peak GiB", peak, "target <= 70 GiB at batch 16")]


def bench_train(args, bw):
    """The train section: the LM step against mamba_ssm, the paper-scale stage-2 step, the small full-model step;
    each alone in memory. A part that fails is reported (traceback, and a row saying so) and the others still run."""
    rows = []
    for part in (bench_train_lm, bench_train_paper, bench_train_step):
        try:
            rows += part(args, bw)
        except Exception as e:
            traceback.print_exc()
            rows.append(Row("train", f"{part.__name__} failed", float("nan"), f"{type(e).__name__}: {e}"[:200]))
        release_memory()
    return rows


def profile_train(args, bw):
    """Per-kernel CUDA times of our LM's training step (forward, loss, backward) at the 130M shape (torch.profiler):
    where the time of the train section's LM row goes; the GPU's busy time against the wall time shows launch gaps."""
    from mlmamba import Mamba2LM
    d_model, n_layer, batch, seqlen = (TRAIN_LM_QUICK if args.quick else TRAIN_LM_SHAPES)["130M"]
    config = train_lm_config(d_model, n_layer)
    with torch.device("cuda"):
        model = Mamba2LM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")
    labels = torch.randint(0, config.vocab_size, (batch, seqlen), device="cuda")
    step = lm_train_step(model, ours_loss, ids, labels)
    for _ in range(3):
        step()
    n = 3
    events, busy = profiled(step, n)
    shape = f"130M {n_layer}L b{batch}x{seqlen}"
    print(f"[profile_train] ours, LM {shape}; {n} steps")
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    ms = wall_ms(step, 5)
    return [Row("profile", f"LM {shape} ours fwd+bwd, wall ms", ms,
                f"GPU busy {busy:.1f} ms per step ({busy / ms:.0%})")]


def kernel_kind(name):
    """profile_paper's kinds of kernel, by name: our Triton kernels are the ones whose names start with _."""
    kinds = (("attention", ("flash", "fmha", "attention")),                # before cutlass: fmha_cutlass...
             ("matrix products (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
             ("AdamW and clipping", ("multi_tensor", "foreach", "adam")))
    kind = next((kind for kind, keys in kinds if any(key in name.lower() for key in keys)), None)
    return kind or ("Triton (ours)" if name.startswith("_") else "other PyTorch (element-wise, copies, reductions)")


def profile_paper(args, bw):
    """Where the paper-scale stage-2 step's time goes (bench_train_paper's row, batch 16 x (729 + 256)): each phase's
    time on the GPU's stream by CUDA events (forward with the loss, backward with the checkpointed recompute, the
    update), then one step under torch.profiler: kernel time by kind of kernel, and its 25 longest kernels."""
    batch, text = (2, 32) if args.quick else (16, 256)
    phases, out, _, _ = paper_phases(args, batch, text)
    names = ("forward", "backward", "update")
    for _ in range(2):                                          # autotuning, then the optimizer's state
        for phase in phases:
            phase()
    totals = dict.fromkeys(names, 0.0)
    reps = 3
    for _ in range(reps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        for phase, event in zip(phases, events[1:]):
            phase()
            event.record()
        torch.cuda.synchronize()
        for name, a, b in zip(names, events, events[1:]):
            totals[name] += a.elapsed_time(b) / reps
    kernels, busy = profiled(lambda: [phase() for phase in phases], 1)
    kinds = {}
    for e in kernels:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e3
    print(f"[profile_paper] stage 2, b{batch}, one step")
    print(kernels.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    rows = [Row("profile", f"paper stage 2 b{batch} {name}, ms", ms, "on the GPU's stream (CUDA events)")
            for name, ms in totals.items()]
    rows += [Row("profile", f"paper stage 2 b{batch} kernels: {kind}, ms", ms, f"{ms / busy:.0%} of GPU busy")
             for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])]
    del phases, phase, out                                      # the model and its optimizer, for release_memory
    release_memory()
    return rows


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
            states, a_cumsum_end, final, final, states, states, final, 8, 64 * 128, *states.stride()[:3],
            *a_cumsum_end.stride(), final.stride(0), final.stride(1), HAS_INITIAL_STATE=False, REVERSE=False,
            BLOCK=block, num_warps=warps)
        ms = bench_ms(run)
        floor = 2 * states.numel() * 4 / bw * 1e3
        rows.append(Row("profile", f"state passing BLOCK {block} warps {warps}", ms, f"floor {floor:.3f} ({floor / ms:.0%})"))
    return rows


SECTIONS = {"ssd": bench_ssd, "mixer": bench_mixer, "scan2d": bench_scan2d, "lm": bench_lm, "vision": bench_vision,
            "generate": bench_generate, "train": bench_train, "train_lm": bench_train_lm,
            "train_paper": bench_train_paper, "train_step": bench_train_step, "profile_ssd": profile_ssd,
            "profile_train": profile_train, "profile_paper": profile_paper, "profile_decode": profile_decode,
            "profile_prefill": profile_prefill, "sweep_decode": sweep_decode, "sweep_ssd": sweep_ssd,
            "sweep_conv": sweep_conv}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ssd,mixer,scan2d,vision,lm,generate,train",
                    help="comma-separated sections: " + ", ".join(SECTIONS))
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
