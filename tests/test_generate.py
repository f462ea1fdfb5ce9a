"""generate.py on a tiny random checkpoint laid out as train.py writes it: the command line end to end (a subprocess),
a batch against single runs, against MLMamba.generate on inputs built by hand, the streamed text, the sampling flags,
every bad input as one line and exit status 1, a prompt several times the training length against token-by-token
stepping, out-of-memory advice; on a GPU, the CUDA graph's replay against the eager step."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import checkpoints
import data
import generate
from generate import CUDAGraphDecoder, GenerateConfig, TextStream
from mlmamba import ConnectorConfig, Mamba2Config, Mamba2LM, MLMamba, MLMambaConfig
from tokenizer import load_tokenizer
from vision import VisionConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]
S = 16                          # image side; 4-pixel patches: 16 visual tokens
MAX_LEN = 24                    # the training max_len the checkpoint's train_config.json records
QUESTIONS = ["What colour is the circle?", "How many shapes are there in the picture?", "Where is the square?"]


def tiny_config(vocab_size):
    return MLMambaConfig(
        vision=VisionConfig(image_size=S, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, feature_layer=None),
        connector=ConnectorConfig(scan="cross"),
        lm=Mamba2Config(d_model=32, n_layer=2, vocab_size=vocab_size, d_state=16, headdim=8, chunk_size=16),
        image_resize_strategy="letterbox")


@torch.no_grad()
def randomise(model, seed=0):
    """Every parameter moved off its init, so that logits are spread out and answers run for several tokens; slow
    decays (Δ ≈ 0.05, A in [-1.5, -0.5]), so that the LM's state still holds the image when the answer starts."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + torch.rand(p.shape, generator=g)))
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * noise - 3)
        else:
            p.add_(0.3 * noise)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A train.py out_dir: ckpt-000010/ (model.safetensors, config.json, tokenizer.model, train_config.json) and the
    `latest` symlink to it."""
    out = tmp_path_factory.mktemp("run")
    records = [{"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(zip(QUESTIONS * 4, ["red", "two", "top left", "blue circle"] * 3))]
    tokenizer_file = data.train_tokenizer(records, out / "tokenizer.model", vocab_size=300)
    torch.manual_seed(0)
    model = randomise(MLMamba(tiny_config(load_tokenizer(tokenizer_file).vocab_size)))
    ckpt = out / "ckpt-000010"
    checkpoints.save_pretrained(model, ckpt)
    shutil.move(tokenizer_file, ckpt / "tokenizer.model")
    (ckpt / "train_config.json").write_text(json.dumps({"max_len": MAX_LEN}))
    os.symlink(ckpt.name, out / "latest")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small pictures of different sizes: a red circle, a blue square."""
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "circle.png", folder / "square.jpg"]
    circle = Image.new("RGB", (40, 30), (24, 24, 24))
    ImageDraw.Draw(circle).ellipse([8, 4, 30, 26], fill=(220, 40, 40))
    square = Image.new("RGB", (20, 20), (24, 24, 24))
    ImageDraw.Draw(square).rectangle([2, 6, 12, 16], fill=(50, 90, 240))
    circle.save(paths[0])
    square.save(paths[1])
    return [str(p) for p in paths]


def gen(ckpt, **settings):
    """generate.run in-process, by default in float32 on the CPU, where results compare exactly across batch sizes
    (on a GPU, cuDNN may pick other kernels for another batch size; the GPU tests at the end compare like with like)."""
    c = GenerateConfig(ckpt=str(ckpt), **{"max_new_tokens": 8, "dtype": "fp32", "device": "cpu", **settings})
    out, log = io.StringIO(), io.StringIO()
    result = generate.run(c, out=out, log=log)
    return dict(result, out=out.getvalue(), log=log.getvalue())


def load(run_dir):
    latest = run_dir / "latest"
    return checkpoints.load_pretrained(latest).eval(), load_tokenizer(latest)


# ----------------------------------------------------------------------------------------------------------------------
# The command line, end to end


def test_cli_end_to_end_in_a_subprocess(run_dir, images):
    """A batch of two images with one question; the answers equal the in-process ones, timings on stderr."""
    args = ["--ckpt", str(run_dir), "--image", images[0], "--image", images[1], "--prompt", QUESTIONS[0],
            "--max_new_tokens", "8", "--dtype", "fp32", "--device", "cpu"]
    done = subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    expected = gen(run_dir, image=images, prompt=[QUESTIONS[0]])
    assert done.stdout == expected["out"]
    assert f"[1] {images[0]}: {QUESTIONS[0]}\n{expected['answers'][0]}\n" in done.stdout
    assert "time to first token" in done.stderr and "tokens/s" in done.stderr


def test_cli_error_in_a_subprocess(run_dir, tmp_path):
    missing = tmp_path / "nowhere.jpg"
    done = subprocess.run([sys.executable, "generate.py", "--ckpt", str(run_dir), "--image", str(missing),
                           "--prompt", "What is it?"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr == f"generate.py: error: image {missing} does not exist\n"


def test_default_checkpoint_is_train_pys(run_dir, tmp_path, monkeypatch, capsys):
    """Without --ckpt: out/shapes/latest, and when it is not there, what to run."""
    monkeypatch.chdir(tmp_path)
    assert generate.cli(["--prompt", "What is it?"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out/shapes/latest" in err and "python train.py" in err
    (tmp_path / "out").mkdir()
    shutil.copytree(run_dir, tmp_path / "out" / "shapes", symlinks=True)
    assert generate.run(GenerateConfig(prompt=["What is it?"], max_new_tokens=3, dtype="fp32"),
                        out=io.StringIO(), log=io.StringIO())["tokens"]


# ----------------------------------------------------------------------------------------------------------------------
# What it generates


@pytest.mark.parametrize("layout", ["image per prompt", "one prompt for all", "text only"])
def test_batch_of_two_equals_two_single_runs(run_dir, images, layout):
    """Rows of different prompt lengths (and images) batched give each row's tokens alone."""
    if layout == "image per prompt":
        batch = dict(image=images, prompt=QUESTIONS[:2])
    elif layout == "one prompt for all":
        batch = dict(image=images, prompt=QUESTIONS[1:2])
    else:
        batch = dict(prompt=QUESTIONS[1:3])
    rows = generate.pair_up(batch.get("image", []), batch["prompt"])
    pair = gen(run_dir, **batch)
    singles = [gen(run_dir, image=[image] if image else [], prompt=[prompt])["tokens"][0] for image, prompt in rows]
    assert pair["tokens"] == singles
    assert all(len(tokens) > 1 for tokens in singles)                 # answers, not an immediate eos
    assert singles[0] != singles[1]                                    # the rows' images or prompts matter


def test_equals_model_generate_on_inputs_built_by_hand(run_dir, images):
    """generate.py's prompt template, image preprocessing and batching against MLMamba.generate on a prompt spelled
    out as training writes it and an image letterboxed by vision.preprocess."""
    model, tokenizer = load(run_dir)
    ids = [tokenizer.encode(f"<|user|>\n{q}") + [tokenizer.eos_id] + tokenizer.encode("\n<|assistant|>\n")
           for q in QUESTIONS[:2]]                                              # the Zephyr template, no BOS
    input_ids = torch.full((2, max(map(len, ids))), tokenizer.pad_id)
    for row, prompt in enumerate(ids):
        input_ids[row, :len(prompt)] = torch.tensor(prompt)
    pixels = torch.stack([preprocess(path, S, fill=model.vision.image_mean) for path in images])
    expected = model.generate(input_ids, pixels, lengths=torch.tensor([len(i) for i in ids]), max_new_tokens=8,
                              eos_id=tokenizer.eos_id)
    got = gen(run_dir, image=images, prompt=QUESTIONS[:2])
    assert got["tokens"] == expected
    assert got["answers"] == [tokenizer.decode(t[:t.index(2)] if 2 in t else t).strip() for t in expected]


def test_generate_steps_through_the_given_decoder(run_dir, images):
    """MLMamba.generate(decoder=) takes its cache, the prefill and every step from the decoder (what the CUDA graphs
    plug into)."""
    model, tokenizer = load(run_dir)

    class Counting:
        def __init__(self):
            self.allocated, self.prefills, self.steps = [], 0, 0

        def allocate_cache(self, batch):
            self.allocated.append(model.lm.allocate_cache(batch))
            return self.allocated[-1]

        def prefill(self, inputs_embeds, lengths, cache):
            assert cache is self.allocated[-1] and self.steps == 0
            self.prefills += 1
            return model.lm.prefill(inputs_embeds, lengths, cache)

        def step(self, input_ids, cache):
            assert cache is self.allocated[-1]
            self.steps += 1
            return model.lm.step(input_ids, cache)

    batch = generate.make_batch(model, tokenizer, [generate.read_image(images[0]), None],
                                [generate.encode_question(tokenizer, q) for q in QUESTIONS[:2]])
    decoder = Counting()
    got = model.generate(**batch, max_new_tokens=7, decoder=decoder)
    assert got == model.generate(**batch, max_new_tokens=7)
    assert len(decoder.allocated) == 1 and decoder.prefills == 1 and decoder.steps == 6


def test_streamed_text_is_the_answer(run_dir, images):
    result = gen(run_dir, image=images[:1], prompt=QUESTIONS[:1], max_new_tokens=12)
    assert result["out"] == result["answers"][0] + "\n"


def test_text_stream_holds_back_partial_characters(run_dir):
    """Byte-fallback pieces of é and ☃ decode to "\ufffd" alone; the stream never shows one, and the pieces add up to
    the decoded text."""
    tokenizer = load_tokenizer(run_dir / "latest")
    ids = tokenizer.encode(" red héllo ☃ circle ✓")
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(len(ids)))       # the case under test happens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "red héllo ☃ circle ✓"
    assert not any("\ufffd" in p for p in pieces)


def test_sampling_flags(run_dir, images):
    """top_k=1 and a tiny top_p leave only the likeliest token: greedy; a seed makes sampling reproducible."""
    args = dict(image=images[:1], prompt=QUESTIONS[:1], max_new_tokens=10)
    greedy = gen(run_dir, **args)["tokens"]
    assert gen(run_dir, temperature=1.0, top_k=1, seed=5, **args)["tokens"] == greedy
    assert gen(run_dir, temperature=1.0, top_p=1e-6, seed=5, **args)["tokens"] == greedy
    sampled = [gen(run_dir, temperature=1.5, top_k=50, top_p=0.95, seed=seed, **args)["tokens"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_prompt_far_longer_than_training(run_dir):
    """A prompt of more than 5x the training max_len: the recurrent state is the same size whatever the length, and
    the answer equals greedy decoding that feeds the prompt through the recurrent step one token at a time."""
    question = " ".join(["is the red circle left of the blue square"] * 12)
    result = gen(run_dir, prompt=[question], max_new_tokens=6)
    model, tokenizer = load(run_dir)
    ids = generate.encode_question(tokenizer, question)
    assert len(ids) > 5 * MAX_LEN
    cache = model.lm.allocate_cache(1)
    with torch.no_grad():
        for token in ids:
            logits = model.lm.step(torch.tensor([token]), cache)
        expected = []
        while len(expected) < 6 and tokenizer.eos_id not in expected:
            expected.append(int(logits[0, :model.config.lm.vocab_size].argmax()))
            logits = model.lm.step(torch.tensor(expected[-1:]), cache)
    assert result["tokens"] == [expected]


def test_exif_rotation_and_extreme_aspect_ratios(run_dir, images, tmp_path):
    """A photo stored sideways with an EXIF orientation reads as the upright one; a 600:1 panorama still works."""
    upright = Image.open(images[0])
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90° clockwise to display"
    sideways.save(tmp_path / "sideways.png", exif=exif)
    model, _ = load(run_dir)
    assert torch.equal(generate.make_batch(model, load_tokenizer(run_dir / "latest"),
                                           [generate.read_image(tmp_path / "sideways.png")], [[1]])["pixel_values"],
                       generate.make_batch(model, load_tokenizer(run_dir / "latest"), [upright], [[1]])["pixel_values"])
    args = dict(prompt=QUESTIONS[:1])
    assert gen(run_dir, image=[str(tmp_path / "sideways.png")], **args)["tokens"] == \
        gen(run_dir, image=images[:1], **args)["tokens"]
    Image.new("RGB", (1800, 3), (200, 30, 30)).save(tmp_path / "panorama.png")
    Image.new("RGB", (2, 1500), (30, 30, 200)).save(tmp_path / "tower.png")
    result = gen(run_dir, image=[str(tmp_path / "panorama.png"), str(tmp_path / "tower.png")], **args)
    assert len(result["tokens"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit status 1


def bad_images(folder):
    """{name: path} of image files that cannot be used."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, format="PNG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[:70])
    (folder / "notes.jpg").write_text("not an image at all")
    (folder / "a_folder.png").mkdir()
    return {"missing": folder / "missing.png", "zero": folder / "zero.png", "truncated": folder / "truncated.png",
            "not an image": folder / "notes.jpg", "a folder": folder / "a_folder.png"}


def assert_one_line_error(capsys, argv, *expected):
    assert generate.cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("generate.py: error: ") and captured.err.count("\n") == 1, captured.err
    for text in expected:
        assert text in captured.err, (text, captured.err)


@pytest.mark.parametrize("case, expected", [("missing", "does not exist"), ("zero", "empty (0 bytes)"),
                                            ("truncated", "truncated"), ("not an image", "cannot identify"),
                                            ("a folder", "is not a file")])
def test_bad_image(run_dir, tmp_path, capsys, case, expected):
    path = bad_images(tmp_path)[case]
    assert_one_line_error(capsys, ["--ckpt", str(run_dir), "--image", str(path), "--prompt", "What?"],
                          str(path), expected)


@pytest.mark.parametrize("pixels", [150, 300])           # over the limit: Pillow warns; over twice the limit: raises
def test_decompression_bomb(run_dir, tmp_path, capsys, monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (pixels, 1)).save(tmp_path / "bomb.png")
    assert_one_line_error(capsys, ["--ckpt", str(run_dir), "--image", str(tmp_path / "bomb.png"), "--prompt", "What?"],
                          str(tmp_path / "bomb.png"), "decompression bomb")


def checkpoint_like(folder, config, weights=b""):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_bad_checkpoint(run_dir, tmp_path, capsys):
    cases = [
        (tmp_path / "nothing", "does not exist"),
        (checkpoint_like(tmp_path / "unknown", {"hidden": 3}), "unknown checkpoint layout"),
        (checkpoint_like(tmp_path / "mamba2", {"d_model": 64, "n_layer": 2, "vocab_size": 50,
                                               "ssm_cfg": {"layer": "Mamba2"}}), "Mamba-2 language model alone"),
        (checkpoint_like(tmp_path / "siglip", {"model_type": "siglip"}), "vision encoder alone"),
        (run_dir / "latest" / "tokenizer.model", "not a directory"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "not a checkpoint of train.py"))
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir / "latest", truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    cases.append((truncated, "truncated or corrupt"))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(run_dir / "latest", no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    cases.append((no_tokenizer, "no tokenizer.json or tokenizer.model"))
    for path, expected in cases:
        assert_one_line_error(capsys, ["--ckpt", str(path), "--prompt", "What?"], expected)


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", ""], "--prompt 1 is empty"),
    (["--prompt", "What?", "--prompt", "  <image>\n "], "--prompt 2 is empty"),
    ([], "give a question with --prompt"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--image", "x.png", "--image", "y.png"],
     "2 images but 3 prompts"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "a", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--prompt", "a", "--top_k", "0"], "--top_k must be positive"),
    (["--prompt", "a", "--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    (["--prompt", "a", "--dtype", "fp8"], "--dtype must be"),
])
def test_bad_settings(run_dir, capsys, argv, expected):
    assert_one_line_error(capsys, ["--ckpt", str(run_dir), *argv], expected)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError])
def test_out_of_memory_gives_advice(run_dir, images, capsys, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Mamba2LM, "prefill", out_of_memory)
    assert_one_line_error(capsys, ["--ckpt", str(run_dir), "--image", images[0], "--image", images[1], "--prompt",
                                   "What?", "--dtype", "fp32"],
                          "out of memory", "fewer images/prompts at once (this batch: 2)", "--dtype bf16",
                          "shorter prompts")
    monkeypatch.setattr(checkpoints, "load_pretrained", out_of_memory)
    assert_one_line_error(capsys, ["--ckpt", str(run_dir), "--prompt", "What?", "--dtype", "fp32"],
                          "out of memory", "--dtype bf16")


# ----------------------------------------------------------------------------------------------------------------------
# The CUDA graph (GPU only)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_step(dtype):
    """Many steps of replay give exactly the eager step's logits and states, at two batch sizes, and a second
    allocate_cache starts from the empty state again."""
    config = Mamba2Config(d_model=64, n_layer=3, vocab_size=101, d_state=32, headdim=16, chunk_size=32)
    torch.manual_seed(0)
    lm = randomise(Mamba2LM(config)).to("cuda", dtype).eval()
    decoder = CUDAGraphDecoder(lm)
    with torch.no_grad():
        for batch in (3, 1, 3):
            prompt = torch.randint(0, 101, (batch, 37), device="cuda")
            tokens = torch.randint(0, 101, (batch, 40), device="cuda")
            eager, graphed = lm.allocate_cache(batch), decoder.allocate_cache(batch)
            assert not graphed.ssm_state.any() and not graphed.conv_state.any()
            lm(prompt, cache=eager)
            graphed.conv_state.copy_(eager.conv_state)
            graphed.ssm_state.copy_(eager.ssm_state)
            for step in range(tokens.shape[1]):
                expected = lm.step(tokens[:, step], eager)
                assert torch.equal(decoder.step(tokens[:, step], graphed), expected), (batch, step)
            assert torch.equal(graphed.ssm_state, eager.ssm_state) and torch.equal(graphed.conv_state, eager.conv_state)
    assert sorted(decoder.caches) == [1, 3]


@needs_cuda
def test_cuda_graph_prefill_equals_eager_prefill():
    """The prefill's graph gives the eager prefill's logits and cache on the same zero-padded inputs, one graph per
    bucket of padded lengths; capturing it leaves the cache as it was."""
    config = Mamba2Config(d_model=64, n_layer=3, vocab_size=101, d_state=32, headdim=16, chunk_size=32)
    torch.manual_seed(0)
    lm = randomise(Mamba2LM(config)).to("cuda", torch.bfloat16).eval()
    decoder = CUDAGraphDecoder(lm)
    bucket = generate.PREFILL_BUCKET
    with torch.no_grad():
        for seqlen, lengths in ((bucket + 6, [bucket + 6, 9]), (2 * bucket, [3, 2 * bucket]), (5, [5, 1])):
            embeds = torch.randn(2, seqlen, 64, device="cuda", dtype=torch.bfloat16)
            lengths = torch.tensor(lengths, device="cuda")
            graphed, eager = decoder.allocate_cache(2), lm.allocate_cache(2)
            got = decoder.prefill(embeds, lengths, graphed)
            padded = torch.nn.functional.pad(embeds, (0, 0, 0, -seqlen % bucket))
            assert torch.equal(got, lm.prefill(padded, lengths, eager)), seqlen
            assert torch.equal(graphed.ssm_state, eager.ssm_state) and torch.equal(graphed.conv_state, eager.conv_state)
    assert len(decoder.prefills[2].graphs) == 2                        # two buckets


@needs_cuda
def test_cuda_graph_generate_equals_eager_generate(run_dir, images):
    """MLMamba.generate through the graphs (vision tower, prefill, step) gives the eager tokens: bf16, a batch with
    and without an image."""
    latest = run_dir / "latest"
    model = checkpoints.load_pretrained(latest, dtype=torch.bfloat16, device="cuda").eval()
    tokenizer = load_tokenizer(latest)
    batch = generate.make_batch(model, tokenizer, [generate.read_image(images[0]), None],
                                [generate.encode_question(tokenizer, q) for q in QUESTIONS[:2]])
    eager = model.generate(**batch, max_new_tokens=16)
    decoder, encoder = CUDAGraphDecoder(model.lm), generate.CUDAGraphed(model.encode_images)
    assert model.generate(**batch, max_new_tokens=16, decoder=decoder, encode_images=encoder) == eager
    assert model.generate(**batch, max_new_tokens=16, decoder=decoder, encode_images=encoder) == eager   # reused
    pixels = batch["pixel_values"]
    assert torch.equal(encoder(pixels), model.encode_images(pixels))
    result = gen(run_dir, image=images[:1], prompt=QUESTIONS[:1], dtype="bf16", device="cuda")   # the CLI's path
    assert "CUDA graph" in result["log"] and result["tokens"]
