"""The authors' released ML-Mamba: a run directory written in the released layout (config.json's "model" object;
checkpoints/latest-checkpoint.pt = torch.save({"model": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}}),
as WenjunHuang94/ML-Mamba's FSDPStrategy.save_checkpoint writes it), from random tensors, with timm-layout towers
(timm.models.save_for_hf) and a GPT-NeoX-style tokenizer.json. It loads and answers through generate.py as a
subprocess; its LM equals transformers' Mamba2ForCausalLM holding the same weights; its visual tokens are the
connector's on timm's features fused DINOv2-then-SigLIP; a missing or mis-shaped tensor, a bad config and a pickled
object are refused with the file named."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import timm_oracle
from checkpoints import connector_state_from_release, lm_config_from_release, load_release
from mlmamba import Connector, ConnectorConfig

ROOT = Path(__file__).resolve().parents[1]
D_MODEL, N_LAYER, VOCAB = 32, 2, 400
TOWERS = {"dinov2": "vit_large_patch14_reg4_dinov2", "siglip": "vit_so400m_patch14_siglip_384"}
IMAGE = 224                                 # "dinosiglip-vit-so-224px": a 16 x 16 patch grid of 14 px


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokenizer_json(folder):
    """A byte-level BPE tokenizer.json with GPT-NeoX's <|endoftext|> (bos = eos), as the Mamba-2 checkpoints use."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["<|user|>\nWhat is in the picture?\n<|assistant|>\nA red circle."] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))


def released_lm(seed=0):
    """transformers' Mamba2ForCausalLM (random) and its state dict in mamba_ssm's MambaLMHeadModel names."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(hidden_size=D_MODEL, num_hidden_layers=N_LAYER, vocab_size=VOCAB,
                                       state_size=16, expand=2, head_dim=16, num_heads=4, n_groups=1, chunk_size=16,
                                       conv_kernel=4, tie_word_embeddings=True)
    hf = randomise(transformers.Mamba2ForCausalLM(config), seed)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    return hf, state


def released_connector(lm_config, vision_dim, seed=1):
    """The released `mlp`, `bidirectional_mamba` (2 layers) and `projector` entries: names from our released-layout
    map run backwards is circular, so they are spelled out from the released code's modules (see test_connector)."""
    g = torch.Generator().manual_seed(seed)
    c, d = lm_config, lm_config.d_model
    shapes = {"mlp": {"0.weight": (d, vision_dim), "0.bias": (d,)}, "bidirectional_mamba": {}, "projector": {}}
    bm = shapes["bidirectional_mamba"]
    for i in range(2):
        m = f"layers.{i}.mixer."
        bm.update({m + "in_proj.weight": (c.d_inner + c.conv_dim + c.nheads, d), m + "norm.weight": (c.d_inner,),
                   m + "out_proj.weight": (d, c.d_inner)})
        for s in ("", "_b"):
            bm.update({f"{m}conv1d{s}.weight": (c.conv_dim, 1, c.d_conv), f"{m}conv1d{s}.bias": (c.conv_dim,),
                       f"{m}dt_bias{s}": (c.nheads,), f"{m}A_log{s}": (c.nheads,), f"{m}D{s}": (c.nheads,)})
        bm.update({f"layers.{i}.norm.weight": (d,), f"layers.{i}.norm.bias": (d,)})
        bm.update({f"layers.{i}.mlp.w{j}.{p}": (d, d) if p == "weight" else (d,) for j in (1, 2, 3)
                   for p in ("weight", "bias")})
    bm.update({"norm_f.weight": (d,), "norm_f.bias": (d,)})
    for j, (rows, cols) in zip((0, 2, 4), ((4 * d, d), (d, 4 * d), (d, d))):
        shapes["projector"].update({f"projector.{j}.weight": (rows, cols), f"projector.{j}.bias": (rows,)})
    out = {part: {k: 0.2 * torch.randn(shape, generator=g) for k, shape in entries.items()}
           for part, entries in shapes.items()}
    for k in out["bidirectional_mamba"]:
        if "A_log" in k:                                             # decays in (0, 1): A = -exp(A_log) < 0
            out["bidirectional_mamba"][k] = torch.log(0.5 + torch.rand(out["bidirectional_mamba"][k].shape))
    return out


@pytest.fixture(scope="module")
def release(timm, tmp_path_factory):
    """A released run directory, its towers in timm's hub layout, and the oracles' modules."""
    root = tmp_path_factory.mktemp("release")
    towers = {}
    for seed, (name, arch) in enumerate(TOWERS.items()):
        args = dict(img_size=IMAGE, embed_dim=48, depth=3, num_heads=4)
        model = randomise(timm.create_model(arch, pretrained=False, num_classes=0, **args), seed=20 + seed)
        timm_oracle.save_timm(model, root / name, args)
        towers[name] = model
    hf, lm_state = released_lm()
    lm_config = lm_config_from_release(lm_state, "test")
    parts = {"llm_backbone": lm_state, **released_connector(lm_config, vision_dim=48 + 48)}
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": parts}, run / "checkpoints" / "latest-checkpoint.pt")
    settings = {"model_id": "mlmamba+3b", "vision_backbone_id": "dinosiglip-vit-so-224px",
                "llm_backbone_id": "mamba2-2.7b", "arch_specifier": "no-align+fused-gelu-mlp",
                "image_resize_strategy": "resize-naive", "llm_max_length": 2048}
    (run / "config.json").write_text(json.dumps({"model": settings, "stage": "finetune", "seed": 7}))
    tokenizer_json(run)
    return dict(run=run, dinov2=root / "dinov2", siglip=root / "siglip", hf=hf, parts=parts, towers=towers,
                settings=settings)


def load(release, **kwargs):
    return load_release(kwargs.pop("run", release["run"]), release["siglip"],
                                dinov2_path=release["dinov2"], **kwargs)


def test_release_answers_through_generate_py(release, tmp_path):
    from PIL import Image
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "red.png")
    done = subprocess.run([sys.executable, "generate.py", "--ckpt", str(release["run"]), "--vision",
                           str(release["siglip"]), "--dinov2", str(release["dinov2"]), "--image",
                           str(tmp_path / "red.png"), "--prompt", "What is in the picture?", "--max_new_tokens", "4",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_release_lm_equals_transformers(release):
    model = load(release)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ours = model.lm(ids)[..., :VOCAB]
        theirs = release["hf"](ids).logits[..., :VOCAB]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.config.image_resize_strategy == "resize-naive" and model.image_size == IMAGE


def test_release_visual_tokens_are_the_connector_on_timm_features(release):
    """timm's features as Prismatic takes them (second-to-last block, prefix tokens dropped), DINOv2 then SigLIP, through
    a Connector filled from the released tensors (the key map is tested against the released computation in
    test_connector.py)."""
    model = load(release)
    pixels = torch.rand(2, 3, IMAGE, IMAGE)
    features = []
    for name in ("dinov2", "siglip"):
        tower = release["towers"][name]
        mean, std = (torch.tensor(tower.pretrained_cfg[k])[:, None, None] for k in ("mean", "std"))
        with torch.no_grad():
            out = tower.get_intermediate_layers((pixels - mean) / std, n={len(tower.blocks) - 2})[0]
        features.append(out)
    grid = torch.cat(features, dim=-1).reshape(2, 16, 16, -1)
    connector = Connector(ConnectorConfig(), 96, model.config.lm)
    flat = {f"{part}.{k}": v for part in ("mlp", "bidirectional_mamba", "projector")
            for k, v in release["parts"][part].items()}
    connector.load_state_dict(connector_state_from_release(flat))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixels), connector(grid), atol=2e-4, rtol=2e-4)


def rewrite(release, tmp_path, parts=None, settings=None, raw=None):
    """A copy of the run directory with its checkpoint's parts or its config's model settings changed."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(raw if raw is not None else {"model": parts or release["parts"]},
               run / "checkpoints" / "latest-checkpoint.pt")
    (run / "config.json").write_text(json.dumps({"model": {**release["settings"], **(settings or {})}}))
    return run


def test_missing_and_misshaped_tensors_are_listed(release, tmp_path):
    parts = {part: dict(entries) for part, entries in release["parts"].items()}
    del parts["llm_backbone"]["backbone.layers.1.mixer.D"]
    parts["projector"]["projector.2.weight"] = torch.zeros(3, 3)
    run = rewrite(release, tmp_path, parts=parts)
    with pytest.raises(ValueError) as error:
        load(release, run=run)
    message = str(error.value)
    assert str(run / "checkpoints" / "latest-checkpoint.pt") in message
    assert "missing (1): lm.layers.1.mixer.D" in message
    assert "wrong shape (1): connector.projector.2.weight (3, 3)" in message


@pytest.mark.parametrize("change, match", [
    (dict(settings={"vision_backbone_id": "clip-vit-l"}), "vision_backbone_id='clip-vit-l' is not supported"),
    (dict(settings={"arch_specifier": "gelu-mlp"}), "arch_specifier='gelu-mlp' is not supported"),
    (dict(settings={"image_resize_strategy": "squash"}), "image_resize_strategy='squash' is not supported"),
    (dict(raw={"model": {"llm_backbone": {}}}), r"must hold llm_backbone, mlp, bidirectional_mamba, projector"),
    (dict(raw={"state": {}}), r"expected \{\"model\""),
    (dict(raw={"model": {"llm_backbone": {}, "mlp": {}, "bidirectional_mamba": {}, "projector": {}}}),
     "llm_backbone lacks a tensor"),
])
def test_bad_release_files_are_named(release, tmp_path, change, match):
    run = rewrite(release, tmp_path, **change)
    with pytest.raises(ValueError, match=match) as error:
        load(release, run=run)
    assert str(run) in str(error.value)


def test_pickled_objects_are_refused(release, tmp_path):
    run = rewrite(release, tmp_path, raw={"model": release["parts"], "note": Path("x")})
    with pytest.raises(ValueError, match="refused by torch.load"):
        load(release, run=run)


def test_dinosiglip_needs_both_towers(release):
    with pytest.raises(ValueError, match="needs a DINOv2 tower"):
        load_release(release["run"], release["siglip"])
