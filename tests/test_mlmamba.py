"""MLMamba of mlmamba.py: the sequence layout and the loss against hand-built ones, padding, rows without images,
linear_cross_entropy against the cross-entropy of the whole logits, save / load, from_pretrained against
transformers' Mamba2 and SigLIP / DINOv2 (the independent oracle), generation against full forwards recomputed at
every step, gradient checkpointing, and a tiny model that learns."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import DEVICE
import checkpoints
from checkpoints import load_mamba2, load_vision
from mlmamba import IGNORE_INDEX, ConnectorConfig, Mamba2Config, MLMamba, MLMambaConfig, linear_cross_entropy
from vision import IMAGENET_MEAN, IMAGENET_STD, VisionConfig

VOCAB = 53                                            # padded to 56: generation must never produce 53..55
S = 20                                                # 20 px images, 4 px patches: a 5 x 5 grid, 25 visual tokens
V = 25


def tiny_config(scan="cross", fused=False):
    tower = dict(image_size=S, patch_size=4, width=32, depth=2, heads=2, mlp_dim=48)
    siglip = VisionConfig(arch="siglip", **tower)
    vision = [VisionConfig(arch="dinov2", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, **tower), siglip]
    return MLMambaConfig(vision=vision if fused else siglip,
                         connector=ConnectorConfig(scan=scan),
                         lm=Mamba2Config(d_model=32, n_layer=2, vocab_size=VOCAB, pad_vocab_size_multiple=8,
                                         d_state=16, headdim=8, chunk_size=16))


@torch.no_grad()
def randomise(model, seed):
    """Every parameter off its neutral init (norm weights 1, D 1, zero biases), so that a swapped one would show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device)
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + 3.5 * torch.rand(p.shape, generator=g)).to(p.device))
        elif name.endswith("dt_bias"):
            p.copy_(noise)
        else:
            p.add_(0.2 * noise)
    return model


def tiny_model(seed=0, **config):
    torch.manual_seed(seed)
    return randomise(MLMamba(tiny_config(**config)), seed).to(DEVICE)


def batch_of_three(seed=0):
    """Rows: image + 7 tokens, text only (5 of 7), image + 4 of 7. Pads and labels past the lengths hold garbage."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 7), generator=g)
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    labels[:, 1:3] = IGNORE_INDEX                                        # questions are not supervised
    labels[1, 0] = IGNORE_INDEX
    return dict(input_ids=input_ids.to(DEVICE), labels=labels.to(DEVICE),
                pixel_values=torch.rand(2, 3, S, S, generator=g).to(DEVICE),
                has_image=torch.tensor([True, False, True], device=DEVICE),
                lengths=torch.tensor([7, 5, 4], device=DEVICE))


def row(batch, i):
    """Row i alone, unpadded, as its own batch of one."""
    n = int(batch["lengths"][i])
    image = int(batch["has_image"][:i].sum())
    has = bool(batch["has_image"][i])
    return dict(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n],
                pixel_values=batch["pixel_values"][image:image + 1] if has else None,
                has_image=batch["has_image"][i:i + 1], lengths=None)


def without_labels(batch):
    """The batch for logits: with labels the model returns the loss and no logits."""
    return {k: v for k, v in batch.items() if k != "labels"}


def by_hand(model, batch, i):
    """Row i's LM input built with torch.cat: its visual tokens (if any) then its text embeddings, no padding."""
    r = row(batch, i)
    text = model.lm.embedding(r["input_ids"])
    if r["pixel_values"] is None:
        return text
    return torch.cat([model.encode_images(r["pixel_values"]), text], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Layout, loss, padding


@torch.no_grad()
def test_sequence_layout():
    """[visual][text][padding] per row, T = 25 + 7; each row's real positions as the LM on a hand-built sequence."""
    model = tiny_model()
    batch = batch_of_three()
    out = model(**without_labels(batch))
    assert out.logits.shape == (3, V + 7, 56) and out.loss is None
    for i in range(3):
        embeds = by_hand(model, batch, i)
        expected = model.lm(inputs_embeds=embeds)[0]
        torch.testing.assert_close(out.logits[i, :embeds.shape[1]], expected, rtol=1e-4, atol=1e-4)
    text_only = model(batch["input_ids"][1:2, :5])                      # no image: T is the text length
    assert text_only.logits.shape == (1, 5, 56)
    torch.testing.assert_close(text_only.logits, model.lm(batch["input_ids"][1:2, :5]), rtol=0, atol=0)


def test_loss_is_cross_entropy_on_the_supervised_positions():
    """Output at position p is scored on the label of position p + 1; an image row's first text label is predicted
    by its last visual token; labels past a row's length (garbage here) do not count. The loss (and its gradients)
    is the cross-entropy of the logits a labels-free forward returns, though with labels it never computes them."""
    model = tiny_model(seed=1)
    batch = batch_of_three(seed=1)
    out = model(**batch)
    assert out.logits is None
    logits = model(**without_labels(batch)).logits
    terms = []
    for i, start in enumerate((V, 0, V)):
        for t in range(int(batch["lengths"][i])):
            label = int(batch["labels"][i, t])
            if label != IGNORE_INDEX and start + t >= 1:
                terms.append(-F.log_softmax(logits[i, start + t - 1].double(), -1)[label])
    assert out.n_tokens.item() == len(terms) == 5 + 2 + 2              # row 0's label 0 from its last visual token
    expected = torch.stack(terms).sum()
    torch.testing.assert_close(out.loss_sum.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss.double(), torch.stack(terms).mean(), rtol=1e-4, atol=1e-4)
    names, params = zip(*model.named_parameters())
    grads = lambda loss: torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    ours = dict(zip(names, grads(out.loss_sum)))
    for name, expected_grad in zip(names, grads(expected)):
        torch.testing.assert_close(ours[name], expected_grad, rtol=1e-4, atol=1e-5, msg=name)
    assert ours["connector.projector.4.weight"].abs().sum() > 0 and ours["lm.embedding.weight"].abs().sum() > 0

    labels = torch.full_like(batch["labels"], IGNORE_INDEX)                 # nothing supervised: loss 0, not nan
    empty = model(**{**batch, "labels": labels})
    assert empty.n_tokens.item() == 0 and empty.loss.item() == 0


@torch.no_grad()
def test_padding_changes_nothing():
    """Each row alone and unpadded gives the same logits on its positions and the same summed loss as in the
    padded batch; other pad ids change nothing either."""
    model = tiny_model(seed=2)
    batch = batch_of_three(seed=2)
    out, logits = model(**batch), model(**without_labels(batch)).logits
    garbage = batch["input_ids"].clone()
    garbage[1, 5:], garbage[2, 4:] = 0, 1
    repadded = model(**{**batch, "input_ids": garbage})
    repadded_logits = model(**without_labels({**batch, "input_ids": garbage})).logits
    loss_sum, n_tokens = 0, 0
    for i, start in enumerate((V, 0, V)):
        alone = model(**row(batch, i))
        alone_logits = model(**without_labels(row(batch, i))).logits
        n = start + int(batch["lengths"][i])
        assert alone_logits.shape[1] == n
        torch.testing.assert_close(logits[i, :n], alone_logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(repadded_logits[i, :n], alone_logits[0], rtol=1e-4, atol=1e-4)
        loss_sum, n_tokens = loss_sum + alone.loss_sum, n_tokens + alone.n_tokens
    torch.testing.assert_close(out.loss_sum, loss_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(repadded.loss_sum, loss_sum, rtol=1e-4, atol=1e-4)
    assert out.n_tokens == n_tokens


@torch.no_grad()
def test_rows_without_images():
    """A batch without images, with or without collate's empty pixel tensor, is the LM on the text."""
    model = tiny_model(seed=3)
    ids = torch.randint(0, VOCAB, (2, 6), device=DEVICE)
    expected = model.lm(ids)
    for pixels in (None, torch.zeros(0, 3, S, S, device=DEVICE)):
        out = model(ids, pixel_values=pixels, has_image=torch.tensor([False, False]))
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


def test_bad_input_gets_a_clear_error():
    model = tiny_model()
    batch = batch_of_three()
    with pytest.raises(ValueError, match="marks 2 rows with an image but pixel_values holds 1"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})
    with pytest.raises(ValueError, match=r"pixel_values must be \(n_images, 3, 20, 20\), got \(2, 3, 24, 24\)"):
        model(**{**batch, "pixel_values": torch.rand(2, 3, 24, 24, device=DEVICE)})
    with pytest.raises(ValueError, match=r"lengths must be \(3,\) with values in 0..7"):
        model(**{**batch, "lengths": torch.tensor([7, 8, 1])})
    with pytest.raises(ValueError, match="labels .* must have input_ids' shape"):
        model(**{**batch, "labels": batch["labels"][:, :5]})
    with pytest.raises(ValueError, match="has_image must be"):
        model(**{**batch, "has_image": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="row 1 has neither an image nor any text"):
        model.generate(batch["input_ids"], batch["pixel_values"], batch["has_image"], torch.tensor([3, 0, 2]))


# ----------------------------------------------------------------------------------------------------------------------
# The loss without the logits: linear_cross_entropy


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100, None])      # 13 rows: 4 leaves a remainder; None: one chunk
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits_in_float64(chunk_size):
    """Values and gradients against autograd through the whole logits, for an incoming gradient other than 1; with a
    frozen head (training stage 1) and under no_grad (evaluation) too."""
    g = torch.Generator().manual_seed(chunk_size or 0)
    h = torch.randn(13, 8, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    W = (3 * torch.randn(11, 8, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_()
    t = torch.randint(0, 11, (13,), generator=g).to(DEVICE)
    d_loss = torch.tensor(0.37, dtype=torch.float64, device=DEVICE)
    expected = F.cross_entropy(F.linear(h, W), t, reduction="sum")
    expected_grads = torch.autograd.grad(expected, (h, W), d_loss)
    loss = linear_cross_entropy(h, W, t, chunk_size)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected)
    for ours, theirs in zip(torch.autograd.grad(loss, (h, W), d_loss), expected_grads):
        torch.testing.assert_close(ours, theirs)
    frozen = linear_cross_entropy(h, W.detach(), t, chunk_size)
    torch.testing.assert_close(torch.autograd.grad(frozen, h, d_loss)[0], expected_grads[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, W, t, chunk_size), expected)


def test_linear_cross_entropy_under_bfloat16_autocast():
    """As train.py runs it: float32 hidden states and head under bfloat16 autocast give the loss of bfloat16 logits
    (as F.linear's), in float32, with float32 gradients, within bfloat16's precision of the float32 reference.
    bfloat16 inputs without autocast get bfloat16 gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(DEVICE).requires_grad_()
    W = torch.randn(50, 16, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 50, (37,), generator=g).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, t, chunk_size=8)
        as_before = F.cross_entropy(F.linear(h, W).float(), t, reduction="sum")      # MLMamba's loss until now
    expected = F.cross_entropy(F.linear(h, W), t, reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, as_before, rtol=1e-6, atol=1e-4)                # the same bfloat16 logits
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    for ours, theirs in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(expected, (h, W))):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-2 * theirs.abs().max().item())
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, Wb, t, chunk_size=8)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in torch.autograd.grad(loss, (hb, Wb))] == [torch.bfloat16] * 2


def test_linear_cross_entropy_rejects_what_it_cannot_score():
    h, W, t = torch.randn(4, 8), torch.randn(11, 8), torch.tensor([0, 3, 10, 2])
    with pytest.raises(ValueError, match="targets must be token ids in 0..10, got values from -100 to 10"):
        linear_cross_entropy(h, W, torch.tensor([0, IGNORE_INDEX, 10, 2]))
    with pytest.raises(ValueError, match="targets must be token ids in 0..10, got values from 1 to 11"):
        linear_cross_entropy(h, W, t + 1)
    for bad in ((h[:3], W, t), (h, W[:, :7], t), (h[None], W, t), (h, W, t.int())):
        with pytest.raises(ValueError, match=r"expected hidden \(N, d_model\), weight \(vocab, d_model\), int64"):
            linear_cross_entropy(*bad)


def test_labels_out_of_the_vocabulary_are_refused_before_the_lm_runs():
    model, batch = tiny_model(seed=2), batch_of_three(seed=2)
    vocab = model.lm._head.shape[0]
    batch["labels"][0, 1] = vocab
    with pytest.raises(ValueError, match=f"labels must be token ids in 0..{vocab - 1} or IGNORE_INDEX"):
        model(**batch)


# ----------------------------------------------------------------------------------------------------------------------
# Config, save and load


def test_config_round_trips_through_json():
    for config in (tiny_config(), tiny_config("snake", fused=True), tiny_config("row,column_reverse")):
        text = json.dumps(config.to_dict())
        assert MLMambaConfig.from_dict(json.loads(text)) == config
    d = tiny_config().to_dict()
    with pytest.raises(ValueError, match=r"ConnectorConfig: unknown fields \['mlp_width'\]"):
        MLMambaConfig.from_dict({**d, "connector": {**d["connector"], "mlp_width": 3}})
    with pytest.raises(ValueError, match="Mamba2Config: .*missing 1 required positional argument: 'vocab_size'"):
        MLMambaConfig.from_dict({**d, "lm": {k: v for k, v in d["lm"].items() if k != "vocab_size"}})
    with pytest.raises(ValueError, match="expected the fields"):
        MLMambaConfig.from_dict({**d, "extra": 1})


def test_save_and_load_round_trip(tmp_path):
    """Bit-exact, fused towers included; saving again replaces the checkpoint and leaves no temporary folders."""
    model = tiny_model(seed=4, scan="bidirectional", fused=True)
    batch = batch_of_three(seed=4)
    checkpoints.save_pretrained(model, tmp_path / "ckpt")
    loaded = checkpoints.load_pretrained(tmp_path / "ckpt", device=DEVICE)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**without_labels(batch)).logits, model(**without_labels(batch)).logits,
                                   rtol=0, atol=0)

    with torch.no_grad():
        model.connector.projector[4].bias.add_(1)
    (tmp_path / "ckpt" / "stale.txt").write_text("from an earlier run")
    checkpoints.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = checkpoints.load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert again.connector.projector[4].bias.dtype == torch.bfloat16
    assert torch.equal(again.connector.projector[4].bias, model.connector.projector[4].bias.cpu().to(torch.bfloat16))


def test_load_lists_missing_unexpected_and_misshaped_tensors(tmp_path):
    model = tiny_model(seed=5)
    checkpoints.save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["connector.msc.layers.0.mixer.A_log"]
    state["connector.extra"] = torch.zeros(2)
    state["lm.layers.0.mixer.D"] = torch.zeros(3)
    state["lm.norm_f.weight"] = state["lm.norm_f.weight"].to(torch.int64)
    save_file(state, weights)
    with pytest.raises(ValueError) as err:
        checkpoints.load_pretrained(tmp_path)
    message = str(err.value)
    assert "model.safetensors does not fit the model of" in message and "config.json" in message
    assert "missing (1): connector.msc.layers.0.mixer.A_log" in message
    assert "unexpected (1): connector.extra" in message
    assert "wrong shape (1): lm.layers.0.mixer.D (3,) (expected (8,))" in message
    assert "wrong dtype, not floating point (1): lm.norm_f.weight torch.int64" in message

    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        checkpoints.load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["connector"]["scan"] = "spiral"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: ConnectorConfig: scan='spiral'"):
        checkpoints.load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: no such config file"):
        checkpoints.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        checkpoints.load_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------------------------
# From public checkpoints: tiny transformers models as the oracle


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Tiny random Mamba2ForCausalLM, SiglipVisionModel and Dinov2Model saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=16, expand=2, head_dim=16, num_heads=4,
        n_groups=1, chunk_size=16, conv_kernel=4, tie_word_embeddings=True))
    tower = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=2, image_size=24, patch_size=8)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=40, **tower))
    dino = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **tower))
    folders = {}
    for name, model in (("lm", lm), ("siglip", siglip), ("dinov2", dino)):
        randomise(model, seed=len(name))
        folders[name] = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(folders[name])
        folders[name + "_model"] = model
    return folders


def test_from_pretrained_matches_transformers(hf_checkpoints):
    """The LM gives transformers' Mamba2 logits on text; the visual tokens are the new connector applied to the
    concatenated second-to-last hidden states of transformers' DINOv2 and SigLIP, normalised as their processors do."""
    c = hf_checkpoints
    connector = ConnectorConfig(scan="cross")
    model = checkpoints.from_pretrained(c["lm"], c["siglip"], connector, dinov2_path=c["dinov2"], device=DEVICE)
    assert model.config.lm == load_mamba2(c["lm"]).config and model.config.connector == connector
    assert [v.arch for v in model.config.vision] == ["dinov2", "siglip"]
    assert model.num_visual_tokens == 9 and model.image_size == 24
    assert all(p.device.type == DEVICE and not p.is_meta for p in model.parameters())
    ids = torch.randint(0, 64, (2, 11))
    pixels = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(DEVICE)).logits.cpu(), c["lm_model"](ids).logits,
                                   rtol=1e-4, atol=1e-4)
        dino = c["dinov2_model"]((pixels - torch.tensor(IMAGENET_MEAN)[:, None, None])
                                 / torch.tensor(IMAGENET_STD)[:, None, None], output_hidden_states=True)
        siglip = c["siglip_model"]((pixels - 0.5) / 0.5, output_hidden_states=True)
        features = torch.cat([dino.hidden_states[-2][:, 1:], siglip.hidden_states[-2]], dim=-1)   # (2, 9, 48)
        expected = model.connector(features.reshape(2, 3, 3, 48).to(DEVICE))
        torch.testing.assert_close(model.encode_images(pixels.to(DEVICE)), expected, rtol=1e-4, atol=1e-4)

    single = checkpoints.from_pretrained(c["lm"], c["siglip"], ConnectorConfig(kind="mlp"))
    assert single.config.vision == load_vision(c["siglip"]).config and not hasattr(single.connector, "msc")


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def generate_by_full_forwards(model, r, steps):
    """Greedy decoding without a cache: the whole sequence again for every token."""
    ids = r["input_ids"]
    new = []
    for _ in range(steps):
        logits = model(ids, pixel_values=r["pixel_values"], has_image=r["has_image"]).logits
        token = logits[0, -1, :VOCAB].argmax()
        new.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return new


@torch.no_grad()
def test_greedy_generate_matches_argmax_of_full_forwards():
    model = tiny_model(seed=6)
    with torch.no_grad():                     # padded ids 53..55 would win every argmax if generate let them
        model.lm.embedding.weight[VOCAB:] = 10 * model.lm.embedding.weight[:VOCAB].abs().max()
    batch = batch_of_three(seed=6)
    out = model.generate(batch["input_ids"], batch["pixel_values"], batch["has_image"], batch["lengths"],
                         max_new_tokens=8)
    assert [len(tokens) for tokens in out] == [8, 8, 8]
    for i in range(3):
        assert out[i] == generate_by_full_forwards(model, row(batch, i), 8), i


@torch.no_grad()
def test_batch_of_two_equals_two_single_runs():
    """Different lengths, one row with an image and one without; eos stops a row, the other goes on; streaming."""
    model = tiny_model(seed=7)
    batch = batch_of_three(seed=7)
    args = lambda b: (b["input_ids"], b["pixel_values"], b["has_image"], b["lengths"])
    pair = {**batch, "input_ids": batch["input_ids"][1:], "has_image": batch["has_image"][1:],
            "pixel_values": batch["pixel_values"][1:], "lengths": batch["lengths"][1:]}
    singles = [model.generate(*args(row(batch, i)), max_new_tokens=10)[0] for i in (1, 2)]
    assert model.generate(*args(pair), max_new_tokens=10) == singles

    eos = singles[0][3]                                           # row 1 produces it at step 3 (or before)
    first = singles[0].index(eos)
    streamed = []
    out = model.generate(*args(pair), max_new_tokens=10, eos_id=eos,
                         callback=lambda step, ids: streamed.append((step, ids.tolist())))
    assert out[0] == singles[0][:first + 1]
    assert out[1] == model.generate(*args(row(batch, 2)), max_new_tokens=10, eos_id=eos)[0]
    assert [step for step, _ in streamed] == list(range(len(streamed)))
    assert [ids[0] for _, ids in streamed] == out[0] + [eos] * (len(streamed) - len(out[0]))
    assert [ids[1] for _, ids in streamed][:len(out[1])] == out[1]

    sampled = [model.generate(*args(pair), max_new_tokens=10, temperature=1.0, top_k=20, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1] and max(max(tokens) for tokens in sampled[0]) < VOCAB


# ----------------------------------------------------------------------------------------------------------------------
# Training


def loss_grads(model, batch):
    """The gradients of the loss on batch, by parameter name."""
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    model = tiny_model(seed=8)
    batch = batch_of_three(seed=8)
    calls = {"lm": 0, "vision": 0}
    # hooks on each block's first module: the recomputation stops early once it has what the backward pass needs
    model.lm.layers[0].norm.register_forward_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1))
    model.vision.blocks[0].norm1.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    grads = lambda: loss_grads(model, batch)

    plain = grads()
    assert calls == {"lm": 1, "vision": 1}
    keys = list(model.state_dict())
    model.set_gradient_checkpointing(True)
    assert model.gradient_checkpointing and list(model.state_dict()) == keys
    checkpointed = grads()
    assert calls == {"lm": 3, "vision": 3}                       # forward, then again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    copied = copy.deepcopy(model)                                 # the copy checkpoints its own blocks
    assert copied.lm.layers[1].forward.args[0] is copied.lm.layers[1]
    assert model.generate(batch["input_ids"][:1], batch["pixel_values"][:1], max_new_tokens=2)   # prefill, 1 step
    model.set_gradient_checkpointing(False)
    grads()
    assert calls["lm"] == 3 + 2 + 1 and "forward" not in vars(model.lm.layers[0])


def test_kept_blocks_are_not_recomputed_and_give_the_same_gradients():
    """keep_blocks=1: the last LM block keeps its activations, the first is still recomputed."""
    model = tiny_model(seed=8)
    batch = batch_of_three(seed=8)
    calls = [0, 0]
    for i, layer in enumerate(model.lm.layers):
        layer.norm.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))

    plain = loss_grads(model, batch)
    model.set_gradient_checkpointing(True, keep_blocks=1)
    kept = loss_grads(model, batch)
    assert calls == [1 + 2, 1 + 1]
    assert "forward" in vars(model.lm.layers[0]) and "forward" not in vars(model.lm.layers[1])
    for name in plain:
        torch.testing.assert_close(kept[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="keep_blocks must be 0..2"):
        model.set_gradient_checkpointing(True, keep_blocks=3)


def test_tiny_model_overfits_a_handful_of_examples():
    """Four examples (two with different images, two text-only) learnt by heart in 120 Adam steps."""
    torch.manual_seed(9)
    model = MLMamba(tiny_config()).to(DEVICE)
    g = torch.Generator().manual_seed(9)
    input_ids = torch.randint(0, VOCAB, (4, 10), generator=g).to(DEVICE)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX                                   # answers: the last 6 tokens
    batch = dict(input_ids=input_ids, labels=labels, pixel_values=torch.rand(2, 3, S, S, generator=g).to(DEVICE),
                 has_image=torch.tensor([True, False, True, False], device=DEVICE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(120):
        loss = model(**batch).loss
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.5 and loss.item() < 0.05 * first, (first, loss.item())


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 autocast with the Triton kernels: GPU only")
def test_bfloat16_autocast_training_step_on_gpu():
    """The training step train.py takes on a GPU: float32 weights, bfloat16 autocast, the Triton kernels."""
    model = tiny_model(seed=10)
    batch = batch_of_three(seed=10)
    exact = model(**batch).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
        with torch.no_grad():
            assert model(**without_labels(batch)).logits.dtype == torch.bfloat16
    assert out.logits is None and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - exact.item()) < 0.05 * exact.item()
    out.loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
