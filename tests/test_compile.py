"""Every Triton kernel compiles natively for an H100 (sm_90), checked on a CPU-only machine.

The other tests run the kernels under TRITON_INTERPRET=1 when there is no GPU. The interpreter executes the Python
of a kernel with NumPy: it accepts code that the real compiler rejects, and it never counts shared memory or
registers. This test closes that gap in two phases.

1. Record, in this process (interpreted): each scenario calls a public entry point at a shape a GPU would see, with
   every kernel launch intercepted and not run, so large shapes cost nothing. A launch becomes a spec: the kernel,
   its arguments' types as Triton specialises them on a GPU (pointer dtypes, i32/i64, integers equal to 1 folded to
   constants, multiples of 16 marked divisible), its constexprs and its launch options.
2. Compile, in a subprocess without the interpreter, where the kernels are real JITFunctions: every distinct spec
   with triton.compile for GPUTarget("cuda", 90, 32), through ptxas; autotuned kernels under each config the GPU
   would try, or only the lightest one for the scenarios not marked every_config (compiling is the slow part).

Then: every compile succeeds; each launch fits one block's limits on an H100 (shared memory, the register file)
under every config, or for an autotuned kernel under at least one (the autotuner skips the others). Spills are
reported, not asserted. `pytest -s tests/test_compile.py` prints the table of registers, spills, shared memory and
compile seconds: the installed Triton's numbers, which may differ a little from another Triton version's. On a GPU
machine this module is skipped: the other tests compile and run every kernel there.

To cover a new kernel, add a scenario: a short function decorated with @scenario that calls the public entry point
at a representative shape, forward and backward where there is one, and add its module to KERNEL_MODULES.
"""
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch
import triton

from bounded import arm_stack_dump, run_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("ssd_kernel", "scan2d_kernel", "mixer_kernel")   # each launched kernel (a global named *_kernel) needs a scenario
TARGETS = {90: 232448}       # compute capability -> shared memory one block may opt into: 227 KiB on sm_90 (H100, H200)
REGISTERS_PER_BLOCK = 65536  # the register file a block may use, on every capability since sm_50
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _ptxas_problem():
    """Why this Triton cannot compile for an H100 here, or None. The check also needs two of Triton's internals (its
    argument specialisation and ptxas's report), which a later Triton may move: then it is skipped, saying so."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import KernelParam  # noqa: F401
        triton.knobs.nvidia.dump_ptxas_log
        if "warmup" not in inspect.signature(InterpretedFunction.run).parameters:
            raise AttributeError("InterpretedFunction.run takes no warmup argument")
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
        subprocess.run([ptxas, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as e:                             # no nvidia backend, no ptxas binary, or one that cannot run
        return f"this Triton build cannot compile for CUDA here ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Scenarios: one short function each, calling a public entry point at the shape and dtype a GPU run would use.

SCENARIOS = {}                                       # name -> (function, every_config)


def scenario(every_config=False):
    """Registers a scenario. Autotuned kernels compile under each config the GPU would try with every_config, else
    under the lightest one alone (most warps, fewest stages: the fewest registers per thread and the least shared
    memory, the config that has to fit), which keeps the compile phase within CI's time."""
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, every_config)
        return fn
    return register


def _ssd_inputs(dtype, batch, seqlen, nheads, headdim, dstate, ngroups):
    """Inputs of ssd_scan; the parameters in the model's dtype, A in float32 as the mixer computes it."""
    return dict(x=torch.randn(batch, seqlen, nheads, headdim, dtype=dtype),
                dt=torch.randn(batch, seqlen, nheads, dtype=dtype),
                A=-torch.rand(nheads),
                B=torch.randn(batch, seqlen, ngroups, dstate, dtype=dtype),
                C=torch.randn(batch, seqlen, ngroups, dstate, dtype=dtype),
                D=torch.randn(nheads, dtype=dtype),
                dt_bias=torch.randn(nheads, dtype=dtype))


def _ssd_train_step(inputs, chunk):
    """ssd_scan forward and backward, as a training step runs it (no initial state)."""
    from ssd_kernel import ssd_scan
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    y = ssd_scan(chunk_size=chunk, dt_softplus=True, **leaves)
    torch.autograd.grad(y, list(leaves.values()), torch.randn_like(y))


@scenario(every_config=True)
def ssd_scan_mamba2_bf16():
    """Pretrained Mamba-2's scan (headdim 64, dstate 128, chunk 256, one group) in bfloat16: a training step, and a
    prefill that continues a cached state."""
    from ssd_kernel import ssd_scan
    inputs = _ssd_inputs(torch.bfloat16, batch=1, seqlen=1000, nheads=4, headdim=64, dstate=128, ngroups=1)
    _ssd_train_step(inputs, chunk=256)
    with torch.no_grad():
        ssd_scan(**inputs, chunk_size=256, dt_softplus=True, initial_state=torch.randn(1, 4, 64, 128))


@scenario()
def ssd_scan_mamba2_fp32():
    """The same training step in float32, whose dots are exact ("ieee"), not tf32."""
    _ssd_train_step(_ssd_inputs(torch.float32, 1, 1000, 4, 64, 128, 1), chunk=256)


@scenario()
def connector_gpu_preset_bf16():
    """The MSC mixer of train.py's GPU preset as Mamba2ScanMixer runs it, forward and backward at micro-batch 128:
    the in_proj output of an 8x8 grid (d_model 256: 512 + 640 + 8 channels) read in the 2 "bidirectional" orders,
    one SSD (headdim 64, dstate 64, chunk 64) with a group of 8 heads per order, and the mean back onto the grid."""
    from scan2d_kernel import cross_merge, cross_scan
    batch, H, W, K = 128, 8, 8, 2
    grid = torch.randn(batch, H, W, 512 + 640 + 8, dtype=torch.bfloat16, requires_grad=True)
    ys = cross_scan(grid, "bidirectional")                                           # (K, batch, H*W, d_in_proj)
    _ssd_train_step(_ssd_inputs(torch.bfloat16, batch, H * W, K * 512 // 64, 64, 64, ngroups=K), chunk=64)
    out = cross_merge(ys[..., :512], "bidirectional", H, W, "mean")
    torch.autograd.grad(out, grid, torch.randn_like(out))


@scenario()
def scan2d_siglip_bf16():
    """cross_scan and cross_merge, forward and backward, on SigLIP-so400m/384's 27x27 grid of d_inner = 2 * 1152
    channels, in the 4 "cross" orders (mean) and the 2 "bidirectional" ones (sum)."""
    from scan2d_kernel import cross_merge, cross_scan
    grid = torch.randn(2, 27, 27, 2304, dtype=torch.bfloat16, requires_grad=True)
    for orders, reduce in (("cross", "mean"), ("bidirectional", "sum")):
        out = cross_merge(cross_scan(grid, orders), orders, 27, 27, reduce)
        torch.autograd.grad(out, grid, torch.randn_like(out))


@scenario()
def ssd_step_decode_bf16():
    """A decoding step of pretrained Mamba-2 (headdim 64, dstate 128) and of the GPU preset's LM (dstate 64): a
    bfloat16 model with its float32 state."""
    from ssd_kernel import ssd_step
    for dstate in (128, 64):
        inputs = _ssd_inputs(torch.bfloat16, batch=2, seqlen=1, nheads=4, headdim=64, dstate=dstate, ngroups=1)
        inputs = {k: v[:, 0] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
        ssd_step(torch.randn(2, 4, 64, dstate), **inputs, dt_softplus=True)
        A_log = torch.log(-inputs.pop("A")).to(torch.bfloat16)                     # as the mixer decodes
        ssd_step(torch.randn(2, 4, 64, dstate), A=None, A_log=A_log, **inputs, dt_softplus=True)


@scenario()
def mixer_decode_bf16():
    """The decoding step's kernels at Mamba-2 2.7B's sizes (d_model 2560, d_inner 5120, conv_dim 5376, d_conv 4,
    in_proj 10576 x 2560), a bfloat16 model with the float32 residual stream, batch 1: in_proj with the RMSNorm and
    the conv step, out_proj with the gated RMSNorm and the residual add; the final RMSNorm; and the eager step's
    conv step and gated RMSNorm."""
    from types import SimpleNamespace
    from mixer_kernel import conv_step, gated_norm_out_proj, gated_rms_norm, norm_in_proj_conv, rms_norm
    bf16 = torch.bfloat16
    in_proj = SimpleNamespace(weight=torch.empty(10576, 2560, dtype=bf16), bias=None)
    out_proj = SimpleNamespace(weight=torch.empty(2560, 5120, dtype=bf16), bias=None)
    h = torch.randn(1, 2560)
    zxbcdt = norm_in_proj_conv(h, torch.randn(2560, dtype=bf16), 1e-5, in_proj, torch.randn(1, 5376, 4, dtype=bf16),
                               torch.randn(5376, 1, 4, dtype=bf16), torch.randn(5376, dtype=bf16), conv_start=5120)
    gated_norm_out_proj(torch.randn(1, 5120, dtype=bf16), zxbcdt[:, :5120], torch.randn(5120, dtype=bf16), 5120, 1e-5,
                        out_proj, h)
    zxbcdt = torch.randn(2, 10576, dtype=bf16)
    rms_norm(torch.randn(2, 2560), torch.randn(2560, dtype=bf16), 1e-5)
    gated_rms_norm(torch.randn(2, 5120, dtype=bf16), zxbcdt[:, :5120], torch.randn(5120, dtype=bf16), 5120, 1e-5)
    conv_step(zxbcdt[:, 5120:10496], torch.randn(2, 5376, 4, dtype=bf16), torch.randn(5376, 1, 4, dtype=bf16),
              torch.randn(5376, dtype=bf16))


@scenario()
def mixer_train_bf16():
    """The mixer's training kernels, forward and backward, at Mamba-2 2.7B's sizes under bf16 autocast (float32
    weights): the block's RMSNorm of the float32 residual stream, the gated RMSNorm of y and the z slice of in_proj's
    output, the causal conv on its xBC slice."""
    from mixer_kernel import causal_conv1d, gated_rms_norm, rms_norm
    bf16 = torch.bfloat16
    zxbcdt = torch.randn(2, 64, 2 * 5120 + 2 * 128 + 80, dtype=bf16, requires_grad=True)
    leaves = lambda *shapes: [torch.randn(*s, requires_grad=True) for s in shapes]
    hidden, weight = leaves((2, 64, 2560), (2560,))
    out = rms_norm(hidden, weight, 1e-5)
    torch.autograd.grad(out, (hidden, weight), torch.randn_like(out))
    y, gate_weight = torch.randn(2, 64, 5120, dtype=bf16, requires_grad=True), *leaves((5120,))
    out = gated_rms_norm(y, zxbcdt[..., :5120], gate_weight, 5120, 1e-5)
    torch.autograd.grad(out, (y, zxbcdt, gate_weight), torch.randn_like(out))
    conv_weight, conv_bias = leaves((5376, 1, 4), (5376,))
    out = causal_conv1d(zxbcdt[..., 5120:10496], conv_weight, conv_bias)
    torch.autograd.grad(out, (zxbcdt, conv_weight, conv_bias), torch.randn_like(out))


# ----------------------------------------------------------------------------------------------------------------------
# Phase 1: record the launches, in this process


def _launched_kernel(fn):
    """(module name, global name, autotuned) of the kernel whose Python function is `fn`."""
    module = sys.modules[fn.__module__]
    kernel = getattr(module, fn.__name__, None)
    inner = kernel
    while inner is not None and not inspect.isfunction(inner):
        inner = getattr(inner, "fn", None)
    if inner is not fn:
        raise AssertionError(f"{fn.__module__}.py: the launched kernel {fn.__name__} is not a module global of that "
                             f"name; the compile step looks kernels up by name")
    return fn.__module__, fn.__name__, hasattr(kernel, "configs")        # triton.autotune's, or ssd_kernel._Tuned


def _spec(fn, args, kwargs):
    """A launch of the kernel `fn`, as JSON: its argument types as Triton specialises them for a GPU launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import KernelParam

    module, name, autotuned = _launched_kernel(fn)
    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    spec = dict(module=module, kernel=name, autotuned=autotuned, signature={}, constexprs={}, attrs={},
                options={} if autotuned else {k: v for k, v in kwargs.items() if k not in params})  # tuner's: phase 2
    for i, (arg, value) in enumerate(bound.arguments.items()):
        if KernelParam(i, params[arg], False, False).is_constexpr:
            kind, attr = "constexpr", None
        else:       # as the JIT does (no kernel here sets do_not_specialize): ints equal to 1 become constants,
                    # pointers and ints divisible by 16 are marked so
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        spec["signature"][arg] = kind
        if kind == "constexpr":
            if not isinstance(value, (bool, int, float, str, type(None))):
                raise AssertionError(f"{module}.py: {name}'s constexpr {arg}={value!r} does not fit in a JSON spec")
            spec["constexprs"][arg] = value
        elif attr:
            spec["attrs"][arg] = attr
    return spec


def _record(fn):
    """The specs of every kernel launch that fn() makes; the kernels are intercepted and do not run."""
    from triton.runtime.interpreter import InterpretedFunction
    specs = []

    def run(self, *args, grid, warmup, **kwargs):
        specs.append(_spec(self.fn, args, kwargs))

    original, InterpretedFunction.run = InterpretedFunction.run, run
    try:
        fn()
    finally:
        InterpretedFunction.run = original
    return specs


@pytest.fixture(scope="module")
def recorded():
    """{scenario: [spec, ...]} for every scenario."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the other tests compile and run every kernel natively on it")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the launches are recorded through Triton's interpreter: conftest sets TRITON_INTERPRET=1 on a CPU")
    if problem := _ptxas_problem():
        pytest.skip(problem)
    return {name: _record(fn) for name, (fn, _) in SCENARIOS.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Phase 2: compile the specs, in a subprocess that imports the kernels without the interpreter


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _jobs(specs):
    """(spec, config options, compute capability, launch: the spec's index) for every compile: under each autotune
    config the GPU would try for the specs marked every_config, under the lightest one for the others."""
    jobs = []
    for launch, (spec, every_config) in enumerate(specs):
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        if spec["autotuned"]:
            configs = kernel.configs if every_config else [min(kernel.configs,
                                                               key=lambda c: (c.num_stages, -c.num_warps))]
            configs = [(c.kwargs, {k: v for k, v in c.all_kwargs().items() if k in LAUNCH_OPTIONS}) for c in configs]
        else:
            configs = [({}, spec["options"])]
        for constexprs, options in configs:
            tuned = dict(spec, signature={**spec["signature"], **{k: "constexpr" for k in constexprs}},
                         constexprs={**spec["constexprs"], **constexprs})
            jobs += [(tuned, options, capability, launch) for capability in TARGETS]
    return jobs


def _compile(job):
    """Compiles one job for its target; registers and spills from ptxas's log."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    spec, options, capability, _ = job
    kernel = _jit_function(getattr(importlib.import_module(spec["module"]), spec["kernel"]))
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    attrs = {(kernel.arg_names.index(arg),): backend.parse_attr(attr) for arg, attr in spec["attrs"].items()}
    source = ASTSource(kernel, spec["signature"], spec["constexprs"], attrs)
    triton.knobs.nvidia.dump_ptxas_log = True          # ptxas -v's report, printed after each compile
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):           # the GPU's Triton 3.6 fuses multiply-adds by default
            compiled = triton.compile(source, target=target, options={**options, "enable_fp_fusion": True})
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}"[:4000], seconds=time.perf_counter() - start)
    seconds, report = time.perf_counter() - start, log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not (registers and spills):
        raise RuntimeError(f"no ptxas report for {spec['kernel']} (a compile cache hit?):\n{report[-2000:]}")
    return dict(seconds=seconds, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, registers=int(registers.group(1)),
                spills=int(spills.group(1)) + int(spills.group(2)))


def compile_all(specs_path, results_path):
    """Entry point of the subprocess: compiles every job of the specs in specs_path, results to results_path."""
    with open(specs_path) as f:
        jobs = _jobs(json.load(f))
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count()), mp_context=get_context("fork"),
                             initializer=arm_stack_dump, initargs=("compile worker",)) as pool:
        results = list(pool.map(_compile, jobs))
    with open(results_path, "w") as f:
        json.dump([dict(spec=spec, options=options, capability=capability, launch=launch, **result)
                   for (spec, options, capability, launch), result in zip(jobs, results)], f)


@pytest.fixture(scope="module")
def compiled(recorded, tmp_path_factory):
    """The results of compiling every distinct spec, one per (spec, config, target)."""
    specs = []                                         # [spec, every_config], each distinct spec once
    for name, launches in recorded.items():
        for spec in launches:
            seen = next((s for s in specs if s[0] == spec), None)
            if seen is None:
                specs.append([spec, SCENARIOS[name][1]])
            else:
                seen[1] |= SCENARIOS[name][1]
    tmp = tmp_path_factory.mktemp("compile")
    (tmp / "specs.json").write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")      # an empty cache: every kernel really compiles, ptxas reports
    start = time.perf_counter()
    done = run_bounded([sys.executable, __file__, str(tmp / "specs.json"), str(tmp / "results.json")], 900,
                       "the compile subprocess and its pool", cwd=ROOT, env=env)
    assert done.returncode == 0, f"the compile subprocess failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads((tmp / "results.json").read_text())
    print(f"\n{len(specs)} distinct launches, {len(results)} compiles in {time.perf_counter() - start:.1f} s\n"
          f"{_table(results)}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# The checks


def _variant(spec):
    """A short name for a spec: the first pointer's dtype and the kernel's own constexprs."""
    dtype = next((kind[1:] for kind in spec["signature"].values() if kind.startswith("*")), "")
    return " ".join([dtype] + [f"{k}={v}" for k, v in spec["constexprs"].items() if k.isupper()])


def _fits(result):
    return ("error" not in result and result["shared"] <= TARGETS[result["capability"]]
            and result["registers"] * 32 * result["num_warps"] <= REGISTERS_PER_BLOCK)


def _table(results):
    lines = [f"{'kernel':28} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>4} {'spill B':>7} {'smem KiB':>8} "
             f"{'s':>5}  variant"]
    for r in results:
        if "error" in r:
            numbers = f"{'':>5} {'':>6} {'':>4} {'':>7} {'FAILED':>8}"
        else:
            numbers = (f"{r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>4} {r['spills']:>7} "
                       f"{r['shared'] / 1024:>8.1f}")
        lines.append(f"{r['spec']['kernel']:28} {r['capability']:>3} {numbers} {r['seconds']:>5.1f}  "
                     f"{_variant(r['spec'])}")
    return "\n".join(lines)


def test_every_kernel_has_a_scenario(recorded):
    empty = [name for name, specs in recorded.items() if not specs]
    assert not empty, f"scenarios that launched no kernel: {empty}"
    launched = {(s["module"], s["kernel"]) for specs in recorded.values() for s in specs}
    kernels = {(m, name) for m in KERNEL_MODULES for name, obj in vars(importlib.import_module(m)).items()
               if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)}
    assert kernels - launched == set(), f"kernels that no scenario launches: {sorted(kernels - launched)}"


def test_every_kernel_compiles_for_h100(compiled):
    failed = {}                                        # error -> the launches that raise it
    for r in compiled:
        if "error" in r:
            failed.setdefault(r["error"], []).append(
                f"{r['spec']['module']}.py {r['spec']['kernel']} ({_variant(r['spec'])}; "
                f"{r['options'] or 'default options'}; sm_{r['capability']})")
    assert not failed, "kernels that do not compile natively:\n" + "\n\n".join(
        "\n".join(launches) + f":\n{error}" for error, launches in failed.items())


def test_every_launch_fits_a_block(compiled):
    """Shared memory and registers within one block's limits: under every config, or at least one of an autotuned
    kernel's configs (the autotuner drops those that do not fit)."""
    launches = {}                                      # (launch, capability) -> its compiles, one per config
    for r in compiled:
        if "error" not in r:
            launches.setdefault((r["launch"], r["capability"]), []).append(r)
    too_big = []
    for results in launches.values():
        spec = results[0]["spec"]
        fit = [_fits(r) for r in results]
        if not (any(fit) if spec["autotuned"] else all(fit)):
            too_big += [r for r, ok in zip(results, fit) if not ok]
    assert not too_big, (f"launches over an H100's per-block limits ({TARGETS[90]} B of shared memory, "
                         f"{REGISTERS_PER_BLOCK} registers):\n{_table(too_big)}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    arm_stack_dump("compile")
    compile_all(*sys.argv[1:])
