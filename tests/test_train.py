"""train.py: the loss normalisation, learning, exact resume, data parallel runs equal to one process, and what
happens when things go wrong (signals, kill -9 while saving, a NaN loss, a full disk, bad data, bad images).

Runs are tiny (16 px images, a one-block LM, a few steps) and mostly in this process; those that need a process of
their own (signals, torchrun) start one."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import data
import train
from bounded import Bounded, _processes, run_bounded
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
    with pytest.raises(train.TrainingError, match="--keep_blocks goes with --grad_checkpointing"):
        train.parse_args(["--keep_blocks", "2"])


def test_help_shows_each_presets_values(capsys):
    """--help shows what the presets run with, not unused dataclass defaults, and a % in a help text stays a %."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())                     # argparse wraps lines
    gpu, cpu = train.PRESETS["gpu"]["steps"], train.PRESETS["cpu"]["steps"]
    assert f"optimizer steps (preset gpu: {gpu}, cpu: {cpu})" in shown
    assert f"(default: {train.TrainConfig.steps})" not in shown
    assert "~30% slower" in shown and "{'option_strings'" not in shown


def test_both_presets_train_the_papers_connector_on_a_grid_where_order_matters():
    """The runs the README leads with use ML-Mamba's MSC (bidirectional, 2 blocks), on grids big enough that a scan
    order changes what precedes what: on a 4 x 4 grid "row" and a student's "diagonal" order differ."""
    from scan2d_kernel import scan_permutation
    for preset in ("cpu", "gpu"):
        config, _ = train.parse_args(["--preset", preset])
        connector = train.connector_config(config)
        assert (connector.kind, connector.orders, connector.n_blocks) == ("msc", ("row", "row_reverse"), 2), preset
        side = config.image_size // config.patch_size
        assert side >= 4, preset
        diagonal = torch.tensor(sorted(range(side * side), key=lambda g: (g // side + g % side, g // side)))
        assert not torch.equal(diagonal, scan_permutation("row", side, side))


def test_paper_recipe_sets_the_released_settings():
    """--recipe paper: the released config's numbers for each stage (mlmamba/conf/models.py, the run's config.json),
    under any flag given explicitly; it needs a stage."""
    c, _ = train.parse_args(["--recipe", "paper", "--stage", "2", "--init", "x"])
    assert (c.lr, c.batch_size, c.micro_batch_size, c.weight_decay, c.epochs, c.warmup_ratio, c.min_lr) == \
        (2e-5, 128, 8, 0.1, 1, 0.03, 0.0)
    assert (c.beta1, c.beta2, c.grad_clip, c.precision, c.grad_checkpointing, c.image_resize_strategy) == \
        (0.9, 0.999, 1.0, "bf16", True, "resize-naive")
    c, _ = train.parse_args(["--recipe", "paper", "--stage", "1", "--init", "x", "--lr", "5e-4"])
    assert (c.lr, c.batch_size, c.weight_decay) == (5e-4, 256, 0.0)
    with pytest.raises(train.TrainingError, match="give --stage 1 or --stage 2"):
        train.parse_args(["--recipe", "paper"])


def test_epochs_and_warmup_ratio_set_the_schedule_as_the_released_code_counts():
    """Records rounded up to whole batches, times the epochs; warmup floored (fsdp.py run_setup)."""
    quiet = type("Ranks", (), {"main": False})()
    c = train.schedule_from_epochs(train.TrainConfig(epochs=2, batch_size=128, warmup_ratio=0.03), 1000, quiet)
    assert (c.steps, c.warmup_steps) == (16, 0)                    # ceil(1000 / 128) = 8 batches per epoch
    c = train.schedule_from_epochs(train.TrainConfig(epochs=1, batch_size=128, warmup_ratio=0.03), 665_298, quiet)
    assert (c.steps, c.warmup_steps) == (5198, 155)                # LLaVA-665K at the released batch
    assert train.schedule_from_epochs(train.TrainConfig(steps=7), 1000, quiet).steps == 7
    with pytest.raises(train.TrainingError, match="--epochs must be positive"):
        train.check_config(train.TrainConfig(epochs=0))


def test_weight_decay_is_chosen_by_name():
    """As mamba_ssm and the released recipe: decay on the weights of linear maps, convolutions and embeddings; none
    on biases, norms (LayerNorm, RMSNorm, the gated norm), DINOv2's layer scale, or the SSMs' A_log, dt_bias and D,
    whatever their shape: the connector's are (K, nheads) matrices."""
    config, _ = train.parse_args(["--preset", "cpu", "--connector", "msc", "--scan", "cross"])
    model = train.MLMamba(train.scratch_config(config, vocab_size=64))
    optimizer = train.make_optimizer(model, config, torch.device("cpu"))
    decayed, plain = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == config.weight_decay > 0
    assert optimizer.param_groups[1]["weight_decay"] == 0
    names = dict(model.named_parameters())
    for name in ("connector.msc.layers.0.mixer.A_log", "connector.msc.layers.1.mixer.dt_bias",
                 "connector.msc.layers.0.mixer.D", "lm.layers.0.mixer.A_log",
                 "connector.msc.layers.0.mixer.norm.weight",
                 "connector.msc.layers.0.norm.weight", "connector.msc.norm_f.bias", "lm.norm_f.weight",
                 "vision.blocks.0.norm1.weight", "connector.projector.0.bias", "lm.layers.1.mixer.conv1d.bias"):
        assert id(names[name]) in plain, name
    assert names["connector.msc.layers.0.mixer.A_log"].dim() == 2
    for name in ("connector.msc.layers.0.mixer.in_proj.weight", "connector.msc.layers.0.mixer.conv1d.weight",
                 "connector.msc.layers.0.mlp.w3.weight", "lm.embedding.weight", "vision.blocks.0.attn.qkv.weight"):
        assert id(names[name]) in decayed, name
    assert len(decayed) + len(plain) == len(names)
    for name in ("vision.towers.0.cls_token", "vision.towers.0.blocks.1.gamma1", "vision.towers.0.blocks.0.gamma2"):
        assert not train.decays(name), name                               # DINOv2's, in a fused encoder
    assert train.decays("vision.towers.0.pos_embed") and train.decays("vision.towers.1.blocks.0.mlp.fc1.weight")


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
        loss, grad_norm, _, nonfinite = train.train_step(model, micro_batches, optimizer, config, ranks,
                                                         model.num_visual_tokens)
        assert nonfinite == []
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
    model = checkpoints.load_pretrained(tmp_path / "out" / "latest")
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


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group"])
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, to_group):
    """SIGTERM to train.py alone, or to its whole process group with DataLoader workers running (as `timeout`, a
    terminal's Ctrl-C or a job scheduler send it): the workers leave the signal to the main process, which saves."""
    out_dir = tmp_path / "out"
    command = [sys.executable, "train.py", "--out_dir", str(out_dir), *TINY, "--steps", "100000",
               "--save_every", "100000", "--eval_every", "100000", "--num_workers", "2" if to_group else "0"]
    with Bounded(command, 300, "train.py, to be stopped by SIGTERM", cwd=ROOT, env=subprocess_env(),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as bounded:
        process, output = bounded.process, []
        for line in process.stdout:                             # wait until it trains
            output.append(line)
            if line.startswith("training steps"):
                break
        time.sleep(1.0)                                         # (the handlers are in place before that line)
        if to_group:
            os.killpg(process.pid, signal.SIGTERM)              # Bounded starts it in a session (a group) of its own
        else:
            process.send_signal(signal.SIGTERM)
        rest, _ = bounded.output = process.communicate()
    output = "".join(output) + rest
    assert process.returncode == 0, output
    step = checkpoint_step(out_dir)
    assert step is not None and 1 <= step < 100000
    assert f"stopped by SIGTERM at step {step}" in output and "--resume" in output
    checkpoints.load_pretrained(out_dir / "latest")


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
    process = run_bounded([sys.executable, "-c", KILL_DURING_SAVE, "--out_dir", str(out_dir), *TINY, "--steps", "6",
                           "--save_every", "2", "--eval_every", "100"], 300, "train.py, to be killed while saving",
                          cwd=ROOT, env=subprocess_env())
    assert process.returncode == -signal.SIGKILL, process.stdout + process.stderr
    assert train.latest_checkpoint(out_dir).name == "ckpt-000002" and checkpoint_step(out_dir) == 2
    checkpoints.load_pretrained(out_dir / "latest")                                           # loads, complete
    resumed = train.main(["--out_dir", str(out_dir), "--resume"])
    assert resumed["step"] == 6 and [s for s, _ in resumed["history"]["train"]] == list(range(1, 7))
    assert sorted(p.name for p in out_dir.iterdir() if "ckpt" in p.name) == ["ckpt-000006"]   # partials gone


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(tmp_path, mode):
    """torchrun with 2 CPU processes (gloo): each takes half of every global batch of 4; one process takes the same
    batch as 2 micro-batches. Same losses, same held-out results. Each launch is bounded: a hang fails the test with
    each rank's stack (tests/bounded.py)."""
    flags = [*TINY, "--steps", "4", "--micro_batch_size", "2", "--eval_every", "4", "--save_every", "2"]
    histories = {}
    for n in (1, 2):
        out_dir = tmp_path / f"n{n}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
                   "--out_dir", str(out_dir), *flags, *(["--fsdp"] if mode == "fsdp" else [])]
        process = run_bounded(command, 240, f"torchrun --nproc_per_node={n} train.py ({mode})", cwd=ROOT,
                              env=subprocess_env(cpu_only=True))
        assert process.returncode == 0, process.stdout + process.stderr
        assert f"{n} process(es)" in process.stdout and "held-out accuracy" in process.stdout
        histories[n] = train.load_trainer_state(out_dir / "latest")["history"]
    for kind in ("train", "eval"):
        torch.testing.assert_close(torch.tensor(histories[2][kind]), torch.tensor(histories[1][kind]),
                                   rtol=1e-5, atol=1e-6)


STOP_IN_STEP_2 = """
import os, signal, sys
import train

seed_step = train.seed_step

def stop_in_step_2(c, step, rank):
    if step == 1 and rank == 0:             # rank 0 alone is signalled: the other ranks stop with it
        os.kill(os.getpid(), signal.SIGTERM)
    seed_step(c, step, rank)

train.seed_step = stop_in_step_2
train.main(sys.argv[1:])
"""


def test_a_run_of_two_processes_resumes_exactly_in_one(tmp_path):
    """torchrun with 2 CPU processes (FSDP, gloo) stopped by SIGTERM in step 2 saves a checkpoint; one process resumes
    it: the losses and final weights of one process that ran all 4 steps, to the rounding of summing over two ranks
    (as test_two_processes_give_the_losses_of_one). The checkpoint holds the whole model and optimizer state, not the
    ranks' shards, and each step's data is a global batch."""
    flags = [*TINY, "--steps", "4", "--micro_batch_size", "2", "--eval_every", "4", "--save_every", "4"]
    whole = tiny_run(tmp_path / "whole", *flags[len(TINY):])
    script = tmp_path / "stop.py"
    script.write_text(STOP_IN_STEP_2)
    parts = tmp_path / "parts"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--out_dir", str(parts), *flags, "--fsdp"]
    process = run_bounded(command, 240, "torchrun --nproc_per_node=2 train.py, stopped in step 2", cwd=ROOT,
                          env=dict(subprocess_env(cpu_only=True), PYTHONPATH=str(ROOT)))
    assert process.returncode == 0, process.stdout + process.stderr
    assert "stopped by" in process.stdout and checkpoint_step(parts) == 2
    resumed = train.main(["--out_dir", str(parts), "--resume"])
    assert resumed["step"] == 4
    for kind in ("train", "eval"):
        torch.testing.assert_close(torch.tensor(resumed["history"][kind]), torch.tensor(whole["history"][kind]),
                                   rtol=1e-5, atol=1e-6)
    a, b = (load_file(run / "latest" / "model.safetensors") for run in (tmp_path / "whole", parts))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


HANG = """
import sys, time
from pathlib import Path
import train

def never_arrives():
    time.sleep(600)

def hang(c, ranks, preset):
    (Path(sys.argv[1]) / f"ready{ranks.rank}").touch()
    if ranks.rank == 0:
        train.all_sum([1.0], ranks)                     # waits for rank 1, which never comes
    else:
        never_arrives()

train.run = hang
train.main(sys.argv[2:])
"""


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the processes to stop through /proc")
def test_a_hang_fails_with_each_ranks_stack_and_leaves_no_process(tmp_path):
    """The bound on the tests above, tried on torchrun ranks that hang: rank 0 in a collective that rank 1 never
    joins. The test fails with where each rank waited, and no process of the run is left."""
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), *TINY, "--out_dir", str(tmp_path / "out")]
    env = dict(subprocess_env(cpu_only=True), PYTHONPATH=str(ROOT))
    with pytest.raises(pytest.fail.Exception) as failure:
        with Bounded(command, 300, "a run that hangs", cwd=ROOT, env=env, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True) as bounded:
            while bounded.process.poll() is None and not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
                time.sleep(0.1)
            time.sleep(0.5)                                             # rank 0 now waits inside all_sum
            start = time.monotonic()
            bounded.deadline_in(0)
            bounded.output = bounded.process.communicate()
    assert time.monotonic() - start < 20
    message = str(failure.value)
    assert "did not finish within" in message
    assert re.search(r"rank 0 of 2, pid \d+: in .*, called from all_sum \(train.py:\d+\)", message), message
    assert re.search(r"rank 1 of 2, pid \d+: in never_arrives \(hang.py:\d+\)", message), message
    assert not _processes(bounded.marker)


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
    with pytest.raises(train.TrainingError, match=r"step 3: the loss is nan") as stop:
        tiny_run(tmp_path, "--steps", 6, "--save_every", 2, "--eval_every", 100)
    message = str(stop.value)
    assert "not finite in the gradients of" in message and "vision." in message
    assert f"The last good checkpoint is {tmp_path / 'ckpt-000002'}" in message
    assert f"python train.py --out_dir {tmp_path} --resume --lr" in message
    assert train.latest_checkpoint(tmp_path).name == "ckpt-000002"
    weights = load_file(tmp_path / "latest" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_nan_before_any_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    """With no checkpoint yet, the message cannot say --resume: it says to start again with a lower --lr."""
    forward = MLMamba.forward

    def nan_gradient(self, *args, **kwargs):                 # one tensor's gradient overflows; the loss is finite
        bias = self.connector.projector[4].bias
        if torch.is_grad_enabled() and not bias._backward_hooks:
            bias.register_hook(lambda grad: grad * float("inf"))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(MLMamba, "forward", nan_gradient)
    with pytest.raises(train.TrainingError, match=r"step 1: the loss is [0-9.]+ \(gradient norm (nan|inf)\)") as stop:
        tiny_run(tmp_path, "--steps", 4, "--save_every", 2, "--eval_every", 100)
    message = str(stop.value)
    assert "not finite in the gradients of 1 tensor: connector.projector.4.bias;" in message
    assert "--resume" not in message
    assert "No checkpoint was saved yet (every 2 steps), so start again" in message and "--lr" in message


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
    checkpoints.load_pretrained(tmp_path / "latest")


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


def test_a_small_data_file_holds_out_a_tenth(tmp_path, capsys):
    """Without --eval_data, eval_samples (here 1000) would hold out all 20 records: a tenth is held out instead."""
    records = data.make_shapes(data.ShapesConfig(image_size=16, n_train=20, n_test=0, seed=3))["train"]
    train_json = write_records(tmp_path / "data", records)
    config, _ = train.parse_args(["--data", str(train_json), "--images", str(tmp_path / "data"), "--eval_samples",
                                  "1000"])
    records, held_out, _ = train.load_data(config, train.Ranks(0, 1, torch.device("cpu")))
    assert len(held_out) == 2 and len(records) == 18
    assert "holding out 2 of 20 records for evaluation, a tenth" in capsys.readouterr().out


def test_ctrl_c_while_writing_the_builtin_data_leaves_nothing_and_no_traceback(tmp_path):
    """The second split's images interrupted: the temporary folder is removed, one line, exit status 130."""
    script = ("import runpy, sys, data\n"
              "write_llava = data.write_llava\n"
              "def interrupted(records, folder, name):\n"
              "    if name == 'test':\n"
              "        raise KeyboardInterrupt\n"
              "    return write_llava(records, folder, name)\n"
              "data.write_llava = interrupted\n"
              "sys.argv = ['train.py', *sys.argv[1:]]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script, "--out_dir", str(tmp_path), *TINY], cwd=ROOT,
                          env=subprocess_env(cpu_only=True), capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and done.stderr.strip().splitlines() == [
        "train.py: interrupted (Ctrl-C); the latest checkpoint, if any, is whole"], done.stderr
    assert not list((tmp_path / "data").iterdir())                          # neither .tmp-shapes-... nor a half set


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


def test_the_held_out_table_gives_each_question_type_against_its_chance():
    result = dict(accuracy=0.5, baseline=0.375, n=4, types={"colour": dict(accuracy=1.0, baseline=0.25, n=2),
                                                          "shape": dict(accuracy=0.0, baseline=0.5, n=2)})
    lines = train.type_table(result).splitlines()
    assert [line.split() for line in lines] == [["question", "type", "accuracy", "chance", "records"],
                                                ["colour", "100.0%", "25.0%", "2"], ["shape", "0.0%", "50.0%", "2"],
                                                ["all", "50.0%", "37.5%", "4"]]
    assert train.type_table(dict(result, types={})) == ""              # records without question types


def test_bad_images_are_counted_and_skipped(tmp_path, data_with_bad_images, capsys):
    result = tiny_run(tmp_path / "out", *data_with_bad_images)
    output = capsys.readouterr().out
    assert result["step"] == 3 and checkpoint_step(tmp_path / "out") == 3
    assert "training data: skipped 1 sample with unreadable images (first: id 'empty'" in output
    assert [i for i, _ in result["skipped"]] == ["truncated"]
    assert "data: skipped 1 sample with unreadable images (first: id 'truncated'" in output


@pytest.mark.parametrize("bad", ["empty", "truncated"])
def test_strict_images_makes_a_bad_image_fatal(tmp_path, data_with_bad_images, bad):
    if bad == "truncated":                                                # leave only the one found while loading
        train_json = Path(data_with_bad_images[1])
        train_json.write_text(json.dumps([r for r in json.loads(train_json.read_text()) if r["id"] != "empty"]))
    with pytest.raises(train.TrainingError, match=f"'{bad}'"):
        tiny_run(tmp_path / "out", *data_with_bad_images, "--strict_images")
    assert checkpoint_step(tmp_path / "out") is None
