"""Closed-set evaluation of an ML-Mamba checkpoint on local benchmark files: a table on stdout, everything in JSON.

    python eval.py --data out/shapes/data/shapes-32px-8000-500-seed0/test.json     # the cpu preset's held-out set
    python eval.py --data out/shapes/data/shapes-64px-50000-1000-seed0/test.json   # the gpu preset's
    python eval.py --ckpt out/stage2/latest --data pope/coco_pope_random.json --data pope/coco_pope_adversarial.json \\
                   --images coco/val2014
    python eval.py --data textvqa_val.jsonl --images textvqa/train_images --out textvqa.json
    python eval.py --ckpt out/stage2/latest --data vsr/test.jsonl --images vsr/images
    python eval.py --ckpt out/stage2/latest --data vizwiz/val.json --images vizwiz/val

Prompts are the training template (data.encode_prompt: the released ML-Mamba code's Zephyr chat template), each
question worded as vlm-evaluation (TRI-ML/vlm-evaluation, vlm_eval/models/prismatic.py, the prompt functions) words it
for the task. Free answers are greedy, batched through `MLMamba.generate` (replayed from a CUDA graph on a GPU). The
yes/no and true/false benchmarks are by default scored from the answer's probabilities instead (--scoring
probability), as the released code's `MLMambaVLM.generate_batch(return_string_probabilities=...)` and vlm-evaluation's
POPE and VSR harnesses do: one forward pass over the prompt, and the answer is the one of "Yes"/"No" ("True"/"False")
whose token is the likelier at the first answer position (`answer_probabilities`); --scoring generate reads greedy
answers instead. The task of each file comes from its records' fields (or --task):

  vqa     LLaVA-format conversations (the last answer is the reference, the turns before it the history), or records
          {"question" | "text", "answer" | "answers", "image"?}; VQAv2 / TextVQA keep ten human answers per question,
          as strings or as {"answer": ...}. accuracy: answers equal after VQA normalisation (data.normalize_answer);
          with several references the VQA accuracy min(1, #annotators who gave the answer / 3), averaged over the ten
          ways of leaving one annotator out (Antol et al. 2015). exact_match: equal as stripped strings to a reference.
  pope    POPE's records (Li et al. 2023, arXiv 2305.10355) {"question_id", "image", "text", "label": "yes" | "no"},
          asked with "Answer the question using a single word or phrase."; probability: "Yes" against "No";
          generate: an answer is "no" when its first sentence holds the word no, No or not, otherwise "yes" (LLaVA's
          eval_pope). accuracy, precision, recall, F1 of "yes", the yes-ratio; with probabilities also the areas under
          the ROC and precision-recall curves of P(Yes), as vlm-evaluation reports them.
  vsr     VSR's zero-shot test.jsonl (Liu et al. 2023, cambridgeltl/vsr_zeroshot) {"image", "caption", "label": 1 | 0,
          "relation", "subj", "obj", ...}, asked 'Based on the image, is this statement "True" or "False"? {caption}'
          + 'Respond with "True" or "False" directly.'; probability: "True" against "False"; generate: the answer's
          first word, true or false (anything else is wrong, counted in no_answer). accuracy (and the AUCs).
  vizwiz  VizWiz's val.json (Gurari et al. 2018) [{"image", "question", "answers": ten {"answer", "answer_confidence"},
          "answer_type", "answerable": 1 | 0}], asked with LLaVA-1.5's trigger "When the provided information is
          insufficient, respond with 'Unanswerable'." and the short-answer line; free answers, VQA accuracy against
          the ten (an unanswerable question's references are mostly "unanswerable", so that answer scores there);
          accuracy on the answerable and the unanswerable questions, and the F1 of answering "unanswerable" (the
          VizWiz evaluation's unanswerability F1).
  mc      multiple choice, ScienceQA / MMBench-like: {"question", "options" | "choices": [...] or {"A": ...},
          "answer": a letter or an index, "hint"?, "image"?}; the prompt lists the options as "A. ..." and asks for the
          letter (LLaVA's single-prediction prompt); `extract_choice` reads the letter from the answer; accuracy, and
          how many answers named no option.

Image paths are relative to --images, by default the data file's folder. Every image is checked before the model runs.
"""
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
from flags import option, parse_config
from generate import (DEFAULT_CKPT, CUDAGraphDecoder, GenerateError, advice_on_out_of_memory,
                      encode_question, load_checkpoint, loading_advice, make_batch, one_line,
                      read_image, resolve_device)

TASKS = ("vqa", "pope", "vsr", "vizwiz", "mc")
SCORINGS = ("probability", "generate")
LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# vlm-evaluation's wording (vlm_eval/models/prismatic.py: get_vqa_chat_prompt_fn, get_true_false_chat_prompt_fn), the
# LLaVA-1.5 prompts; `add_turn` strips the leading newline those functions put in front of the question
SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
TRUE_FALSE = ('Based on the image, is this statement "True" or "False"? {caption}\n'
              'Respond with "True" or "False" directly.')
# the answers scored by probability, the first the positive class (vlm_eval/tasks/harnesses/pope.py and vsr.py pass
# return_string_probabilities=["Yes", "No"] and ["True", "False"])
CHOICES = {"pope": ("Yes", "No"), "vsr": ("True", "False")}


@dataclass
class EvalConfig:
    data: list[str] = option([], "a benchmark file (JSON or JSON Lines); repeat for several")
    images: str | None = option(None, "the folder the records' image paths are relative to; default: each data "
                                      "file's folder")
    ckpt: str = option(DEFAULT_CKPT, "a checkpoint directory of train.py, or its out_dir (then its 'latest'), or the "
                                     "released ML-Mamba's run directory (then give --vision and --dinov2)")
    vision: str | None = option(None, "the released ML-Mamba only: its SigLIP tower's folder (see generate.py)")
    dinov2: str | None = option(None, "the released ML-Mamba only: its DINOv2 tower's folder")
    tokenizer: str | None = option(None, "the released ML-Mamba only: its tokenizer.json (default: the one in --ckpt)")
    task: str = option("auto", "vqa, pope, vsr, vizwiz or mc; auto: from the records' fields")
    scoring: str = option("probability", "POPE and VSR: 'probability' (one forward pass; the likelier of Yes/No, "
                                         "True/False at the first answer position, as vlm-evaluation scores them) "
                                         "or 'generate' (greedy answers read as yes/no, true/false)")
    batch_size: int = option(32, "questions per generate call")
    max_new_tokens: int = option(32, "the longest answer, in tokens")
    out: str | None = option(None, "where the metrics and every prediction are written; default: eval.json beside "
                                   "the checkpoint (in its out_dir), or out/eval.json if that is not writable")
    device: str = option("auto", "'cuda', 'cpu', ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "weights: 'bf16' or 'fp32'; auto: bf16 on a GPU, fp32 on a CPU")
    cuda_graph: bool = option(True, "on a GPU, replay the prefill and the per-token step from CUDA graphs")


@dataclass
class Item:
    """One question, whatever the file's format."""
    id: str
    image: str | None                       # a path under the image folder, or None: text only
    question: str                           # as the prompt asks it (a multiple-choice question with its options)
    references: list[str]                   # vqa, vizwiz: the reference answers; pope: ["yes"] or ["no"]; vsr: ["true"]
                                            # or ["false"]; mc: [the letter]
    history: list = dataclasses.field(default_factory=list)     # earlier (question, answer) turns
    options: list[str] = dataclasses.field(default_factory=list)
    answerable: bool | None = None          # vizwiz: whether the annotators found the question answerable


# ----------------------------------------------------------------------------------------------------------------------
# 1. Metrics: each a function of predictions and references alone


def vqa_accuracy(prediction, references):
    """1 or 0 for one reference (normalised answers equal); for several (VQAv2's ten annotators) the official VQA
    accuracy: with each annotator left out in turn, min(1, matches among the others / 3), averaged."""
    prediction = data.normalize_answer(prediction)
    matches = [data.normalize_answer(r) == prediction for r in references]
    if len(references) == 1:
        return float(matches[0])
    return sum(min(1.0, (sum(matches) - m) / 3) for m in matches) / len(matches)


def exact_match(prediction, references):
    return float(any(prediction.strip() == r.strip() for r in references))


def pope_says_yes(answer):
    """POPE's reading of a free answer, as LLaVA's eval_pope: "no" when its first sentence holds the word "no", "No"
    or "not", otherwise "yes"."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not any(word in ("no", "No", "not") for word in words)


def pope_metrics(says_yes, is_yes):
    """Accuracy, and precision, recall and F1 of the "yes" answers, and the share of "yes" answers (a model that
    agrees with everything has a yes-ratio near 1)."""
    pairs = list(zip(says_yes, is_yes, strict=True))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return dict(accuracy=(tp + tn) / len(pairs), precision=precision, recall=recall,
                f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                yes_ratio=(tp + fp) / len(pairs))


def read_true_false(answer):
    """True or False from a free answer's first word ("True.", "false, ..."), None when it is neither."""
    words = re.findall(r"\w+", answer.lower())
    return {"true": True, "false": False}.get(words[0]) if words else None


def auc_roc(scores, labels):
    """Area under the ROC curve of scores for the positive labels: the chance that a random positive scores above a
    random negative, ties counting half (sklearn's roc_auc_score, which vlm-evaluation reports); None without both
    classes."""
    n_pos = sum(map(bool, labels))
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum, start = 0.0, 0
    while start < len(order):                          # ranks 1..n, tied scores sharing their mean rank
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        rank_sum += sum(bool(labels[i]) for i in order[start:end + 1]) * (start + end + 2) / 2
        start = end + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def average_precision(scores, labels):
    """Area under the precision-recall curve of the positive labels as sklearn's average_precision_score: the sum of
    precision at each distinct score threshold times the recall it adds; None without a positive."""
    n_pos = sum(map(bool, labels))
    if not n_pos:
        return None
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ap, recall, tp, seen, k = 0.0, 0.0, 0, 0, 0
    while k < len(order):
        threshold = scores[order[k]]
        while k < len(order) and scores[order[k]] == threshold:
            tp, seen, k = tp + bool(labels[order[k]]), seen + 1, k + 1
        ap += (tp / n_pos - recall) * tp / seen
        recall = tp / n_pos
    return ap


def extract_choice(answer, options):
    """The letter of the option an answer names, or None. In this order: the answer is a letter ("B", "(B)", "B."),
    begins with one followed by ".", ")" or ":" ("B. a dog"), says "answer is B", or is one option's text (after VQA
    normalisation, so "A dog." names the option "dog", not option A)."""
    letters = LETTERS[:len(options)]
    text = answer.strip()
    found = (re.fullmatch(r"\(?([A-J])[.):]?", text) or re.match(r"\(?([A-J])[.):](\s|$)", text)
             or re.search(r"(?i:answer is):?\s*\(?([A-J])\b", text))
    if found and found.group(1) in letters:
        return found.group(1)
    named = [letter for letter, option in zip(letters, options)
             if data.normalize_answer(option) == data.normalize_answer(text)]
    return named[0] if len(named) == 1 else None


def score(task, items, predictions, probabilities=None):
    """(metrics, per-item scores) for a task. probabilities: for pope and vsr scored by probability, each item's
    [P(first answer), P(second answer)] of CHOICES[task] (the areas under the curves use the first)."""
    if task == "vqa":
        accuracy = [vqa_accuracy(p, item.references) for item, p in zip(items, predictions)]
        exact = [exact_match(p, item.references) for item, p in zip(items, predictions)]
        return dict(accuracy=mean(accuracy), exact_match=mean(exact)), accuracy
    if task == "vizwiz":
        return vizwiz_metrics(items, predictions)
    if task in ("pope", "vsr"):
        if task == "pope":
            said = [pope_says_yes(p) for p in predictions]
            truth = [item.references[0] == "yes" for item in items]
            metrics = pope_metrics(said, truth)
        else:
            said = [read_true_false(p) for p in predictions]
            truth = [item.references[0] == "true" for item in items]
            metrics = dict(accuracy=mean([float(s == t) for s, t in zip(said, truth)]),
                           no_answer=sum(s is None for s in said))
        if probabilities is not None:
            first = [p[0] for p in probabilities]
            areas = dict(auc_roc=auc_roc(first, truth), auc_pr=average_precision(first, truth))
            metrics.update({k: v for k, v in areas.items() if v is not None})
        return metrics, [float(s == t) for s, t in zip(said, truth)]
    choices = [extract_choice(p, item.options) for item, p in zip(items, predictions)]
    correct = [float(c == item.references[0]) for item, c in zip(items, choices)]
    return dict(accuracy=mean(correct), no_option=sum(c is None for c in choices)), correct


def vizwiz_metrics(items, predictions):
    """VizWiz: the VQA accuracy over all questions and over the answerable and the unanswerable ones apart, and the
    precision, recall and F1 of answering "unanswerable" (after normalisation) for the questions the annotators marked
    unanswerable (vlm-evaluation's VizWizScorer and the VizWiz VQAEval's unanswerability F1)."""
    accuracy = [vqa_accuracy(p, item.references) for item, p in zip(items, predictions)]
    metrics = dict(accuracy=mean(accuracy))
    for name, answerable in (("answerable", True), ("unanswerable", False)):
        subset = [a for a, item in zip(accuracy, items) if item.answerable == answerable]
        if subset:
            metrics[f"{name}_accuracy"] = mean(subset)
    said = [data.normalize_answer(p) == "unanswerable" for p in predictions]
    binary = pope_metrics(said, [item.answerable is False for item in items])
    metrics.update(unanswerable_precision=binary["precision"], unanswerable_recall=binary["recall"],
                   unanswerable_f1=binary["f1"])
    return metrics, accuracy


def mean(values):
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Reading the public formats


def detect_task(records, source):
    """The task the records' fields say: 'answerable' vizwiz, 'caption' and 'label' vsr, 'label' pope,
    'options'/'choices' mc, 'conversations' or 'answer(s)' vqa."""
    first = records[0] if isinstance(records[0], dict) else {}
    if "answerable" in first:
        return "vizwiz"
    if "label" in first:
        return "vsr" if "caption" in first else "pope"
    if "options" in first or "choices" in first:
        return "mc"
    if "conversations" in first or "answer" in first or "answers" in first:
        return "vqa"
    raise ValueError(f"{source}: cannot tell the task from the first record's fields {sorted(first)}: expected "
                     f"'conversations' or 'answer(s)' (vqa), 'label' (POPE; with 'caption' VSR), 'answerable' "
                     f"(VizWiz), 'options' or 'choices' (multiple choice); or give --task")


def mc_question(question, options, hint=None):
    """LLaVA's multiple-choice prompt: [hint] question, one "A. option" line each, then the instruction."""
    lines = ([hint] if hint else []) + [question] + [f"{l}. {o}" for l, o in zip(LETTERS, options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def vqa_question(question, uncertainty_aware=False):
    """vlm-evaluation's VQA prompt (LLaVA-1.5's): the question, for VizWiz the 'Unanswerable' trigger, then the
    short-answer instruction."""
    return "\n".join([question] + ([UNANSWERABLE] if uncertainty_aware else []) + [SHORT_ANSWER])


def _answers(value):
    """A reference answer, a list of them, or VQAv2's list of {"answer": ...} -> a list of strings."""
    values = value if isinstance(value, list) else [value]
    return [str(v["answer"] if isinstance(v, dict) else v) for v in values]


def _item(record, task, index):
    """An Item from one record; KeyError/ValueError/TypeError for a record that does not fit the task."""
    ident = str(record.get("question_id", record.get("id", index)))
    image = record.get("image")
    if task == "vqa" and "conversations" in record:
        turns = data.conversation_turns(record)
        return Item(ident, image, turns[-1][0], [turns[-1][1]], history=turns[:-1])
    if task == "vsr":
        label = record["label"]
        if label not in (0, 1) and str(label).strip().lower() not in ("true", "false"):
            raise ValueError(f"label {label!r} is not 1 or 0 (true or false)")
        truth = label is True or label == 1 or str(label).strip().lower() == "true"
        return Item(ident, image, TRUE_FALSE.format(caption=record["caption"]), ["true" if truth else "false"])
    question = record["question"] if "question" in record else record["text"]
    if task == "vqa":
        return Item(ident, image, question, _answers(record["answers"] if "answers" in record else record["answer"]))
    if task == "vizwiz":
        answerable = record["answerable"]
        if answerable not in (0, 1):
            raise ValueError(f"answerable {answerable!r} is not 1 or 0")
        return Item(ident, image, vqa_question(question, uncertainty_aware=True), _answers(record["answers"]),
                    answerable=bool(answerable))
    if task == "pope":
        label = str(record["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"label {record['label']!r} is not yes or no")
        return Item(ident, image, vqa_question(question), [label])
    options = record["options"] if "options" in record else record["choices"]
    if isinstance(options, dict):
        options = [options[letter] for letter in LETTERS if letter in options]
    options = [str(o) for o in options]
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"has {len(options)} options, expected 2 to {len(LETTERS)}")
    answer = record["answer"]
    letter = LETTERS[answer] if isinstance(answer, int) else str(answer).strip().strip("().").upper()
    if letter not in LETTERS[:len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the options' letters {LETTERS[:len(options)]}")
    return Item(ident, image, mc_question(question, options, record.get("hint")), [letter], options=options)


def load_items(path, image_folder, task="auto"):
    """(task, items) of a benchmark file; ValueError listing the records that do not fit the task, and the images
    that are missing or unreadable (their headers are opened: missing, empty, not an image, decompression bombs)."""
    records = data.read_conversations(path)                 # a JSON list or JSON Lines, one record per line
    if not records:
        raise ValueError(f"{path} holds no records")
    task = detect_task(records, path) if task == "auto" else task
    if task == "vqa" and isinstance(records[0], dict) and "conversations" in records[0]:
        data.validate_records(records, image_folder, source=path)
    items, problems = [], []
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"is a {type(record).__name__}, not an object")
            items.append(_item(record, task, index))
        except KeyError as e:
            problems.append(f"record {index}: no {e} field, which {task} needs")
        except (ValueError, TypeError, IndexError) as e:
            problems.append(f"record {index}: {e}")
    if problems:
        raise ValueError(f"{path}: {len(problems)} of {len(records)} records do not fit task {task}: "
                         f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}")
    images = [dict(id=item.id, image=item.image) for item in items if item.image is not None]
    bad = data.find_unreadable_images(images, image_folder)
    if bad:
        raise ValueError(f"{path}: {len(bad)} images missing or unreadable under {image_folder}: "
                         f"{'; '.join(f'id {i}: {reason}' for i, reason in bad[:3])}{' ...' if len(bad) > 3 else ''}")
    return task, items


# ----------------------------------------------------------------------------------------------------------------------
# 3. Answering and reporting


@torch.no_grad()
def predict(model, tokenizer, items, image_folder, c, decoder=None):
    """Greedy answers to the items, batch_size at a time."""
    predictions = []
    for start in tqdm(range(0, len(items), c.batch_size), desc="eval", unit="batch", file=sys.stderr, leave=False):
        chunk = items[start:start + c.batch_size]
        images = [None if item.image is None else read_image(Path(image_folder) / item.image) for item in chunk]
        prompts = [encode_question(tokenizer, item.question, item.history) for item in chunk]
        tokens = model.generate(**make_batch(model, tokenizer, images, prompts), max_new_tokens=c.max_new_tokens,
                                eos_id=tokenizer.eos_id, decoder=decoder)
        predictions += [data.decode_answer(tokenizer, t) for t in tokens]
    return predictions


@torch.no_grad()
def answer_probabilities(model, tokenizer, images, prompts, answers):
    """(batch, len(answers)) float: the probability of each answer string after each (image or None, prompt ids),
    normalised over the answers: the released `MLMambaVLM.generate_batch(return_string_probabilities=answers)`
    (mlmamba/models/vlms/mlmamba.py) for a batch.

    The released code encodes each answer string alone without special tokens (`string2idx`, which asserts one token
    each: "Yes", "No", "True", "False" are single GPT-NeoX tokens), takes the softmax of the first generated position's
    logits (`scores[0]`) at those tokens and divides by their sum. Here that is one forward pass over the prompts
    (generate.make_batch: right-padded, images before the text), read at each row's last prompt token. An answer of
    several tokens (a small sentencepiece model may split "Yes") is scored by its whole sequence instead: one forward
    pass per answer over the prompt and the answer's tokens, the sum of their log-probabilities; for answers of one
    token each this is the same number."""
    candidates = [tokenizer.encode(answer) for answer in answers]
    empty = [answer for answer, ids in zip(answers, candidates) if not ids]
    if empty:
        raise ValueError(f"answer_probabilities: {empty[0]!r} encodes to no tokens")
    return sequence_probabilities(model, tokenizer, images, prompts, candidates)


@torch.no_grad()
def sequence_probabilities(model, tokenizer, images, prompts, candidates):
    """(batch, len(candidates)): the probability of each candidate continuation (a list of token ids) of each row's
    prompt, normalised over the candidates. One forward pass when every candidate is one token, else one per
    candidate."""
    vocab = model.config.lm.vocab_size
    batch = make_batch(model, tokenizer, images, prompts)
    rows = torch.arange(len(prompts), device=batch["input_ids"].device)
    starts = model.num_visual_tokens * batch["has_image"].long() + batch["lengths"] - 1      # each row's last prompt
    if all(len(c) == 1 for c in candidates):
        logits = model(**batch).logits[rows, starts, :vocab].float()
        scores = logits.log_softmax(-1)[:, [c[0] for c in candidates]]
    else:
        scores = []
        for candidate in candidates:
            extended = make_batch(model, tokenizer, images, [p + candidate[:-1] for p in prompts])
            positions = starts[:, None] + torch.arange(len(candidate), device=starts.device)
            logits = model(**extended).logits[rows[:, None], positions, :vocab].float()
            targets = torch.tensor(candidate, device=logits.device).expand(len(prompts), -1)
            scores.append(logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0].sum(-1))
        scores = torch.stack(scores, dim=-1)
    return scores.softmax(-1)


@torch.no_grad()
def predict_probabilities(model, tokenizer, items, image_folder, c, answers):
    """Each item's [P(answer) for answers], batch_size at a time (`answer_probabilities`)."""
    probabilities = []
    for start in tqdm(range(0, len(items), c.batch_size), desc="eval", unit="batch", file=sys.stderr, leave=False):
        chunk = items[start:start + c.batch_size]
        images = [None if item.image is None else read_image(Path(image_folder) / item.image) for item in chunk]
        prompts = [encode_question(tokenizer, item.question, item.history) for item in chunk]
        probabilities += answer_probabilities(model, tokenizer, images, prompts, answers).tolist()
    return probabilities


def table(results):
    """One row per file: its task, number of questions, accuracy and the task's other metrics; rates as percentages
    ("50.00%"), counts out of the questions ("0 of 3")."""
    rows = [("data", "task", "questions", "accuracy", "other metrics")]
    for r in results:
        others = [f"{k} {100 * v:.2f}%" if isinstance(v, float) else f"{k} {v} of {r['n']}"
                  for k, v in r["metrics"].items() if k != "accuracy"]
        rows.append((Path(r["data"]).name, r["task"], str(r["n"]), f"{100 * r['metrics']['accuracy']:.2f}%",
                     "  ".join(others)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def check_config(c):
    problems = []
    if not c.data:
        problems.append("give a benchmark file with --data")
    if c.task not in ("auto", *TASKS):
        problems.append(f"--task must be auto, {', '.join(TASKS[:-1])} or {TASKS[-1]}, got {c.task!r}")
    if c.scoring not in SCORINGS:
        problems.append(f"--scoring must be {' or '.join(SCORINGS)}, got {c.scoring!r}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(c, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(c, name)}")
    if problems:
        raise GenerateError("; ".join(problems))


def run(c, log=sys.stderr):
    """Evaluate every --data file; prints the table, writes --out, returns its contents."""
    check_config(c)
    benchmarks = []
    for path in c.data:                                   # all files read and checked before the model loads
        folder = Path(c.images) if c.images is not None else Path(path).parent
        try:
            benchmarks.append((path, folder, *load_items(path, folder, c.task)))
        except (ValueError, FileNotFoundError) as e:
            raise GenerateError(one_line(e)) from None
    device, dtype = resolve_device(c.device, c.dtype)
    with advice_on_out_of_memory(device, loading_advice(device, dtype)):
        model, tokenizer, directory = load_checkpoint(c.ckpt, device, dtype, c.vision, c.dinov2, c.tokenizer)
    decoder = CUDAGraphDecoder(model.lm) if device.type == "cuda" and c.cuda_graph else None
    results = []
    for path, folder, task, items in benchmarks:
        start = time.perf_counter()
        advice = [f"a smaller --batch_size (now {c.batch_size})"] + loading_advice(device, dtype)[:1]
        scoring = c.scoring if task in CHOICES else "generate"
        probabilities = None
        with advice_on_out_of_memory(device, advice):
            if scoring == "probability":
                answers = CHOICES[task]
                probabilities = predict_probabilities(model, tokenizer, items, folder, c, answers)
                predictions = [answers[max(range(len(p)), key=p.__getitem__)] for p in probabilities]  # ties: first
            else:
                predictions = predict(model, tokenizer, items, folder, c, decoder)
        metrics, scores = score(task, items, predictions, probabilities)
        print(f"eval.py: {path}: {len(items)} {task} questions ({scoring}) in {time.perf_counter() - start:.1f} s",
              file=log)
        rows = [dict(id=item.id, question=item.question, prediction=p, references=item.references, score=s)
                for item, p, s in zip(items, predictions, scores)]
        for row, p in zip(rows, probabilities or []):
            row["probabilities"] = dict(zip(CHOICES[task], p))
        results.append(dict(data=str(path), task=task, scoring=scoring, n=len(items), metrics=metrics,
                            predictions=rows))
    report = dict(ckpt=str(directory), date=time.strftime("%Y-%m-%d %H:%M:%S"), dtype=str(dtype), device=str(device),
                  results=results)
    written = write_report(report, [c.out] if c.out is not None else [directory.parent / "eval.json",
                                                                      Path("out") / "eval.json"])
    print(table(results))
    print(f"eval.py: metrics and every prediction in {written}", file=log)
    return report


def write_report(report, paths):
    """Writes the report as JSON to the first of `paths` that can be written; returns that path."""
    for path in map(Path, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1) + "\n")
            return path
        except OSError as e:
            error = e
    raise GenerateError(f"cannot write the results to {path}: {error}")


def cli(argv=None):
    """The command line; a problem the user can fix is one line on stderr and exit status 1."""
    try:
        run(parse_config(EvalConfig, argv, __doc__.split("\n\n")[0]))
    except GenerateError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
