"""data.py: label masking and the prompt template, padding, the LLaVA loader and its validation, bad images, the
built-in shapes data (checked against its scene descriptions and its pixels), the tokenizer, the sampler."""
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import (ANSWERS, BACKGROUND, COLOURS, IGNORE_INDEX, ConversationDataset, ShapesConfig,
                  ShardedBatchSampler, chance_accuracy, conversation_turns, encode_caption, encode_conversation,
                  encode_prompt,
                  exact_match, find_unreadable_images, load_conversations, make_shapes, normalize_answer,
                  prompt_text, read_conversations, skip_summary, strip_image_marker, train_tokenizer,
                  validate_records, write_llava)
from tokenizer import load_tokenizer
from vision import preprocess

TURNS = [("What is in the picture?", "A red circle and a blue square."),
         ("How many shapes?", "Two."),
         ("Is the circle left of the square?", "yes")]


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(ShapesConfig(image_size=32, n_train=200, n_test=50, seed=3))


@pytest.fixture(scope="module")
def sp_tokenizer(shapes, tmp_path_factory):
    extra = [{"id": "extra", "conversations": [{"from": s, "value": v} for q, a in TURNS
                                               for s, v in (("human", q), ("gpt", a))]}]
    return load_tokenizer(train_tokenizer(shapes["train"] + extra, tmp_path_factory.mktemp("sp") / "shapes.model"))


@pytest.fixture(scope="module")
def neox_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer.json with GPT-NeoX's special tokens: bos == eos == <|endoftext|>, as Mamba's."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"<|user|>\n{q}\n<|assistant|>\n{a}" for q, a in TURNS] * 20, trainer)
    path = tmp_path_factory.mktemp("neox") / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    loaded.path = path                          # for transformers' GPTNeoXTokenizerFast in the template test
    return loaded


@pytest.fixture(params=["sentencepiece", "neox"])
def tokenizer(request, sp_tokenizer, neox_tokenizer):
    return sp_tokenizer if request.param == "sentencepiece" else neox_tokenizer


def record(id, turns, image=None):
    r = {"id": id, "conversations": [{"from": s, "value": v} for q, a in turns for s, v in (("human", q), ("gpt", a))]}
    return r if image is None else {**r, "image": image}


def png(size=(20, 12), colour=(200, 30, 30), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Prompt template and labels


def zephyr_turns(turns):
    """The released ZephyrChatPromptBuilder.add_turn's strings, written out (ML-Mamba,
    mlmamba/models/backbones/llm/prompting/zephyr_prompter.py): system prompt "", eos "<|endoftext|>"."""
    strings = []
    for i, (q, a) in enumerate(turns):
        strings.append(("" if i == 0 else "\n") + f"<|user|>\n{q}<|endoftext|>\n<|assistant|>\n")
        strings.append(f"{a if a != '' else ' '}<|endoftext|>")
    return strings


def released_encoding(hf_tokenizer, turns):
    """FinetuneDataset.__getitem__'s ids and labels (mlmamba/preprocessing/datasets/datasets.py), written out: each
    turn's string tokenised alone, add_special_tokens for the first only; user turns unlabelled, answer turns labelled
    whole."""
    input_ids, labels = [], []
    for turn_idx, message in enumerate(zephyr_turns(turns)):
        ids = hf_tokenizer(message, add_special_tokens=turn_idx == 0).input_ids
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids) if turn_idx % 2 == 0 else list(ids)
    return input_ids, labels


def test_zephyr_template_ids_equal_the_released_procedure(neox_tokenizer):
    """On a GPT-NeoX-style tokenizer.json (byte-level BPE, <|endoftext|> a special token), loaded by transformers'
    GPTNeoXTokenizerFast as the released code loads its tokenizer: training ids and labels equal the released per-turn
    encoding; generation prompts equal its tokenisation of the whole get_prompt() string (MLMambaVLM.generate)."""
    from transformers import GPTNeoXTokenizerFast
    hf = GPTNeoXTokenizerFast(tokenizer_file=str(neox_tokenizer.path), eos_token="<|endoftext|>",
                              pad_token="<|padding|>")
    eos = neox_tokenizer.eos_id
    assert hf.eos_token_id == eos == 0                                  # adding special tokens adds none: no BOS
    assert hf("Hi", add_special_tokens=True).input_ids == hf("Hi", add_special_tokens=False).input_ids
    for k in range(1, len(TURNS) + 1):
        ids, labels, truncated = encode_conversation(neox_tokenizer, TURNS[:k])
        assert (ids, labels) == released_encoding(hf, TURNS[:k]) and not truncated
        prompt = prompt_text(TURNS[:k - 1], TURNS[k - 1][0])
        assert prompt == "".join(zephyr_turns(TURNS[:k])[:-1])
        assert encode_prompt(neox_tokenizer, TURNS[:k - 1], TURNS[k - 1][0]) == hf(prompt).input_ids
    # the exact strings, and where eos and the labels fall
    assert prompt_text([], "Hi?") == "<|user|>\nHi?<|endoftext|>\n<|assistant|>\n"
    assert prompt_text([("Hi?", "Hello.")], "Bye?") == ("<|user|>\nHi?<|endoftext|>\n<|assistant|>\nHello.<|endoftext|>"
                                                       "\n<|user|>\nBye?<|endoftext|>\n<|assistant|>\n")
    ids, labels, _ = encode_conversation(neox_tokenizer, TURNS[:2])
    enc = neox_tokenizer.encode
    first = enc(f"<|user|>\n{TURNS[0][0]}") + [eos] + enc("\n<|assistant|>\n")
    second = enc(f"\n<|user|>\n{TURNS[1][0]}") + [eos] + enc("\n<|assistant|>\n")
    answers = [enc(TURNS[0][1]) + [eos], enc(TURNS[1][1]) + [eos]]
    assert ids == first + answers[0] + second + answers[1]
    assert labels == [IGNORE_INDEX] * len(first) + answers[0] + [IGNORE_INDEX] * len(second) + answers[1]
    assert ids[0] != eos and ids.count(eos) == 4         # no BOS; an eos inside each user turn and after each answer


def test_alignment_captions_as_the_released_align_dataset(neox_tokenizer):
    """AlignDataset.__getitem__ (mlmamba/preprocessing/datasets/datasets.py), written out: the prompt dropped,
    tokenizer("{caption}<|endoftext|>") with its special tokens (none for GPT-NeoX), every label kept."""
    from transformers import GPTNeoXTokenizerFast
    hf = GPTNeoXTokenizerFast(tokenizer_file=str(neox_tokenizer.path), eos_token="<|endoftext|>")
    r = record("c", [("Render a clear and concise summary of the photo.\n<image>", " A red circle. ")], image=png())
    expected = hf("A red circle.<|endoftext|>").input_ids
    assert encode_caption(neox_tokenizer, " A red circle. ") == (expected, expected, False)
    example = ConversationDataset([r], neox_tokenizer, 16, align=True)[0]
    assert example["input_ids"].tolist() == example["labels"].tolist() == expected
    assert encode_caption(neox_tokenizer, "A red circle.", max_len=2) == (expected[:2], expected[:2], True)


def test_labels_are_exactly_the_answers_and_their_eos(tokenizer):
    ids, labels, truncated = encode_conversation(tokenizer, TURNS)
    assert not truncated and len(ids) == len(labels)
    # the template, spelled out and encoded piece by piece: eos is the tokenizer's eos id, whatever its text
    eos = tokenizer.eos_id
    expected_ids, expected_labels = [], []
    for i, (q, a) in enumerate(TURNS):
        question = tokenizer.encode(("" if i == 0 else "\n") + f"<|user|>\n{q}") + [eos] + \
            tokenizer.encode("\n<|assistant|>\n")
        answer = tokenizer.encode(a) + [eos]
        expected_ids += question + answer
        expected_labels += [IGNORE_INDEX] * len(question) + answer
    assert ids == expected_ids and labels == expected_labels
    # and read back: the supervised tokens are the answers, each ended by eos
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised.count(eos) == len(TURNS) and supervised[-1] == eos
    ends = [i for i, token in enumerate(supervised) if token == eos]
    answers = [tokenizer.decode(supervised[start + 1:end]) for start, end in zip([-1] + ends, ends)]
    assert answers == [a for _, a in TURNS]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert labels[0] == IGNORE_INDEX and ids[0] != tokenizer.bos_id                  # no BOS, even where there is one
    # an empty answer is " " (the released wrap_gpt)
    assert encode_conversation(tokenizer, [("Hi?", "")])[0][-2:] == tokenizer.encode(" ") + [eos]


def test_sentencepiece_eos_is_its_id_not_text(sp_tokenizer):
    """A sentencepiece model has no <|endoftext|> piece: the template's eos is id 2, never the text's characters."""
    ids = encode_prompt(sp_tokenizer, TURNS[:1], TURNS[1][0])
    assert sp_tokenizer.eos_id == 2 and ids.count(2) == 3
    assert sp_tokenizer.decode(ids) == prompt_text(TURNS[:1], TURNS[1][0]).replace("<|endoftext|>", "")
    assert "endoftext" not in sp_tokenizer.decode(ids)


def test_generation_prompt_is_the_training_prefix(tokenizer):
    """generate.py's prompt is exactly the tokens in front of the answer in training; the rest is the answer + eos."""
    assistant = tokenizer.encode("\n<|assistant|>\n")
    for k in range(len(TURNS)):
        ids, labels, _ = encode_conversation(tokenizer, TURNS[:k + 1])
        prompt = encode_prompt(tokenizer, TURNS[:k], TURNS[k][0])
        assert ids[:len(prompt)] == prompt and prompt[-len(assistant):] == assistant
        assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tokenizer.eos_id
        assert all(label == IGNORE_INDEX for label in labels[len(prompt) - len(assistant) - 1:len(prompt)])
        expected = prompt_text(TURNS[:k], TURNS[k][0])
        assert tokenizer.decode(prompt) == expected.replace("<|endoftext|>", "")


def test_image_marker_is_removed_as_the_released_code_does(sp_tokenizer):
    """message.replace("<image>", "").strip(), as ZephyrChatPromptBuilder.add_turn."""
    for text in ("<image>\nWhat is this?", "What is this?\n<image>", "<image>What is this?", " What is this? <image>"):
        assert strip_image_marker(text) == "What is this?"
    assert strip_image_marker("Look.\n<image>\nWhat is this?") == "Look.\n\nWhat is this?"
    r = record("m", [("<image>\nWhat is this?", "A cat.")], image="x.png")
    assert conversation_turns(r) == [("What is this?", "A cat.")]
    ids, _, _ = encode_conversation(sp_tokenizer, conversation_turns(r))
    assert "image" not in sp_tokenizer.decode(ids) and "What is this?" in sp_tokenizer.decode(ids)


def test_truncation_keeps_whole_turns_then_the_answer(tokenizer):
    full, full_labels, _ = encode_conversation(tokenizer, TURNS)
    two, two_labels, _ = encode_conversation(tokenizer, TURNS[:2])
    # room for two turns and a bit: the third is dropped whole
    ids, labels, truncated = encode_conversation(tokenizer, TURNS, max_len=len(two) + 3)
    assert truncated and (ids, labels) == (two, two_labels)
    # the first turn alone is too long: the question loses its start, the answer and eos stay
    one, _, _ = encode_conversation(tokenizer, TURNS[:1])
    answer = tokenizer.encode(TURNS[0][1]) + [tokenizer.eos_id]
    max_len = len(one) - 4
    ids, labels, truncated = encode_conversation(tokenizer, TURNS, max_len=max_len)
    assert truncated and len(ids) == max_len
    assert ids[-len(answer):] == answer and labels[-len(answer):] == answer
    assert ids[:-len(answer)] == one[4:-len(answer)]                 # the question's end, "<|assistant|>\n" included
    assert all(label == IGNORE_INDEX for label in labels[:-len(answer)])
    # not even the answer fits: plain cut
    ids, labels, truncated = encode_conversation(tokenizer, TURNS, max_len=3)
    assert truncated and ids == one[:3] and labels == [IGNORE_INDEX] * 3
    # nothing to cut
    assert encode_conversation(tokenizer, TURNS, max_len=len(full)) == (full, full_labels, False)


# ----------------------------------------------------------------------------------------------------------------------
# Batches


def test_collate_right_pads_and_stacks_the_images(sp_tokenizer):
    records = [record("a", TURNS[:2], image=png((30, 10))), record("b", TURNS[2:]),               # text-only
               record("c", TURNS, image=png((8, 8), (0, 0, 255))),
               record("d", TURNS[1:2], image=png(mode="L", colour=90))]
    dataset = ConversationDataset(records, sp_tokenizer, image_size=16, max_len=40, fill=(0.1, 0.2, 0.3))
    examples = [dataset[i] for i in range(len(records))]
    batch = dataset.collate(examples)
    full = [len(encode_conversation(sp_tokenizer, conversation_turns(r))[0]) for r in records]
    cut = [len(encode_conversation(sp_tokenizer, conversation_turns(r), 40)[0]) for r in records]
    assert full[2] > 40 and batch["n_truncated"] == 1 and batch["lengths"].tolist() == cut
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(cut))
    for row, e in enumerate(examples):
        n = int(batch["lengths"][row])
        assert torch.equal(batch["input_ids"][row, :n], e["input_ids"])
        assert torch.equal(batch["labels"][row, :n], e["labels"])
        assert (batch["input_ids"][row, n:] == sp_tokenizer.pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["has_image"].tolist() == [True, False, True, True] and batch["ids"] == ["a", "b", "c", "d"]
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    for j, r in enumerate(r for r in records if "image" in r):
        expected = preprocess(Image.open(io.BytesIO(r["image"])), 16, fill=(0.1, 0.2, 0.3))
        torch.testing.assert_close(batch["pixel_values"][j], expected, rtol=0, atol=0)
    text_only = dataset.collate([examples[1]])
    assert text_only["pixel_values"].shape == (0, 3, 16, 16) and not text_only["has_image"].any()


def test_tokenizer_without_bos_or_pad(sp_tokenizer):
    """No bos: the same ids (the template has none); no pad id: rows are padded with eos, never supervised; no eos:
    no template."""
    bare = SimpleNamespace(encode=sp_tokenizer.encode, decode=sp_tokenizer.decode, bos_id=None,
                           eos_id=sp_tokenizer.eos_id, pad_id=None)
    ids, labels, _ = encode_conversation(bare, TURNS[:1])
    assert ids == encode_conversation(sp_tokenizer, TURNS[:1])[0] and labels[0] == IGNORE_INDEX
    assert encode_prompt(bare, [], "Hi?") == (sp_tokenizer.encode("<|user|>\nHi?") + [sp_tokenizer.eos_id]
                                              + sp_tokenizer.encode("\n<|assistant|>\n"))
    dataset = ConversationDataset([record("a", TURNS), record("b", TURNS[:1])], bare, 16)
    batch = dataset.collate([dataset[0], dataset[1]])
    n = int(batch["lengths"][1])
    assert (batch["input_ids"][1, n:] == sp_tokenizer.eos_id).all() and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="no eos token"):
        encode_conversation(SimpleNamespace(**{**vars(bare), "eos_id": None}), TURNS)


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA files: round trip, validation, bad images


def test_written_llava_data_loads_back_identically(shapes, sp_tokenizer, tmp_path):
    records = shapes["test"][:12] + [record("text-only", TURNS)]
    json_path = write_llava(records, tmp_path / "shapes", "test")
    assert json.loads(json_path.read_text())[0]["image"] == "images/shapes-test-000000.png"
    loaded = load_conversations(json_path, tmp_path / "shapes")
    for original, back in zip(records, loaded):
        assert {k: v for k, v in back.items() if k != "image"} == {k: v for k, v in original.items() if k != "image"}
        if "image" in original:
            assert (tmp_path / "shapes" / back["image"]).read_bytes() == original["image"]
    in_memory = ConversationDataset(records, sp_tokenizer, 32)
    on_disk = ConversationDataset(loaded, sp_tokenizer, 32, image_folder=tmp_path / "shapes")
    a, b = (d.collate([d[i] for i in range(len(records))]) for d in (in_memory, on_disk))
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
    with pytest.raises(ValueError, match="not unique file names.*'a/b'.*'twice'"):
        write_llava([record(i, TURNS, image=png()) for i in ("twice", "twice", "a/b")], tmp_path / "bad", "x")
    # JSON Lines reads the same
    lines = tmp_path / "shapes" / "test.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in loaded) + "\n")
    assert read_conversations(lines) == loaded


def test_validation_names_every_bad_record(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png())
    good = record("good", TURNS[:1], image="ok.png")
    turns = lambda *pairs: [{"from": role, "value": value} for role, value in pairs]
    records = [
        good,
        {"id": "no-conversations", "image": "ok.png"},
        {"id": "no-answer", "conversations": turns(("human", "<image>\nHi?"))},
        {"id": "trailing-question", "conversations": turns(("human", "Hi?"), ("gpt", "Hello."), ("human", "And?"))},
        {"id": "wrong-role", "conversations": turns(("gpt", "Hi"), ("human", "Hi"))},
        {"id": "no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        record("missing-image", TURNS[:1], image="nowhere.jpg"),
        record("image-type", TURNS[:1], image=["ok.png"]),
        {"conversations": turns(("human", "Hi?"), ("gpt", "Hello."))},
        "not a record",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError) as error:
        load_conversations(path, tmp_path / "img")
    message = str(error.value)
    assert str(path) in message and "10 problems in 10 records" in message, message
    for id, phrase in [("no-conversations", "no 'conversations'"), ("no-answer", "no answer"),
                       ("trailing-question", "no answer"), ("wrong-role", "turn 0 is from 'gpt'"),
                       ("wrong-role", "turn 1 is from 'human'"), ("no-value", "turn 0 is not an object"),
                       ("missing-image", "nowhere.jpg does not exist"), ("image-type", "type list")]:
        assert re.search(rf"\(id '{id}'\) .*{re.escape(phrase)}", message), (id, phrase, message)
    assert "record 8 has no 'id'" in message and "record 9 is a str" in message and "'good'" not in message
    with pytest.raises(ValueError, match="no image folder was given"):
        validate_records([good])
    validate_records([good], tmp_path / "img")
    validate_records([record("text-only", TURNS)])                      # text-only needs no folder
    with pytest.raises(ValueError, match="holds no records"):
        validate_records([])


def test_malformed_files_are_reported_by_line(tmp_path):
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(record("a", TURNS)) + "\n{not json\n\n" + json.dumps(record("b", TURNS)) + "\n[1,\n")
    with pytest.raises(ValueError, match=r"2 problems(.|\n)*line 2: not valid JSON(.|\n)*line 5: not valid JSON"):
        read_conversations(lines)
    broken = tmp_path / "data.json"
    broken.write_text('[\n  {"id": "a"},\n  {"id": "b",,}\n]')
    with pytest.raises(ValueError, match=r"data\.json: not valid JSON at line 3"):
        read_conversations(broken)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_conversations(tmp_path / "missing.json")


@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """Good images in odd modes and shapes, and bad ones: truncated, empty, not an image, over Pillow's pixel limit."""
    folder = tmp_path / "img"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    files = {"good.png": png(), "palette.png": png(mode="P", colour=3), "grey16.png": png(mode="I;16", colour=40000),
             "panorama.png": png((900, 2)), "truncated.png": buffer.getvalue()[:len(buffer.getvalue()) // 2],
             "empty.png": b"", "garbage.jpg": b"not an image at all", "bomb.png": png((2000, 1000), (0, 0, 0))}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_500_000)      # bomb.png is over it, not over twice it
    buffer = io.BytesIO()
    Image.new("CMYK", (10, 30), (0, 255, 0, 0)).save(buffer, format="JPEG")
    (folder / "cmyk.jpg").write_bytes(buffer.getvalue())
    records = [record(name, TURNS[:1], image=name) for name in sorted([*files, "cmyk.jpg"])]
    return folder, records


BAD = ["bomb.png", "empty.png", "garbage.jpg", "truncated.png"]


def test_bad_images_are_skipped_and_counted(image_folder, sp_tokenizer):
    folder, records = image_folder
    validate_records(records, folder)                                  # they all exist: the structure is fine
    # the fast header check finds all but the truncated file, whose header is intact
    assert [id for id, _ in find_unreadable_images(records, folder)] == ["bomb.png", "empty.png", "garbage.jpg"]
    dataset = ConversationDataset(records, sp_tokenizer, 16, image_folder=folder)
    batch = dataset.collate([dataset[i] for i in range(len(records))])
    assert sorted(id for id, _ in batch["skipped"]) == BAD
    assert sorted(batch["ids"]) == sorted(r["id"] for r in records if r["id"] not in BAD)
    assert batch["pixel_values"].shape == (len(records) - len(BAD), 3, 16, 16) and batch["has_image"].all()
    assert batch["input_ids"].shape[0] == len(records) - len(BAD)
    assert "skipped 4 samples" in skip_summary(batch["skipped"]) and "bomb.png" in skip_summary(batch["skipped"])
    assert skip_summary([]) == "data: no samples skipped"
    everything_bad = dataset.collate([dataset[records.index(r)] for r in records if r["id"] in BAD])
    assert everything_bad["input_ids"].shape == (0, 0) and len(everything_bad["skipped"]) == 4


def test_bad_images_are_fatal_when_strict(image_folder, sp_tokenizer):
    folder, records = image_folder
    dataset = ConversationDataset(records, sp_tokenizer, 16, image_folder=folder, strict_images=True)
    for i, r in enumerate(records):
        if r["id"] in BAD:
            with pytest.raises(ValueError, match=rf"record {i} \(id '{re.escape(r['id'])}'\).*cannot read image"):
                dataset[i]
        else:
            assert dataset[i]["pixel_values"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------------
# The built-in shapes data


def test_shapes_are_deterministic_balanced_and_splits_do_not_overlap(shapes):
    again = make_shapes(ShapesConfig(image_size=32, n_train=200, n_test=50, seed=3))
    assert again == shapes
    other = make_shapes(ShapesConfig(image_size=32, n_train=200, n_test=50, seed=4))
    assert [r["scene"] for r in other["train"]] != [r["scene"] for r in shapes["train"]]
    key = lambda r: json.dumps([r["conversations"], r["scene"]])
    assert not {key(r) for r in shapes["train"]} & {key(r) for r in shapes["test"]}
    assert not {r["image"] for r in shapes["train"]} & {r["image"] for r in shapes["test"]}
    ids = [r["id"] for r in shapes["train"] + shapes["test"]]
    assert len(set(ids)) == len(ids)
    for split in shapes.values():
        validate_records(split)
        kinds = [r["question_type"] for r in split]
        assert max(kinds.count(k) for k in ANSWERS) - min(kinds.count(k) for k in ANSWERS) <= 1
        for kind, answers in ANSWERS.items():
            counts = [sum(r["conversations"][1]["value"] == a for r in split if r["question_type"] == kind)
                      for a in answers]
            assert max(counts) - min(counts) <= 1, (kind, counts)
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        ShapesConfig(image_size=8)
    assert chance_accuracy() == pytest.approx(dict(colour=1 / 4, shape=1 / 4, position=1 / 4, count=1 / 4,
                                                   relation=1 / 2, all=0.3))


def derive_answer(question, scene, size):
    """The answer from the scene description alone: object centres and the question's words."""
    centre = lambda o: ((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2)
    def the(colour=None, shape=None):
        found = [o for o in scene if colour in (None, o["colour"]) and shape in (None, o["shape"])]
        assert len(found) == 1, (question, scene)                          # the question names exactly one object
        return found[0]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return the(shape=m[1])["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return the(colour=m[1])["shape"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        x, y = centre(the(m[1], m[2]))
        return ("top" if y < size / 2 else "bottom") + " " + ("left" if x < size / 2 else "right")
    if question == "How many shapes are there?":
        return str(len(scene))
    m = re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question)
    (x1, y1), (x2, y2) = centre(the(m[1], m[2])), centre(the(m[4], m[5]))
    gap = {"left of": x2 - x1, "right of": x1 - x2, "above": y2 - y1, "below": y1 - y2}[m[3]]
    assert abs(gap) > size / 8, (question, scene)                          # never a borderline case
    return "yes" if gap > 0 else "no"


def shape_in_pixels(pixels, obj):
    """Which shape the pixels show in obj's box, from where the box is filled (fractions of the side):
    a square fills its corner, a circle not its corner but (0.2, 0.2), a cross only its arms, a triangle none of
    those three; all fill the centre with exactly the object's colour."""
    x0, y0, x1, y1 = obj["box"]
    def filled(fx, fy):
        value = pixels[int(y0 + fy * (y1 - y0)), int(x0 + fx * (x1 - x0))]
        if np.abs(value - np.array(obj["rgb"])).max() == 0:
            return True
        assert np.abs(value - np.array(BACKGROUND)).max() == 0, (obj, fx, fy, value)
        return False
    assert filled(0.5, 0.5)
    return "square" if filled(0.1, 0.1) else "circle" if filled(0.2, 0.2) else "cross" if filled(0.1, 0.5) else \
        "triangle"


def test_shape_answers_follow_from_the_scene_and_the_pixels(shapes):
    size = 128                                                         # large enough to probe shapes pixel-exactly
    records = make_shapes(ShapesConfig(image_size=size, n_train=60, n_test=0, seed=5))["train"] + shapes["train"]
    for r in records:
        question, answer = conversation_turns(r)[0]
        image_size = Image.open(io.BytesIO(r["image"])).size[0]
        assert derive_answer(question, r["scene"], image_size) == answer, r
        assert r["conversations"][0]["value"].startswith("<image>\n")
        boxes = [o["box"] for o in r["scene"]]
        assert all(0 <= v <= image_size for box in boxes for v in box)
        if image_size == size:
            pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
            assert (pixels[0, 0] == BACKGROUND).all() and (pixels[-1, -1] == BACKGROUND).all()
            for obj in r["scene"]:
                assert shape_in_pixels(pixels, obj) == obj["shape"], (r["id"], obj)
                assert np.abs(np.array(obj["rgb"]) - COLOURS[obj["colour"]]).max() <= 15


def test_shapes_at_32_pixels_keep_their_colour(shapes):
    """At the CPU preset's size each object's centre pixel still shows its colour."""
    for r in shapes["train"][:50]:
        pixels = np.asarray(Image.open(io.BytesIO(r["image"]))).astype(int)
        for obj in r["scene"]:
            x0, y0, x1, y1 = obj["box"]
            assert np.abs(pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)] - obj["rgb"]).max() <= 2


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer, sampler, answers


def test_trained_tokenizer_round_trips_any_text(sp_tokenizer):
    assert (sp_tokenizer.bos_id, sp_tokenizer.eos_id, sp_tokenizer.pad_id) == (1, 2, 3)
    assert sp_tokenizer.vocab_size <= 512
    for text in ["<|user|>\nWhat colour is the circle?", "\n<|assistant|>\n", "  two  spaces\n\nand lines ",
                 "unseen: Ω ∑ 😀 Zebra"]:
        assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text
    assert [sp_tokenizer.encode(s) for s in ("<|user|>", "<|assistant|>")] == [[4], [5]]     # the template's, whole
    for word in (" red", "triangle", "yes"):                          # the dataset's words became single pieces
        assert len(sp_tokenizer.encode(word)) == 1, word
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer([record("a", TURNS)], "/nonexistent/x.model", vocab_size=100)


def test_sampler_resumes_exactly_and_shards_disjointly():
    n, batch_size = 103, 8
    sampler = ShardedBatchSampler(n, batch_size, seed=7)
    stream = [b for b, _ in zip(sampler, range(40))]
    assert sampler.steps_per_epoch == 12 and sampler.position(25) == (2, 1)
    for epoch in range(3):
        seen = sum(stream[epoch * 12:(epoch + 1) * 12], [])
        assert len(set(seen)) == len(seen) == 96 and set(seen) <= set(range(n))
    assert stream[0] != stream[12]                                     # a new order every epoch
    resumed = ShardedBatchSampler(n, batch_size, seed=7, start=17)
    assert [b for b, _ in zip(resumed, range(23))] == stream[17:]
    assert [b for b, _ in zip(ShardedBatchSampler(n, batch_size, seed=8), range(12))] != stream[:12]
    # four ranks: each takes a disjoint quarter of every global batch, together all of it
    ranks = [ShardedBatchSampler(n, batch_size, seed=7, rank=r, world_size=4, start=10) for r in range(4)]
    for k, shares in zip(range(10, 30), zip(*ranks)):
        assert [len(s) for s in shares] == [2] * 4 and sum(shares, []) == stream[k]
    # a dataset that batches evenly is covered exactly once per epoch, across the ranks
    ranks = [ShardedBatchSampler(96, 12, seed=1, rank=r, world_size=3) for r in range(3)]
    epoch = [sum((b for b, _ in zip(s, range(8))), []) for s in ranks]
    assert sorted(sum(epoch, [])) == list(range(96)) and not set(epoch[0]) & set(epoch[1])
    # as a DataLoader's batch_sampler
    loader = torch.utils.data.DataLoader(list(range(103)), batch_sampler=ShardedBatchSampler(n, batch_size, seed=7))
    assert [b.tolist() for b, _ in zip(loader, range(3))] == stream[:3]
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardedBatchSampler(n, 10, world_size=4)


def test_resumed_loader_gives_the_same_next_batches(shapes, sp_tokenizer):
    """The pipeline a trainer runs, in worker processes: resuming at batch k gives batches k, k+1, ... exactly."""
    dataset = ConversationDataset(shapes["train"], sp_tokenizer, 32)
    def batches(start, count, workers):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=ShardedBatchSampler(len(dataset), 16, seed=2,
                                                                                        start=start),
                                             collate_fn=dataset.collate, num_workers=workers)
        return [b for b, _ in zip(loader, range(count))]
    uninterrupted, resumed = batches(0, 15, 0), batches(11, 4, 2)              # an epoch is 12 batches
    for a, b in zip(uninterrupted[11:], resumed):
        assert a["ids"] == b["ids"] and all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "pixel_values"))


@pytest.mark.parametrize("prediction, answer, match", [
    ("Two.", "2", True), ("the red circle!", "Red circle", True), ("  yes\n", "yes", True), ("3.5", "3.5", True),
    ("1,000", "1000", True), ("top  left", "top left", True), ("no", "yes", False), ("a square", "squares", False),
    ("top left", "left", False)])
def test_exact_match_after_normalisation(prediction, answer, match):
    assert exact_match(prediction, answer) == match
    assert normalize_answer("An apple, THE pear; three") == "apple pear 3"
