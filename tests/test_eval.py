"""eval.py: its metrics on hand-made predictions with answers worked out by hand (VQA accuracy and normalisation, POPE
precision / recall / F1 / yes-ratio, the areas under the curves, VSR's true/false, VizWiz's unanswerable answers,
multiple-choice letters), the public file formats (POPE, VSR, VizWiz, VQA, LLaVA, multiple choice), the whole run from
files to table and JSON with known predictions, answers scored by probability against greedy generation and against
the recurrent step, its batched answers against generate.py's single runs, and bad input."""
import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from mlmamba import Mamba2LM
from test_generate import QUESTIONS, ROOT, images, load, run_dir      # noqa: F401 (the fixtures)

ev = importlib.import_module("eval")                             # the file eval.py; `eval` alone is the builtin


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def test_vqa_accuracy_with_one_reference_is_normalised_exact_match():
    assert ev.vqa_accuracy("Two.", ["2"]) == 1.0                    # number word, punctuation
    assert ev.vqa_accuracy("The red circle!", ["red circle"]) == 1.0   # article, case
    assert ev.vqa_accuracy("red", ["blue"]) == 0.0
    assert ev.vqa_accuracy("3.5", ["35"]) == 0.0                    # a decimal point is kept
    assert ev.exact_match("Two.", ["2"]) == 0.0 and ev.exact_match(" 2 ", ["2"]) == 1.0


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_annotators(matches, expected):
    """k of 10 annotators gave the answer: leaving out one who did leaves k-1, one who did not leaves k; min(1, ·/3),
    averaged over the 10: k=1 -> (0 + 9 * 1/3) / 10 = 0.3, k=2 -> 0.6, k=3 -> (3 * 2/3 + 7) / 10 = 0.9, k>=4 -> 1."""
    references = ["two"] * matches + ["three", "four", "many", "several", "3", "5", "lots", "six", "7", "8"][matches:]
    assert ev.vqa_accuracy("2", references) == pytest.approx(expected)


def test_pope_reading_of_free_answers():
    assert ev.pope_says_yes("Yes, there is a dog.")
    assert ev.pope_says_yes("yes")
    assert not ev.pope_says_yes("No.")
    assert not ev.pope_says_yes("no")
    assert not ev.pope_says_yes("There is not a cat in the image")
    assert ev.pope_says_yes("There is a cat. No other animal")         # only the first sentence counts
    assert ev.pope_says_yes("Nothing")                                 # words, not substrings


def test_pope_metrics():
    """labels yes yes yes no no no, answers yes yes no yes yes no: TP 2, FN 1, FP 2, TN 1."""
    answers = ["Yes, there is a dog.", "yes", "No.", "Yes", "yes it is", "There is not a cat."]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    metrics = ev.pope_metrics([ev.pope_says_yes(a) for a in answers], [label == "yes" for label in labels])
    assert metrics == pytest.approx(dict(accuracy=3 / 6, precision=2 / 4, recall=2 / 3, f1=4 / 7, yes_ratio=4 / 6))
    assert ev.pope_metrics([False, False], [True, False]) == dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0,
                                                                   yes_ratio=0.0)


def test_areas_under_the_curves():
    """Worked out by hand. Scores .9 .8 .7 .6 .5 for labels 1 0 1 0 1: of the 3 x 2 (positive, negative) pairs the
    positive scores higher in (.9, .8), (.9, .6), (.7, .6): AUC-ROC 3/6. AP: precision where each positive comes in,
    1/1, 2/3, 3/5, each adding 1/3 of the recall."""
    scores, labels = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1]
    assert ev.auc_roc(scores, labels) == pytest.approx(3 / 6)
    assert ev.average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert ev.auc_roc([0.9, 0.1], [1, 0]) == 1.0 and ev.auc_roc([0.1, 0.9], [1, 0]) == 0.0
    assert ev.auc_roc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5                 # ties count half
    assert ev.average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5   # one threshold: precision 2/4
    assert ev.auc_roc([0.3, 0.4], [1, 1]) is None and ev.average_precision([0.3], [0]) is None


def test_vsr_and_vizwiz_scores():
    assert [ev.read_true_false(a) for a in ("True", "false.", " TRUE, it is", "Yes", "", "truly")] == \
        [True, False, True, None, None, None]
    vsr = [ev.Item(str(i), None, "q", [t]) for i, t in enumerate(["true", "false", "true"])]
    metrics, scores = ev.score("vsr", vsr, ["True", "True", "maybe"])
    assert metrics == dict(accuracy=1 / 3, no_answer=1) and scores == [1.0, 0.0, 0.0]
    metrics, _ = ev.score("vsr", vsr, ["True", "False", "False"], probabilities=[[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    assert metrics == dict(accuracy=2 / 3, no_answer=0, auc_roc=1.0, auc_pr=1.0)
    # VizWiz: ten annotators each; unanswerable questions mostly answered "unanswerable"
    vizwiz = [ev.Item("0", None, "q", ["unanswerable"] * 8 + ["blue", "unsuitable"], answerable=False),
              ev.Item("1", None, "q", ["red"] * 10, answerable=True),
              ev.Item("2", None, "q", ["unanswerable"] * 10, answerable=False),
              ev.Item("3", None, "q", ["soup"] * 2 + ["unanswerable"] * 8, answerable=True)]
    metrics, scores = ev.score("vizwiz", vizwiz, ["Unanswerable.", "Red", "a cat", "unanswerable"])
    assert scores == pytest.approx([1.0, 1.0, 0.0, 1.0])          # "Unanswerable." normalises to the references'
    assert metrics == pytest.approx(dict(accuracy=0.75, answerable_accuracy=1.0, unanswerable_accuracy=0.5,
                                         unanswerable_precision=0.5, unanswerable_recall=0.5, unanswerable_f1=0.5))


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("C)", "C"), ("D. a bird", "D"), ("(A) cat", "A"), ("b) bird", None),
    ("The answer is C.", "C"), ("the answer is (D)", "D"), ("dog", "B"), ("A dog.", "B"), ("A cat", "A"),
    ("E", None), ("I do not know", None), ("", None), ("fish", "C"),
])
def test_extract_choice(answer, expected):
    """Options A cat, B dog, C fish, D bird: a leading article "A" is not the letter A."""
    assert ev.extract_choice(answer, ["cat", "dog", "fish", "bird"]) == expected


def test_multiple_choice_prompt():
    assert ev.mc_question("Which is a mammal?", ["cat", "fish"], hint="Animals.") == (
        "Animals.\nWhich is a mammal?\nA. cat\nB. fish\nAnswer with the option's letter from the given choices "
        "directly.")


# ----------------------------------------------------------------------------------------------------------------------
# Formats


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def benchmark_files(tmp_path, images):  # noqa: F811
    """One file per format, image paths relative to the images' folder."""
    folder = tmp_path / "bench"
    (folder / "img").mkdir(parents=True)
    circle, square = "img/circle.png", "img/square.jpg"
    shutil.copy(images[0], folder / circle)
    shutil.copy(images[1], folder / square)
    pope = write_jsonl(folder / "coco_pope_random.json", [
        dict(question_id=1, image=circle, text="Is there a circle in the image?", label="yes"),
        dict(question_id=2, image=square, text="Is there a cat in the image?", label="no"),
        dict(question_id=3, image=square, text="Is there a square in the image?", label="yes"),
        dict(question_id=4, image=circle, text="Is there a dog in the image?", label="no")])
    vqa = write_jsonl(folder / "vqa.jsonl", [
        dict(question_id="q1", image=circle, question=QUESTIONS[0], answers=[{"answer": "red"}] * 3 +
             [{"answer": "orange"}] * 7),
        dict(question_id="q2", image=square, question=QUESTIONS[1], answer="one"),
        dict(question_id="q3", question="Is the sky blue?", answers=["yes", "Yes.", "no"])])
    llava = folder / "llava.json"
    llava.write_text(json.dumps([
        dict(id="c1", image=circle, conversations=[
            {"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": QUESTIONS[2]}, {"from": "gpt", "value": "top left"}]),
        dict(id="c2", conversations=[{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}])]))
    mc = write_jsonl(folder / "mc.jsonl", [
        dict(id=1, image=circle, question="Which shape?", options=["circle", "square", "triangle"], answer="A"),
        dict(id=2, image=square, question="Which colour?", hint="Look closely.", choices=["red", "blue"], answer=1),
        dict(id=3, question="Which is a number?", options={"A": "cat", "B": "two", "C": "dog", "D": "sun"},
             answer="(B)")])
    vsr = write_jsonl(folder / "test.jsonl", [        # VSR's zero-shot test.jsonl (cambridgeltl/vsr_zeroshot)
        dict(image="circle.png", image_link="http://images.cocodataset.org/val2017/circle.png",
             caption="The circle is at the left side of the square.", label=1, relation="left of", subj="circle",
             obj="square", annotator_id=3, vote_true_validator_id=[1], vote_false_validator_id=[]),
        dict(image="square.jpg", image_link="http://images.cocodataset.org/val2017/square.jpg",
             caption="The square is above the cat.", label=0, relation="above", subj="square", obj="cat",
             annotator_id=5, vote_true_validator_id=[], vote_false_validator_id=[2, 4])])
    for name in ("circle.png", "square.jpg"):
        shutil.copy(folder / "img" / name, folder / name)
    answers = lambda *pairs: [dict(answer=a, answer_confidence=conf) for a, n, conf in pairs for _ in range(n)]
    vizwiz = folder / "val.json"                       # VizWiz's Annotations.zip val.json: one JSON list
    vizwiz.write_text(json.dumps([
        dict(image="img/circle.png", question="What colour is this?", answerable=1, answer_type="other",
             answers=answers(("red", 7, "yes"), ("dark red", 2, "maybe"), ("unanswerable", 1, "no"))),
        dict(image="img/square.jpg", question="What does this label say?", answerable=0, answer_type="unanswerable",
             answers=answers(("unanswerable", 9, "yes"), ("blue", 1, "maybe")))]))
    return dict(pope=pope, vqa=vqa, llava=llava, mc=mc, vsr=vsr, vizwiz=vizwiz, folder=folder)


def test_reading_the_public_formats(benchmark_files):
    folder = benchmark_files["folder"]
    task, pope = ev.load_items(benchmark_files["pope"], folder)
    assert task == "pope" and [i.references for i in pope] == [["yes"], ["no"], ["yes"], ["no"]]
    assert pope[0].id == "1" and pope[0].question == ("Is there a circle in the image?\n"
                                                      "Answer the question using a single word or phrase.")
    task, vqa = ev.load_items(benchmark_files["vqa"], folder)
    assert task == "vqa" and vqa[0].references == ["red"] * 3 + ["orange"] * 7 and vqa[1].references == ["one"]
    assert vqa[2].image is None
    task, llava = ev.load_items(benchmark_files["llava"], folder)
    assert task == "vqa" and llava[0].question == QUESTIONS[2] and llava[0].references == ["top left"]
    assert llava[0].history == [(QUESTIONS[0], "red")] and llava[1].history == []
    task, mc = ev.load_items(benchmark_files["mc"], folder)
    assert task == "mc" and [i.references for i in mc] == [["A"], ["B"], ["B"]]
    assert mc[1].options == ["red", "blue"] and mc[1].question.startswith("Look closely.\nWhich colour?\nA. red")
    assert mc[2].options == ["cat", "two", "dog", "sun"]
    task, vsr = ev.load_items(benchmark_files["vsr"], folder)
    assert task == "vsr" and [i.references for i in vsr] == [["true"], ["false"]] and vsr[0].image == "circle.png"
    assert vsr[1].question == ('Based on the image, is this statement "True" or "False"? The square is above the cat.'
                               '\nRespond with "True" or "False" directly.')
    task, vizwiz = ev.load_items(benchmark_files["vizwiz"], folder)
    assert task == "vizwiz" and [i.answerable for i in vizwiz] == [True, False]
    assert vizwiz[1].references == ["unanswerable"] * 9 + ["blue"] and vizwiz[0].references[7:9] == ["dark red"] * 2
    assert vizwiz[0].question == ("What colour is this?\nWhen the provided information is insufficient, respond with "
                                  "'Unanswerable'.\nAnswer the question using a single word or phrase.")


def test_bad_benchmark_files(benchmark_files, tmp_path):
    folder = benchmark_files["folder"]
    with pytest.raises(ValueError, match="cannot tell the task"):
        ev.load_items(write_jsonl(tmp_path / "odd.jsonl", [dict(question="Why?")]), folder)
    bad = write_jsonl(tmp_path / "bad_pope.jsonl", [dict(text="Is it?", label="yes"), dict(text="Is it?", label="maybe"),
                                                    dict(label="no")])
    with pytest.raises(ValueError, match=r"2 of 3 records do not fit task pope: record 1: label 'maybe' is not yes or "
                                         r"no; record 2: no 'text' field"):
        ev.load_items(bad, folder)
    bad_vsr = write_jsonl(tmp_path / "bad_vsr.jsonl", [dict(image="x.png", caption="A cat.", label=2)])
    with pytest.raises(ValueError, match="record 0: label 2 is not 1 or 0"):
        ev.load_items(bad_vsr, folder)
    test_split = write_jsonl(tmp_path / "test.json", [dict(image="x.png", question="What?", answerable=1)])
    with pytest.raises(ValueError, match="record 0: no 'answers' field, which vizwiz needs"):
        ev.load_items(test_split, folder)
    bad_mc = write_jsonl(tmp_path / "bad_mc.jsonl", [dict(question="Which?", options=["a", "b"], answer="C")])
    with pytest.raises(ValueError, match="answer 'C' is not one of the options' letters AB"):
        ev.load_items(bad_mc, folder)
    (tmp_path / "empty.png").write_bytes(b"")
    missing = write_jsonl(tmp_path / "missing.jsonl", [dict(question_id=7, image="nowhere.png", text="Is it?",
                                                            label="no"),
                                                       dict(question_id=8, image="empty.png", text="Is it?",
                                                            label="no")])
    with pytest.raises(ValueError, match="2 images missing or unreadable.*id 7: FileNotFoundError.*id 8"):
        ev.load_items(missing, tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Answers scored by probability


def rows_and_prompts(tokenizer, images):  # noqa: F811
    """An image row, a text-only row and another image row, prompts of different lengths."""
    rows = [(generate.read_image(images[0]), QUESTIONS[0]), (None, QUESTIONS[1]), (generate.read_image(images[1]),
                                                                                  QUESTIONS[2])]
    return [image for image, _ in rows], [generate.encode_question(tokenizer, q) for _, q in rows]


def test_probabilities_agree_with_greedy_generation(run_dir, images):  # noqa: F811
    """Every token of the vocabulary scored as a one-token answer in one forward pass: the likeliest is the first token
    greedy generation gives, row by row. So wherever the first generated token is "Yes" or "No", the likelier of the
    two by probability is that token. Two answers get the full distribution's probabilities, renormalised."""
    model, tokenizer = load(run_dir)
    pictures, prompts = rows_and_prompts(tokenizer, images)
    vocab = model.config.lm.vocab_size
    probabilities = ev.sequence_probabilities(model, tokenizer, pictures, prompts, [[t] for t in range(vocab)])
    greedy = model.generate(**generate.make_batch(model, tokenizer, pictures, prompts), max_new_tokens=1)
    assert probabilities.argmax(-1).tolist() == [tokens[0] for tokens in greedy]
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))
    pair = [greedy[0][0], (greedy[0][0] + 1) % vocab]
    got = ev.sequence_probabilities(model, tokenizer, pictures, prompts, [[t] for t in pair])
    expected = probabilities[:, pair]
    torch.testing.assert_close(got, expected / expected.sum(-1, keepdim=True))
    assert (got[0, 0] > got[0, 1]).item()


def test_answers_of_several_tokens_against_the_recurrent_step(run_dir, images):  # noqa: F811
    """This tokenizer splits "Yes" and "No": each answer's probability is then its tokens' product, computed here by
    prefilling each row alone and stepping the LM through the answer (the path generation takes), renormalised."""
    model, tokenizer = load(run_dir)
    pictures, prompts = rows_and_prompts(tokenizer, images)
    answers = ["Yes", "No"]
    assert min(len(tokenizer.encode(a)) for a in answers) > 1             # the several-token path is what runs
    got = ev.answer_probabilities(model, tokenizer, pictures, prompts, answers)
    batch = generate.make_batch(model, tokenizer, pictures, prompts)
    vocab = model.config.lm.vocab_size
    with torch.no_grad():
        embeds, text_start, lengths = model.embed(**batch)
        expected = []
        for row in range(len(prompts)):
            end = int(text_start[row] + lengths[row])
            log_probs = []
            for answer in answers:
                cache = model.lm.allocate_cache(1)
                logits, total = model.lm(inputs_embeds=embeds[row:row + 1, :end], cache=cache)[:, -1], 0.0
                for token in tokenizer.encode(answer):
                    total += logits[0, :vocab].float().log_softmax(-1)[token]
                    logits = model.lm.step(torch.tensor([token]), cache)
                log_probs.append(total)
            expected.append(torch.stack(log_probs).softmax(-1))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_yes_no_benchmarks_are_scored_by_probability_by_default(run_dir, benchmark_files, tmp_path):  # noqa: F811
    """POPE ("Yes"/"No") and VSR ("True"/"False") files through eval.run: each prediction is the likelier answer of
    `answer_probabilities`, which the JSON keeps; the metrics add the areas under the curves."""
    folder = benchmark_files["folder"]
    report = ev.run(ev.EvalConfig(data=[str(benchmark_files["pope"]), str(benchmark_files["vsr"])], ckpt=str(run_dir),
                                  images=str(folder), out=str(tmp_path / "r.json"), batch_size=3, dtype="fp32",
                                  device="cpu"))
    model, tokenizer = load(run_dir)
    for result, answers in zip(report["results"], (("Yes", "No"), ("True", "False"))):
        assert result["scoring"] == "probability" and {"auc_roc", "auc_pr"} <= set(result["metrics"])
        _, items = ev.load_items(result["data"], folder)
        pictures = [generate.read_image(folder / item.image) for item in items]
        prompts = [generate.encode_question(tokenizer, item.question) for item in items]
        expected = ev.answer_probabilities(model, tokenizer, pictures, prompts, answers).tolist()
        for row, p in zip(result["predictions"], expected):
            assert list(row["probabilities"]) == list(answers)
            assert list(row["probabilities"].values()) == pytest.approx(p, abs=1e-5)
            assert row["prediction"] == answers[0 if p[0] >= p[1] else 1]
        metrics, _ = ev.score(result["task"], items, [r["prediction"] for r in result["predictions"]])
        assert metrics["accuracy"] == result["metrics"]["accuracy"]


# ----------------------------------------------------------------------------------------------------------------------
# The whole run


def test_run_with_known_predictions(run_dir, benchmark_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Files -> items -> (predictions made up here) -> metrics, table and JSON, all worked out by hand."""
    made_up = {
        "pope": ["Yes, there is.", "yes", "No.", "no"],                  # TP 1, FP 1, FN 1, TN 1
        "vqa": ["Red", "1", "yes"],                     # 0.9 (3 of 10), 1 ("one"), (1/3 + 1/3 + 2/3) / 3 (2 of 3)
        "mc": ["A", "The answer is A.", "two"],                          # right, wrong, right (by the option's text)
        "vsr": ["False.", "False"],                                      # wrong, right
        "vizwiz": ["Red", "Unanswerable"],                               # 1 (7 of 10), 1 (9 of 10)
    }
    tasks = iter(made_up)

    def predict(model, tokenizer, items, image_folder, c, decoder=None):
        answers = made_up[next(tasks)]
        assert len(items) == len(answers)
        return answers

    monkeypatch.setattr(ev, "predict", predict)
    out = tmp_path / "results.json"
    report = ev.run(ev.EvalConfig(data=[str(benchmark_files[k]) for k in made_up], ckpt=str(run_dir),
                                  images=str(benchmark_files["folder"]), out=str(out), dtype="fp32", scoring="generate"))
    pope, vqa, mc, vsr, vizwiz = (r["metrics"] for r in report["results"])
    assert [r["scoring"] for r in report["results"]] == ["generate"] * 5
    assert vsr == dict(accuracy=0.5, no_answer=0)
    assert vizwiz == pytest.approx(dict(accuracy=1.0, answerable_accuracy=1.0, unanswerable_accuracy=1.0,
                                        unanswerable_precision=1.0, unanswerable_recall=1.0, unanswerable_f1=1.0))
    assert pope == pytest.approx(dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5, yes_ratio=0.5))
    assert vqa == pytest.approx(dict(accuracy=(0.9 + 1 + 4 / 9) / 3, exact_match=1 / 3))   # only "yes" is verbatim
    assert mc == pytest.approx(dict(accuracy=2 / 3, no_option=0))
    assert [p["score"] for p in report["results"][2]["predictions"]] == [1.0, 0.0, 1.0]
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["data", "task", "questions", "accuracy", "other", "metrics"]
    assert printed[1].split() == ["coco_pope_random.json", "pope", "4", "50.00%", "precision", "50.00%", "recall",
                                  "50.00%", "f1", "50.00%", "yes_ratio", "50.00%"]
    assert printed[3].split() == ["mc.jsonl", "mc", "3", "66.67%", "no_option", "0", "of", "3"]


def test_results_go_beside_the_checkpoint(run_dir, benchmark_files, tmp_path, monkeypatch):  # noqa: F811
    """No --out: eval.json in the checkpoint's out_dir, not the current directory; out/eval.json where that out_dir
    cannot be written. The log names the file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "predict", lambda model, tokenizer, items, *args, **kwargs: ["yes"] * len(items))
    config = ev.EvalConfig(data=[str(benchmark_files["pope"])], ckpt=str(run_dir),
                           images=str(benchmark_files["folder"]), dtype="fp32", scoring="generate")
    log = io.StringIO()
    report = ev.run(config, log=log)
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads(json.dumps(report))
    assert not (tmp_path / "eval.json").exists()
    assert f"metrics and every prediction in {run_dir / 'eval.json'}" in log.getvalue()
    (run_dir / "eval.json").unlink()

    def read_only_run_dir(path, *args, write_text=Path.write_text, **kwargs):
        if path.parent == run_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only_run_dir)
    ev.run(config)
    assert (tmp_path / "out" / "eval.json").is_file() and not (run_dir / "eval.json").exists()


def test_batched_answers_equal_generate_single_runs(run_dir, benchmark_files, tmp_path):  # noqa: F811
    """eval.py's batches (an image row, a text-only row, a history) answer as generate.py does one question at a time."""
    report = ev.run(ev.EvalConfig(data=[str(benchmark_files["vqa"]), str(benchmark_files["llava"])],
                                  ckpt=str(run_dir), images=str(benchmark_files["folder"]), out=str(tmp_path / "r.json"),
                                  batch_size=2, max_new_tokens=6, dtype="fp32", device="cpu"))
    vqa = [p["prediction"] for p in report["results"][0]["predictions"]]
    _, items = ev.load_items(benchmark_files["vqa"], benchmark_files["folder"])
    for item, prediction in zip(items, vqa):
        image = [] if item.image is None else [str(benchmark_files["folder"] / item.image)]
        single = generate.run(generate.GenerateConfig(ckpt=str(run_dir), image=image, prompt=[item.question],
                                                      max_new_tokens=6, dtype="fp32", device="cpu"),
                              out=open("/dev/null", "w"), log=open("/dev/null", "w"))
        assert prediction == single["answers"][0]
    assert len(report["results"][1]["predictions"]) == 2


def test_cli_in_a_subprocess(run_dir, benchmark_files, tmp_path):  # noqa: F811
    out = tmp_path / "pope.json"
    done = subprocess.run([sys.executable, "eval.py", "--ckpt", str(run_dir), "--data", str(benchmark_files["pope"]),
                           "--images", str(benchmark_files["folder"]), "--out", str(out), "--max_new_tokens", "4",
                           "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:3] == ["coco_pope_random.json", "pope", "4"]
    assert json.loads(out.read_text())["results"][0]["n"] == 4


@pytest.mark.parametrize("argv, expected", [
    (["--data", "nowhere.jsonl"], "nowhere.jsonl does not exist"),
    ([], "give a benchmark file with --data"),
    (["--data", "x.json", "--task", "caption"], "--task must be auto, vqa, pope, vsr, vizwiz or mc"),
    (["--data", "x.json", "--scoring", "vote"], "--scoring must be probability or generate"),
    (["--data", "x.json", "--batch_size", "0"], "--batch_size must be positive"),
])
def test_cli_errors(run_dir, capsys, argv, expected):  # noqa: F811
    assert ev.cli(["--ckpt", str(run_dir), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1 and expected in err, err


def test_out_of_memory_gives_advice(run_dir, benchmark_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Mamba2LM, "forward", out_of_memory)
    assert ev.cli(["--ckpt", str(run_dir), "--data", str(benchmark_files["pope"]), "--batch_size", "4",
                   "--images", str(benchmark_files["folder"]), "--out", str(tmp_path / "r.json"), "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "a smaller --batch_size (now 4)" in err, err
