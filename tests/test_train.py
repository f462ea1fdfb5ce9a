"""train.py: the loss normalisation, learning, exact resume, data parallel runs equal to one process, and what
happens when things go wrong (signals, kill -9 while saving, a NaN loss, a full disk, bad data, bad images).

Runs are tiny (16 px images, a one-block LM, a few steps) and mostly in this process; those that need a process of
their own (signals, torchrun) start one."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import train
from conftest import DEVICE
from mlmamba import MLMamba
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "cpu", "--image_size", "16", "--shapes_image_size", "16", "--patch_size", "8", "--vision_width",
        "32", "--vision_depth", "1", "--d_model", "32", "--n_layer", "1", "--d_state", "16", "--headdim", "16",
        "--chunk_size", "16", "--vocab_size", "300", "--shapes_train", "32", "--shapes_test", "8", "--eval_samples",
        "8", "--num_workers", "0", "--batch_size", "4", "--micro_batch_size", "4", "--warmup_steps", "2",
        "--precision", "fp32"]


def tiny_run(out_dir, *flags):
    return train.main(["--out_dir", str(out_dir), *TINY, *map(str, flags)])


def subprocess_env(cpu_only=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu_only:                                  # gloo on CPU processes: the machine may have one GPU only
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def checkpoint_step(out_dir):
    latest = train.latest_checkpoint(out_dir)
    return None if latest is None else train.load_trainer_state(latest)["step"]


# On a GPU, cuDNN and the kernels' reductions may change the last bits from run to run (and convolutions use TF32)
GPU_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def assert_same(a, b):
    """Bit-identical on a CPU; within GPU_TOLERANCE on a GPU."""
    if DEVICE == "cpu":
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    else:
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), **GPU_TOLERANCE)


def write_records(folder, records, name="train"):
    return data.write_llava(records, folder, name)


# ----------------------------------------------------------------------------------------------------------------------
# Config and schedule


def test_flags_are_the_config_fields_and_override_the_preset():
    config, preset = train.parse_args(["--preset", "cpu", "--lr", "0.5", "--grad_checkpointing", "--data", "x.json"])
    assert preset == "cpu" and config.lr == 0.5 and config.grad_checkpointing and config.data == "x.json"
    assert config.steps == train.PRESETS["cpu"]["steps"]                   # not given: the preset's
    assert config.weight_decay == train.TrainConfig.weight_decay           # in no preset: the field's default
    gpu, _ = train.parse_args(["--preset", "gpu"])
    assert gpu.image_size == train.PRESETS["gpu"].get("image_size", train.TrainConfig.image_size)
    with pytest.raises(train.TrainingError, match="--stage 1 freezes the vision encoder"):
        train.parse_args(["--stage", "1"])                                 # from scratch, a frozen random encoder
    with pytest.raises(train.TrainingError, match="--lm and --vision go together"):
        train.parse_args(["--lm", "somewhere"])


def test_learning_rate_warms_up_linearly_then_decays_to_min_lr():
    c = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    lrs = [train.learning_rate(c, s) for s in range(c.steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)     # half way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# The loss: answers only, normalised over the whole global batch


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny model, its dataset (answers of different lengths) and a batch of 6 examples."""
    folder = tmp_path_factory.mktemp("setup")
    records = data.make_shapes(data.ShapesConfig(image_size=16, n_train=24, n_test=0, seed=5))["train"]
    # longer and shorter answers, so that the micro-batches below hold different numbers of supervised tokens
    records[1]["conversations"][1]["value"] = "a red circle, then a blue square and a yellow cross"
    records[2]["conversations"] += [{"from": "human", "value": "And the other one?"},
                                    {"from": "gpt", "value": "green"}]
    config, _ = train.parse_args(TINY + ["--out_dir", str(folder)])
    tokenizer = load_tokenizer(data.train_tokenizer(records, folder / "sp.model", config.vocab_size))
    model = train.build_model(config, None, tokenizer.vocab_size, train.Ranks(0, 1, torch.device(DEVICE)))
    dataset = data.ConversationDataset(records, tokenizer, model.image_size, fill=model.vision.image_mean)
    return config, model, dataset, [dataset[i] for i in range(6)]


def test_the_loss_counts_the_answer_tokens_that_the_labels_mark(tiny_setup):
    """train_step's normaliser (the labels data.py masks) is exactly the model's count of supervised tokens."""
    config, model, dataset, examples = tiny_setup
    batch = dataset.collate(examples)
    out = model(**train.model_inputs(batch, DEVICE))
    answers = sum(len(dataset.tokenizer.encode(data.answer_text(a))) + 1                 # + eos after each answer
                  for r in dataset.records[:6] for _, a in data.conversation_turns(r))
    assert int(out.n_tokens) == int((batch["labels"] != data.IGNORE_INDEX).sum()) == answers


def test_loss_and_update_do_not_depend_on_the_micro_batch_split(tiny_setup):
    """One micro-batch of 6, or three of 2 with different numbers of answer tokens: the same loss (the mean over all
    answer tokens, not a mean of means) and the same update."""
    config, model, dataset, examples = tiny_setup
    ranks = train.Ranks(0, 1, torch.device(DEVICE))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        whole = float(model(**train.model_inputs(dataset.collate(examples), DEVICE)).loss)
    results = []
    for size in (6, 2):
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        micro_batches = train.split_collate(dataset.collate, size, examples)
        loss, grad_norm, _ = train.train_step(model, micro_batches, optimizer, config, ranks, model.num_visual_tokens)
        results.append((loss, grad_norm, {k: v.clone() for k, v in model.state_dict().items()}))
    (loss_a, norm_a, weights_a), (loss_b, norm_b, weights_b) = results
    assert loss_a == pytest.approx(whole, rel=1e-5) and loss_b == pytest.approx(loss_a, rel=1e-5)
    assert norm_b == pytest.approx(norm_a, rel=1e-4 if DEVICE == "cpu" else 1e-3)
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name],
                                   **(dict(rtol=1e-4, atol=1e-6) if DEVICE == "cpu" else GPU_TOLERANCE))
    assert any(not torch.equal(weights_a[k], initial[k]) for k in initial)               # it did update
    model.load_state_dict(initial)


# ----------------------------------------------------------------------------------------------------------------------
# Learning


def test_a_tiny_model_overfits_a_handful_of_examples(tmp_path, capsys):
    """Eight LLaVA-format records from disk, evaluated on themselves: memorised, answered exactly; the loss curve
    and the final report line are written."""
    records = data.make_shapes(data.ShapesConfig(image_size=16, n_train=8, n_test=0, seed=1))["train"]
    train_json = write_records(tmp_path / "data", records)
    result = tiny_run(tmp_path / "out", "--data", train_json, "--images", tmp_path / "data", "--eval_data", train_json,
                      "--steps", 150, "--lr", 3e-3, "--min_lr", 1e-3, "--batch_size", 8, "--micro_batch_size", 8,
                      "--eval_every", 150, "--save_every", 150)
    losses = [loss for _, loss in result["history"]["train"]]
    assert losses[-1] < 0.05 < losses[0]
    assert result["result"]["accuracy"] == 1.0 and result["result"]["n"] == 8
    output = capsys.readouterr().out
    assert "held-out accuracy: 100.0%" in output and str(tmp_path / "out" / "latest") in output
    with Image.open(tmp_path / "out" / "loss.png") as plot:
        assert plot.size == (900, 500)
        colours = {colour for _, colour in plot.convert("RGB").getcolors(900 * 500)}
        assert {(30, 70, 200), (220, 60, 30)} <= colours                                  # the curve, the eval point
    # the checkpoint is what generate.py loads: the model and its tokenizer
    model = MLMamba.load_pretrained(tmp_path / "out" / "latest")
    assert load_tokenizer(tmp_path / "out" / "latest").vocab_size <= model.config.lm.vocab_size


# ----------------------------------------------------------------------------------------------------------------------
# Resume, signals, data parallel


def test_resume_equals_an_uninterrupted_run_step_for_step(tmp_path, monkeypatch):
    """SIGTERM after step 3 saves a checkpoint and stops; --resume continues: the same losses, step for step, and
    the same final weights as a run never interrupted. (The data position, learning rate, optimizer state and
    random generators all come back.)"""
    flags = ["--steps", 6, "--eval_every", 3, "--save_every", 4]
    whole = tiny_run(tmp_path / "whole", *flags)

    seed_step = train.seed_step

    def interrupt_at_step_3(c, step, rank):
        if step == 2:                                       # during the third step
            os.kill(os.getpid(), signal.SIGTERM)
        seed_step(c, step, rank)
    monkeypatch.setattr(train, "seed_step", interrupt_at_step_3)
    first = tiny_run(tmp_path / "parts", *flags)
    monkeypatch.setattr(train, "seed_step", seed_step)
    assert first["step"] == 3 and checkpoint_step(tmp_path / "parts") == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                            # handlers restored

    resumed = train.main(["--out_dir", str(tmp_path / "parts"), "--resume"])
    assert resumed["step"] == 6
    assert_same(resumed["history"]["train"], whole["history"]["train"])
    assert_same(resumed["history"]["eval"], whole["history"]["eval"])
    a, b = (load_file(tmp_path / run / "latest" / "model.safetensors") for run in ("whole", "parts"))
    for name in a:
        assert_same(b[name], a[name])


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, "train.py", "--out_dir", str(out_dir), *TINY, "--steps", "100000",
               "--save_every", "100000", "--eval_every", "100000"]
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:                                 # wait until it trains
        output.append(line)
        if line.startswith("training steps"):
            break
    time.sleep(1.0)                                             # (the handlers are in place before that line)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    output = "".join(output) + rest
    assert process.returncode == 0, output
    step = checkpoint_step(out_dir)
    assert step is not None and 1 <= step < 100000
    assert f"stopped by SIGTERM at step {step}" in output and "--resume" in output
    MLMamba.load_pretrained(out_dir / "latest")


KILL_DURING_SAVE = """
import os, signal, sys
import train
write_checkpoint = train.write_checkpoint
def dying(directory, *args):
    write_checkpoint(directory, *args)
    if args[4] == 4:                                     # the second save: half a weights file, then kill -9
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
train.write_checkpoint = dying
train.main(sys.argv[1:])
"""


def test_kill_9_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    out_dir = tmp_path / "out"
    process = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "--out_dir", str(out_dir), *TINY, "--steps",
                              "6", "--save_every", "2", "--eval_every", "100"],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stdout + process.stderr
    assert train.latest_checkpoint(out_dir).name == "ckpt-000002" and checkpoint_step(out_dir) == 2
    MLMamba.load_pretrained(out_dir / "latest")                                           # loads, complete
    resumed = train.main(["--out_dir", str(out_dir), "--resume"])
    assert resumed["step"] == 6 and [s for s, _ in resumed["history"]["train"]] == list(range(1, 7))
    assert sorted(p.name for p in out_dir.iterdir() if "ckpt" in p.name) == ["ckpt-000006"]   # partials gone


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(tmp_path, mode):
    """torchrun with 2 CPU processes (gloo): each takes half of every global batch of 4; one process takes the same
    batch as 2 micro-batches. Same losses, same held-out results."""
    flags = [*TINY, "--steps", "4", "--micro_batch_size", "2", "--eval_every", "4", "--save_every", "2"]
    histories = {}
    for n in (1, 2):
        out_dir = tmp_path / f"n{n}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
                   "--out_dir", str(out_dir), *flags, *(["--fsdp"] if mode == "fsdp" else [])]
        process = subprocess.run(command, cwd=ROOT, env=subprocess_env(cpu_only=True), capture_output=True,
                                 text=True, timeout=300)
        assert process.returncode == 0, process.stdout + process.stderr
        assert f"{n} process(es)" in process.stdout and "held-out accuracy" in process.stdout
        histories[n] = train.load_trainer_state(out_dir / "latest")["history"]
    for kind in ("train", "eval"):
        torch.testing.assert_close(torch.tensor(histories[2][kind]), torch.tensor(histories[1][kind]),
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Faults: a diverged loss, a full disk


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward, calls = MLMamba.forward, []

    def nan_at_step_3(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():                          # training steps, not evaluation
            calls.append(1)
            if len(calls) == 3:
                out.loss_sum = out.loss_sum * float("nan")
        return out
    monkeypatch.setattr(MLMamba, "forward", nan_at_step_3)
    with pytest.raises(train.TrainingError, match=r"step 3: the loss is nan.*ckpt-000002"):
        tiny_run(tmp_path, "--steps", 6, "--save_every", 2, "--eval_every", 100)
    assert train.latest_checkpoint(tmp_path).name == "ckpt-000002"
    weights = load_file(tmp_path / "latest" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def disk_full_on_second_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    with pytest.raises(train.TrainingError, match=r"step 4 .*the disk is full.*ckpt-000002 is intact"):
        tiny_run(tmp_path, "--steps", 6, "--save_every", 2, "--eval_every", 100)
    assert train.latest_checkpoint(tmp_path).name == "ckpt-000002" and checkpoint_step(tmp_path) == 2
    assert not list(tmp_path.glob("*tmp*"))                                              # nothing half-written left
    MLMamba.load_pretrained(tmp_path / "latest")


# ----------------------------------------------------------------------------------------------------------------------
# Bad data


def test_invalid_data_stops_before_training_with_every_record_id(tmp_path):
    records = data.make_shapes(data.ShapesConfig(image_size=16, n_train=6, n_test=0, seed=2))["train"]
    train_json = write_records(tmp_path / "data", records)
    raw = json.loads(train_json.read_text())
    del raw[1]["conversations"]
    raw[3]["conversations"] = raw[3]["conversations"][:1]                               # a question, no answer
    raw[4]["image"] = "images/missing.png"
    train_json.write_text(json.dumps(raw))
    with pytest.raises(train.TrainingError) as error:
        tiny_run(tmp_path / "out", "--data", train_json, "--images", tmp_path / "data", "--steps", 2)
    message = str(error.value)
    for i in (1, 3, 4):
        assert repr(raw[i]["id"]) in message
    assert "no answer" in message and "missing.png" in message
    assert not (tmp_path / "out" / "tokenizer.model").exists() and checkpoint_step(tmp_path / "out") is None


def _png_bytes(size=16):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def data_with_bad_images(tmp_path):
    """13 training records and 2 held-out ones. 'empty' has a zero-byte image (caught by the check before training),
    'truncated' a PNG cut inside its pixel data (caught when it is loaded). Returns the flags of a 3-step run: the 12
    other records in batches of 4, one epoch, so 'truncated' comes up exactly once."""
    splits = data.make_shapes(data.ShapesConfig(image_size=16, n_train=13, n_test=2, seed=4))
    splits["train"][0]["id"], splits["train"][5]["id"] = "empty", "truncated"
    folder = tmp_path / "data"
    train_json, test_json = write_records(folder, splits["train"]), write_records(folder, splits["test"], "test")
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "truncated.png").write_bytes(_png_bytes()[:60])
    return ["--data", train_json, "--images", folder, "--eval_data", test_json, "--steps", 3, "--eval_every", 3,
            "--save_every", 3]


def test_bad_images_are_counted_and_skipped(tmp_path, data_with_bad_images, capsys):
    result = tiny_run(tmp_path / "out", *data_with_bad_images)
    output = capsys.readouterr().out
    assert result["step"] == 3 and checkpoint_step(tmp_path / "out") == 3
    assert "training data: skipped 1 samples with unreadable images (first: id 'empty'" in output
    assert [i for i, _ in result["skipped"]] == ["truncated"]
    assert "data: skipped 1 samples with unreadable images (first: id 'truncated'" in output


@pytest.mark.parametrize("bad", ["empty", "truncated"])
def test_strict_images_makes_a_bad_image_fatal(tmp_path, data_with_bad_images, bad):
    if bad == "truncated":                                                # leave only the one found while loading
        train_json = Path(data_with_bad_images[1])
        train_json.write_text(json.dumps([r for r in json.loads(train_json.read_text()) if r["id"] != "empty"]))
    with pytest.raises(train.TrainingError, match=f"'{bad}'"):
        tiny_run(tmp_path / "out", *data_with_bad_images, "--strict_images")
    assert checkpoint_step(tmp_path / "out") is None
