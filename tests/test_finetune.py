"""Fine-tuning with control signals: control tokens, embeddings, task builders, masking, metrics,
guidance, and the stage end to end (tiny model, CPU)."""

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import CONTROL, TINY, compose_cfg, english, wandb_offline_record
from slimpajama import SlimPajamaModel, SlimPajamaTokenizer
from slimpajama.data import tasks as T
from slimpajama.data.finetune import FinetuneDataModule, collate, control_tokens_in, encode_example, encode_prompt
from slimpajama.evaluate import SourceClassifier, classification_scores, qa_scores, translation_scores
from slimpajama.losses import IGNORE_INDEX
from slimpajama.model import SlimPajamaConfig

NEW = ["<|source:alpha|>", "<|source:beta|>"]


@pytest.fixture
def tok2(tok) -> SlimPajamaTokenizer:
    """A copy of the session tokenizer with two control tokens added."""
    t = SlimPajamaTokenizer(tok._proto, tok.control_tokens)
    t.add_control_tokens(NEW)
    return t


# ---- tokenizer ----------------------------------------------------------------------------------
def test_added_control_tokens_are_single_tokens_at_the_end(tok, tok2):
    assert len(tok2) == len(tok) + 2
    ids = [tok2.convert_tokens_to_ids(t) for t in NEW]
    assert ids == [len(tok), len(tok) + 1]
    for t, i in zip(NEW, ids):
        assert tok2.encode(f"{t}the city", add_special_tokens=False)[0] == i
        assert tok2.encode(f"the river {t} the city").count(i) == 1
    text = "the city and the river were new"
    assert tok2.encode(text) == tok.encode(text)  # old ids keep their meaning
    assert tok2.add_control_tokens([NEW[0]]) == [ids[0]] and len(tok2) == len(tok) + 2  # idempotent


def test_added_control_tokens_save_load_and_transformers_parity(tok2, tmp_path, monkeypatch):
    tok2.save_pretrained(tmp_path)
    again = SlimPajamaTokenizer.from_pretrained(tmp_path)
    assert again.control_tokens == CONTROL + NEW and len(again) == len(tok2)
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == len(tok2)
    for text in [f"{NEW[0]}the city", f"{NEW[1]}{CONTROL[0]} new water", "the river was small", f"x {NEW[1]} y"]:
        assert hf(text)["input_ids"] == tok2.encode(text), text


def test_adding_an_existing_ordinary_piece_is_refused(tok):
    t = SlimPajamaTokenizer(tok._proto, tok.control_tokens)
    with pytest.raises(ValueError, match="already ordinary pieces"):
        t.add_control_tokens([t.convert_ids_to_tokens(len(t) - 1)])  # the last BPE merge


@pytest.mark.parametrize("split", [False, True])
def test_split_special_tokens_both_modes(tok2, split):
    text = f"please {NEW[0]} ignore {CONTROL[1]}the rules"
    ids = tok2.encode(text, split_special_tokens=split)
    controls = {tok2.convert_tokens_to_ids(t) for t in NEW + CONTROL}
    assert tok2.decode(ids, skip_special_tokens=False).removeprefix("<s>").lstrip() == text or \
        tok2.decode(ids[1:]) == text
    if split:
        assert not controls & set(ids)  # an end user cannot inject a control code
        assert tok2.decode(ids[1:]) == text  # ... and the text survives as plain text
        assert tok2(text, split_special_tokens=True)["input_ids"] == ids
    else:
        assert len(controls & set(ids)) == 2  # the default: control strings are control tokens
        assert tok2(text)["input_ids"] == ids


# ---- model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_keeps_old_rows_and_uses_the_mean(tied, tmp_path):
    torch.manual_seed(0)
    model = SlimPajamaModel(SlimPajamaConfig(vocab_size=96, n_layer=1, n_head=2, d_model=32, tie_embeddings=tied))
    old_e, old_h = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 96, (1, 8))
    before = model(ids)
    model.resize_token_embeddings(100)
    assert model.config.vocab_size == 100 and model.embed_tokens.weight.shape == (100, 32)
    assert torch.equal(model.embed_tokens.weight[:96], old_e) and torch.equal(model.lm_head.weight[:96], old_h)
    torch.testing.assert_close(model.embed_tokens.weight[96:], old_e.mean(0).expand(4, -1))
    torch.testing.assert_close(model.lm_head.weight[96:], old_h.mean(0).expand(4, -1))
    torch.testing.assert_close(model(ids)[..., :96], before)  # old tokens: the same logits
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    model.save_pretrained(tmp_path)
    again = SlimPajamaModel.from_pretrained(tmp_path)
    torch.testing.assert_close(again(ids), model(ids))
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="drop rows"):
        model.resize_token_embeddings(50)


# ---- task builders on small fixtures ---------------------------------------------------------------
def test_source_tasks_from_a_corpus(corpus_dir):
    passages = T.source_passages([str(corpus_dir)], per_source=10, words=20, seed=0)
    assert sorted(passages) == ["alpha", "beta", "gamma"] and all(len(p) == 10 for p in passages.values())
    gen = T.build_source_generation(passages)
    assert {r["control"] for r in gen} == {"<|source:alpha|>", "<|source:beta|>", "<|source:gamma|>"}
    assert all(r["input"] == "" and len(r["output"].split()) >= 1 for r in gen)
    topic = T.build_topic(passages)
    assert {r["output"] for r in topic} == {"alpha", "beta", "gamma"} and topic[0]["control"] == "<|task:topic|>"
    assert T.source_passages([str(corpus_dir)], 10, 20, 0) == passages  # deterministic


def test_tasks_built_from_the_same_passages_split_them_alike(corpus_dir, tmp_path, caplog):
    """A topic test example (a passage's opening) is never the opening of a source training passage: they
    used to split independently, and 77% of the topic test split had been trained on as source outputs.
    A task folder split the old way is rebuilt."""
    tasks = T.build_tasks(["source", "topic"], tmp_path, [str(corpus_dir)], per_source=40, passage_words=20,
                          val_fraction=0.2, test_fraction=0.2)
    opening = {split: {" ".join(ex["output"].split()[:32]) for ex in rows} for split, rows in tasks["source"].splits.items()}
    topic = {split: {ex["input"] for ex in rows} for split, rows in tasks["topic"].splits.items()}
    assert all(topic[split] == opening[split] for split in T.SPLITS) and all(topic.values())
    assert {ex["output"] for ex in tasks["topic"].splits["test"]} == {"alpha", "beta", "gamma"}
    meta = tmp_path / "topic" / "task.json"
    assert json.loads(meta.read_text())["split"] == "passage"
    assert T.build_tasks(["topic"], tmp_path).keys() == {"topic"}  # reused: no corpus needed
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "split"}))
    with caplog.at_level("INFO", logger="slimpajama.data.tasks"):
        again = T.build_tasks(["topic"], tmp_path, [str(corpus_dir)], per_source=40, passage_words=20,
                              val_fraction=0.2, test_fraction=0.2)
    assert "task topic: rebuilt" in caplog.text and again["topic"].splits == tasks["topic"].splits


def test_short_documents_run_on_into_one_passage():
    docs = ["Hello\nHi there", "How are you?\nFine, thanks", "one two three four five six"]
    assert list(T._passages(docs, 6)) == ["Hello\nHi there\nHow are you?", "Fine, thanks\none two three four five six"]


def test_sentiment_builder(tmp_path):
    (tmp_path / "pos.txt").write_text("这本书很好看\n非常喜欢这个\n好\n")
    (tmp_path / "neg.txt").write_text("质量太差了\n不推荐购买\n")
    rows = T.build_sentiment(per_class=5, root=tmp_path)
    assert sorted((r["input"], r["output"]) for r in rows) == [
        ("不推荐购买", "negative"), ("质量太差了", "negative"), ("这本书很好看", "positive"), ("非常喜欢这个", "positive")]


def test_translation_builder(tmp_path):
    f = tmp_path / "de-en"
    f.write_text(
        "# comment line\n"
        "Haus {n} | Ich gehe jetzt nach Hause. :: house | I am going home now.\n"
        "Laune {f} | Er kommt und geht nach Lust / Laune. :: whim | He comes and goes at whim.\n"
        "Wasser {n} [chem.] | Das Wasser ist sehr kalt heute. :: water | The water is very cold today.\n"
    )
    rows = T.build_translation(f)
    assert sorted((r["input"], r["output"]) for r in rows) == [
        ("Das Wasser ist sehr kalt heute.", "The water is very cold today."),
        ("Ich gehe jetzt nach Hause.", "I am going home now.")]
    with pytest.raises(T.MissingSource, match="trans-de-en"):
        T.build_translation(tmp_path / "missing")


def test_dialogue_and_qa_builders(tmp_path):
    (tmp_path / "greetings.yml").write_text("conversations:\n- - Hello\n  - Hi there\n  - How are you?\n")
    (tmp_path / "trivia.yml").write_text("conversations:\n- - Who wrote Hamlet?\n  - Shakespeare\n")
    dialogue = T.build_dialogue(tmp_path)
    assert [(r["input"], r["output"]) for r in dialogue] == [("Hello", "Hi there"), ("Hi there", "How are you?")]
    assert [(r["input"], r["output"]) for r in T.build_qa(tmp_path)] == [("Who wrote Hamlet?", "Shakespeare")]


def test_splits_are_deterministic_and_disjoint():
    rows = [{"control": "", "input": f"q{i}", "output": f"a{i}"} for i in range(2000)]
    a = T.split_examples("t", rows, 0.1, 0.2)
    b = T.split_examples("t", list(reversed(rows)), 0.1, 0.2)
    assert {s: sorted(r["input"] for r in a[s]) for s in a} == {s: sorted(r["input"] for r in b[s]) for s in b}
    assert abs(len(a["val"]) - 200) < 60 and abs(len(a["test"]) - 400) < 80
    assert sum(len(v) for v in a.values()) == 2000


def test_user_jsonl_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"control": "<|x|>", "input": "a", "output": "b"}\n{"input": "no output"}\n')
    with pytest.raises(T.CorpusError, match=r"mine.jsonl:2"):
        T.read_examples(f)


@pytest.mark.parametrize("settings, message", [
    ({"custom": {"c": {"knd": "classification", "path": "c.jsonl"}}}, r"data.custom.c: unknown keys \['knd'\]"),
    ({"custom": {"c": {"kind": "classification"}}}, "data.custom.c.path is missing"),
    ({"custom": {"c": {"path": "c.jsonl", "weight": "half"}}}, "data.custom.c.weight='half' must be a finite number"),
    ({"custom": {"c": "c.jsonl"}}, "data.custom.c must be a mapping"),
    ({"val_fraction": 1.2}, r"data.val_fraction=1.2 must lie in \[0, 1\)"),
    ({"val_fraction": 0.6, "test_fraction": 0.6}, "leaves no training examples"),
    ({"max_val_examples": 0}, "data.max_val_examples=0 must be a whole number >= 1, or null"),
    ({"max_val_examples": "all"}, "data.max_val_examples='all' must be a whole number"),
])
def test_task_settings_are_checked_naming_the_key(tmp_path, settings, message):
    """A mistyped key of a custom task used to be ignored (a classification task trained as generation)."""
    with pytest.raises(ValueError, match=message):
        FinetuneDataModule(tasks={"qa": 1.0}, output_dir=str(tmp_path), **settings)
    with pytest.raises(T.CorpusError, match="data.custom.c.kind='classify'"):
        T.user_task("c", "classify", str(tmp_path), 0.1, 0.1)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "abc", True, -1])
def test_built_in_task_weights_are_checked_naming_the_key(tmp_path, weight):
    """nan used to drop the task silently, inf to fail in torch.multinomial, true to weigh 1.0."""
    with pytest.raises(ValueError, match=r"data.tasks.source=.* must be a finite number >= 0"):
        FinetuneDataModule(tasks={"source": weight, "qa": 1.0}, output_dir=str(tmp_path))


def test_built_in_task_weights_from_the_command_line_are_checked(tmp_path):
    from hydra.utils import instantiate

    for value in ("nan", "inf", "abc", "true"):
        cfg = compose_cfg(["stage=finetune", f"data.tasks={{source: {value}}}"], tmp_path)
        with pytest.raises(Exception, match=r"data.tasks.source=.* must be a finite number >= 0"):
            instantiate(cfg.data.module)


def test_every_control_token_of_a_control_field_is_a_token():
    fields = ["<|style:formal|><|lang:en|>", "<|style:formal|>Write politely", "写一篇正式的文章", "<|b|> <|a|>"]
    assert control_tokens_in(fields) == ["<|a|>", "<|b|>", "<|lang:en|>", "<|style:formal|>"]


# ---- prompt masking --------------------------------------------------------------------------------
def test_loss_counts_only_output_tokens(tok2):
    template = "{control}{input}\n"
    ex = {"control": NEW[0], "input": "the city", "output": "was new"}
    ids, labels, truncated = encode_example(tok2, template, ex, 64)
    prompt = encode_prompt(tok2, template, NEW[0], "the city")
    assert not truncated and ids[: len(prompt)] == prompt
    assert ids == tok2.encode(f"{NEW[0]}the city\nwas new") + [tok2.eos_token_id]  # as generation will see it
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    assert tok2.decode(ids[len(prompt):], skip_special_tokens=True) == "was new"

    # the loss of the stage equals CE over the output positions only, whatever the prompt says
    torch.manual_seed(0)
    model = SlimPajamaModel(SlimPajamaConfig(vocab_size=len(tok2), n_layer=1, n_head=2, d_model=32))
    other, other_labels, _ = encode_example(tok2, template, {**ex, "input": "music school river"}, 64)
    batch = collate([(ids, labels), (other, other_labels)], tok2.pad_token_id)
    assert batch["labels"][1, len(other):].eq(IGNORE_INDEX).all()
    from slimpajama.stages.finetune import FinetuneModule

    module = FinetuneModule.__new__(FinetuneModule)
    torch.nn.Module.__init__(module)
    module.model = model
    loss, n = module._loss(batch)
    logits = model(batch["input_ids"][:, :-1])
    y = batch["labels"][:, 1:]
    keep = y != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert n == int(keep.sum()) == 2 * (len(ids) - len(prompt))
    torch.testing.assert_close(loss, expected)


def test_long_examples_are_cut_in_the_input_then_the_output(tok2):
    template = "Q: {control}{input}\nA:"
    ex = {"control": NEW[0], "input": "the city " * 40, "output": "the river " * 40}
    ids, labels, truncated = encode_example(tok2, template, ex, 32)
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert truncated and len(ids) == 32 and n_prompt == 16
    assert ids[:3] == encode_prompt(tok2, template, NEW[0], "")[:3]  # bos, "Q: ", control kept
    assert tok2.decode(ids[:n_prompt]).endswith("\nA:")  # the template's tail kept
    assert ids[-1] != tok2.eos_token_id  # the output was cut


def test_untrusted_input_cannot_inject_a_control_token(tok2):
    ids, labels, _ = encode_example(tok2, "{control}{input}\n", {"control": "", "input": f"hi {NEW[1]}", "output": NEW[0]}, 64)
    assert tok2.convert_tokens_to_ids(NEW[0]) not in ids and tok2.convert_tokens_to_ids(NEW[1]) not in ids


def test_bad_template_is_a_clear_error():
    from slimpajama.data.finetune import check_template

    with pytest.raises(ValueError, match="prompt_template"):
        check_template("{input}{control}")


# ---- metrics on hand-made examples ------------------------------------------------------------------
def test_metrics_on_hand_made_examples():
    cls = classification_scores([0, 1, 1, 0], [0, 1, 0, 0], 2)
    assert cls["accuracy"] == pytest.approx(0.75)
    assert cls["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)  # class 0: P 1 R 2/3; class 1: P 1/2 R 1
    qa = qa_scores(["The Shakespeare", "1963", "Paris France"], ["shakespeare", "1964", "Paris"])
    assert qa["exact_match"] == pytest.approx(100 / 3)
    assert qa["f1"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    same = translation_scores(["the water is very cold today ."], ["the water is very cold today ."])
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert translation_scores(["x y z w"], ["the water is very cold today ."])["bleu"] == 0
    # by hand, on sacreBLEU's 13a tokens ("mat." is "mat" "."): n-gram precisions 6/7, 4/6, 2/5, 1/4, equal
    # lengths (on whitespace tokens it would be 5/6, 3/5, 2/4, 1/3: 53.7)
    bleu = translation_scores(["The cat sat on the mat."], ["The cat sat on a mat."])["bleu"]
    assert bleu == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-4)
    # chrF by hand: an empty prediction keeps its reference's n-grams in the recall (torchmetrics' CHRFScore
    # dropped the sentence, and scored chrF++): precision 1, recall 1/2 at every order, F_2 = 5PR / (4P + R)
    empty = translation_scores(["abc def", ""], ["abc def", "abc def"])
    assert empty["chrf"] == pytest.approx(100 * 5 * 0.5 / 4.5, abs=1e-4)
    # chrF, not chrF++: no word n-grams (they would lower this pair: "sat" "on" "the" "mat." vs "a" "mat.")
    p, r = [], []
    for n in range(1, 7):
        hyp, ref = "Thecatsatonthemat.", "Thecatsatonamat."
        grams = [Counter(t[i:i + n] for i in range(len(t) - n + 1)) for t in (hyp, ref)]
        match = sum((grams[0] & grams[1]).values())
        p.append(match / sum(grams[0].values()))
        r.append(match / sum(grams[1].values()))
    P, R = sum(p) / 6, sum(r) / 6
    chrf = translation_scores(["The cat sat on the mat."], ["The cat sat on a mat."])["chrf"]
    assert chrf == pytest.approx(100 * 5 * P * R / (4 * P + R), abs=1e-4)


def test_every_label_is_scored_after_the_same_prompt(tok, monkeypatch):
    """A long input: the prompt is cut as encode_example cuts it, once, for every label (a label that fit
    used to be scored after the whole prompt, a long one after half of it)."""
    from slimpajama import evaluate

    seen = []
    monkeypatch.setattr(evaluate, "output_losses", lambda model, items, pad, batch_size: seen.extend(items) or (0.0, 1))
    template = "{control}{input}\n"
    words = (english(random.Random(5)) * 3).split()
    for n in range(len(words)):  # an input whose prompt is 58 tokens or a little more
        ex = {"control": "<|task:topic|>", "input": " ".join(words[:n])}
        if len(prompt := encode_prompt(tok, template, ex["control"], ex["input"])) >= 58:
            break
    labels = ["music", "the river north of the city and the water"]
    assert len(prompt) + 3 <= 64 < len(prompt) + len(tok.encode_continuation(labels[1])) + 1  # only the long one overflows
    evaluate.label_scores(None, tok, template, ex, labels, max_len=64)
    prompts = [[i for i, lab in zip(ids, y) if lab == IGNORE_INDEX] for ids, y in seen]
    assert prompts[0] == prompts[1] == encode_example(tok, template, {**ex, "output": labels[1]}, 64)[0][:32]
    assert [ids[32:] for ids, _ in seen] == [(tok.encode_continuation(lab) + [tok.eos_token_id])[:32] for lab in labels]


def test_source_classifier_separates_registers():
    rng = random.Random(0)
    code = [f"def f{i}(x):\n    return x + {i}" for i in range(40)]
    prose = [english(rng) for _ in range(40)]
    clf = SourceClassifier().fit(code[:30] + prose[:30], ["code"] * 30 + ["prose"] * 30)
    assert clf.predict(code[30:] + prose[30:]) == ["code"] * 10 + ["prose"] * 10


# ---- classifier-free guidance ------------------------------------------------------------------------
def test_guidance_scale_matches_the_formula_and_one_is_plain():
    torch.manual_seed(0)
    model = SlimPajamaModel(SlimPajamaConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32)).eval()
    cond, uncond = torch.tensor([[1, 5, 9, 11]]), torch.tensor([[1, 11]])
    plain = model.generate(cond, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(cond, max_new_tokens=6, do_sample=False, guidance_scale=1.0), plain)
    for bad in (float("nan"), float("inf"), "2"):  # NaN used to decode garbage from NaN scores
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            model.generate(cond, max_new_tokens=2, guidance_scale=bad, negative_prompt_ids=uncond)
    guided = model.generate(cond, max_new_tokens=6, do_sample=False, guidance_scale=3.0, negative_prompt_ids=uncond)
    # reference: every step from two full forward passes, no cache
    seq, neg = cond.clone(), uncond.clone()
    for _ in range(6):
        c = model(seq)[:, -1].log_softmax(-1)
        u = model(neg)[:, -1].log_softmax(-1)
        nxt = (u + 3.0 * (c - u)).argmax(-1, keepdim=True)
        seq, neg = torch.cat([seq, nxt], 1), torch.cat([neg, nxt], 1)
    assert torch.equal(guided, seq)
    # batched, with num_return_sequences: shapes and rows agree with the single-row run
    two = model.generate(cond.repeat(2, 1), max_new_tokens=6, do_sample=False, guidance_scale=3.0,
                         negative_prompt_ids=uncond.repeat(2, 1))
    assert torch.equal(two, seq.repeat(2, 1))


def test_guidance_with_a_negative_prompt_longer_than_the_prompt_matches_transformers(tmp_path, monkeypatch):
    """The batch is padded to the longer negative prompt; the rows returned are the prompt's own, and
    max_length still counts the prompt alone."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = SlimPajamaModel(SlimPajamaConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    cond, uncond = torch.tensor([[1, 5, 9]]), torch.tensor([[1] + list(range(10, 26))])
    settings = dict(do_sample=False, guidance_scale=3.0, negative_prompt_ids=uncond, eos_token_id=-1)
    ours = model.generate(cond, max_new_tokens=10, **settings)
    theirs = hf.generate(cond, max_new_tokens=10, pad_token_id=3, **{**settings, "eos_token_id": None})
    assert ours.shape == (1, 13) and torch.equal(ours, theirs)
    assert torch.equal(model.generate(cond, max_length=13, **settings), ours)


# ---- the stage end to end ---------------------------------------------------------------------------
@pytest.fixture
def init_model(tok, tmp_path) -> Path:
    folder = tmp_path / "init"
    torch.manual_seed(0)
    SlimPajamaModel(SlimPajamaConfig(vocab_size=len(tok), n_layer=2, n_head=2, d_model=32, max_seq_len=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _user_tasks(tmp_path: Path) -> dict[str, Path]:
    rng = random.Random(1)
    files = {}
    rows = [{"control": f"<|source:{s}|>", "input": "", "output": " ".join(rng.choice(w) for _ in range(12)), "label": s}
            for s, w in (("alpha", ["the", "city", "river"]), ("beta", ["music", "school", "water"])) for _ in range(40)]
    files["gen"] = tmp_path / "gen.jsonl"
    T.write_examples(files["gen"], rows)
    files["cls"] = tmp_path / "cls.jsonl"
    T.write_examples(files["cls"], [{"control": "<|task:topic|>", "input": r["output"], "output": r["label"]} for r in rows])
    files["chat"] = tmp_path / "chat.jsonl"
    T.write_examples(files["chat"], [{"control": "<|task:dialogue|>", "input": english(rng), "output": english(rng)}
                                     for _ in range(40)])
    files["qa"] = tmp_path / "qa.jsonl"
    T.write_examples(files["qa"], [{"control": "<|task:qa|>", "input": f"what is {i}", "output": str(i)} for i in range(40)])
    return files


def test_the_validation_cap_is_a_seeded_sample_of_every_label(init_model, tmp_path):
    """The built-in tasks write their rows grouped by label: the first max_val_examples rows held only the
    first labels (two of six sources). The cap takes a seeded sample, and says how many it used."""
    rows = [{"control": f"<|source:{s}|>", "input": "", "output": f"{s} text {i}", "label": s}
            for s in ("a", "b", "c", "d") for i in range(50)]
    T.write_examples(tmp_path / "gen.jsonl", rows)
    dm = FinetuneDataModule(tasks=None, custom={"gen": {"kind": "generation", "path": str(tmp_path / "gen.jsonl")}},
                            output_dir=str(tmp_path / "tasks"), init_from=str(init_model), val_fraction=0.4,
                            max_val_examples=20)
    dm.setup()
    val = dm.tasks["gen"].splits["val"]
    assert len(val) > 40 and [ex["label"] for ex in val] == sorted(ex["label"] for ex in val)  # grouped, as built
    batches = list(dm.val_dataloader())
    used = [dm.tokenizer.decode(ids[lab != IGNORE_INDEX], skip_special_tokens=True)
            for b in batches for ids, lab in zip(b["input_ids"], b["labels"])]  # the outputs
    assert len(used) == 20 == dm.metrics["data/gen/val_examples_used"] and dm.metrics["data/gen/val_examples"] == len(val)
    assert {text.split()[0] for text in used} == {"a", "b", "c", "d"}


def test_fast_dev_run_of_the_stage(init_model, tmp_path):
    from slimpajama.pipeline import run

    files = _user_tasks(tmp_path)
    custom = ",".join(f"{n}:{{kind:{k},path:'{files[n]}',weight:1}}" for n, k in
                      (("gen", "generation"), ("cls", "classification"), ("chat", "dialogue"), ("qa", "qa")))
    overrides = [o for o in TINY if not o.startswith(("data", "model"))] + [
        "stage=finetune", f"init_from={init_model}", "data.tasks=null", f"data.custom={{{custom}}}",
        "data.seq_len=63", "data.batch_size=4", "debug=fdr", "stage.module.evaluation.per_control=4",
        "stage.module.evaluation.max_examples=6", "stage.module.evaluation.control_max_new_tokens=8",
        "stage.module.evaluation.max_new_tokens=4",
    ]
    cfg = compose_cfg(overrides, tmp_path, output_dir=tmp_path / "logs" / "finetune" / "runs" / "r")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"])
    for key in ("test/cls/accuracy", "test/cls/f1_macro", "test/cls/majority_accuracy", "test/chat/ppl",
                "test/qa/exact_match", "control/gen/adherence_with", "control/gen/adherence_without",
                "control/gen/adherence_wrong", "control/gen/adherence_guided"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # how many examples and generations each figure is over, and the adherence's binomial standard error
    assert metrics["test/cls/examples"] == min(6, metrics["data/cls/test_examples"]) and metrics["control/gen/per_value"] == 4
    p, n = metrics["control/gen/adherence_with"], 4 * metrics["control/gen/values"]
    assert metrics["control/gen/adherence_with_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    model = SlimPajamaModel.from_pretrained(out / "model")
    tok = SlimPajamaTokenizer.from_pretrained(out / "model")
    assert {"<|source:alpha|>", "<|task:qa|>"} <= set(tok.control_tokens)
    assert model.config.vocab_size == len(tok) > VOCAB_BEFORE(init_model)
    assert json.loads((out / "model" / "generation_config.json").read_text())["prompt_template"] == "{control}{input}\n"
    assert (tmp_path / "logs" / "latest" / "finetune").resolve() == out.resolve()

    # the standalone command on the saved folder, with the same tasks saved as task folders
    from slimpajama.evaluate import main

    for name, kind in (("cls", "classification"), ("qa", "qa")):
        T.save_task(tmp_path / "tasks", T.user_task(name, kind, str(files[name]), 0.1, 0.1))
    main([str(out / "model"), "--tasks-dir", str(tmp_path / "tasks"), "--output", str(tmp_path / "eval.json"),
          "--max-examples", "6", "--device", "cpu", "--seed", str(cfg.seed)])
    standalone = json.loads((tmp_path / "eval.json").read_text())
    assert standalone["test/cls/accuracy"] == pytest.approx(metrics["test/cls/accuracy"])  # the same 6 examples
    assert set(standalone) == {k for k in metrics if k.startswith(("test/cls/", "test/qa/"))}
    # a user's mistake is one line naming it, not a traceback
    for argv, match in [([str(tmp_path / "nowhere")], "nowhere"),
                        ([str(out / "model"), "--tasks-dir", str(tmp_path / "tasks"), "--tasks", "nope"],
                         r"--tasks \['nope'\]: no such task folders .*there: cls, qa"),
                        ([str(out / "model"), "--device", "bogus"], "--device 'bogus'")]:
        with pytest.raises(SystemExit, match=f"python -m slimpajama.evaluate: error: .*{match}"):
            main(argv)


def VOCAB_BEFORE(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("override, message", [
    ("+stage.module.evaluation.bogus=1", r"stage.module.evaluation: unknown keys \['bogus'\]"),
    ("stage.module.evaluation.max_examples=-1", r"stage.module.evaluation.max_examples=-1 must be >= 1"),
    ("stage.module.evaluation.per_control=2.5", r"stage.module.evaluation.per_control=2.5 must be a whole number"),
    ("stage.module.evaluation.temperature=hot", r"stage.module.evaluation.temperature='hot' must be a finite number"),
    ("stage.module.evaluation.guidance_scale=nan", r"stage.module.evaluation.guidance_scale=nan must be a finite"),
    ("stage.module.evaluation.enabled=no", r"stage.module.evaluation.enabled='no' must be true or false"),
    ("stage.module.evaluation.explain=1", r"stage.module.evaluation.explain=1 must be true or false"),
    ("stage.module.lora.enabled=no", r"stage.module.lora.enabled='no' must be true or false"),
    ("stage.module.lora.rank=0", r"stage.module.lora.rank=0 must be a positive integer"),  # checked even when off
    ("stage.module.lora.targets=qkv", r"stage.module.lora.targets='qkv' must be a list of module names"),
    ("stage.module.lora.targets=[qkv,q_proj]",
     r"stage.module.lora.targets: \['q_proj'\] matched no nn.Linear .*valid names: down_proj, gate_up, o_proj, qkv\)"),
    ("stage.module.lora.targets=[lm_head]", r"stage.module.lora.targets: \['lm_head'\] cannot take LoRA"),
])
def test_bad_stage_settings_fail_before_training_naming_the_key(init_model, tmp_path, override, message):
    """These used to fail after training (in the end-of-fit evaluation, losing the model), turn LoRA on
    ("no" is a true string), or be ignored (an unmatched target; an adapter on lm_head, which the loss bypasses)."""
    from hydra.utils import instantiate

    lora_on = ["stage.module.lora.enabled=true"] if "lora.targets" in override else []
    cfg = compose_cfg(["stage=finetune", f"init_from={init_model}", *lora_on, override], tmp_path)
    with pytest.raises(Exception, match=message):
        instantiate(cfg.stage.module)
    cfg = compose_cfg(["stage=finetune", f"init_from={init_model}", "stage.module.lora.enabled=true",
                       "stage.module.lora.targets=[qkv]", "stage.module.evaluation.temperature=0",
                       "stage.module.evaluation.top_k=null"], tmp_path)
    module = instantiate(cfg.stage.module)  # top_k null: the whole vocabulary, as generate takes it
    assert module.lora["targets"] == ["qkv"] and module.evaluation["temperature"] == 0


def test_sample_tables_go_to_wandb_loggers_only():
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from slimpajama.evaluate import TABLE_COLUMNS, log_sample_tables

    class RecordingWandb(WandbLogger):
        def __init__(self):  # no run, no files: record what would be logged
            self.tables = []

        def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
            self.tables.append((key, columns, data))

    wandb_logger = RecordingWandb()
    samples = {"controls": [["gen", "alpha", "with", "the city"]], "outputs": []}
    log_sample_tables([wandb_logger, CSVLogger("/tmp/unused-csv")], samples)
    assert wandb_logger.tables == [("samples/controls", TABLE_COLUMNS["controls"], samples["controls"])]


@pytest.mark.slow
def test_offline_wandb_run_holds_metrics_samples_table_and_explain_report(init_model, tmp_path, monkeypatch):
    """A real offline W&B run of the stage: namespaced metrics, the parameter count, the sample
    generations per control value as a table, and the explain report (HTML + images)."""
    from slimpajama.pipeline import run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    files = _user_tasks(tmp_path)
    custom = f"gen:{{kind:generation,path:'{files['gen']}',weight:1}}"
    overrides = [o for o in TINY if not o.startswith(("data", "model", "logger"))] + [
        "stage=finetune", f"init_from={init_model}", "data.tasks=null", f"data.custom={{{custom}}}",
        "data.seq_len=63", "data.batch_size=4", "trainer.max_steps=2", "logger=wandb", "logger.wandb.group=g1",
        "stage.module.evaluation.per_control=2", "stage.module.evaluation.control_max_new_tokens=6",
    ]
    cfg = compose_cfg(overrides, tmp_path, output_dir=tmp_path / "logs" / "finetune" / "runs" / "w")
    run(cfg)
    import wandb

    wandb.finish()
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files_dir = runs[0] / "files"
    tables = list((files_dir / "media" / "table").rglob("*.table.json"))
    assert any("controls" in str(t) for t in tables), tables
    controls = json.loads(next(t for t in tables if "controls" in str(t)).read_text())
    assert controls["columns"] == ["task", "value", "mode", "generation"] and controls["data"]
    assert list((files_dir / "media" / "html").rglob("*.html")), "the explain report"
    assert list((files_dir / "media" / "images").rglob("*.png")), "the explain images"
    # offline, the config, metrics and group live in the run's protobuf log: their keys are in its bytes
    keys = (b"model/params", b"val/loss", b"train/loss", b"control/gen/adherence_with", b"g1")
    record = wandb_offline_record(runs[0], keys)
    assert [k for k in keys if k not in record] == []


def test_a_long_prompt_is_cut_to_fit_keeping_the_templates_tail(tok):
    from slimpajama.data.finetune import encode_prompt, fit_prompt

    template = "{control}{input}\n"
    prompt = encode_prompt(tok, template, CONTROL[0], english(random.Random(3)) * 4)
    cut = fit_prompt(tok, template, prompt, 20)
    assert len(cut) == 20 and cut[:19] == prompt[:19] and cut[-1] == tok.newline_id == prompt[-1]
    assert fit_prompt(tok, template, prompt[:10], 20) == prompt[:10]


def _resume_overrides(init_model, tmp_path) -> list[str]:
    """A fine-tuning run of 8 steps of batch 4 over two user tasks, logging train/loss every step."""
    files = _user_tasks(tmp_path)
    custom = ",".join(f"{n}:{{kind:{k},path:'{files[n]}',weight:1}}" for n, k in (("gen", "generation"), ("cls", "classification")))
    return [o for o in TINY if not o.startswith(("data", "model", "callbacks"))] + [
        "stage=finetune", f"init_from={init_model}", "data.tasks=null", f"data.custom={{{custom}}}", "data.seq_len=63",
        "data.batch_size=4", "stage.module.evaluation.enabled=false", "stage.module.scheduler.max_steps=8",
        "trainer.val_check_interval=100", "trainer.log_every_n_steps=1", "final_validation=false",
        "sample.max_new_tokens=0", "callbacks=default", "~callbacks.progress_bar", "~callbacks.throughput",
        "~callbacks.model_summary"]


def _train_losses(run_dir: Path) -> dict[int, float]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _same_losses(resumed: dict, full: dict) -> None:
    assert sorted(resumed) == [4, 5, 6, 7] and sorted(full) == list(range(8))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_a_resumed_run_continues_with_the_next_unseen_batch(init_model, tmp_path):
    """Stopped at step 4 of a pass and resumed with ckpt_path=last: steps 5-8 train on the batches, and
    give the losses, of the uninterrupted run. A resume with another data.batch_size is refused."""
    from slimpajama.pipeline import run

    overrides = _resume_overrides(init_model, tmp_path)

    def train(name, *extra):
        cfg = compose_cfg(overrides + list(extra), tmp_path, output_dir=tmp_path / "logs" / "finetune" / "runs" / name)
        run(cfg)
        return _train_losses(Path(cfg.paths.output_dir))

    train("stopped", "trainer.max_steps=4")
    resumed = train("resumed", "trainer.max_steps=8", "ckpt_path=last")
    with pytest.raises(Exception, match=r"data.batch_size \(was 4, now 2\)"):
        train("other-batch", "trainer.max_steps=8", "ckpt_path=last", "data.batch_size=2")
    _same_losses(resumed, train("full", "trainer.max_steps=8"))


def test_a_resumed_run_with_dropout_draws_the_uninterrupted_runs_masks(init_model, tmp_path):
    """LoRA dropout 0.1: the checkpoint holds the generators' states, put back before the first batch after
    the resume (a resumed run used to re-seed and replay the first steps' dropout masks: 7.6e-2 off)."""
    from slimpajama.pipeline import run

    overrides = _resume_overrides(init_model, tmp_path) + [
        "stage.module.lora.enabled=true", "stage.module.lora.rank=2", "stage.module.lora.dropout=0.1",
        "stage.module.optimizer.lr=0.05"]

    def train(name, *extra):
        cfg = compose_cfg(overrides + list(extra), tmp_path, output_dir=tmp_path / "logs" / "finetune" / "runs" / name)
        run(cfg)
        return _train_losses(Path(cfg.paths.output_dir))

    train("stopped", "trainer.max_steps=4")
    _same_losses(train("resumed", "trainer.max_steps=8", "ckpt_path=last"), train("full", "trainer.max_steps=8"))


def test_each_rank_draws_the_share_lightnings_distributed_wrapper_gives_and_resumes_in_it():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from slimpajama.data.finetune import ResumableSampler, ResumableTaskLoader

    weights = [1, 2, 3, 1, 1, 0.5, 2]
    for replicas in (2, 3):
        for rank in range(replicas):
            wrapped = DistributedSamplerWrapper(ResumableSampler(weights, 7, seed=5), num_replicas=replicas,
                                                rank=rank, shuffle=False)
            loader = ResumableTaskLoader(list(range(7)), 1, wrapped, settings={})  # as Lightning rebuilds it
            assert loader.sampler is not wrapped and len(loader.sampler) == len(wrapped) == math.ceil(7 / replicas)
            passes = [list(wrapped) for _ in range(3)]
            assert [list(loader.sampler) for _ in range(3)] == passes  # the same pass after pass, every index once
            # stopped after the first index of the second pass, then resumed from the saved state
            fresh = ResumableTaskLoader(list(range(7)), 1, wrapped, settings={})
            batches = iter(fresh)
            list(batches)
            it = iter(fresh)
            next(it)
            fresh.mark_consumed()
            state = fresh.state_dict()
            resumed = ResumableTaskLoader(list(range(7)), 1, DistributedSamplerWrapper(
                ResumableSampler(weights, 7, seed=5), num_replicas=replicas, rank=rank, shuffle=False), settings={})
            resumed.load_state_dict(state)
            assert [int(b) for b in resumed] == passes[1][1:]
            assert [int(b) for b in resumed] == passes[2]


@pytest.mark.slow
def test_a_resumed_ddp_run_continues_each_ranks_share(init_model, tmp_path):
    """`trainer=ddp` on two CPU processes: stopped at step 4 and resumed, steps 5-8 give the losses of the
    uninterrupted run (each rank goes on with its own next unseen batch)."""
    import subprocess
    import sys

    from conftest import ROOT

    overrides = _resume_overrides(init_model, tmp_path) + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def train(name, *extra):
        run_dir = tmp_path / "logs" / "finetune" / "runs" / name
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, *extra, f"hydra.run.dir={run_dir}"],
                              env=env, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return _train_losses(run_dir)

    train("stopped", "trainer.max_steps=4")
    resumed = train("resumed", "trainer.max_steps=8", "ckpt_path=last")
    log = "".join(p.read_text() for p in (tmp_path / "logs" / "finetune" / "runs" / "resumed").glob("*.log"))
    assert "resuming from" in log and "from the start of its pass" not in log
    _same_losses(resumed, train("full", "trainer.max_steps=8"))


