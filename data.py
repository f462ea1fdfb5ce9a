"""Data for ML-Mamba: LLaVA-format conversations in, right-padded token batches and pixel tensors out.

1. Conversations  `load_conversations`: LLaVA's JSON (or JSON Lines) with an image folder, every record checked
                  before training starts; `find_unreadable_images` opens every image's header
2. Prompt         the released ML-Mamba code's Zephyr chat template for Mamba LMs (`ZephyrChatPromptBuilder`, as
                  Cobra's): `encode_conversation` for training, `encode_prompt` for generation, the same tokens
                  either way; `encode_caption` for the released alignment stage's captions
3. Batches        `ConversationDataset` and its `collate`: input_ids, labels (-100 except the answers), right padding
4. Order          `ShardedBatchSampler`: a seeded, endless stream of global batches, resumable and split over ranks
5. Built-in data  `make_shapes`: seeded pillow scenes of coloured shapes with questions, no download; `write_llava`
6. Tokenizer      `train_tokenizer`: a small sentencepiece model on a dataset's text, for a from-scratch LM
7. Evaluation     `normalize_answer`, `exact_match`: VQA-style answer normalisation

A record, as in LLaVA-Instruct (Liu et al. 2023, arXiv 2304.08485):
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",      # optional: text-only without it
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}
"image" is a path under the image folder, or, for data kept in memory, the encoded image file's bytes.
"""
import functools
import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image, ImageDraw

from vision import preprocess

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100                 # labels here are left out of the loss (PyTorch's cross_entropy default)
MAX_LISTED = 50                     # problems spelled out in an error message; the rest are counted


def plural(n, noun):
    """A count and its noun, for messages: "1 record", "2 records"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _record_name(record, index):
    has_id = isinstance(record, dict) and "id" in record
    return f"record {index} (id {record['id']!r})" if has_id else f"record {index}"


def _raise_problems(source, problems, total):
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                          if len(problems) > MAX_LISTED else [])
        raise ValueError(f"data: {source}: {plural(len(problems), 'problem')} in {plural(total, 'record')}:\n  "
                         + "\n  ".join(listed))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Conversations


def read_conversations(path):
    """The records of a LLaVA-format file as parsed JSON: a JSON list, or JSON Lines (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {path} is not UTF-8 text ({e})") from None
    try:
        records = json.loads(text)
        return [records] if isinstance(records, dict) else records        # one object: JSON Lines of one record
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"data: {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:          # a number of over 4300 digits, nesting too deep
        raise ValueError(f"data: {path}: not valid JSON ({e})") from None
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError) as e:  # JSONDecodeError, a 4300-digit number, nesting too deep
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                problems.append(f"line {number}: not valid JSON ({why})")
    _raise_problems(path, problems, len(records) + len(problems))
    return records


def _record_problems(record, image_folder):
    """What is wrong with one record, as short phrases (none for a good record)."""
    if not isinstance(record, dict):
        return [f"is a {type(record).__name__}, not an object"]
    problems = []
    if not isinstance(record.get("id"), (str, int)):
        problems.append("has no 'id'" if "id" not in record else f"has an 'id' of type {type(record['id']).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        problems.append("has no 'conversations' list" if turns is None else "has an empty or non-list 'conversations'")
    else:
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                problems.append(f"turn {i} is not an object with a string 'value'")
            elif not _is_unicode(turn["value"]):
                problems.append(f"turn {i} holds a lone surrogate (a \\ud800-\\udfff escape), which is no text")
            elif turn.get("from") != expected:
                problems.append(f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (turns alternate "
                                f"human, gpt, human, ...)")
        if len(turns) == 1:
            problems.append("has no answer (no 'gpt' turn)")
        elif len(turns) % 2:
            problems.append("ends with a 'human' turn that has no answer")
    image = record.get("image")
    if isinstance(image, str):
        if image_folder is None:
            problems.append(f"has an image {image!r} but no image folder was given")
        elif not _is_file(Path(image_folder) / image):
            problems.append(f"image file {Path(image_folder) / image} does not exist")
    elif image is not None and not isinstance(image, bytes):
        problems.append(f"has an 'image' of type {type(image).__name__}, expected a path")
    return problems


def _is_unicode(text):
    """False for a str that holds a lone surrogate (JSON's "\\ud800"): it has no UTF-8, no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_file(path):
    """Path.is_file, but False rather than OSError for a name the file system refuses (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def validate_records(records, image_folder=None, source="records"):
    """Raise ValueError listing every bad record by id: missing or mistyped keys, turns that do not alternate
    human/gpt, conversations without an answer, image files that do not exist. Reads no image."""
    if not isinstance(records, list):
        raise ValueError(f"data: {source}: expected a list of records, got a {type(records).__name__}")
    if not records:
        raise ValueError(f"data: {source} holds no records")
    problems = [f"{_record_name(record, i)} {problem}"
                for i, record in enumerate(records) for problem in _record_problems(record, image_folder)]
    _raise_problems(source, problems, len(records))


def load_conversations(path, image_folder=None):
    """A LLaVA-format file's records, validated (`validate_records`) before anything trains on them."""
    records = read_conversations(path)
    validate_records(records, image_folder, source=path)
    return records


def _open_image(image, image_folder):
    """A file object or path for a record's image: bytes in memory, or a path under the image folder."""
    return io.BytesIO(image) if isinstance(image, bytes) else Path(image_folder) / image


def find_unreadable_images(records, image_folder=None):
    """[(id, reason)] for every image whose header Pillow cannot read: zero-byte and non-image files, unknown formats,
    decompression bombs (more pixels than Image.MAX_IMAGE_PIXELS). Fast: pixels are not decoded, so a file truncated
    after its header passes here and is caught, counted and skipped when `ConversationDataset` loads it."""
    unreadable = []
    for record in records:
        if record.get("image") is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(_open_image(record["image"], image_folder)) as image:
                    if min(image.size) == 0:
                        raise ValueError(f"image has no pixels ({image.size})")
        except Exception as e:            # Pillow raises many kinds: UnidentifiedImageError, OSError, bomb errors
            unreadable.append((record["id"], f"{type(e).__name__}: {e}"))
    return unreadable


def skip_summary(skipped):
    """One line for the log from [(id, reason)] of skipped samples."""
    if not skipped:
        return "data: no samples skipped"
    first_id, first_reason = skipped[0]
    return (f"data: skipped {plural(len(skipped), 'sample')} with unreadable images (first: id {first_id!r}: "
            f"{first_reason})")


# ----------------------------------------------------------------------------------------------------------------------
# 2. The prompt template: ML-Mamba's Zephyr chat template
#
#     <|user|>\n{question 1}<|endoftext|>\n<|assistant|>\n{answer 1}<|endoftext|>\n<|user|>\n{question 2}...
#
# As the released ML-Mamba code builds it (github.com/WenjunHuang94/ML-Mamba): its Mamba LLM backbone
# (mlmamba/models/backbones/llm/mamba.py, `MambaLLMBackbone.prompt_builder_fn`) gives every "mamba..." backbone,
# Mamba-2 2.7B included, the `ZephyrChatPromptBuilder` (llm/prompting/zephyr_prompter.py; Cobra's is the same, after
# havenhq/mamba-chat): an empty system prompt, no BOS, a user turn "<|user|>\n{msg}<|endoftext|>\n<|assistant|>\n"
# (the turns after the first start with a newline), an answer "{msg}<|endoftext|>" (" " for an empty answer), every
# message with its <image> marker removed and stripped (`add_turn`). Its training data
# (mlmamba/preprocessing/datasets/datasets.py, `FinetuneDataset.__getitem__`) tokenises turn by turn, each turn's
# string alone (`add_special_tokens` only for the first, which adds nothing: the GPT-NeoX tokenizer has no BOS), and
# labels every token of an answer turn (the answer and its <|endoftext|>) and none of a user turn (so the newline that
# opens the next user turn is not supervised). Its model puts the visual tokens before all the text
# (mlmamba/models/vlms/mlmamba.py, `MLMambaVLM.forward`); here `MLMamba.embed` does.
#
# <|endoftext|> is the tokenizer's eos token: a special token of GPT-NeoX's tokenizer.json, which splits text at it
# (as HF's tokenizers do), but no text to a sentencepiece model (whose eos is id 2). So each turn's string is cut at
# "<|endoftext|>", the pieces encoded alone and joined by eos_id: the released ids for a GPT-NeoX tokenizer.json, and
# the same template for any tokenizer with an eos.

EOS_TEXT = "<|endoftext|>"          # the template's end of a message; encoded as tokenizer.eos_id
SYSTEM_PROMPT = ""                  # ZephyrChatPromptBuilder sets an empty system prompt, whatever it is given
TEMPLATE_SYMBOLS = ["<|user|>", "<|assistant|>"]   # one piece each in `train_tokenizer`'s vocabularies (plain text to
                                                    # GPT-NeoX's tokenizer, which splits them into several)


def strip_image_marker(text):
    """The text without LLaVA's <image> marker, stripped (the released `add_turn`: replace, then strip)."""
    return text.replace(IMAGE_MARKER, "").strip()


def conversation_turns(record):
    """[(question, answer)] of a validated record, markers removed and whitespace stripped."""
    values = [strip_image_marker(turn["value"]) for turn in record["conversations"]]
    return list(zip(values[0::2], values[1::2]))


def user_text(question, first=True):
    """A user turn as the template writes it, up to where the answer begins; the turns after the first start with the
    newline that ends the answer before them."""
    start = SYSTEM_PROMPT if first else "\n"
    return f"{start}<|user|>\n{question}{EOS_TEXT}\n<|assistant|>\n"


def answer_text(answer):
    """An answer's text (the template then appends <|endoftext|>): the answer itself, or " " when it is empty."""
    return answer if answer != "" else " "


def prompt_text(history, question):
    """The generation prompt as a string: the earlier (question, answer) turns, then the question, up to where the
    answer begins (the released `get_prompt` after `add_turn("human", question)`)."""
    turns = [user_text(q, i == 0) + answer_text(a) + EOS_TEXT for i, (q, a) in enumerate(history)]
    return "".join(turns) + user_text(question, not history)


def encode_text(tokenizer, text):
    """Ids of a template string: the pieces between its <|endoftext|> marks encoded alone, joined by eos_id."""
    if tokenizer.eos_id is None:
        raise ValueError("data: the tokenizer has no eos token; the prompt template needs one")
    ids = []
    for k, piece in enumerate(text.split(EOS_TEXT)):
        ids += ([tokenizer.eos_id] if k else []) + (tokenizer.encode(piece) if piece else [])
    return ids


def _encode_turns(tokenizer, turns):
    """[(user turn ids, answer ids + eos)], each turn's string encoded alone as the released training data does."""
    return [(encode_text(tokenizer, user_text(q, i == 0)), encode_text(tokenizer, answer_text(a) + EOS_TEXT))
            for i, (q, a) in enumerate(turns)]


def encode_conversation(tokenizer, turns, max_len=None):
    """(input_ids, labels, truncated) for a conversation of (question, answer) turns, as lists of ints.

    labels[t] = input_ids[t] on each answer and the eos after it, IGNORE_INDEX elsewhere (the user turns, including
    the newline that opens every user turn after the first). They are aligned with input_ids, not shifted: the model
    predicts labels[t] from the tokens before t. No BOS: the text starts with the first user turn.
    Truncation to max_len keeps whole turns from the start while they fit; when even the first does not, its user turn
    loses tokens from its start (its end, "<|assistant|>\n", stays next to the answer); when not even the first answer
    and its eos fit, the first turn is simply cut at max_len."""
    encoded = _encode_turns(tokenizer, turns)
    input_ids, labels = [], []
    for q, a in encoded:
        if max_len is not None and len(input_ids) + len(q) + len(a) > max_len:
            break
        input_ids += q + a
        labels += [IGNORE_INDEX] * len(q) + a
    truncated = len(input_ids) < sum(len(q) + len(a) for q, a in encoded)
    if truncated and not input_ids:                                # the first turn alone is too long
        q, a = encoded[0]
        room = max_len - len(a)
        q = q[-room:] if room > 0 else q
        input_ids = (q + a)[:max_len]
        labels = ([IGNORE_INDEX] * len(q) + a)[:max_len]
    return input_ids, labels, truncated


def encode_prompt(tokenizer, history, question):
    """The ids to generate an answer from: the earlier (question, answer) turns, then the question's user turn, which
    ends with "<|assistant|>\n".

    Exactly the tokens `encode_conversation` gives in front of that answer in training; generation then samples the
    answer and stops at eos. Ids rather than text, because eos is a special token that a sentencepiece model cannot
    read from text (`encode_text`)."""
    encoded = _encode_turns(tokenizer, history)
    return [i for q, a in encoded for i in q + a] + encode_text(tokenizer, user_text(question, not history))


def encode_caption(tokenizer, caption, max_len=None):
    """(input_ids, labels, truncated) for the alignment stage as the released code builds it (AlignDataset.__getitem__
    in mlmamba/preprocessing/datasets/datasets.py): the human's prompt is dropped and "{caption}<|endoftext|>" is
    learnt straight from the image, every token supervised (the first from the last visual token; GPT-NeoX has no BOS
    to leave out); cut at max_len."""
    ids = encode_text(tokenizer, caption.strip() + EOS_TEXT)
    truncated = max_len is not None and len(ids) > max_len
    ids = ids[:max_len] if truncated else ids
    return ids, list(ids), truncated


def pad_prompts(prompts, pad_id):
    """Prompts (lists of ids) of different lengths -> input_ids (batch, longest) right-padded with pad_id, and the
    lengths (batch,): what MLMamba.generate takes."""
    lengths = torch.tensor([len(p) for p in prompts])
    input_ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return input_ids, lengths


def decode_answer(tokenizer, tokens):
    """The text of generated tokens, up to the eos that ends the answer."""
    if tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_id)]
    return tokenizer.decode(tokens).strip()


# ----------------------------------------------------------------------------------------------------------------------
# 3. Dataset and batches


class ConversationDataset(torch.utils.data.Dataset):
    """Validated LLaVA-format records -> tokenised examples with their preprocessed image.

    images: paths under image_folder (or bytes in memory), preprocessed by `vision.preprocess` to (3, image_size,
    image_size) RGB in [0, 1] with `resize` and `fill` (pass the encoder's image_mean). An image that cannot be read
    (truncated, corrupt, a decompression bomb) makes the example carry an `error`; `collate` leaves such examples out
    and lists them, or, with strict_images, loading raises ValueError naming the record.
    transform: instead, a callable image -> pixels, e.g. `vision.ImageTransform` (the model's towers and strategy).
    max_len: the most text tokens per example (the visual tokens come on top).
    align: the released code's alignment-stage examples (`encode_caption`): each record's last answer alone, as a
    caption; otherwise whole conversations in the template (`encode_conversation`)."""

    def __init__(self, records, tokenizer, image_size, image_folder=None, max_len=None, resize="letterbox",
                 fill=(0.5, 0.5, 0.5), strict_images=False, align=False, transform=None):
        self.records, self.tokenizer, self.image_size, self.image_folder = records, tokenizer, image_size, image_folder
        self.max_len, self.strict_images = max_len, strict_images
        self.align = align
        self.transform = transform or functools.partial(preprocess, image_size=image_size, resize=resize, fill=fill)
        self.pad_id = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        turns = conversation_turns(record)
        input_ids, labels, truncated = (encode_caption(self.tokenizer, turns[-1][1], self.max_len) if self.align else
                                        encode_conversation(self.tokenizer, turns, self.max_len))
        example = dict(id=record["id"], input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                       truncated=truncated, pixel_values=None, error=None)
        if record.get("image") is not None:
            try:
                with warnings.catch_warnings():       # over Pillow's pixel limit is an error, not only a warning
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    example["pixel_values"] = self.transform(_open_image(record["image"], self.image_folder))
            except ValueError as e:
                if self.strict_images:
                    raise ValueError(f"data: record {index} (id {record['id']!r}): {e}") from e
                example["error"] = str(e)
        return example

    def collate(self, examples):
        """A batch from `__getitem__` examples; those whose image failed are left out and listed in `skipped`.

        input_ids      (batch, max_len) long, each row's tokens then pad_id: RIGHT padding, so a causal scan reaches
                       every real token before any pad, and its outputs there do not depend on the padding
        labels         (batch, max_len) long, IGNORE_INDEX except answers and their eos, so also on pads; aligned
                       with input_ids (labels[i, t] is the target for the output at token t - 1: the model shifts)
        lengths        (batch,) long, real tokens per row: row i is input_ids[i, :lengths[i]]
        has_image      (batch,) bool
        pixel_values   (n_images, 3, image_size, image_size) float32 in [0, 1], the images of the rows with
                       has_image, in row order (n_images may be 0)
        ids            the records' ids, per row
        n_truncated    how many rows were cut to max_len
        skipped        [(id, reason)] of the examples left out; the batch can even be empty (batch = 0)
        The model builds each row as [its visual tokens if has_image][its lengths[i] text tokens][pads]."""
        kept = [e for e in examples if e["error"] is None]
        lengths = torch.tensor([len(e["input_ids"]) for e in kept], dtype=torch.long)
        width = int(lengths.max()) if kept else 0
        input_ids = torch.full((len(kept), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(kept):
            input_ids[row, :len(e["input_ids"])] = e["input_ids"]
            labels[row, :len(e["labels"])] = e["labels"]
        images = [e["pixel_values"] for e in kept if e["pixel_values"] is not None]
        pixel_values = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        return dict(input_ids=input_ids, labels=labels, lengths=lengths,
                    has_image=torch.tensor([e["pixel_values"] is not None for e in kept], dtype=torch.bool),
                    pixel_values=pixel_values, ids=[e["id"] for e in kept],
                    n_truncated=sum(e["truncated"] for e in kept),
                    skipped=[(e["id"], e["error"]) for e in examples if e["error"] is not None])


# ----------------------------------------------------------------------------------------------------------------------
# 4. Order: seeded, resumable, sharded


class ShardedBatchSampler(torch.utils.data.Sampler):
    """An endless stream of global batches of dataset indices; yields this rank's share of each, batch after batch.

    Global batch k is the (k mod steps_per_epoch)-th run of batch_size indices in epoch k // steps_per_epoch's
    permutation, seeded by (seed, epoch); the tail of an epoch too short for a batch is left out (another tail each
    epoch). The stream is a function of (seed, k) only: to resume after k batches, build the sampler with start=k.
    Rank r takes the r-th contiguous slice of batch_size // world_size indices: the ranks are disjoint and together
    take the global batch, the very micro-batches one process accumulating world_size of them would take.
    Use as a DataLoader's batch_sampler."""

    def __init__(self, dataset_size, batch_size, seed=0, rank=0, world_size=1, start=0):
        if batch_size % world_size:
            raise ValueError(f"data: batch_size={batch_size} must be a multiple of world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank={rank} is not in [0, world_size={world_size})")
        if dataset_size < batch_size:
            raise ValueError(f"data: {dataset_size} samples do not fill one batch of {batch_size}")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.steps_per_epoch = dataset_size // batch_size
        self._epoch, self._order = None, None

    def position(self, k):
        """(epoch, step within the epoch) of global batch k."""
        return divmod(k, self.steps_per_epoch)

    def global_batch(self, k):
        epoch, step = self.position(k)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
        return self._order[step * self.batch_size:(step + 1) * self.batch_size].tolist()

    def __iter__(self):
        share = self.batch_size // self.world_size
        k = self.start
        while True:
            yield self.global_batch(k)[self.rank * share:(self.rank + 1) * share]
            k += 1


# ----------------------------------------------------------------------------------------------------------------------
# 5. The built-in dataset: shapes on a plain background, questions about them
#
# Four large shapes at most, one per quadrant, so they stay recognisable at 32x32. Every question type draws its answer
# from a fixed set, in equal numbers, and the scene is built around that answer; the question's text is independent of
# it, so a model that ignores the image scores chance: 1 / len(ANSWERS[type]).

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 240), "yellow": (240, 215, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")     # quadrant q: row q // 2, column q % 2
RELATIONS = ("left of", "right of", "above", "below")
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": QUADRANTS, "count": ("1", "2", "3", "4"),
           "relation": ("yes", "no")}
BACKGROUND = (24, 24, 24)
SUPERSAMPLE = 4                      # drawn this much larger, then averaged down: smooth edges at small sizes


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    n_train: int = 20_000
    n_test: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"ShapesConfig: image_size={self.image_size} is too small for the shapes (at least 16)")


def chance_accuracy():
    """Per question type, the accuracy of guessing (answers are balanced); "all" over the equal mix of types."""
    chance = {kind: 1 / len(answers) for kind, answers in ANSWERS.items()}
    return {**chance, "all": sum(chance.values()) / len(chance)}


def _balanced(rng, values, n):
    """n values, each of `values` equally often (up to one), in random order."""
    return list(rng.permutation(np.resize(np.array(values, dtype=object), n)))


def _pick_objects(rng, n, first, allowed=lambda colour, shape: True):
    """`first` (colour, shape), then n - 1 other distinct allowed pairs: "the red circle" is always one object."""
    pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != first and allowed(c, s)]
    return [first] + [pool[i] for i in rng.choice(len(pool), size=n - 1, replace=False)]


def _scene_question(rng, kind, answer):
    """(question, [(colour, shape, quadrant)]) whose answer is `answer`; the objects asked about come first."""
    n = int(answer) if kind == "count" else int(rng.integers(2 if kind == "relation" else 1, 5))
    quadrants = [int(q) for q in rng.permutation(4)]                  # the first n are used
    if kind == "colour":                                   # the asked-about shape must be the only one of its kind
        shape = str(rng.choice(SHAPES))
        objects = _pick_objects(rng, n, (answer, shape), lambda c, s: s != shape)
        question = f"What colour is the {shape}?"
    elif kind == "shape":                                  # the asked-about colour must be the only one of its kind
        colour = str(rng.choice(list(COLOURS)))
        objects = _pick_objects(rng, n, (colour, answer), lambda c, s: c != colour)
        question = f"What shape is the {colour} object?"
    else:
        objects = _pick_objects(rng, n, (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))))
        c1, s1 = objects[0]
        if kind == "count":
            question = "How many shapes are there?"
        elif kind == "position":
            target = QUADRANTS.index(answer)
            quadrants = [target] + [q for q in quadrants if q != target]
            question = f"Where is the {c1} {s1}?"
        else:
            c2, s2 = objects[1]
            relation = str(rng.choice(RELATIONS))
            axis = 1 if relation in ("left of", "right of") else 0          # compare columns, or rows
            pairs = [(a, b) for a in range(4) for b in range(4) if divmod(a, 2)[axis] != divmod(b, 2)[axis]]
            q1, q2 = pairs[rng.integers(len(pairs))]
            before = divmod(q1, 2)[axis] < divmod(q2, 2)[axis]             # object 1 left of / above object 2
            if (before == (relation in ("left of", "above"))) != (answer == "yes"):
                q1, q2 = q2, q1
            quadrants = [q1, q2] + [q for q in quadrants if q not in (q1, q2)]
            question = f"Is the {c1} {s1} {relation} the {c2} {s2}?"
    return question, [(c, s, q) for (c, s), q in zip(objects, quadrants)]


def _place(rng, objects, size):
    """Scene description: each object's colour, shape, RGB (slightly jittered) and box (x0, y0, x1, y1) in pixels,
    inside its quadrant with a margin, its side 55-85% of the quadrant's."""
    cell = size / 2
    scene = []
    for colour, shape, quadrant in objects:
        side = rng.uniform(0.55, 0.85) * cell
        margin = 0.05 * cell
        row, col = divmod(quadrant, 2)
        x0 = col * cell + margin + rng.uniform(0, cell - 2 * margin - side)
        y0 = row * cell + margin + rng.uniform(0, cell - 2 * margin - side)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)
        scene.append(dict(colour=colour, shape=shape, rgb=[int(v) for v in rgb],
                          box=[round(float(v), 2) for v in (x0, y0, x0 + side, y0 + side)]))
    return scene


def render_scene(scene, size):
    """The scene as a size x size RGB image."""
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in scene:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj["box"])
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:                                                               # a plus sign, arms a third as wide
            third = (x1 - x0) / 3
            draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
            draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)
    return big.reduce(SUPERSAMPLE)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)                   # lossless all the same; 3x faster
    return buffer.getvalue()


def _make_split(name, n, size, rng, taken):
    """n records whose (scene, question) is not in `taken` (which gains them)."""
    kinds = _balanced(rng, list(ANSWERS), n)
    answers = {kind: iter(_balanced(rng, ANSWERS[kind], kinds.count(kind))) for kind in ANSWERS}
    records = []
    for i, kind in enumerate(kinds):
        answer = next(answers[kind])
        while True:
            question, objects = _scene_question(rng, kind, answer)
            scene = _place(rng, objects, size)
            key = json.dumps([question, scene])
            if key not in taken:
                break
        taken.add(key)
        records.append({"id": f"shapes-{name}-{i:06d}", "image": _png(render_scene(scene, size)),
                        "conversations": [{"from": "human", "value": f"{IMAGE_MARKER}\n{question}"},
                                          {"from": "gpt", "value": answer}],
                        "question_type": kind, "scene": scene})
    return records


def make_shapes(config=ShapesConfig()):
    """{"train": records, "test": records}, LLaVA-format records held in memory (images as PNG bytes).

    Deterministic for a config. The splits are drawn from independent seeded streams, and no test record repeats a
    training record's scene and question. Each record also keeps its "question_type" and "scene" (the objects'
    colour, shape, RGB and box), which the loader ignores."""
    taken = set()
    return {name: _make_split(name, n, config.image_size, np.random.default_rng([config.seed, split]), taken)
            for split, (name, n) in enumerate((("train", config.n_train), ("test", config.n_test)))}


def write_llava(records, folder, name):
    """Write records as LLaVA data: folder/{name}.json, and in-memory images as folder/images/{id}.png. Returns the
    JSON's path (images keep their format: {id}.jpeg for JPEG bytes). Records whose image is already a path keep it
    (relative to their own image folder)."""
    folder = Path(folder)
    ids = [r["id"] for r in records if isinstance(r.get("image"), bytes)]
    bad = [i for i in ids if not re.fullmatch(r"[\w.-]+", str(i))] + [i for i, n in Counter(ids).items() if n > 1]
    if bad:
        raise ValueError(f"data: write_llava names image files by record id; these ids are not unique file names: "
                         f"{sorted(map(str, bad))[:10]}")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        if isinstance(record.get("image"), bytes):
            with Image.open(io.BytesIO(record["image"])) as image:        # reads the header only
                path = f"images/{record['id']}.{image.format.lower()}"
            (folder / path).write_bytes(record["image"])
            record = {**record, "image": path}
        written.append(record)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(written, indent=1), encoding="utf-8")
    return json_path


# ----------------------------------------------------------------------------------------------------------------------
# 6. A tokenizer for a from-scratch LM


def train_tokenizer(records, model_path, vocab_size=512):
    """Train a sentencepiece BPE on the records' text as the prompt template writes it, cut where `encode_text` cuts
    it (at each turn and each <|endoftext|>, which is the eos id); save it at model_path (a .model file for
    `tokenizer.load_tokenizer`). unk, bos, eos, pad are ids 0-3, then the template's "<|user|>" and "<|assistant|>"
    as one piece each. The text is kept as it is (no normalisation) and any character outside the training text falls
    back to its UTF-8 bytes, so every string round-trips; the byte pieces count towards vocab_size."""
    texts = [piece for record in records for i, (q, a) in enumerate(conversation_turns(record))
             for piece in (user_text(q, i == 0) + answer_text(a)).split(EOS_TEXT) if piece]
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True, character_coverage=1.0, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            hard_vocab_limit=False, num_threads=1, minloglevel=2, user_defined_symbols=TEMPLATE_SYMBOLS)
    except RuntimeError as e:
        raise ValueError(f"data: training a tokenizer of vocab_size={vocab_size} on {len(texts)} texts failed: {e}") \
            from None
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return model_path


# ----------------------------------------------------------------------------------------------------------------------
# 7. Evaluation: answers compared after VQA-style normalisation (Antol et al. 2015, the VQA evaluation script)

_NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11))))
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text):
    """Lower case, punctuation dropped (a decimal point kept), articles dropped, number words as digits, single
    spaces: "Two." -> "2", "The red circle!" -> "red circle"."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())                 # 1,000 -> 1000
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", text)           # punctuation, but not 3.5's point
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES)


def exact_match(prediction, answer):
    return normalize_answer(prediction) == normalize_answer(answer)
