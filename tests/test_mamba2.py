"""The Mamba-2 LM of mlmamba.py.

- against transformers' Mamba2ForCausalLM (random weights) as the independent oracle, loaded from its own
  save_pretrained and from the same weights converted to mamba_ssm's layout: logits and gradients;
- its recurrent cache against its own parallel forward: prefill + steps, prefill in pieces, steps from empty;
- generation and sampling;
- the loaders' errors: missing / unexpected / mis-shaped tensors, corrupt and malicious files, bad configs.

transformers' pure-PyTorch Mamba2 (checked in 5.23) follows mamba_ssm in everything these tests touch: the gated RMSNorm is
group-wise (group_size = d_inner / ngroups), dt_limit is (0, inf) so nothing is clamped, and a seqlen that is not a
multiple of chunk_size is padded; so it serves as the oracle for every config below, ngroups > 1 included.
"""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import DEVICE
import mlmamba
from checkpoints import load_mamba2
from mlmamba import Mamba2Config, Mamba2LM, sample_next

# Tiny models: d_model 64, 2 layers, d_state 16, chunk 16. Each case changes what may go wrong.
# official_vocab and pad: the vocab of the mamba_ssm config.json and its pad_vocab_size_multiple; transformers' config
# holds the padded size.
CASES = {
    "ngroups2-tied-seqlen37": dict(n_groups=2, head_dim=16, expand=2, tie=True, bias=False, conv_bias=True,
                                   official_vocab=100, pad=16, seqlen=37, official_format="bin", shard=False),
    "headdim32-untied-biases-seqlen33": dict(n_groups=1, head_dim=32, expand=2, tie=False, bias=True, conv_bias=False,
                                             official_vocab=101, pad=8, seqlen=33, official_format="safetensors",
                                             shard=False),
    "ngroups4-headdim8-expand3-sharded-seqlen16": dict(n_groups=4, head_dim=8, expand=3, tie=True, bias=False,
                                                       conv_bias=True, official_vocab=96, pad=16, seqlen=16,
                                                       official_format="safetensors", shard=True),
}


def padded(vocab, multiple):
    return (vocab + multiple - 1) // multiple * multiple


@torch.no_grad()
def randomise(model, seed):
    """Move every parameter off its neutral init (norm weights 1, D 1, zero biases), so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + 3.5 * torch.rand(p.shape, generator=g)))     # A in [-4, -0.5]
        elif name.endswith("dt_bias"):
            p.copy_(noise)                                                   # Δ = softplus(dt + dt_bias) ~ 0.1 .. 2
        else:
            p.add_(0.3 * noise)


def hf_model(case, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=padded(case["official_vocab"], case["pad"]), state_size=16,
        expand=case["expand"], head_dim=case["head_dim"], num_heads=case["expand"] * 64 // case["head_dim"],
        n_groups=case["n_groups"], chunk_size=16, conv_kernel=4, use_bias=case["bias"],
        use_conv_bias=case["conv_bias"], tie_word_embeddings=case["tie"])
    model = transformers.Mamba2ForCausalLM(config).eval()
    # the gated norm's class was renamed (MambaRMSNormGated, then Mamba2RMSNormGated in 5.25): ask the instance
    if case["n_groups"] > 1 and not hasattr(model.backbone.layers[0].mixer.norm, "group_size"):
        pytest.skip("this transformers normalises y·SiLU(z) over all of d_inner, mamba_ssm per group of "
                    "d_inner/ngroups (changed by huggingface/transformers#40861); tested with transformers 5.23-5.25")
    randomise(model, seed)
    return model


def save_official(state, directory, *, d_model, n_layer, vocab_size, pad, ssm_cfg, tie, fmt):
    """A checkpoint in mamba_ssm's layout (as state-spaces/mamba2-* ship it): config.json and pytorch_model.bin,
    or model.safetensors. state: {key in mamba_ssm's naming: tensor}."""
    os.makedirs(directory, exist_ok=True)
    config = {"d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": vocab_size,
              "ssm_cfg": {"layer": "Mamba2", **ssm_cfg}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": pad, "tie_embeddings": tie}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if fmt == "bin":          # torch.save of a tied model's state_dict holds lm_head.weight too, sharing storage
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:                     # safetensors cannot hold shared tensors: a tied model stores the embedding only
        state = {k: v.clone().contiguous() for k, v in state.items() if not (tie and k == "lm_head.weight")}
        save_file(state, os.path.join(directory, "model.safetensors"))


def hf_to_official(model, directory, case):
    c = model.config
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    save_official(state, directory, d_model=c.hidden_size, n_layer=c.num_hidden_layers,
                  vocab_size=case["official_vocab"], pad=case["pad"], tie=c.tie_word_embeddings,
                  fmt=case["official_format"],
                  ssm_cfg=dict(d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand, headdim=c.head_dim,
                               ngroups=c.n_groups, chunk_size=c.chunk_size, bias=c.use_bias, conv_bias=c.use_conv_bias))


def save_checkpoint(model, directory, case, layout):
    if layout == "transformers":
        model.save_pretrained(directory, max_shard_size="20KB" if case["shard"] else "5GB")
    else:
        hf_to_official(model, directory, case)


# ----------------------------------------------------------------------------------------------------------------------
# Against transformers


@pytest.mark.parametrize("layout", ["transformers", "mamba_ssm"])
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name, layout):
    case = CASES[name]
    theirs = hf_model(case)
    save_checkpoint(theirs, tmp_path, case, layout)
    if case["shard"] and layout == "transformers":
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_mamba2(tmp_path, device=DEVICE)
    c = ours.config
    assert (c.ngroups, c.headdim, c.tie_embeddings, c.bias, c.conv_bias) == (
        case["n_groups"], case["head_dim"], case["tie"], case["bias"], case["conv_bias"])
    padded_vocab = padded(case["official_vocab"], case["pad"])
    assert c.vocab_size == (case["official_vocab"] if layout == "mamba_ssm" else padded_vocab)

    ids = torch.randint(0, case["official_vocab"], (2, case["seqlen"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids.to(DEVICE)).cpu()
    assert got.shape == expected.shape == (2, case["seqlen"], padded_vocab)
    # atol relative to the logits' scale, as in the gradient test: on a GPU the kernels sum in other orders than
    # transformers on the CPU (seen: 1.2e-4 at one logit of 6,864, largest logit 8.9)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_gradients_match_transformers(tmp_path):
    case = CASES["ngroups2-tied-seqlen37"]
    theirs = hf_model(case, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = load_mamba2(tmp_path, device=DEVICE)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 100, (2, case["seqlen"]), generator=g)
    weights = torch.randn(2, case["seqlen"], 112, generator=g)

    (theirs(ids).logits * weights).sum().backward()
    (ours(ids.to(DEVICE)) * weights.to(DEVICE)).sum().backward()
    their_grads = {k.removeprefix("backbone.").replace("embeddings.", "embedding."): p.grad
                   for k, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        expected = their_grads[name]
        torch.testing.assert_close(p.grad.cpu(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------------
# The recurrent cache against the parallel forward


def random_lm(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    sizes = dict(d_model=64, n_layer=2, vocab_size=97, pad_vocab_size_multiple=16, d_state=16, headdim=16, ngroups=2,
                 chunk_size=16)
    model = Mamba2LM(Mamba2Config(**{**sizes, **overrides}))
    randomise(model, seed)
    return model.to(device=DEVICE, dtype=dtype)


@pytest.fixture(params=["references", "kernels"])
def path(request, monkeypatch):
    """The LM through its PyTorch references, or through the Triton kernels (natively on a GPU, interpreted on a CPU,
    where the model otherwise takes the references)."""
    kernels = request.param == "kernels"
    monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: kernels and t.dtype != torch.float64)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prefill", [0, 2, 17])          # none (steps from empty), shorter than d_conv, past a chunk
@torch.no_grad()
def test_prefill_then_steps_match_forward(prefill, dtype, path):
    if path == "kernels" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter's bfloat16 tl.dot is wrong (triton#11584); runs on a GPU")
    model = random_lm(dtype)
    ids = torch.randint(0, 97, (2, 23), device=DEVICE)
    full = model(ids)
    cache = model.allocate_cache(2)
    logits = [model(ids[:, :prefill], cache=cache)] if prefill else []
    logits += [model.step(ids[:, t], cache)[:, None] for t in range(prefill, ids.shape[1])]
    got = torch.cat(logits, dim=1)
    assert cache.ssm_state.dtype == torch.float32 and cache.conv_state.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    else:   # the two paths round differently: the cached one must be as accurate as the parallel one
        exact = model.float()(ids)                               # the same bf16-rounded weights, float32 arithmetic
        err_full, err_cached = ((t.float() - exact).abs().max().item() for t in (full, got))
        assert err_full < 0.1 * exact.abs().max().item()
        assert err_cached <= 1.5 * err_full + 0.05, (err_cached, err_full)


# the interpreter's bfloat16 tl.dot is wrong (triton#11584): half precision there is float16
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("batch", [1, 2])       # the decoding step's fused kernels at batch 1, cuBLAS's above
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
@torch.no_grad()
def test_kernels_give_the_references_logits(monkeypatch, dtype, batch):
    """The Triton path (scan, both norms, the conv and SSM steps; at batch 1 the steps' fused kernels, with the norms
    and the conv step inside the projections) against the PyTorch path, prefill and steps."""
    model = random_lm(dtype)
    ids = torch.randint(0, 97, (batch, 20), device=DEVICE)
    prefill = 17
    logits = {}
    for kernels in (False, True):
        monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: kernels)
        cache = model.allocate_cache(batch)
        pieces = [model(ids[:, :prefill], cache=cache)] if prefill else []
        pieces += [model.step(ids[:, t], cache)[:, None] for t in range(prefill, 20)]
        logits[kernels] = torch.cat(pieces, dim=1)
    if dtype == torch.float32:
        torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    else:   # the two paths round differently (the kernels keep float32 inside); both near the float32 model's
        monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: False)
        exact = model.float()(ids)                               # the same bf16-rounded weights, float32 arithmetic
        err_ref, err_kernels = ((t.float() - exact).abs().max().item() for t in (logits[False], logits[True]))
        assert err_kernels <= 1.5 * err_ref + 0.05, (err_kernels, err_ref)


def test_training_on_the_kernel_path_gets_every_gradient(monkeypatch):
    """With autograd on, the kernel path (the scan, both norms and the conv, each a forward and a backward kernel; the
    decoding step's forward-only kernels stay out) gives every parameter the references' gradient."""
    model = random_lm()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    grads = {}
    for kernels in (False, True):
        monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: kernels)
        model.zero_grad()
        model(ids).square().mean().backward()
        grads[kernels] = {name: p.grad for name, p in model.named_parameters()}
    for name, expected in grads[False].items():
        assert grads[True][name] is not None, name
        torch.testing.assert_close(grads[True][name], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@torch.no_grad()
def test_residual_stream_dtype(residual_in_fp32):
    model = random_lm(torch.bfloat16, residual_in_fp32=residual_in_fp32)
    seen = []
    model.norm_f.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))   # the residual stream
    logits = model(torch.randint(0, 97, (1, 5), device=DEVICE))
    assert seen == [torch.float32 if residual_in_fp32 else torch.bfloat16] and logits.dtype == torch.bfloat16


@torch.no_grad()
def test_prefill_in_pieces_matches_forward():
    model = random_lm(seed=1, ngroups=1, headdim=32)
    ids = torch.randint(0, 97, (3, 45), device=DEVICE)
    full = model(ids)
    cache = model.allocate_cache(3)
    pieces = [model(ids[:, a:b], cache=cache) for a, b in ((0, 3), (3, 20), (20, 21), (21, 45))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    cache.reset()                                              # an emptied cache starts over
    torch.testing.assert_close(model(ids[:, :5], cache=cache), full[:, :5], rtol=1e-4, atol=1e-4)


# into an empty cache or continuing one (through the references), and continuing one through the kernels
@pytest.mark.parametrize("before,kernels", [(0, False), (6, False), (6, True)])
@torch.no_grad()
def test_prefill_of_padded_rows_equals_each_row_alone(before, kernels, monkeypatch):
    """Mamba2LM.prefill with lengths: rows of different lengths, right-padded with other tokens, leave the cache (SSM
    state and conv state, a row shorter than d_conv included) and give the logits of each row prefilled alone; the
    steps after it agree too."""
    monkeypatch.setattr(mlmamba, "_use_kernels", lambda t: kernels and t.dtype != torch.float64)
    model = random_lm()
    lengths = [23, 2, 17]
    ids = torch.randint(0, 97, (3, before + 23), device=DEVICE)          # the padding: tokens that must not count
    batched = model.allocate_cache(3)
    if before:
        model(ids[:, :before], cache=batched)
    embeds = model.embedding(ids[:, before:])
    # float32 rounding differs between the two ways (other chunk boundaries, other matmul shapes): errors are measured
    # against each tensor's scale
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    got = model.prefill(embeds, torch.tensor(lengths, device=DEVICE), batched)
    alone = [model.allocate_cache(1) for _ in lengths]
    for row, n in enumerate(lengths):
        close(got[row], model(ids[row:row + 1, :before + n], cache=alone[row])[0, -1])
        close(batched.ssm_state[:, row:row + 1], alone[row].ssm_state)
        close(batched.conv_state[:, row:row + 1], alone[row].conv_state)
    next_ids = torch.tensor([5, 7, 11], device=DEVICE)
    got = model.step(next_ids, batched)
    for row, cache in enumerate(alone):
        close(got[row], model.step(next_ids[row:row + 1], cache)[0])


@torch.no_grad()
def test_step_keeps_the_cache_tensors_in_place(path):
    """What CUDA-graph capture of step needs: the same storage before and after, only its contents change."""
    model = random_lm()
    cache = model.allocate_cache(2)
    pointers = (cache.conv_state.data_ptr(), cache.ssm_state.data_ptr())
    model.step(torch.tensor([3, 5], device=DEVICE), cache)
    assert (cache.conv_state.data_ptr(), cache.ssm_state.data_ptr()) == pointers
    assert cache.conv_state.abs().sum() > 0 and cache.ssm_state.abs().sum() > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_step_replays_as_a_cuda_graph(path):
    model = random_lm()
    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    cache = model.allocate_cache(2)
    model(ids[:, :4], cache=cache)
    start = (cache.conv_state.clone(), cache.ssm_state.clone())
    eager = [model.step(ids[:, t], cache) for t in range(4, 12)]     # also compiles the kernels before capture

    cache.conv_state.copy_(start[0])
    cache.ssm_state.copy_(start[1])
    token = ids[:, 4].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                                   # records only: the cache is not advanced
        logits = model.step(token, cache)
    replayed = []
    for t in range(4, 12):
        token.copy_(ids[:, t])
        graph.replay()
        replayed.append(logits.clone())
    torch.testing.assert_close(torch.stack(replayed), torch.stack(eager), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    model = random_lm()
    ids = torch.randint(0, 97, (2, 19), device=DEVICE)
    torch.testing.assert_close(model(inputs_embeds=model.embedding(ids)), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embedding(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="cache holds batch 3"):
        model(ids, cache=model.allocate_cache(3))


# ----------------------------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def test_greedy_generate_matches_argmax_of_full_forward():
    model = random_lm(seed=2)
    with torch.no_grad():                      # padded rows 97..111 would win every argmax if generate let them
        model.embedding.weight[97:] = 10 * model.embedding.weight[:97].abs().max()
    prompt = torch.randint(0, 97, (2, 7), device=DEVICE)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    expected = prompt
    for _ in range(12):                         # no cache: the whole sequence again for every token
        next_ids = model(expected)[:, -1, :97].argmax(-1)
        expected = torch.cat([expected, next_ids[:, None]], dim=1)
    assert torch.equal(out, expected)


@torch.no_grad()
def test_generate_stops_at_eos_and_is_reproducible_with_a_seed():
    model = random_lm(seed=3)
    prompt = torch.randint(0, 97, (1, 5), device=DEVICE)
    greedy = model.generate(prompt, max_new_tokens=10, temperature=0)
    eos = greedy[0, 7].item()                                   # the third new token
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    stopped = model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=eos)
    assert torch.equal(stopped, greedy[:, :5 + first + 1])
    a = model.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    b = model.generate(prompt, max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a, b) and a.max() < 97


def test_sample_next_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), torch.zeros(20000, dtype=torch.long))
    assert torch.equal(sample_next(logits, top_k=1, generator=g), torch.zeros(20000, dtype=torch.long))
    assert torch.equal(sample_next(logits, top_p=0.4, generator=g), torch.zeros(20000, dtype=torch.long))

    def freq(ids):
        return torch.bincount(ids, minlength=4).float() / len(ids)
    # top_k=3 renormalises the three likeliest; top_p=0.7 keeps 0.5 and 0.3 (0.5 < 0.7 ≤ 0.8)
    torch.testing.assert_close(freq(sample_next(logits, top_k=3, generator=g)),
                               torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, rtol=0, atol=0.02)
    torch.testing.assert_close(freq(sample_next(logits, top_p=0.7, generator=g)),
                               torch.tensor([0.625, 0.375, 0, 0]), rtol=0, atol=0.02)
    # temperature 2 flattens: p ∝ sqrt(probs)
    torch.testing.assert_close(freq(sample_next(logits, temperature=2.0, generator=g)),
                               probs.sqrt() / probs.sqrt().sum(), rtol=0, atol=0.02)


# ----------------------------------------------------------------------------------------------------------------------
# Loading errors. Checkpoints in mamba_ssm's layout written from a model of ours.

SSM_CFG = dict(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=2, chunk_size=16)


def official_state(model):
    state = {"backbone." + k: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    return state


def write(directory, state, fmt="bin", **config):
    kw = dict(d_model=64, n_layer=2, vocab_size=97, pad=16, ssm_cfg=SSM_CFG, tie=True, fmt=fmt)
    save_official(state, directory, **{**kw, **config})
    return directory


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def model():
    return random_lm().cpu()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_roundtrip_of_our_official_writer(tmp_path, model, fmt):
    """The error tests below start from this checkpoint, which loads back exactly."""
    loaded = load_mamba2(write(tmp_path, official_state(model), fmt))
    assert loaded.config == model.config
    for (name, p), (name2, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(p, q), name


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, model):
    state = official_state(model)
    del state["backbone.layers.1.mixer.D"]
    state["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    state["backbone.layers.0.mixer.dt_bias"] = torch.zeros(5)
    state["backbone.layers.1.norm.weight"] = state["backbone.layers.1.norm.weight"].int()
    with pytest.raises(ValueError) as err:
        load_mamba2(write(tmp_path, state))
    message = str(err.value)
    assert "wrong dtype, not floating point (1): layers.1.norm.weight torch.int32" in message
    assert "pytorch_model.bin" in message
    assert "missing (1): layers.1.mixer.D" in message
    assert "unexpected (1): layers.0.mixer.extra" in message
    assert "wrong shape (1): layers.0.mixer.dt_bias (5,) (expected (8,))" in message


def test_config_that_does_not_fit_the_weights(tmp_path, model):
    write(tmp_path, official_state(model))
    edit_config(tmp_path, lambda c: c["ssm_cfg"].update(headdim=32))     # 4 heads instead of 8
    with pytest.raises(ValueError, match=r"wrong shape \(\d+\): .*A_log \(8,\) \(expected \(4,\)\)"):
        load_mamba2(tmp_path)


def test_untied_checkpoint_without_lm_head(tmp_path, model):
    state = official_state(model)
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): lm_head.weight"):
        load_mamba2(write(tmp_path, state, tie=False))


def test_tied_checkpoint_whose_lm_head_differs(tmp_path, model):
    state = official_state(model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="ties the embeddings, but lm_head.weight differs"):
        load_mamba2(write(tmp_path, state))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("d_model"), r"missing config fields \['d_model'\]"),
    (lambda c: c["ssm_cfg"].pop("layer"), "ssm_cfg.layer is 'Mamba1'"),
    (lambda c: c.update(d_intermediate=128), r"d_intermediate=128 \(only 0"),
    (lambda c: c["ssm_cfg"].update(dt_limit=[0.0, 0.1]), r"ssm_cfg.dt_limit=\[0.0, 0.1\]"),
    (lambda c: c["ssm_cfg"].update(headdims=16), r"unknown ssm_cfg fields \['headdims'\]"),
    (lambda c: c["ssm_cfg"].update(ngroups=3), "ngroups=3 must divide nheads=8"),
    (lambda c: [c.pop("d_model"), c.pop("ssm_cfg")], "neither a mamba_ssm config"),
])
def test_bad_official_config(tmp_path, model, edit, match):
    write(tmp_path, official_state(model))
    edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as err:
        load_mamba2(tmp_path)
    assert "config.json" in str(err.value)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("hidden_size"), r"missing config fields \['hidden_size'\]"),
    (lambda c: c.update(num_heads=4), "num_heads=4 but expand"),
    (lambda c: c.update(time_step_limit=[0.0, 0.1]), r"time_step_limit=\[0.0, 0.1\]"),
])
def test_bad_transformers_config(tmp_path, edit, match):
    hf_model(CASES["ngroups2-tied-seqlen37"]).save_pretrained(tmp_path)
    edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        load_mamba2(tmp_path)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_weights(tmp_path, model, fmt):
    write(tmp_path, official_state(model), fmt)
    file = tmp_path / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{file.name}: not a readable .*truncated or corrupt"):
        load_mamba2(tmp_path)


class _Payload:
    """A pickle that runs a command when unpickled."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused(tmp_path, model):
    sentinel = tmp_path / "payload_ran"
    state = official_state(model)
    write(tmp_path, state)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        torch.save({**state, "backbone.norm_f.weight": _Payload(sentinel)}, f, pickle_module=pickle)
    with pytest.raises(ValueError, match=r"refused by torch.load\(weights_only=True\)"):
        load_mamba2(tmp_path)
    assert not sentinel.exists()


def test_missing_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mamba2(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_mamba2(tmp_path / "empty")
    write(tmp_path / "ckpt", official_state(model))
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_mamba2(tmp_path / "ckpt" / "pytorch_model.bin")           # a weights file also names its checkpoint


def test_shard_index_naming_a_missing_shard(tmp_path):
    case = CASES["ngroups4-headdim8-expand3-sharded-seqlen16"]
    save_checkpoint(hf_model(case), tmp_path, case, "transformers")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: weights file not found"):
        load_mamba2(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="headdim=48 must divide d_inner"):
        Mamba2Config(d_model=64, n_layer=1, vocab_size=10, headdim=48)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        Mamba2Config(d_model=64, n_layer=1, vocab_size=10, headdim=16, chunk_size=24)
    c = Mamba2Config(d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=16)   # mamba2-2.7b
    assert (c.d_inner, c.nheads, c.conv_dim, c.padded_vocab_size) == (5120, 80, 5376, 50288)
