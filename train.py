"""Train ML-Mamba: a vision encoder, a connector and a Mamba-2 LM, on LLaVA-format conversations.

    python train.py                               # the main job: a tiny from-scratch model learns the built-in
                                                  # shapes data (a GPU preset, or a smaller CPU one); held-out accuracy
    python train.py --lm mamba2-370m --vision siglip-base-patch16-224 --data llava.json --images img/ \\
                    --stage 1 --out_dir out/stage1                            # paper stage 1: the connector only
    python train.py --init out/stage1/latest --data llava.json --images img/ --stage 2 --out_dir out/stage2
    torchrun --nproc_per_node=8 train.py ... [--fsdp]                          # data parallel, same results per batch
    python train.py --out_dir out/shapes --resume                              # continue exactly where it stopped

The recipe, top to bottom:
1. Config       `TrainConfig`: one flag per field (`--lr 3e-4` sets `lr`); `--preset` picks defaults, flags override
2. Data         LLaVA JSON validated before anything trains (every problem listed with its record id); the built-in
                shapes data is first written to disk as LLaVA JSON, so it takes the very same path as real data
3. Model        from scratch (tiny sizes from the preset), from pretrained Mamba-2 + SigLIP folders, or from a
                checkpoint of this script; `--stage` picks what trains
4. Optimisation AdamW, linear warmup then cosine decay, gradient clipping; each step's loss is the mean over the
                supervised tokens of the whole global batch, however it is split into micro-batches and ranks
5. Checkpoints  a fresh directory per save, published by atomically replacing the `latest` symlink; exact resume
6. Evaluation   held-out loss, and exact-match accuracy of greedy answers against a majority-answer baseline
7. The loop     `setup`, then `train_loop` (each step: batch, learning rate, step, log, evaluate, checkpoint), then
                `finish`; SIGINT/SIGTERM save and exit cleanly; a NaN/inf loss stops before it touches the weights
8. Loss curve   a PNG drawn with pillow

Exact resume: a step's data is a function of (seed, step) only (data.ShardedBatchSampler), the learning rate a
function of the step, and the random generators are re-seeded from (seed, step, rank) before every step; so model,
optimizer state, step and loss history are all a checkpoint needs for a resumed run to equal an uninterrupted one.
"""
import argparse
import contextlib
import dataclasses
import errno
import faulthandler
import functools
import gc
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoints
import data
from flags import add_flags, option
from mlmamba import ConnectorConfig, Mamba2Block, Mamba2Config, MLMamba, MLMambaConfig
from tokenizer import load_tokenizer
from vision import RESIZE_STRATEGIES, Block, ImageTransform, VisionConfig


class TrainingError(Exception):
    """A problem the user can fix (bad data, a bad checkpoint, a full disk, a diverged loss): printed without a
    traceback, exit status 1."""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class TrainConfig:
    # run
    out_dir: str = option("out/shapes", "checkpoints, the tokenizer, the built-in data and the loss curve go here")
    resume: bool = option(False, "continue the run in out_dir from its latest checkpoint, exactly")
    seed: int = option(0, "seeds the data order, the initialisation and the built-in data")
    # data
    data: str | None = option(None, "LLaVA-format JSON (or JSON Lines) to train on; default: the built-in shapes")
    images: str | None = option(None, "the folder that the records' image paths are relative to")
    eval_data: str | None = option(None, "held-out LLaVA-format JSON; default: eval_samples records (at most a "
                                                "tenth) held out of --data")
    eval_samples: int = option(1000, "held-out records evaluated (and held out of --data when there is no --eval_data)")
    shapes_train: int = option(20_000, "built-in data: training records")
    shapes_test: int = option(1000, "built-in data: held-out records")
    shapes_image_size: int = option(64, "built-in data: side of the drawn images in pixels")
    max_len: int = option(256, "text tokens per example at most (the visual tokens come on top)")
    strict_images: bool = option(False, "stop at the first unreadable image instead of counting and skipping it")
    num_workers: int = option(2, "DataLoader worker processes per rank")
    # model
    init: str | None = option(None, "start from a checkpoint of this script (e.g. out/stage1/latest)")
    lm: str | None = option(None, "a pretrained Mamba-2 folder (mamba_ssm's or transformers' layout)")
    vision: str | None = option(None, "a pretrained SigLIP (or DINOv2) folder; needed with --lm")
    dinov2: str | None = option(None, "a DINOv2 folder fused in front of --vision (Prismatic's dinosiglip)")
    tokenizer: str | None = option(None, "tokenizer.json or sentencepiece .model; default: the one in --lm or --init, "
                                         "or one trained on the data for a from-scratch model")
    connector: str = option("msc", "connector: msc (ML-Mamba's Mamba-2 Scan Connector), mlp (the MLP alone), "
                                   "vss-mlp or vss-l2 (VL-Mamba's)")
    scan: str = option("bidirectional", "the connector's scan directions: bidirectional, cross, or scan order names "
                                        "from scan2d_kernel.py, comma-separated (row,snake)")
    connector_blocks: int = option(2, "MSC blocks (scan + SwiGLU) in the msc connector")
    image_resize_strategy: str = option("resize-naive", "a new model's image preprocessing: resize-naive (stretch), "
                                                        "letterbox or resize-crop; --init keeps its model's")
    connector_swiglu: bool = option(True, "the SwiGLU in each MSC block (Eq. 8); --no-connector_swiglu is Eq. 7")
    image_size: int = option(64, "from scratch: the vision encoder's input side in pixels")
    patch_size: int = option(8, "from scratch: ViT patch side; (image_size / patch_size)^2 visual tokens")
    vision_width: int = option(192, "from scratch: ViT width (heads of 64 channels)")
    vision_depth: int = option(4, "from scratch: ViT blocks")
    d_model: int = option(256, "from scratch: Mamba-2 width")
    n_layer: int = option(4, "from scratch: Mamba-2 blocks")
    d_state: int = option(64, "from scratch: SSD state size N of the LM (and so of the connector's scans)")
    headdim: int = option(64, "from scratch: SSD head dimension P of the LM (and of the connector's scans)")
    chunk_size: int = option(64, "from scratch: SSD chunk length of the LM and the connector, a power of two, "
                                 "16 to 4096")
    vocab_size: int = option(512, "from scratch: sentencepiece vocabulary (256 byte pieces included)")
    stage: str = option("full", "what trains: 'full' everything (from scratch), '1' the connector (vision and LM "
                                "frozen), '2' connector and LM (vision frozen)")
    # optimisation
    steps: int = option(3000, "optimizer steps")
    epochs: float | None = option(None, "passes over the training records; when given it sets --steps")
    batch_size: int = option(128, "samples per optimizer step, over all ranks and micro-batches")
    micro_batch_size: int = option(128, "samples per forward pass on one rank; gradients accumulate up to batch_size")
    lr: float = option(1.5e-3, "peak learning rate, reached after warmup_steps")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(300, "linear warmup from 0")
    warmup_ratio: float | None = option(None, "when given, warmup_steps = this fraction of the steps")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices and embeddings only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradients' global norm to this")
    precision: str = option("auto", "'bf16' autocast (float32 weights), 'fp32', or 'auto': bf16 on a GPU")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, ~30% slower")
    keep_blocks: int = option(0, "with --grad_checkpointing, the last N LM blocks keep their activations instead: "
                                 "faster, at about 0.85 GiB a block for the 2.7B LM at 16 x 985 tokens")
    fsdp: bool = option(False, "with torchrun: shard weights, gradients and optimizer state (FSDP2, per block)")
    # evaluation, logging, checkpoints
    eval_every: int = option(500, "evaluate on the held-out records every this many steps (and at the end)")
    eval_batch_size: int = option(100, "held-out samples per forward pass")
    max_new_tokens: int = option(64, "evaluation: the longest answer generated")
    save_every: int = option(1000, "checkpoint every this many steps (and at the end, and when interrupted)")


PRESETS = {
    # one GPU: the defaults above; 64 px images, an 8 x 8 patch grid, a 4-block LM, the paper's connector (84.9%
    # held-out on an H200 with the Zephyr template; 99.6% in 6.1 min with the earlier In:/Out: one)
    "gpu": dict(shapes_train=50_000, steps=5000, lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_every=2500,
                save_every=2500, num_workers=6),
    # 2 CPU cores, about 3 minutes (3:06 measured, data and tokenizer included): 32 px images on a 4 x 4 patch grid
    # (each quadrant's object 2 x 2 patches, so the scan order matters), the paper's connector at the small LM's sizes,
    # 2-block towers; 50.2% held-out (chance 30%: count 100%, position 46%, colour 30%, relation and shape at chance;
    # 2026-12-02), what 1000 steps of 64 with a 320-piece vocabulary reached in 6.5 min. The 512-piece vocabulary
    # makes each word one token (at 320 "top left" was 7 byte-level pieces) and shortens the sequences; batches of 32
    # take twice the steps for the same samples. The model sits at the answer priors for a few hundred steps, and
    # when it leaves varies between runs (37-50% for near-equal settings). At this budget lr 5e-4, 2e-3 or 3e-3,
    # d_model 128, d_state 64, a wider and deeper ViT and 64 px images with patch 16 did no better; a 1-block ViT or
    # batches of 16 gave 35-52%, and headdim 16, 4 LM blocks, 16,000 images, patch 4 or no weight decay 36-50%.
    # Seeds move it as much: this preset gives 50.2%, 44.6%, 51.0% with seeds 0, 1, 2, and one LM block for 1400
    # steps (the same time) 56.4%, 46.6%, 40.6%. The shapes are in what the LM reads: a linear probe finds each
    # object's shape in its 2 x 2 visual tokens (98.7% from the tower, 79.7% after the connector; 97.6% and 94.0%
    # untrained), so the limit is the small LM learning to look them up from the question within this budget, not
    # the vision tower. On an idle machine (1.6 min, 2026-12-07) twice the steps fit in 3 minutes but gave 50.0%;
    # 1500 steps with 3 LM blocks 42.8%, with d_model 128 49.8%; d_state 64 with headdim 16 49.4%; lr 2e-3 after 200
    # warmup steps stayed at chance. 6000 steps (9 min) reached 56.8%, colour 54% but shape still at chance.
    "cpu": dict(shapes_train=8000, shapes_test=500, shapes_image_size=32, image_size=32, patch_size=8,
                vision_width=64, vision_depth=2, d_model=64, n_layer=2, d_state=16, headdim=32, chunk_size=16,
                vocab_size=512, steps=1000, batch_size=32, micro_batch_size=32, lr=1e-3, min_lr=1e-4,
                warmup_steps=50, eval_every=500, eval_samples=500, save_every=1000, num_workers=0),
}
STAGES = {"full": ("vision", "connector", "lm"), "1": ("connector",), "2": ("connector", "lm")}

# The released run's settings by stage (WenjunHuang94/ML-Mamba: mlmamba/conf/models.py, the run's config.json;
# mlmamba/training/strategies/fsdp.py `run_setup`): AdamW at its default betas, linear warmup over 3% then cosine to
# 0, clip 1.0, bf16, gradient checkpointing, no decay on 1-D parameters and biases. Stage "1" is its "align" (the
# connector trains), "2" its "finetune" (connector + LM), from --lm/--vision directly in the released "no-align" run
# or from --init of a stage-1 run. One epoch each, as the released config.json and the paper's Table 1; the paper's
# text says two for fine-tuning (--epochs 2). The per-device batch is the released one; --micro_batch_size changes
# only memory, not the numbers.
RECIPES = {"paper": {
    "1": dict(epochs=1, batch_size=256, micro_batch_size=16, lr=1e-3, weight_decay=0.0),
    "2": dict(epochs=1, batch_size=128, micro_batch_size=8, lr=2e-5, weight_decay=0.1),
    "common": dict(min_lr=0.0, warmup_ratio=0.03, beta1=0.9, beta2=0.999, grad_clip=1.0, precision="bf16",
                   grad_checkpointing=True, max_len=2048, image_resize_strategy="resize-naive"),
}}


def parse_args(argv=None):
    """TrainConfig from the command line: preset defaults, then (with --resume) the run's saved config, then the
    flags given. Returns (config, preset name)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_preset = "gpu" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset,
                        help=f"defaults for the sizes and schedule, shown below; explicit flags override them "
                             f"(default: gpu where CUDA is available, else cpu; here {default_preset})")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="the paper's training settings for --stage 1 (align) or 2 (fine-tune), over the "
                             "preset's; explicit flags override them (see RECIPES in train.py)")
    args = vars(add_flags(parser, TrainConfig, PRESETS).parse_args(argv))
    preset, recipe = args.pop("preset"), args.pop("recipe")
    values = {**PRESETS[preset], **args}
    if recipe is not None:
        stage = values.get("stage", TrainConfig.stage)
        if stage not in ("1", "2"):
            raise TrainingError(f"--recipe {recipe} sets the released run's stages: give --stage 1 or --stage 2")
        values = {**PRESETS[preset], **RECIPES[recipe]["common"], **RECIPES[recipe][stage], **args}
    if args.get("resume"):
        saved = Path(args.get("out_dir", TrainConfig.out_dir)) / "latest" / "train_config.json"
        if not saved.is_file():
            raise TrainingError(f"--resume: {saved} not found; there is no checkpoint to resume in that out_dir")
        values = {**json.loads(saved.read_text()), **args}
    config = TrainConfig(**values)
    check_config(config)
    return config, preset


def check_config(c):
    problems = []
    if c.stage not in STAGES:
        problems.append(f"--stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
    if c.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"--precision must be auto, bf16 or fp32, got {c.precision!r}")
    if (c.lm is None) != (c.vision is None):
        problems.append("--lm and --vision go together (a pretrained Mamba-2 and a pretrained vision encoder)")
    if c.init is not None and c.lm is not None:
        problems.append("--init and --lm/--vision are two different starting points; give one")
    if c.dinov2 is not None and c.vision is None:
        problems.append("--dinov2 is fused with a --vision encoder; give both")
    if c.image_resize_strategy not in RESIZE_STRATEGIES:
        problems.append(f"--image_resize_strategy must be one of {', '.join(RESIZE_STRATEGIES)}, got "
                        f"{c.image_resize_strategy!r}")
    if c.epochs is not None and not c.epochs > 0:
        problems.append(f"--epochs must be positive, got {c.epochs}")
    if c.warmup_ratio is not None and not 0 <= c.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
    if c.images is not None and c.data is None:
        problems.append("--images goes with --data")
    if c.keep_blocks and not c.grad_checkpointing:
        problems.append("--keep_blocks goes with --grad_checkpointing (without it every block keeps its activations)")
    if c.keep_blocks < 0:
        problems.append(f"--keep_blocks must be 0 or more, got {c.keep_blocks}")
    if c.stage != "full" and c.lm is None and c.init is None:
        problems.append(f"--stage {c.stage} freezes the vision encoder, which from scratch is random: train "
                        f"from scratch with --stage full, or give --lm/--vision or --init")
    for name in ("steps", "batch_size", "micro_batch_size", "eval_every", "save_every", "eval_samples",
                 "eval_batch_size", "max_len", "max_new_tokens"):
        if getattr(c, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(c, name)}")
    if problems:
        raise TrainingError("bad arguments:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# Processes: one, or one per GPU / CPU slot under torchrun


@dataclass
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        """The rank that prints and writes files."""
        return self.rank == 0


def arm_stack_dump():
    """With STACK_DUMPS=<folder> in the environment (tests/bounded.py sets it), SIGUSR1 makes this process write
    every thread's stack to <folder>/rank<RANK>.txt: a test whose ranks hang fails saying where each one waited."""
    folder = os.environ.get("STACK_DUMPS")
    if folder and hasattr(signal, "SIGUSR1"):
        rank = os.environ.get("RANK", "0")
        dump = open(Path(folder) / f"rank{rank}.txt", "w")          # faulthandler keeps it open
        dump.write(f"rank {rank} of {os.environ.get('WORLD_SIZE', '1')}, pid {os.getpid()}\n")
        dump.flush()
        faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)


def setup_processes():
    """Join torchrun's process group when launched by it (nccl on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ:
        return Ranks(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def all_sum(values, ranks):
    """Sum a list of numbers over the ranks (a float64 vector, one all_reduce)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    if ranks.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def on_main(ranks, fn):
    """fn() on the main rank only (it writes the files), the others waiting; its result, or its error as a
    TrainingError, reaches every rank, so that no rank is left waiting for one that failed."""
    outcome = [None, None]
    if ranks.main:
        try:
            outcome[0] = fn()
        except (TrainingError, ValueError, FileNotFoundError) as e:
            outcome[1] = str(e)
    if ranks.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise TrainingError(outcome[1])
    return outcome[0]


def print0(ranks, *args):
    if ranks.main:
        tqdm.write(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------------------------------------------------
# 2. Data


def shapes_folder(c):
    """Where the built-in data lives on disk, named by everything that determines it."""
    return (Path(c.out_dir) / "data" /
            f"shapes-{c.shapes_image_size}px-{c.shapes_train}-{c.shapes_test}-seed{c.seed}")


def write_shapes(c):
    """The built-in data as LLaVA files (train.json, test.json, images/), written once, atomically: a run killed
    while writing leaves no half-written folder behind."""
    folder = shapes_folder(c)
    if not folder.is_dir():
        splits = data.make_shapes(data.ShapesConfig(c.shapes_image_size, c.shapes_train, c.shapes_test, c.seed))
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            data.write_llava(splits["train"], tmp, "train")
            data.write_llava(splits["test"], tmp, "test")
            os.replace(tmp, folder)
        except BaseException:                          # Ctrl-C, a full disk, ...: no half-written folder left
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder / "train.json", folder / "test.json", folder


def load_data(c, ranks):
    """(train records, held-out records, image folder): read, validated, unreadable images counted and left out."""
    if c.data is None:
        train_json, eval_json, images = on_main(ranks, lambda: write_shapes(c))
    else:
        train_json, eval_json, images = Path(c.data), c.eval_data, c.images
    try:
        train = data.load_conversations(train_json, images)
        if eval_json is not None:
            held_out = data.load_conversations(eval_json, images)[:c.eval_samples]
        else:                                          # a seeded random choice of records, left out of training
            n = min(c.eval_samples, max(1, len(train) // 10))     # at most a tenth, so a small --data still trains
            if n < c.eval_samples:
                print0(ranks, f"data: holding out {n} of {data.plural(len(train), 'record')} for evaluation, a tenth "
                              f"(fewer than --eval_samples {c.eval_samples}); --eval_data gives a held-out set")
            order = np.random.default_rng(c.seed).permutation(len(train))
            held_out = [train[i] for i in sorted(order[:n])]
            train = [train[i] for i in sorted(order[n:])]
            if not train:
                raise ValueError(f"data: {train_json} holds 1 record, which is held out for evaluation; give more "
                                 f"records, or --eval_data")
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    train = _drop_unreadable(train, images, c.strict_images, "training", ranks)
    held_out = _drop_unreadable(held_out, images, c.strict_images, "held-out", ranks)
    return train, held_out, images


def _drop_unreadable(records, images, strict, split, ranks):
    """The records without the images whose header cannot be read (`data.find_unreadable_images`)."""
    bad = dict(data.find_unreadable_images(records, images))
    if bad and strict:
        listed = "\n  ".join(f"id {i!r}: {reason}" for i, reason in list(bad.items())[:data.MAX_LISTED])
        raise TrainingError(f"data: {data.plural(len(bad), 'unreadable image')} in the {split} records "
                            f"(--strict_images):\n  {listed}")
    if bad:
        print0(ranks, f"{split} {data.skip_summary(list(bad.items()))}")
    return [r for r in records if r["id"] not in bad]


def train_text_tokenizer(c, records, ranks):
    """A from-scratch run's sentencepiece tokenizer, trained on its training text once and kept in out_dir."""
    path = Path(c.out_dir) / "tokenizer.model"

    def train():
        if not path.is_file():
            tmp = path.with_name(f".tmp-{os.getpid()}-tokenizer.model")
            data.train_tokenizer(records, tmp, c.vocab_size)
            os.replace(tmp, path)
        return path
    return on_main(ranks, train)


def tokenizer_path(c, start, records, ranks):
    """The tokenizer file this run uses: the one in the checkpoint it starts from, --tokenizer, the one in --lm's
    folder, or a new one trained on the records."""
    if c.tokenizer is not None and start is None:
        return Path(c.tokenizer)
    if start is not None or c.lm is not None:
        folder = Path(start or c.lm)
        found = [folder / name for name in ("tokenizer.json", "tokenizer.model") if (folder / name).is_file()]
        if not found:
            raise TrainingError(f"no tokenizer.json or tokenizer.model in {folder}; give --tokenizer (the Mamba-2 "
                                f"checkpoints use GPT-NeoX's tokenizer.json, EleutherAI/gpt-neox-20b)")
        return found[0]
    return train_text_tokenizer(c, records, ranks)


def tokenizer_files(path):
    """The tokenizer file and the special-token files that `tokenizer.load_tokenizer` reads beside a tokenizer.json,
    as {name in a checkpoint: contents}; read once, as the run's first checkpoint may be where they come from."""
    path = Path(path)
    files = {f"tokenizer{path.suffix}": path.read_bytes()}
    if path.suffix == ".json":
        beside = [path.parent / name for name in ("special_tokens_map.json", "tokenizer_config.json")]
        files.update({file.name: file.read_bytes() for file in beside if file.is_file()})
    return files


def split_collate(collate, micro_batch_size, examples):
    """This rank's share of a global batch, collated as micro-batches of micro_batch_size examples."""
    return [collate(examples[i:i + micro_batch_size]) for i in range(0, len(examples), micro_batch_size)]


def _ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which saves a checkpoint and stops them. A
    terminal's Ctrl-C, `timeout` and job schedulers signal the whole process group: a worker that died of SIGTERM
    would make the DataLoader raise in the middle of that checkpoint."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def batch_stream(dataset, c, ranks, start_step):
    """Endless: for each step from start_step, this rank's micro-batches of that step's global batch."""
    sampler = data.ShardedBatchSampler(len(dataset), c.batch_size, c.seed, ranks.rank, ranks.world_size,
                                       start=start_step)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=c.num_workers, worker_init_fn=_ignore_stop_signals,
        collate_fn=functools.partial(split_collate, dataset.collate, c.micro_batch_size),
        pin_memory=ranks.device.type == "cuda"))


def never_empty(batch, dataset):
    """The batch, or, when every example in it was skipped, one row of one pad token with a blank image and no
    label: it adds nothing to the loss, yet every rank still runs every part of the model forward and backward
    (DDP and FSDP communicate inside those passes)."""
    if len(batch["ids"]):
        return batch
    size = dataset.image_size
    return dict(batch, input_ids=torch.full((1, 1), dataset.pad_id), labels=torch.full((1, 1), data.IGNORE_INDEX),
                lengths=torch.ones(1, dtype=torch.long), has_image=torch.ones(1, dtype=torch.bool),
                pixel_values=torch.zeros(1, 3, size, size))


def model_inputs(batch, device):
    return {k: batch[k].to(device, non_blocking=True)
            for k in ("input_ids", "labels", "pixel_values", "has_image", "lengths")}


# ----------------------------------------------------------------------------------------------------------------------
# 3. Model


def scratch_config(c, vocab_size):
    """A small ML-Mamba with random weights. Every part trains (--stage full): a random vision encoder frozen would
    give the connector nothing to read. Features after the last block and its norm: a tiny ViT has no layer to spare."""
    vision = VisionConfig(arch="siglip", image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                          depth=c.vision_depth, heads=max(1, c.vision_width // 64), mlp_dim=4 * c.vision_width,
                          feature_layer=None)
    lm = Mamba2Config(d_model=c.d_model, n_layer=c.n_layer, vocab_size=vocab_size, d_state=c.d_state,
                      headdim=c.headdim, chunk_size=c.chunk_size)
    return MLMambaConfig(vision=vision, connector=connector_config(c), lm=lm,
                         image_resize_strategy=c.image_resize_strategy)


def connector_config(c):
    """The connector's kind and scan directions; its scans take the LM's Mamba-2 sizes, as in the released code."""
    return ConnectorConfig(kind=c.connector, scan=c.scan, n_blocks=c.connector_blocks, swiglu=c.connector_swiglu)


def build_model(c, start, vocab_size, ranks):
    """The model in float32 on this rank's device, from the checkpoint `start`, from --lm and --vision, or from
    scratch; its parts that do not train in --stage frozen."""
    torch.manual_seed(c.seed)                          # the same initial weights on every rank
    try:
        if start is not None:
            model = checkpoints.load_pretrained(start, dtype=torch.float32, device=ranks.device)
        elif c.lm is not None:
            model = checkpoints.from_pretrained(c.lm, c.vision, connector_config(c), dinov2_path=c.dinov2,
                                                dtype=torch.float32, device=ranks.device,
                                                image_resize_strategy=c.image_resize_strategy)
        else:
            model = MLMamba(scratch_config(c, vocab_size)).to(ranks.device)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    if vocab_size > model.config.lm.vocab_size:
        raise TrainingError(f"the tokenizer has {vocab_size} tokens, the language model only "
                            f"{model.config.lm.vocab_size}")
    for name in ("vision", "connector", "lm"):
        getattr(model, name).requires_grad_(name in STAGES[c.stage])
    try:
        model.set_gradient_checkpointing(c.grad_checkpointing, c.keep_blocks)
    except ValueError as e:
        raise TrainingError(f"--keep_blocks: {e}") from None
    return model


def describe(model, stage):
    count = lambda module, trainable=False: sum(p.numel() for p in module.parameters()
                                                if p.requires_grad or not trainable)
    parts = ", ".join(f"{name} {count(getattr(model, name)) / 1e6:.2f}M" for name in ("vision", "connector", "lm"))
    return (f"model: {parts}; {model.num_visual_tokens} visual tokens; stage {stage} trains "
            f"{' + '.join(STAGES[stage])}: {count(model, True) / 1e6:.2f}M parameters")


def distribute(model, c, ranks):
    """The model as the training step calls it: itself, DDP-wrapped, or FSDP-sharded (in place)."""
    if ranks.world_size == 1:
        return model
    if c.fsdp:
        for block in model.modules():                  # each block gathers its weights just before it runs
            if isinstance(block, (Mamba2Block, Block)):
                fully_shard(block)
        fully_shard(model)
        return model
    # find_unused_parameters: a batch without images (text-only records) leaves the vision side without gradients
    return DistributedDataParallel(model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def gradient_sync(model, sync):
    """With gradient accumulation only the last micro-batch's backward needs to reduce gradients across ranks."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def reshard(model):
    """After forward passes without a backward (evaluation) FSDP keeps the root's parameters gathered; shard them
    again, so that the model's parameters are the optimizer's when it saves or steps."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ----------------------------------------------------------------------------------------------------------------------
# 4. Optimisation


# Parameters without weight decay, by name: mamba_ssm's `_no_weight_decay` (A_log, dt_bias, D), biases, the
# per-channel scales of norms and of DINOv2's layer scale, and the ViT's class token. By name, not by shape: the
# connector's A_log, dt_bias and D are (K, nheads) matrices, and decaying them would pull every direction's A and Δ
# towards zero. (The position embeddings are decayed, as Prismatic's rule does for every tensor of 2 or more dims.)
NO_DECAY_NAMES = ("bias", "dt_bias", "A_log", "D", "gamma1", "gamma2", "cls_token")


def decays(name):
    """Whether the parameter `name` (as named_parameters gives it) gets weight decay."""
    *modules, leaf = name.split(".")
    return leaf not in NO_DECAY_NAMES and not any("norm" in m for m in modules)


def make_optimizer(model, c, device):
    """AdamW; weight decay on the weights of linear maps, convolutions and embeddings only (see `decays`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in named if decays(n)], weight_decay=c.weight_decay),
              dict(params=[p for n, p in named if not decays(n)], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=device.type == "cuda")


def schedule_from_epochs(c, n_records, ranks):
    """--epochs and --warmup_ratio turned into --steps and --warmup_steps, as the released code counts them
    (mlmamba/training/strategies/fsdp.py `run_setup`: the records rounded up to whole batches, warmup floored)."""
    if c.epochs is not None:
        c = dataclasses.replace(c, steps=max(1, math.ceil(c.epochs * math.ceil(n_records / c.batch_size))))
    if c.warmup_ratio is not None:
        c = dataclasses.replace(c, warmup_steps=int(c.steps * c.warmup_ratio))
    if c.epochs is not None or c.warmup_ratio is not None:
        print0(ranks, f"schedule: {c.steps} steps ({c.epochs or c.steps * c.batch_size / n_records:g} epochs of "
                      f"{n_records} records at {c.batch_size} per step), {c.warmup_steps} warmup")
    return c


def learning_rate(c, step):
    """Linear warmup over warmup_steps, then cosine decay to min_lr at the last step; step counts from 0."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def seed_step(c, step, rank):
    """Every generator re-seeded from (seed, step, rank): what a step draws does not depend on where the run began."""
    seed = int(np.random.SeedSequence([c.seed, step, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                            # all devices


def autocast(c, device):
    bf16 = c.precision == "bf16" or (c.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Checkpoints
#
#   out_dir/ckpt-000500/  model.safetensors, config.json   checkpoints.save_pretrained: what generate.py loads
#                         tokenizer.model | tokenizer.json  the run's tokenizer
#                         train_config.json                 this script's config
#                         trainer_state.pt                  step, optimizer state, loss history
#   out_dir/latest -> ckpt-000500
#
# A checkpoint is written into a hidden temporary directory, flushed to disk, renamed to ckpt-NNNNNN, and only then
# published by replacing the `latest` symlink with os.replace, which is atomic: a crash (even kill -9) or a full disk
# at any moment leaves `latest` pointing at a complete checkpoint. The older checkpoint is deleted after that.


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(out_dir):
    """The directory `out_dir/latest` points at, or None."""
    link = Path(out_dir) / "latest"
    return link.resolve() if link.is_dir() else None


def remove_partial_checkpoints(out_dir):
    """The temporary directories of unfinished saves (ours, and save_pretrained's inside them)."""
    for partial in Path(out_dir).glob("*tmp-ckpt-*"):
        shutil.rmtree(partial, ignore_errors=True)


def write_checkpoint(directory, model, model_state, optimizer_state, c, step, history, tokenizer):
    """All of a checkpoint's files into `directory` (which must not exist: save_pretrained creates it)."""
    if model_state is not None:                        # FSDP: the gathered full weights, in an unsharded copy
        with torch.device("meta"):
            unsharded = MLMamba(model.config)
        unsharded.load_state_dict(model_state, assign=True)
        model = unsharded
    checkpoints.save_pretrained(model, directory)
    for name, contents in tokenizer.items():
        (directory / name).write_bytes(contents)
    (directory / "train_config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1))
    torch.save(dict(step=step, optimizer=optimizer_state, history=history), directory / "trainer_state.pt")


def save_checkpoint(model, optimizer, c, step, history, tokenizer, ranks):
    """Save and publish the checkpoint of `step` (all ranks call this; the main rank writes). Returns its path.
    On an OSError (a full disk, say) the partial checkpoint is removed and TrainingError says which one is intact."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    model_state = get_model_state_dict(model, options=options) if c.fsdp and ranks.world_size > 1 else None
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    out_dir = Path(c.out_dir)
    final = out_dir / f"ckpt-{step:06d}"

    def save():
        previous = latest_checkpoint(out_dir)
        if previous == final.resolve():               # already saved (a run resumed and stopped at once)
            return final
        remove_partial_checkpoints(out_dir)            # left by a run killed while saving
        tmp = out_dir / f".tmp-ckpt-{step:06d}-{os.getpid()}"
        try:
            write_checkpoint(tmp, raw, model_state, optimizer_state, c, step, history, tokenizer)
            for file in tmp.iterdir():
                _fsync(file)
            _fsync(tmp)
            shutil.rmtree(final, ignore_errors=True)   # an unpublished one from a crash before the symlink swap
            os.rename(tmp, final)
            link = out_dir / f".tmp-latest-{os.getpid()}"
            link.unlink(missing_ok=True)
            os.symlink(final.name, link)
            os.replace(link, out_dir / "latest")       # the commit point
            _fsync(out_dir)
        except OSError as e:
            remove_partial_checkpoints(out_dir)
            why = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
            kept = (f"the previous checkpoint {previous} is intact: free some space and continue from it with --resume"
                    if previous else "there is no earlier checkpoint")
            raise TrainingError(f"could not save the checkpoint of step {step} to {final}: {why}; {kept}") from e
        if previous is not None and previous != final.resolve():
            shutil.rmtree(previous, ignore_errors=True)
        return final
    return on_main(ranks, save)


def load_trainer_state(directory):
    """trainer_state.pt of a checkpoint, read with weights_only=True (plain tensors and containers, no code)."""
    path = Path(directory) / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path} not found: {directory} is not a checkpoint of train.py") from None
    except Exception as e:                             # unpickling fails in many ways on a damaged file
        raise TrainingError(f"{path}: unreadable, truncated or corrupt? ({type(e).__name__}: {e})") from None
    missing = {"step", "optimizer", "history"} - set(state)
    if missing:
        raise TrainingError(f"{path}: missing {sorted(missing)}")
    return state


# ----------------------------------------------------------------------------------------------------------------------
# 6. Evaluation


def majority_answers(records):
    """The most common answer of the training records per question type (records without a "question_type" form
    one group): the baseline that knows the answer statistics but looks at no image."""
    by_type = {}
    for r in records:
        answer = data.normalize_answer(data.conversation_turns(r)[-1][1])
        by_type.setdefault(r.get("question_type"), Counter())[answer] += 1
    return {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()}


def _shard(n, ranks):
    """This rank's indices into n items, and which of them count: every rank gets the same number (the last ones
    repeat an item and do not count), so all ranks run the same forward passes, as FSDP needs."""
    per_rank = math.ceil(n / ranks.world_size)
    indices = range(ranks.rank * per_rank, (ranks.rank + 1) * per_rank)
    return [min(i, n - 1) for i in indices], [i < n for i in indices]


@torch.no_grad()
def evaluate(model, dataset, c, baseline, ranks):
    """Held-out loss (mean over answer tokens) and accuracy: the greedy answer to each record's last question, the
    earlier turns as history, must equal the reference after VQA normalisation (data.exact_match). Records whose
    image cannot be read are counted and left out. Returns dict(loss, accuracy, baseline, by_type, types, n,
    skipped); by_type {question type: accuracy} and types {question type: dict(accuracy, baseline, n)} when the
    records carry a "question_type".

    Every rank runs the same rows per batch, even where it has no records left or an image fails (a blank image,
    not counted): FSDP gathers the weights inside each forward pass, so all ranks must run the same passes."""
    records, tokenizer = dataset.records, dataset.tokenizer
    turns = [data.conversation_turns(r) for r in records]
    longest = max(len(tokenizer.encode(data.answer_text(t[-1][1]))) for t in turns)
    max_new_tokens = min(c.max_new_tokens, longest + 1)                  # + 1: the eos
    types = sorted({str(r.get("question_type")) for r in records})
    counts = {kind: [0, 0, 0] for kind in types}                         # correct, baseline correct, answered
    loss_sum, n_tokens, skipped = 0.0, 0, 0
    model.eval()
    indices, counted = _shard(len(records), ranks)
    for start in range(0, len(indices), c.eval_batch_size):
        rows = indices[start:start + c.eval_batch_size]
        examples = [dataset[i] for i in rows]
        keep = [k and e["error"] is None for k, e in zip(counted[start:], examples)]
        skipped += sum(k and e["error"] is not None for k, e in zip(counted[start:], examples))
        examples = [e if k else _uncounted(e, dataset) for e, k in zip(examples, keep)]
        batch = dataset.collate(examples)
        with autocast(c, ranks.device):
            out = model(**model_inputs(batch, ranks.device))
        loss_sum, n_tokens = loss_sum + float(out.loss_sum), n_tokens + int(out.n_tokens)
        prompts = [data.encode_prompt(tokenizer, turns[i][:-1], turns[i][-1][0]) for i in rows]
        answers = generate_answers(model, batch, prompts, dataset, max_new_tokens, c, ranks.device)
        for i, answer in (pair for pair, k in zip(zip(rows, answers), keep) if k):
            kind, reference = str(records[i].get("question_type")), turns[i][-1][1]
            counts[kind][0] += data.exact_match(answer, reference)
            counts[kind][1] += data.normalize_answer(reference) == baseline.get(records[i].get("question_type"))
            counts[kind][2] += 1
    model.train()
    reshard(model)
    totals = all_sum([loss_sum, n_tokens, skipped] + [v for kind in types for v in counts[kind]], ranks)
    per_type = {kind: totals[3 + 3 * k:6 + 3 * k] for k, kind in enumerate(types)}
    n = sum(v[2] for v in per_type.values())
    return dict(loss=totals[0] / max(totals[1], 1), n=int(n), skipped=int(totals[2]),
                accuracy=sum(v[0] for v in per_type.values()) / max(n, 1),
                baseline=sum(v[1] for v in per_type.values()) / max(n, 1),
                by_type={kind: v[0] / max(v[2], 1) for kind, v in per_type.items()} if len(types) > 1 else {},
                types={kind: dict(accuracy=v[0] / max(v[2], 1), baseline=v[1] / max(v[2], 1), n=int(v[2]))
                       for kind, v in per_type.items()} if len(types) > 1 else {})


def _uncounted(example, dataset):
    """An example that runs but counts for nothing: no labels, and a blank image in place of one that failed."""
    size = dataset.image_size
    return dict(example, labels=torch.full_like(example["labels"], data.IGNORE_INDEX), error=None,
                pixel_values=torch.zeros(3, size, size) if example["error"] else example["pixel_values"])


def generate_answers(model, batch, prompts, dataset, max_new_tokens, c, device):
    """Greedy answers (text) to the prompts, with the batch's images. Always max_new_tokens steps, cut at eos
    afterwards: every rank runs the same number of forward passes."""
    input_ids, lengths = data.pad_prompts(prompts, dataset.pad_id)
    with autocast(c, device):
        new = model.generate(input_ids.to(device), pixel_values=batch["pixel_values"].to(device),
                             has_image=batch["has_image"].to(device), lengths=lengths.to(device),
                             max_new_tokens=max_new_tokens, temperature=0.0)
    return [data.decode_answer(dataset.tokenizer, tokens) for tokens in new]


def report(result, step):
    line = (f"step {step}: held-out loss {result['loss']:.4f}, accuracy {100 * result['accuracy']:.1f}% "
            f"(chance {100 * result['baseline']:.1f}%) on {result['n']} records")
    if result["by_type"]:
        line += "; " + ", ".join(f"{kind} {100 * acc:.1f}%" for kind, acc in result["by_type"].items())
    if result["skipped"]:
        line += f"; {result['skipped']} skipped (unreadable images)"
    return line


def type_table(result):
    """The held-out accuracy per question type against its chance (the commonest training answer of that type), as a
    table; "" when the records carry no question types."""
    if not result.get("types"):
        return ""
    rows = [(kind, v["accuracy"], v["baseline"], v["n"]) for kind, v in result["types"].items()]
    rows.append(("all", result["accuracy"], result["baseline"], result["n"]))
    width = max(len("question type"), *(len(kind) for kind, *_ in rows))
    lines = [f"  {'question type':<{width}}  accuracy  chance  records"]
    lines += [f"  {kind:<{width}}  {100 * acc:7.1f}%  {100 * base:5.1f}%  {n:7d}" for kind, acc, base, n in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# 7. The training loop


class StopSignal:
    """SIGINT and SIGTERM ask the loop to stop after the current step, save a checkpoint and exit cleanly. A second
    Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train_step(model, micro_batches, optimizer, c, ranks, visual_tokens):
    """One optimizer step over this rank's micro-batches of the global batch. The loss is Σ token losses / (number
    of supervised tokens in the whole global batch), so gradients do not depend on how the batch is split. Returns
    (loss, gradient norm, tokens the LM read on all ranks, visual ones included, the names of the parameters whose
    gradients are not finite on this rank); the weights are not updated when the loss or the gradient norm is not
    finite."""
    n_tokens, positions = all_sum(
        [sum(int((b["labels"] != data.IGNORE_INDEX).sum()) for b in micro_batches),
         sum(int(b["lengths"].sum()) + visual_tokens * int(b["has_image"].sum()) for b in micro_batches)], ranks)
    # DDP and FSDP average gradients over the ranks; the world_size factor turns that average into the sum
    scale = ranks.world_size / max(n_tokens, 1)
    loss_sum = torch.zeros((), device=ranks.device)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, sync=i == len(micro_batches) - 1):
            with autocast(c, ranks.device):
                out = model(**model_inputs(batch, ranks.device))
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: a DTensor
    loss = all_sum([float(loss_sum)], ranks)[0] / max(n_tokens, 1)
    nonfinite = []
    if math.isfinite(loss) and math.isfinite(float(grad_norm)):
        optimizer.step()
    else:
        nonfinite = [name.removeprefix("module.") for name, p in model.named_parameters()
                     if p.grad is not None and not bool(_local(p.grad).isfinite().all())]
    optimizer.zero_grad(set_to_none=True)
    return loss, float(grad_norm), positions, nonfinite


def diverged_message(step, loss, grad_norm, nonfinite, c, out_dir):
    """What stopped the run at a non-finite loss or gradient, where, and the command that continues or restarts it."""
    where = (f"; not finite in the gradients of {data.plural(len(nonfinite), 'tensor')}: {', '.join(nonfinite[:6])}"
             f"{' ...' if len(nonfinite) > 6 else ''}" if nonfinite else "")
    last = latest_checkpoint(out_dir)
    lower = f"--lr {c.lr / 2:g}"
    if last:
        advice = (f"The last good checkpoint is {last}; continue from it with a lower learning rate: python train.py "
                  f"--out_dir {out_dir} --resume {lower}")
    else:
        advice = (f"No checkpoint was saved yet (every {c.save_every} steps), so start again with a lower learning "
                  f"rate: the same command with {lower}")
    return (f"step {step}: the loss is {loss} (gradient norm {grad_norm}){where}; stopped without updating the "
            f"weights. {advice} (or in float32: --precision fp32)")


def _local(t):
    """This rank's shard of an FSDP DTensor; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Training:
    """What `setup` builds and the training loop needs."""
    c: TrainConfig                      # the steps and warmup set by --epochs and --warmup_ratio, if given
    model: MLMamba                      # evaluation calls it directly
    wrapped: torch.nn.Module            # the training step calls this: the model, DDP-wrapped or FSDP-sharded
    optimizer: torch.optim.Optimizer
    dataset: data.ConversationDataset   # the training records
    held_out: data.ConversationDataset
    baseline: dict                      # the commonest training answer per question type (`majority_answers`)
    batches: object                     # this rank's micro-batches of each step's global batch (`batch_stream`)
    micro_batch_size: int
    gradient_accumulation_steps: int    # micro-batches per rank and step
    step: int                           # the steps already done: 0, or those of the checkpoint resumed
    history: dict                       # train: [[step, loss]], eval: [[step, loss, accuracy]]
    checkpoint: dict                    # save_checkpoint's arguments, all but the step


def run(c, ranks, preset):
    """Set up, train, report. Returns dict(step, history, result, skipped)."""
    t = setup(c, ranks, preset)
    step, result, skipped = train_loop(t, ranks)
    return finish(t, ranks, step, result, skipped)


def setup(c, ranks, preset):
    """The data (validated), the tokenizer, the model (distributed), the optimizer, the batches and, with --resume,
    the step, optimizer state and loss history of the latest checkpoint."""
    out_dir = Path(c.out_dir)
    previous = latest_checkpoint(out_dir)
    if previous is not None and not c.resume:
        raise TrainingError(f"{out_dir} already holds a run (latest: {previous.name}); continue it with --resume, or "
                            f"give another --out_dir")
    settings = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(c).items())
    print0(ranks, f"train.py, preset {preset}, {ranks.world_size} process(es) on {ranks.device.type}:\n" +
           textwrap.fill(settings, 120, initial_indent="  ", subsequent_indent="  "))

    train_records, eval_records, images = load_data(c, ranks)
    c = schedule_from_epochs(c, len(train_records), ranks)
    start = previous if c.resume else c.init           # the checkpoint whose weights (and tokenizer) we start from
    tokenizer_file = tokenizer_path(c, start, train_records, ranks)
    try:
        tokenizer = load_tokenizer(tokenizer_file)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    model = build_model(c, start, tokenizer.vocab_size, ranks)
    transform = ImageTransform(model.vision, model.config.image_resize_strategy)
    dataset = data.ConversationDataset(train_records, tokenizer, model.image_size, images, c.max_len,
                                       strict_images=c.strict_images, align=c.stage == "1", transform=transform)
    held_out = data.ConversationDataset(eval_records, tokenizer, model.image_size, images, c.max_len,
                                        transform=transform)
    baseline = majority_answers(train_records)
    print0(ranks, f"data: {data.plural(len(train_records), 'training record')}, {len(eval_records)} held out")
    print0(ranks, describe(model, c.stage))
    share = c.batch_size // ranks.world_size
    micro_batch_size = min(c.micro_batch_size, share)
    if c.batch_size % ranks.world_size or share % micro_batch_size:
        raise TrainingError(f"--batch_size {c.batch_size} does not split evenly into {ranks.world_size} ranks' "
                            f"micro-batches of --micro_batch_size {c.micro_batch_size}")
    if len(dataset) < c.batch_size:
        raise TrainingError(f"--batch_size {c.batch_size} is more than the {len(dataset)} training records")

    wrapped = distribute(model, c, ranks)
    optimizer = make_optimizer(wrapped, c, ranks.device)
    step, history = 0, dict(train=[], eval=[])
    if c.resume:
        state = load_trainer_state(previous)
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        step, history = state["step"], state["history"]
        print0(ranks, f"resumed from {previous} at step {step}")
    checkpoint = dict(model=wrapped, optimizer=optimizer, c=c, history=history,
                      tokenizer=tokenizer_files(tokenizer_file), ranks=ranks)
    batches = batch_stream(dataset, dataclasses.replace(c, micro_batch_size=micro_batch_size), ranks, step)
    return Training(c=c, model=model, wrapped=wrapped, optimizer=optimizer, dataset=dataset, held_out=held_out,
                    baseline=baseline, batches=batches, micro_batch_size=micro_batch_size,
                    gradient_accumulation_steps=share // micro_batch_size, step=step, history=history,
                    checkpoint=checkpoint)


def train_loop(t, ranks):
    """Step by step to --steps: a global batch, the learning rate, an optimizer step, the log, and now and then a
    held-out evaluation and a checkpoint; a stop signal saves and leaves early. Returns (the last step done, the last
    evaluation or None, the examples skipped for unreadable images)."""
    c, step, out_dir = t.c, t.step, Path(t.c.out_dir)
    skipped, result = [], None
    progress = tqdm(total=c.steps, initial=step, desc="train", disable=not ranks.main, dynamic_ncols=True)
    stop = StopSignal()
    try:
        print0(ranks, f"training steps {step + 1} to {c.steps}: {c.batch_size} samples per step = {ranks.world_size} "
                      f"rank(s) x {t.gradient_accumulation_steps} micro-batch(es) of {t.micro_batch_size}")
        while step < c.steps:
            tic = time.perf_counter()
            seed_step(c, step, ranks.rank)
            micro_batches = next_batch(t.batches, t.dataset)
            skipped += [s for b in micro_batches for s in b["skipped"]]
            for group in t.optimizer.param_groups:
                group["lr"] = learning_rate(c, step)
            loss, grad_norm, tokens, nonfinite = train_step(t.wrapped, micro_batches, t.optimizer, c, ranks,
                                                            t.model.num_visual_tokens)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingError(diverged_message(step + 1, loss, grad_norm, nonfinite, c, out_dir))
            step += 1
            t.history["train"].append([step, loss])
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{t.optimizer.param_groups[0]['lr']:.2e}",
                                 tok_s=f"{tokens / (time.perf_counter() - tic):,.0f}")
            if step % c.eval_every == 0 or step == c.steps:
                result = evaluate(t.model, t.held_out, c, t.baseline, ranks)
                t.history["eval"].append([step, result["loss"], result["accuracy"]])
                print0(ranks, report(result, step))
            received = all_sum([stop.received is not None], ranks)[0]
            if received or step % c.save_every == 0 or step == c.steps:
                path = save_checkpoint(step=step, **t.checkpoint)
            if received:
                print0(ranks, f"stopped by {stop.received or 'a signal on another rank'} at step {step}; checkpoint "
                              f"{path}; continue with: python train.py --out_dir {out_dir} --resume")
                break
    finally:
        progress.close()
        stop.restore()
    return step, result, skipped


def next_batch(batches, dataset):
    """This rank's micro-batches of the next global batch, none of them empty (`never_empty`)."""
    try:
        return [never_empty(b, dataset) for b in next(batches)]
    except ValueError as e:                            # --strict_images, and an image failed to load
        raise TrainingError(str(e)) from None


def finish(t, ranks, step, result, skipped):
    """After the loop: the skipped images, the loss curve and, when the run reached --steps, its held-out accuracy
    and a command that tries the model. Returns dict(step, history, result, skipped)."""
    c, out_dir = t.c, Path(t.c.out_dir)
    if result is None and step == c.steps:             # resumed after the last step: evaluate all the same
        result = evaluate(t.model, t.held_out, c, t.baseline, ranks)
        print0(ranks, report(result, step))
    if ranks.main:
        print0(ranks, data.skip_summary(skipped))
        plot = plot_losses(t.history, out_dir / "loss.png", c.steps)
        print0(ranks, f"loss curve: {plot}")
    if result is not None and step == c.steps:
        example, images = t.held_out.records[0], t.held_out.image_folder
        image = f" --image {Path(images) / example['image']}" if isinstance(example.get("image"), str) else ""
        table = type_table(result)
        if table:
            print0(ranks, f"held-out accuracy by question type (step {step}):\n{table}")
        print0(ranks, f"held-out accuracy: {100 * result['accuracy']:.1f}% (chance {100 * result['baseline']:.1f}%: "
                      f"the commonest training answer per question type); checkpoint: {out_dir / 'latest'}; try it: "
                      f"python generate.py --ckpt {out_dir / 'latest'}{image} "
                      f"--prompt {shlex.quote(data.conversation_turns(example)[0][0])}")
        if result["accuracy"] <= result["baseline"]:
            print0(ranks, f"the model did not beat chance: a learning rate too high for this model can keep it from "
                          f"learning without any error (--lr {c.lr:g}); try half of it, or the preset's")
    return dict(step=step, history=t.history, result=result, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------------------
# 8. The loss curve, drawn with pillow


def plot_losses(history, path, steps, size=(900, 500)):
    """Training loss (each step, and a moving average) and held-out loss against the step, on a log scale, as a PNG
    written atomically."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    train = [(s, v) for s, v in history["train"] if math.isfinite(v) and v > 0]
    held_out = [(s, v) for s, v, _ in history["eval"] if math.isfinite(v) and v > 0]
    values = [v for _, v in train + held_out] or [1.0]
    low, high = math.log10(min(values)), math.log10(max(values))
    low, high = (low - 0.05, high + 0.05) if high - low > 0.1 else (low - 0.5, high + 0.5)
    x_of = lambda s: left + (width - left - right) * s / max(steps, 1)
    y_of = lambda v: top + (height - top - bottom) * (high - math.log10(v)) / (high - low)
    decades = range(math.ceil(low), math.floor(high) + 1)                  # y ticks at powers of ten where there
    y_ticks = [10.0 ** e for e in decades] if len(decades) >= 2 else [10 ** (low + (high - low) * k / 5)
                                                                       for k in range(6)]
    for k in range(6):                                                      # grid, ticks and labels
        s = steps * k / 5
        draw.line([(x_of(s), top), (x_of(s), height - bottom)], fill=(230, 230, 230))
        draw.text((x_of(s), height - bottom + 6), f"{s:.0f}", fill="black", font=font, anchor="ma")
    for v in y_ticks:
        draw.line([(left, y_of(v)), (width - right, y_of(v))], fill=(230, 230, 230))
        draw.text((left - 6, y_of(v)), f"{v:.3g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if len(train) > 1:
        draw.line([(x_of(s), y_of(v)) for s, v in train], fill=(170, 190, 235))
        window = max(1, len(train) // 50)
        average = [(train[i][0], sum(v for _, v in train[max(0, i - window + 1):i + 1]) / min(window, i + 1))
                   for i in range(len(train))]
        draw.line([(x_of(s), y_of(v)) for s, v in average], fill=(30, 70, 200), width=2)
    for s, v in held_out:
        x, y = x_of(s), y_of(v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(220, 60, 30))
    title = "training loss (light blue: each step, dark: moving average), held-out loss (red); log scale"
    if history["eval"]:
        title += f"; held-out accuracy {100 * history['eval'][-1][2]:.1f}% at step {history['eval'][-1][0]}"
    draw.text((left, top / 2), title, fill="black", font=font, anchor="lm")
    draw.text(((left + width - right) / 2, height - 12), "step", fill="black", font=font, anchor="mm")
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def main(argv=None):
    """Train; returns dict(step, history, result, skipped). TrainingError for problems the user can fix."""
    arm_stack_dump()
    config, preset = parse_args(argv)
    ranks = setup_processes()
    try:
        result = run(config, ranks, preset)
        if dist.is_initialized():
            # All ranks done talking before any shuts its side down, and the DDP/FSDP wrappers (reference
            # cycles that keep the group alive) freed now: a gloo group torn down at interpreter exit can abort.
            dist.barrier()
            gc.collect()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except TrainingError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:                          # before or after the loop, or a second Ctrl-C inside it
        print("train.py: interrupted (Ctrl-C); the latest checkpoint, if any, is whole", file=sys.stderr)
        sys.exit(130)

