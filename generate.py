"""Answer questions about images with a trained ML-Mamba, token by token.

    python generate.py --image photo.jpg --prompt "What is in the picture?"    # the checkpoint `python train.py` writes
    python generate.py --ckpt out/stage2/latest --image a.jpg --image b.jpg --prompt "What colour is the shape?"
    python generate.py --image a.jpg --image b.jpg --prompt "Where is it?" --prompt "How many are there?"
    python generate.py --prompt "Why is the sky blue?" --temperature 0.8 --top_p 0.9 --seed 1     # text only

1. Config      `GenerateConfig`: one flag per field (`--top_k 20` sets top_k)
2. Checkpoint  `load_checkpoint`: a checkpoint directory of train.py, or its out_dir (then its `latest`)
3. Inputs      every image read and checked before the model loads; prompts in the training template
4. Decoding    `CUDAGraphDecoder`: the prefill and the per-token step captured in CUDA graphs and replayed
5. Streaming   `TextStream`: the answer's text as it grows, printed piece by piece
6. main        problems the user can fix as one line on stderr and exit status 1, with advice on out-of-memory

Checkpoints: `--ckpt` takes what train.py writes (`out_dir/ckpt-NNNNNN/`: model.safetensors and config.json from
`checkpoints.save_pretrained`, the run's tokenizer beside them), or the out_dir itself. Public Mamba-2 and SigLIP weights
need a connector trained for them first, and a stage-1 checkpoint of train.py (`python train.py --lm MAMBA2_DIR
--vision SIGLIP_DIR --stage 1 ...`) is exactly that: the public weights with the connector, one directory.

Decoding keeps only the recurrent state (SSD §3: a (nheads, headdim, dstate) state and the last d_conv conv inputs per
layer), so memory does not grow with the answer, and a prompt longer than any seen in training costs only prefill time.
The rows' prompts are prefilled together, each to its own length, then the rows step together (`MLMamba.generate`).
"""
import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import checkpoints
import data
from flags import option, parse_config
from tokenizer import load_tokenizer
from vision import ImageTransform, load_image

DEFAULT_CKPT = "out/shapes/latest"           # where the default `python train.py` publishes its checkpoint
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class GenerateError(Exception):
    """A problem the user can fix (a bad image, a missing checkpoint, an empty prompt, out of memory): printed as one
    line without a traceback, exit status 1."""


def one_line(error):
    """An exception's message on one line (the loaders list problems on indented lines)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class GenerateConfig:
    ckpt: str = option(DEFAULT_CKPT, "a checkpoint directory of train.py, or its out_dir (then its 'latest'), or the "
                                     "released ML-Mamba's run directory (config.json, checkpoints/)")
    vision: str | None = option(None, "the released ML-Mamba only: its SigLIP tower's folder (timm's "
                                      "vit_so400m_patch14_siglip_384, or transformers')")
    dinov2: str | None = option(None, "the released ML-Mamba only: its DINOv2 tower's folder (timm's "
                                      "vit_large_patch14_reg4_dinov2.lvd142m, or transformers' with registers)")
    tokenizer: str | None = option(None, "the released ML-Mamba only: its GPT-NeoX tokenizer.json (default: the one "
                                         "in --ckpt)")
    image: list[str] = option([], "an image file; repeat for a batch (one --prompt for all, or one per image); "
                                  "none: text only")
    prompt: list[str] = option([], "the question; repeat for a batch")
    max_new_tokens: int = option(128, "the longest answer, in tokens (generation stops earlier at eos)")
    temperature: float = option(0.0, "0: greedy; otherwise sample from softmax(logits / temperature)")
    top_k: int | None = option(None, "sample only from the k likeliest tokens")
    top_p: float | None = option(None, "sample only from the likeliest tokens whose probability reaches top_p")
    seed: int = option(0, "seeds the sampling")
    device: str = option("auto", "'cuda', 'cpu', ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "weights: 'bf16' or 'fp32'; auto: bf16 on a GPU, fp32 on a CPU")
    cuda_graph: bool = option(True, "on a GPU, replay the vision tower, prefill and per-token step from CUDA graphs")


def check_config(c):
    """Raises GenerateError naming every bad setting."""
    problems = []
    if not c.prompt:
        problems.append("give a question with --prompt")
    problems += [f"--prompt {i + 1} is empty" for i, p in enumerate(c.prompt) if not data.strip_image_marker(p)]
    if len(c.image) > 1 and len(c.prompt) > 1 and len(c.image) != len(c.prompt):
        problems.append(f"{len(c.image)} images but {len(c.prompt)} prompts: give one prompt per image, or one "
                        f"for all")
    if c.max_new_tokens <= 0:
        problems.append(f"--max_new_tokens must be positive, got {c.max_new_tokens}")
    if c.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {c.temperature}")
    if c.top_k is not None and c.top_k <= 0:
        problems.append(f"--top_k must be positive, got {c.top_k}")
    if c.top_p is not None and not 0 < c.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1], got {c.top_p}")
    if problems:
        raise GenerateError("; ".join(problems))


def resolve_device(device, dtype):
    """(torch.device, torch dtype) for the --device and --dtype flags."""
    if dtype not in ("auto", *DTYPES):
        raise GenerateError(f"--dtype must be auto, {' or '.join(DTYPES)}, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise GenerateError(f"--device {device!r}: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------------------
# 2. Checkpoint


def find_checkpoint(path):
    """The checkpoint directory that --ckpt names, or GenerateError saying what it is instead and what to do."""
    path = Path(path)
    if not path.exists():
        if path == Path(DEFAULT_CKPT):
            raise GenerateError(f"no checkpoint at {DEFAULT_CKPT}: train the built-in model first with "
                                f"`python train.py` (a few minutes), or give --ckpt DIR")
        raise GenerateError(f"checkpoint {path} does not exist")
    if (path / "latest").is_dir():                                  # a train.py out_dir
        path = path / "latest"
    if is_release(path):
        return path
    if not path.is_dir():
        raise GenerateError(f"checkpoint {path} is not a directory (give a checkpoint directory of train.py)")
    config = path / "config.json"
    if not config.is_file() or not (path / "model.safetensors").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise GenerateError(f"{path} is not a checkpoint of train.py: expected config.json and model.safetensors, "
                            f"found {found}")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerateError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise GenerateError(f"{config}: expected a JSON object, got {type(raw).__name__}")
    if {"vision", "connector", "lm"} <= set(raw):
        return path
    if raw.get("model_type") == "mamba2" or "ssm_cfg" in raw:
        raise GenerateError(f"{path} holds a Mamba-2 language model alone, not ML-Mamba: train a connector for it "
                            f"first (python train.py --lm {path} --vision SIGLIP_DIR --stage 1 --data ... --out_dir "
                            f"out/stage1) and give --ckpt out/stage1/latest")
    if raw.get("model_type") in ("siglip", "siglip_vision_model", "dinov2"):
        raise GenerateError(f"{path} holds a vision encoder alone, not ML-Mamba: train a connector with it first "
                            f"(python train.py --lm MAMBA2_DIR --vision {path} --stage 1 ...)")
    raise GenerateError(f"{config}: unknown checkpoint layout (fields {sorted(raw)[:8]}); expected the "
                        f"'vision', 'connector' and 'lm' of checkpoints.save_pretrained, as train.py writes")


def is_release(path):
    """Whether path is the released ML-Mamba's run directory (or its checkpoint .pt): a run config.json whose "model"
    names the parts (mlmamba/models/load.py reads the same)."""
    run_dir = path.parent.parent if path.suffix == ".pt" else path
    try:
        raw = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "arch_specifier" in raw["model"]


def load_checkpoint(path, device, dtype, vision=None, dinov2=None, tokenizer=None):
    """(model in eval mode, tokenizer, checkpoint directory) from a checkpoint of train.py, or from the released
    ML-Mamba's run directory with its vision towers (`vision`, `dinov2`) and tokenizer."""
    directory = find_checkpoint(path)
    release = is_release(directory)
    if not release and (vision or dinov2 or tokenizer):
        raise GenerateError(f"--vision, --dinov2 and --tokenizer go with the released ML-Mamba's run directory; "
                            f"{directory} is a checkpoint of train.py, which holds its own")
    if release and vision is None:
        raise GenerateError(f"{directory} is the released ML-Mamba, whose vision towers are not in its checkpoint: "
                            f"give --vision SIGLIP_DIR (and --dinov2 DINOV2_DIR for its dinosiglip towers)")
    try:
        tokenizer = load_tokenizer(tokenizer or (directory.parent.parent if directory.suffix == ".pt" else directory))
        if release:
            model = checkpoints.load_release(directory, vision, dinov2_path=dinov2, dtype=dtype, device=device).eval()
        else:
            model = checkpoints.load_pretrained(directory, dtype=dtype, device=device).eval()
    except (ValueError, FileNotFoundError) as e:
        raise GenerateError(one_line(e)) from None
    if tokenizer.eos_id is None:
        raise GenerateError(f"the tokenizer in {directory} has no eos token: answers could not end")
    if tokenizer.vocab_size > model.config.lm.vocab_size:
        raise GenerateError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens, the model only "
                            f"{model.config.lm.vocab_size}")
    return model, tokenizer, directory


# ----------------------------------------------------------------------------------------------------------------------
# 3. Inputs


def read_image(path):
    """An image file -> RGB PIL image (EXIF orientation applied), or GenerateError naming the file: missing, empty,
    truncated, not an image, or more pixels than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
    if path.stat().st_size == 0:
        raise GenerateError(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():            # over the pixel limit is an error here, not only a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(path)
    except ValueError as e:
        raise GenerateError(one_line(e)) from None


def pair_up(images, prompts):
    """[(image or None, prompt)] per row: one prompt per image, one prompt for all images, or one image for all
    prompts; no images: text only."""
    if not images:
        return [(None, p) for p in prompts]
    if len(prompts) == 1:
        return [(image, prompts[0]) for image in images]
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    return list(zip(images, prompts, strict=True))


def make_batch(model, tokenizer, images, prompts):
    """MLMamba.generate's inputs on the model's device: prompts (lists of token ids) right-padded to input_ids with
    their lengths; images (PIL or None per row) preprocessed as in training (the model's image_resize_strategy) into
    the pixel_values of the rows that have one."""
    device = model.lm.embedding.weight.device
    input_ids, lengths = data.pad_prompts(prompts, tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id)
    transform = ImageTransform(model.vision, model.config.image_resize_strategy)
    pixels = [transform(image) for image in images if image is not None]
    return dict(input_ids=input_ids.to(device), lengths=lengths.to(device),
                has_image=torch.tensor([image is not None for image in images], device=device),
                pixel_values=torch.stack(pixels).to(device) if pixels else None)


def encode_question(tokenizer, question, history=()):
    """The training template's prompt ids (data.encode_prompt); an <image> marker in the text is dropped as in
    training: the visual tokens always go before the text."""
    return data.encode_prompt(tokenizer, list(history), data.strip_image_marker(question))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Decoding with a CUDA graph


class CUDAGraphed:
    """fn(*tensors) -> tensor(s), recorded in a CUDA graph once per input shapes and dtypes, then replayed: the inputs
    are copied into the graph's own buffers, and the outputs returned are the graph's, overwritten by the next replay.

    From Python each kernel launch costs the host tens of µs; with small kernels (a decoding step, a prefill or a
    vision tower at batch 1) the GPU spends most of its time waiting for them (BENCHMARKS.md: a 2.7B prefill of 761
    positions took 154 ms, of which the GPU was busy 21). A replay issues all of fn's kernels in one call. fn
    qualifies if it has fixed shapes for fixed input shapes, no host synchronisation and no data-dependent Python
    branches; what it updates in place (a cache) must keep its address."""

    def __init__(self, fn, pool=None):
        """pool: a memory pool (torch.cuda.graph_pool_handle()) shared with other graphs, for graphs that never run
        at the same time and whose outputs are read before any of them replays again; by default, one per graph."""
        self.fn, self.pool = fn, pool
        self.graphs = {}                    # input signature -> (graph, input buffers, outputs)

    @staticmethod
    def _signature(args):
        return tuple((tuple(a.shape), a.dtype) for a in args)

    def captured(self, *args):
        return self._signature(args) in self.graphs

    @torch.no_grad()
    def capture(self, *args):
        """Records fn for inputs shaped as args, after three runs to warm up: whatever fn updates in place is changed
        by those (the recording itself runs nothing)."""
        inputs = [a.clone() for a in args]
        # Warm up on a side stream, as torch.cuda.graphs' documentation asks: Triton compiles its kernels, cuBLAS and
        # cuDNN pick theirs and allocate workspaces; none of that may happen during the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):       # records the kernels; nothing runs
            outputs = self.fn(*inputs)
        self.graphs[self._signature(args)] = (graph, inputs, outputs)

    @torch.no_grad()
    def __call__(self, *args):
        if not self.captured(*args):
            self.capture(*args)
        graph, inputs, outputs = self.graphs[self._signature(args)]
        for buffer, a in zip(inputs, args):
            buffer.copy_(a)
        graph.replay()
        return outputs


# Prompts are padded up to a multiple of this for the prefill's graphs: one graph serves every prompt length of a
# bucket, at the cost of up to 63 positions of arithmetic (the SSD scan pads to its 256-token chunks anyway).
PREFILL_BUCKET = 64


class CUDAGraphDecoder:
    """`Mamba2LM.prefill` and `Mamba2LM.step` replayed from CUDA graphs (`CUDAGraphed`): the step captured once per
    batch size, the prefill once per batch size and prompt length rounded up to PREFILL_BUCKET.

    At batch 1 a token is three kernels per layer (`Mamba2Block.step_`), and from Python the GPU mostly waits for the
    launches (BENCHMARKS.md: 54 ms/token at the 2.7B shape with the earlier ~31 kernels per layer, 3% of the memory
    floor). `step` and `prefill` qualify for capture: fixed shapes, a cache updated in place, no host synchronisation
    and no data-dependent Python branches. Sampling stays outside.

    Stands in for the LM in `MLMamba.generate(decoder=...)`: the same `allocate_cache`, `prefill` and `step`. One
    generation at a time: the cache and the logits are the graphs' own buffers, and the logits returned are valid
    until the next replay. That lets all the graphs share one memory pool, so that each new prompt-length bucket
    costs the memory of the largest prefill, not one more."""

    def __init__(self, lm):
        self.lm = lm
        self.caches, self.steps, self.prefills = {}, {}, {}     # batch size -> its cache, step and prefill graphs
        self.pool = None

    def allocate_cache(self, batch):
        """The graphs' cache for this batch size (the step captured now if new), emptied: zeros, the state before
        any token."""
        cache = self.capture(batch)
        cache.reset()
        return cache

    def capture(self, batch):
        """This batch size's cache, and its step's graph, captured on first use."""
        if batch not in self.caches:
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            cache = self.caches[batch] = self.lm.allocate_cache(batch)
            self.steps[batch] = CUDAGraphed(lambda input_ids: self.lm.step(input_ids, cache), self.pool)
            self.prefills[batch] = CUDAGraphed(lambda embeds, lengths: self.lm.prefill(embeds, lengths, cache),
                                               self.pool)
            self.steps[batch].capture(torch.zeros(batch, dtype=torch.long, device=cache.ssm_state.device))
        return self.caches[batch]

    def _check(self, batch, cache):
        if cache is not self.caches.get(batch):
            raise ValueError("CUDAGraphDecoder: the cache must be the one allocate_cache gave for this batch size")

    def step(self, input_ids, cache):
        """As `Mamba2LM.step`, by replaying the graph: the logits returned are overwritten by the next step."""
        self._check(input_ids.shape[0], cache)
        return self.steps[input_ids.shape[0]](input_ids.long())       # the captured dtype: no new capture mid-answer

    def prefill(self, inputs_embeds, lengths, cache):
        """As `Mamba2LM.prefill`, by replaying the graph of the prompt's bucket (captured now if new); the padding up
        to the bucket is zeros, which `lengths` keeps out of the cache."""
        batch, seqlen, _ = inputs_embeds.shape
        self._check(batch, cache)
        padded = -(-seqlen // PREFILL_BUCKET) * PREFILL_BUCKET
        inputs_embeds = torch.nn.functional.pad(inputs_embeds, (0, 0, 0, padded - seqlen))
        graphed = self.prefills[batch]
        if not graphed.captured(inputs_embeds, lengths):
            saved = cache.conv_state.clone(), cache.ssm_state.clone()
            graphed.capture(inputs_embeds, lengths)         # its runs wrote the cache: put it back
            cache.conv_state.copy_(saved[0])
            cache.ssm_state.copy_(saved[1])
        return graphed(inputs_embeds, lengths)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Streaming


class TextStream:
    """The text of a growing answer, handed out piece by piece: `push(token)` returns what that token added.

    Tokens are not decoded one at a time: a character split over byte tokens decodes to "\ufffd" until its last byte
    arrives, and a tokenizer may spell a piece differently next to its neighbours. So the whole answer is decoded
    each time and what is new returned, holding it back while it ends in a partial character. Surrounding whitespace
    is not shown (the released code strips its decoded answers too), so the pieces add up to `data.decode_answer`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def push(self, token):
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens).strip()
        if text.endswith("\ufffd"):
            return ""
        return self._show(text)

    def finish(self):
        """Whatever is still held back."""
        return self._show(self.tokenizer.decode(self.tokens).strip())

    def _show(self, text):
        kept = len(os.path.commonprefix([text, self.shown]))     # all of `shown`, unless decoding re-spelled it
        self.shown = text
        return text[kept:]


# ----------------------------------------------------------------------------------------------------------------------
# 6. main


@contextlib.contextmanager
def advice_on_out_of_memory(device, advice):
    """Running out of memory (torch.OutOfMemoryError, which torch.cuda.OutOfMemoryError is; MemoryError on a CPU)
    becomes a GenerateError with advice instead of a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError):
        raise GenerateError(f"out of memory on {device}: try {', '.join(advice)}") from None


def loading_advice(device, dtype):
    return (["--dtype bf16"] if dtype != torch.bfloat16 else []) + (["--device cpu"] if device.type == "cuda" else [])


def batch_advice(device, dtype, batch, longest_prompt):
    """What frees memory in generation: fewer rows, smaller weights, shorter prompts. The prefill's activations grow
    with the prompt; the decoding state does not grow at all, so --max_new_tokens does not matter."""
    return ([f"fewer images/prompts at once (this batch: {batch})"] + loading_advice(device, dtype)[:1] +
            [f"shorter prompts (the longest has {longest_prompt} tokens)"])


@torch.no_grad()
def run(c, out=sys.stdout, log=sys.stderr):
    """Generate for the config's prompts; the answers go to `out` (streamed as they grow at batch 1), the rest to
    `log`. Returns dict(answers, tokens, ttft_s, tokens_per_s)."""
    check_config(c)
    images = [read_image(path) for path in c.image]                # before the model loads: a bad file fails fast
    device, dtype = resolve_device(c.device, c.dtype)
    with advice_on_out_of_memory(device, loading_advice(device, dtype)):
        model, tokenizer, directory = load_checkpoint(c.ckpt, device, dtype, c.vision, c.dinov2, c.tokenizer)
    rows = pair_up(list(zip(c.image, images)), c.prompt)           # [((path, image) or None, prompt)]
    prompts = [encode_question(tokenizer, prompt) for _, prompt in rows]
    batch = make_batch(model, tokenizer, [None if image is None else image[1] for image, _ in rows], prompts)
    graphs = device.type == "cuda" and c.cuda_graph
    decoder, encoder = (CUDAGraphDecoder(model.lm), CUDAGraphed(model.encode_images)) if graphs else (None, None)
    print(f"generate.py: {directory}, {len(rows)} prompt(s), {str(dtype).removeprefix('torch.')} on {device}"
          f"{', CUDA graph' if decoder else ''}", file=log)

    stream = TextStream(tokenizer) if len(rows) == 1 else None
    times = []                                                      # when each step's tokens were there

    def on_step(step, new_ids):
        new_ids = new_ids.tolist()                                  # waits for the GPU: the times are real
        times.append(time.perf_counter())
        if stream is not None and new_ids[0] != tokenizer.eos_id:
            print(stream.push(new_ids[0]), end="", file=out, flush=True)

    with advice_on_out_of_memory(device, batch_advice(device, dtype, len(rows), max(map(len, prompts)))):
        if graphs:
            # a first, untimed token captures the graphs for these shapes: the vision tower, the prefill, the step
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=2, decoder=decoder, encode_images=encoder)
            print(f"generate.py: CUDA graphs captured in {time.perf_counter() - start:.1f} s", file=log)
        start = time.perf_counter()
        tokens = model.generate(**batch, max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                top_p=c.top_p, seed=c.seed, eos_id=tokenizer.eos_id, callback=on_step, decoder=decoder,
                                encode_images=encoder)
    answers = [data.decode_answer(tokenizer, t) for t in tokens]
    if stream is not None:
        print(stream.finish(), file=out, flush=True)
    else:
        for i, ((image, prompt), answer) in enumerate(zip(rows, answers)):
            source = f"{image[0]}: " if image else ""
            print(f"[{i + 1}] {source}{prompt}\n{answer}", file=out, flush=True)
    # the first step's tokens come with the prefill; each later step adds one token per unfinished row
    n_tokens, decode_s = sum(len(t) for t in tokens), times[-1] - times[0]
    rate = (n_tokens - len(rows)) / decode_s if decode_s > 0 else float("nan")
    print(f"generate.py: {n_tokens} tokens in {times[-1] - start:.2f} s: time to first token "
          f"{1e3 * (times[0] - start):.0f} ms, then {rate:.1f} tokens/s (batch {len(rows)})", file=log)
    return dict(answers=answers, tokens=tokens, ttft_s=times[0] - start, tokens_per_s=rate)


def main(argv=None):
    """The command line: returns run's result; GenerateError for problems the user can fix."""
    return run(parse_config(GenerateConfig, argv, __doc__.split("\n\n")[0]))


def cli(argv=None):
    """main, with a GenerateError printed as one line: the exit status."""
    try:
        main(argv)
    except GenerateError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
