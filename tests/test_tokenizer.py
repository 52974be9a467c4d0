"""Tests for the SentencePiece tokenizer with its Hugging Face-style API (src/slimpajama/tokenizer.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from slimpajama.tokenizer import SlimPajamaTokenizer

from conftest import CONTROL, VOCAB, WORDS, chinese, english  # the `tok` fixture is in conftest too


ROUND_TRIP = {
    "english": "The city, by the river, was new: 42 people (and 7 more) were there!",
    "spaces": "two  spaces,   three,    four and a trailing space ",
    "newlines_tabs": "line one\nline two\n\n\tindented with a tab\n    and four spaces\r\nwindows line\n",
    "chinese": "写一篇正式的文章",
    "mixed": "Write a formal article: 写一篇正式的文章, about 北京 and the world.",
    "emoji": "music 🎵 and light ✨ 😀👍🏽 👩\u200d💻 🇯🇵",
    "unseen": "Съешь же ещё этих мягких булок — 한국어 텍스트 ΑΒΓ ∑∫ ﬁ Å",
    "control_chars": "nul\x00 bell\x07 del\x7f nbsp\u00a0 zwsp\u200b",
    "numbers": "3.14159 and 1,000,000 and 2024-06-01",
    "code": "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
    "empty": "",
    "only_spaces_after_text": "x   ",
    "only_newline": "\n",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_exact_round_trip(tok, name):
    """Any text that does not start with a space and holds no special-token string or U+2581 comes back
    exactly (a leading space: `test_a_leading_space_stands_for_the_dummy_prefix_as_in_transformers`)."""
    text = ROUND_TRIP[name]
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids  # byte fallback: nothing is ever <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_unseen_characters_use_byte_fallback(tok):
    ids = tok.encode("Ж", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p != "▁"] == ["<0xD0>", "<0x96>"]  # the UTF-8 bytes of Ж
    emoji = [p for p in tok.convert_ids_to_tokens(tok.encode("😀", add_special_tokens=False)) if p != "▁"]
    assert emoji == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # the 256 byte pieces exist, so any byte string is representable
    assert all(tok.convert_tokens_to_ids(f"<0x{b:02X}>") != tok.unk_token_id for b in range(256))


def test_seen_text_is_compressed(tok):
    """The tokenizer learned the training distribution: seen words and characters are few tokens per byte."""
    rng = random.Random(99)
    en = english(rng)
    zh = chinese(rng)
    assert len(tok.encode(en, add_special_tokens=False)) < 0.45 * len(en.encode())
    assert len(tok.encode(zh, add_special_tokens=False)) <= len(zh) + 1  # one token per character, at most
    assert tok.encode("the", add_special_tokens=False) == [tok.convert_tokens_to_ids("▁the")]


def test_special_ids_and_sizes(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert tok.vocab_size == len(tok) == VOCAB
    assert tok.control_token_ids == [tok.convert_tokens_to_ids(t) for t in CONTROL]
    assert tok.all_special_ids == sorted({0, 1, 2, 3, *tok.control_token_ids})
    # the literal text of a special token is the special token, as in transformers, unless split_special_tokens
    assert tok.encode("<s></s><pad><unk>", add_special_tokens=False) == [1, 2, 3, 0]
    assert tok.encode("the</s>city", add_special_tokens=False) == (
        tok.encode("the", add_special_tokens=False) + [2] + tok.encode_continuation("city"))
    ids = tok.encode("<s></s><pad><unk>", add_special_tokens=False, split_special_tokens=True)
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode(ids) == "<s></s><pad><unk>"
    # the corpus reads them as text: a document's "</s>" does not end it
    doc = "a</s>b"
    assert tok.encode_batch([doc])[0] == tok.encode(doc, add_special_tokens=False, split_special_tokens=True)


@pytest.mark.parametrize("control", CONTROL)
def test_control_tokens_are_single_tokens(tok, control):
    cid = tok.convert_tokens_to_ids(control)
    assert cid not in (0, 1, 2, 3) and tok.convert_ids_to_tokens(cid) == control
    for text in [control, f"{control}Hello", f"Hello{control}", f"Hello {control} world", f"写{control}文章",
                 f"{control}{control}"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids.count(cid) == text.count(control), text
        pieces = tok.convert_ids_to_tokens(ids)
        assert not any(control in p for p, i in zip(pieces, ids) if i != cid), pieces  # never split or merged
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == text.replace(control, "")
    glued = tok.encode(f"{control}Hello", add_special_tokens=False)
    assert glued[glued.index(cid) + 1 :] == tok.encode("Hello", add_special_tokens=False)[1:]  # Hello minus '▁'


def test_skip_special_tokens_drops_bos_eos_pad_and_otherwise_they_print_as_in_transformers(tok):
    city = tok.encode("the city", add_special_tokens=False)
    ids = [tok.bos_token_id] + city + [tok.eos_token_id, 3, 3]
    assert tok.decode(ids, skip_special_tokens=True) == "the city"
    # only the first token loses its dummy-prefix space: after <s> or </s> the space stays
    assert tok.decode(ids, skip_special_tokens=False) == "<s> the city</s><pad><pad>"
    assert tok.decode(city + [2] + city + [0]) == "the city</s> the city<unk>"
    assert tok.decode([0] + city, skip_special_tokens=True) == "the city"


def test_encode_return_tensors(tok):
    ids = tok.encode("The river and the sea.")
    t = tok.encode("The river and the sea.", return_tensors="pt")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.long and t.shape == (1, len(ids))
    assert t[0].tolist() == ids
    assert tok.decode(t[0], skip_special_tokens=True) == "The river and the sea."  # decode takes tensors
    assert tok.encode("The river and the sea.", return_tensors="np").tolist() == [ids]
    with pytest.raises(ValueError, match="return_tensors"):
        tok.encode("x", return_tensors="tf")


def test_add_special_tokens_adds_only_bos(tok):
    for text in ["Hello world.", "写一篇正式的文章", ""]:
        plain = tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == [tok.bos_token_id] + plain
        assert tok.eos_token_id not in tok.encode(text)
        assert tok.bos_token_id not in plain


def test_decode_ignores_ids_past_the_vocabulary(tok):
    ids = tok.encode("the world", add_special_tokens=False)
    assert tok.decode(ids + [VOCAB, VOCAB + 100]) == "the world"  # a model vocab padded to a multiple of 64
    assert tok.decode([-1] + ids) == "the world"


def test_call_single_and_unpadded(tok):
    enc = tok("the music")
    assert enc["input_ids"] == tok.encode("the music") and enc.input_ids == enc["input_ids"]
    assert enc.attention_mask == [1] * len(enc.input_ids)
    batch = tok(["a", "the music of the world"], add_special_tokens=False)
    assert batch.input_ids == [tok.encode(t, add_special_tokens=False) for t in ["a", "the music of the world"]]
    assert [len(m) for m in batch.attention_mask] == [len(i) for i in batch.input_ids]
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "the music of the world"], return_tensors="pt")
    with pytest.raises(AttributeError):
        _ = enc.token_type_ids


@pytest.mark.parametrize("side", ["right", "left"])
def test_call_batch_padding(tok, side):
    texts = ["Hi", "the city by the river was new", "写一篇正式的文章"]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    enc = tok(texts, padding=True, padding_side=side)
    for row, mask, orig in zip(enc.input_ids, enc.attention_mask, ids):
        n_pad = width - len(orig)
        assert len(row) == len(mask) == width
        if side == "right":
            assert row == orig + [tok.pad_token_id] * n_pad and mask == [1] * len(orig) + [0] * n_pad
        else:
            assert row == [tok.pad_token_id] * n_pad + orig and mask == [0] * n_pad + [1] * len(orig)
    pt = tok(texts, padding=True, padding_side=side, return_tensors="pt")
    assert pt.input_ids.shape == pt.attention_mask.shape == (3, width)
    assert pt.input_ids.tolist() == enc.input_ids and pt.attention_mask.tolist() == enc.attention_mask
    assert int(pt.attention_mask.sum()) == sum(map(len, ids))
    assert tok.batch_decode(pt.input_ids, skip_special_tokens=True) == texts
    # the tokenizer attribute sets the default side
    tok.padding_side = side
    try:
        assert tok(texts, padding=True).input_ids == enc.input_ids
    finally:
        tok.padding_side = "right"


def test_call_padding_max_length_and_truncation(tok):
    texts = ["the world", "the city by the river was new and the music was early"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert enc.input_ids.shape == (2, 6)
    assert enc.input_ids[1].tolist() == tok.encode(texts[1])[:6] and enc.attention_mask[1].tolist() == [1] * 6
    short = tok.encode(texts[0])
    assert enc.input_ids[0].tolist() == short + [3] * (6 - len(short))
    # with no max_length, "max_length" is model_max_length, as in transformers
    assert tok(texts, padding="max_length", return_tensors="pt").input_ids.shape == (2, tok.model_max_length)


def test_call_truncates_as_transformers_does_and_refuses_what_it_cannot_do(tok, caplog):
    text = "the city by the river was new and the music was early"
    full = tok.encode(text)
    assert tok(text, max_length=4).input_ids == full[:4]  # max_length alone truncates, as transformers does
    assert "max_length=4 without truncation" in caplog.text
    assert tok(text, max_length=4, truncation=False).input_ids == full
    assert tok(text, max_length=4, truncation="do_not_truncate").input_ids == full
    assert tok(text, max_length=4, truncation="longest_first").input_ids == full[:4]
    assert tok(text, padding="do_not_pad").input_ids == full
    for kwargs, match in [({"padding": "longer"}, "padding='longer'"), ({"truncation": "yes"}, "truncation='yes'"),
                          ({"padding_side": "top"}, "padding_side='top'"), ({"return_tensors": "tf"}, "'tf'"),
                          ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0"), ({"max_length": -1}, "max_length=-1")]:
        with pytest.raises(ValueError, match=match):
            tok(text, **kwargs)
    with pytest.raises(TypeError):  # a second text (a pair) is not taken for `padding`
        tok("a", "b")


def test_batch_encoding_to_moves_the_tensors(tok):
    enc = tok(["the world", "the city"], padding=True, return_tensors="pt").to("cpu")
    assert isinstance(enc, type(tok("a"))) and enc.input_ids.device.type == "cpu"
    assert enc.attention_mask.shape == enc.input_ids.shape
    assert tok("the world").to("cpu").input_ids == tok.encode("the world")  # lists stay lists


def test_padding_side_survives_save_and_load(tok, tmp_path):
    tok.padding_side = "left"
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.padding_side = "right"
    loaded = type(tok).from_pretrained(tmp_path)
    assert loaded.padding_side == "left"
    enc = loaded(["Hi", "the city by the river"], padding=True)
    assert enc.input_ids[0][0] == tok.pad_token_id and enc.attention_mask[0][0] == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(["Hi", "the city by the river"], padding=True)["input_ids"] == enc.input_ids


def test_a_failed_save_changes_no_file_of_the_folder(tok, tmp_path, monkeypatch):
    """tokenizer.model is written first: a save that fails on a later file (here special_tokens_map.json)
    leaves the folder's three files as they were, and no temporary file."""
    import slimpajama.tokenizer as T

    tok.save_pretrained(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    other = SlimPajamaTokenizer.from_pretrained(tmp_path)
    other._proto = other._proto + b"\0"  # another model file
    real, calls = json.dumps, []

    def dumps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(T.json, "dumps", dumps)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2 and {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_batch_decode(tok):
    texts = ["The river.", "写一篇正式的文章", f"{CONTROL[1]}Translate this."]
    ids = [tok.encode(t) for t in texts]
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["The river.", "写一篇正式的文章", "Translate this."]
    assert tok.batch_decode(ids) == ["<s> The river.", "<s> 写一篇正式的文章", f"<s>{CONTROL[1]}Translate this."]


def test_save_and_load_round_trip(tok, tmp_path):
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    assert config["additional_special_tokens"] == CONTROL and config["pad_token"] == "<pad>"
    loaded = SlimPajamaTokenizer.from_pretrained(folder)
    assert loaded.control_tokens == CONTROL and loaded.control_token_ids == tok.control_token_ids
    assert loaded.vocab_size == VOCAB and loaded.fingerprint() == tok.fingerprint()
    for text in ROUND_TRIP.values():
        assert loaded.encode(text) == tok.encode(text)
    glued = f"{CONTROL[0]}Hello{CONTROL[1]}"
    assert loaded.encode(glued) == tok.encode(glued)
    assert loaded.decode(loaded.encode(glued, add_special_tokens=False)) == glued
    # from_pretrained takes str paths too, and a folder without the config (plain SentencePiece model)
    (folder / "tokenizer_config.json").unlink()
    bare = SlimPajamaTokenizer.from_pretrained(str(folder))
    assert bare.encode("The river.") == tok.encode("The river.") and bare.control_tokens == []


def test_from_pretrained_missing_model_raises(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as excinfo:
        SlimPajamaTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SlimPajamaTokenizer.from_pretrained(tmp_path / "nowhere")


def test_unknown_control_tokens_are_the_control_shaped_strings_it_would_read_as_text(tok):
    assert tok.unknown_control_tokens(f"{CONTROL[0]} write <|style:casual|>, then <|mood:calm|>") == [
        "<|style:casual|>", "<|mood:calm|>"]
    assert tok.unknown_control_tokens(f"{CONTROL[1]}写一篇正式的文章 <| not one |> a|b") == []
    unknown = tok.encode("<|style:casual|>", add_special_tokens=False)
    assert len(unknown) > 1 and not set(unknown) & set(tok.control_token_ids)  # plain text, as the name says


def test_unknown_control_token_in_config_raises(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["slimpajama_control_tokens"] = ["<|not:trained|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"<\|not:trained\|>"):
        SlimPajamaTokenizer.from_pretrained(tmp_path)


def test_training_is_deterministic():
    rng = random.Random(5)
    texts = [english(rng) for _ in range(200)]
    a = SlimPajamaTokenizer.train(texts, 400, num_threads=1)
    b = SlimPajamaTokenizer.train(texts, 400, num_threads=2)
    assert a.vocab_size == b.vocab_size == 400
    # the same pieces and scores whatever the thread count (the proto's trainer_spec records num_threads,
    # so the file bytes, and fingerprint(), differ between thread counts)
    assert [a.convert_ids_to_tokens(i) for i in range(400)] == [b.convert_ids_to_tokens(i) for i in range(400)]
    assert [a.sp.get_score(i) for i in range(400)] == [b.sp.get_score(i) for i in range(400)]
    assert a.fingerprint() == SlimPajamaTokenizer.train(texts, 400, num_threads=1).fingerprint()


def test_long_lines_are_cut_for_the_trainer_not_dropped():
    """The SentencePiece trainer drops sentences over max_sentence_length: they are cut instead, so a corpus
    of long single-line documents still trains (here: characters only in long lines make it into the vocab)."""
    long_doc = ("ΩΨΦ " * 5000).strip()  # 20k characters on one line
    t = SlimPajamaTokenizer.train([long_doc, "the river"] * 3, 268, max_sentence_bytes=1024, num_threads=1)
    assert t.convert_tokens_to_ids("Ω") != t.unk_token_id
    assert t.decode(t.encode(long_doc[:100]), skip_special_tokens=True) == long_doc[:100]


def test_the_sentencepiece_space_marker_reads_as_a_space_as_in_transformers(tok):
    assert tok.encode("load ▁▂▃▅▇ and a▁b") == tok.encode("load  ▂▃▅▇ and a b")
    assert tok.decode(tok.encode("a▁b"), skip_special_tokens=True) == "a b"


def test_transformers_autotokenizer_parity(tok, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.pad_token_id == 3 and hf.bos_token_id == 1 and hf.eos_token_id == 2 and len(hf) == VOCAB
    rng = random.Random(7)
    c0, c1 = CONTROL
    texts = ["Hello world", "The city, by the river, was new: 42 people were there!", "写一篇正式的文章",
             "Write a formal article: 写一篇正式的文章.", "two  spaces", "line one\nline two\n\n\tindented",
             f"{c0}Hello", f"{c0} Hello there", f"{c0}写一篇正式的文章", f"{c1}{c0}the city",
             f"Translate: {c1}the river", f"the river {c1} the city{c0}"]
    texts += [english(rng) for _ in range(20)] + [chinese(rng) for _ in range(10)]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), True), text


def test_transformers_autotokenizer_parity_on_random_mixtures(tok, tmp_path, monkeypatch):
    """Ids and text as transformers' on strings glued from the parts where SentencePiece and transformers
    part ways: leading and repeated spaces, U+2581, special-token and control-token strings (parsed,
    and plain with split_special_tokens), byte-fallback characters, tabs and newlines."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    parts = ["the", "city", "写", "文章", " ", "  ", "\n", "\t", "\r\n", *CONTROL, "▁", "😀", "é", ",", "1990", "x",
             "<s>", "</s>", "<pad>", "<unk>", "<|", "|>", "<", "\u00a0", "\u3000"]
    rng = random.Random(3)
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 8)))
        for split in (False, True):
            ids = tok.encode(text, split_special_tokens=split)
            assert ids == hf(text, split_special_tokens=split)["input_ids"], (text, split)
            for skip in (False, True):
                assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, split, skip)
                assert tok.decode(ids[1:], skip) == hf.decode(ids[1:], skip_special_tokens=skip), (text, split, skip)


def test_transformers_parity_of_control_strings_read_as_text_where_they_could_merge(tmp_path, monkeypatch):
    """With split_special_tokens a control-token string is plain text, and its "<" merges with a space before
    it ("▁<") where the vocabulary has that piece, as in code; also for control tokens added after training."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(4)
    code = ["if a < b:", "x <y", "return a <= b", "<a href>", "a|b", "x |> y"]
    texts = [" ".join(rng.choice(code + WORDS) for _ in range(12)) for _ in range(300)]
    t = SlimPajamaTokenizer.train(texts, 320, [CONTROL[0]], num_threads=1)
    t.add_control_tokens(["<|source:code|>"])
    assert " <" in t.decode(t.encode("a <b", add_special_tokens=False)) and "▁<" in t.convert_ids_to_tokens(
        t.encode("a <b", add_special_tokens=False))
    t.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    parts = [" ", "▁", "x", " <", "<", "|>", CONTROL[0], "<|source:code|>", "</s>", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 6)))
        for split in (False, True):
            ids = t.encode(text, split_special_tokens=split)
            assert ids == hf(text, split_special_tokens=split)["input_ids"], (text, split)
            assert t.decode(ids) == hf.decode(ids), (text, split)


def test_a_leading_space_stands_for_the_dummy_prefix_as_in_transformers(tok):
    """transformers' LlamaTokenizer (legacy=False) puts SentencePiece's dummy-prefix space before a text
    only when the text does not start with a space, so " x" and "x" encode alike and decode as "x"."""
    assert tok.encode(" leading space") == tok.encode("leading space")
    assert tok.decode(tok.encode(" leading space"), skip_special_tokens=True) == "leading space"
    assert tok.decode(tok.encode("  two"), skip_special_tokens=True) == " two"
    assert tok.decode(tok.encode("    def f():\n"), skip_special_tokens=True) == "   def f():\n"
    # a space after a control token or inside the text is kept
    text = f"{CONTROL[0]} x {CONTROL[1]}  y"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_a_leading_control_token_has_no_prefix(tok):
    ids = tok.encode(f"{CONTROL[0]}Hello", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(CONTROL[0])
    assert tok.decode(ids) == f"{CONTROL[0]}Hello"


@pytest.fixture
def hf(tok, tmp_path, monkeypatch):
    """transformers' tokenizer on `tok`'s saved folder."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path / "hf")
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))


def _plain(enc) -> dict:
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in enc.items()}


def test_pad_matches_transformers_and_its_collators_take_it(tok, hf):
    import transformers

    rows = [tok("the city"), tok("music school river house"), tok(f"{CONTROL[0]}写一篇")]
    hf_rows = [hf("the city"), hf("music school river house"), hf(f"{CONTROL[0]}写一篇")]
    assert [dict(r) for r in rows] == [dict(r) for r in hf_rows]
    cases = [{}, {"padding_side": "left"}, {"pad_to_multiple_of": 8}, {"padding": "max_length", "max_length": 9}, {"padding": False}, {"return_tensors": "pt"},
             {"return_tensors": "np", "padding_side": "left", "pad_to_multiple_of": 4}]
    for kwargs in cases:
        assert _plain(tok.pad(rows, **kwargs)) == _plain(hf.pad(hf_rows, **kwargs)), kwargs
    # return_attention_mask=False drops the masks (transformers keeps those given, unpadded)
    no_mask = tok.pad(rows, return_attention_mask=False)
    assert list(no_mask) == ["input_ids"] and no_mask.input_ids == hf.pad(hf_rows)["input_ids"]
    batch = tok([f"{CONTROL[1]}the river", "a"], padding=True)  # a dict of rows, masks kept and padded
    assert _plain(tok.pad(batch, pad_to_multiple_of=8)) == _plain(hf.pad(dict(batch), pad_to_multiple_of=8))
    one = {"input_ids": torch.tensor([1, 276, 352])}  # one row, as a tensor: a tensor comes back, as in transformers
    padded = tok.pad(one, padding="max_length", max_length=5)
    assert isinstance(padded.input_ids, torch.Tensor) and type(hf.pad(one)["input_ids"]) is torch.Tensor
    assert _plain(padded) == {"input_ids": [1, 276, 352, 3, 3], "attention_mask": [1, 1, 1, 0, 0]}
    tensor_rows = [{"input_ids": torch.tensor(r["input_ids"])} for r in rows]
    assert _plain(tok.pad(tensor_rows)) == _plain(hf.pad(tensor_rows))
    # transformers' collators call tokenizer.pad: same batches with ours as with its own
    examples = [{"input_ids": r["input_ids"]} for r in rows]
    for make in (lambda t: transformers.DataCollatorForLanguageModeling(t, mlm=False, pad_to_multiple_of=8),
                 lambda t: transformers.DataCollatorWithPadding(t)):
        ours, theirs = make(tok)(examples), make(hf)(examples)
        assert {k: v.tolist() for k, v in ours.items()} == {k: v.tolist() for k, v in theirs.items()}
    with pytest.raises(ValueError, match="row 1 has keys"):
        tok.pad([{"input_ids": [1]}, {"ids": [1]}])
    with pytest.raises(ValueError, match="'labels' cannot be made a tensor"):
        tok.pad([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1, 2]}], return_tensors="pt")


def test_special_tokens_are_linked_as_in_transformers_and_saved(tok, hf, tmp_path):
    assert tok.special_tokens_map == hf.special_tokens_map
    assert set(tok.all_special_tokens) == set(hf.all_special_tokens) and set(tok.all_special_ids) == set(hf.all_special_ids)
    for t in (tok, hf):
        t.pad_token = t.eos_token  # the usual Llama idiom
    assert tok.pad_token_id == hf.pad_token_id == 2
    assert tok(["a", "the city"], padding=True).input_ids == hf(["a", "the city"], padding=True)["input_ids"]
    tok.save_pretrained(tmp_path / "eos-pad")
    assert SlimPajamaTokenizer.from_pretrained(tmp_path / "eos-pad").pad_token_id == 2
    tok.pad_token_id = 3
    assert tok.pad_token == "<pad>"
    assert SlimPajamaTokenizer.from_pretrained(tmp_path / "eos-pad", pad_token="<pad>").pad_token_id == 3
    with pytest.raises(ValueError, match="pad_token='<mask>' is not a piece"):
        tok.pad_token = "<mask>"
    with pytest.raises(ValueError, match="pad_token_id=99999"):
        tok.pad_token_id = 99999
    assert tok.pad_token_id == 3


def test_decode_tokenize_and_vocab_as_in_transformers(tok, hf):
    ids = tok.encode(f"{CONTROL[0]}the city 写 é😀")
    assert tok.decode(ids[1]) == hf.decode(ids[1]) and tok.decode(torch.tensor(ids[1])) == hf.decode(torch.tensor(ids[1]))
    assert tok.decode([ids, ids[:2]]) == hf.decode([ids, ids[:2]])  # a batch decodes to a list
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == hf.decode(ids, clean_up_tokenization_spaces=True)
    for text in ["the city", f"{CONTROL[0]}the", "é中", " two  spaces", "line\nbreak"]:
        assert tok.tokenize(text) == hf.tokenize(text), text
        assert tok.tokenize(text, add_special_tokens=True) == hf.tokenize(text, add_special_tokens=True), text
        assert tok.convert_tokens_to_string(tok.tokenize(text)) == hf.convert_tokens_to_string(hf.tokenize(text))
    assert tok.get_vocab() == hf.get_vocab() and len(tok.vocab) == VOCAB
    for arg in (ids, torch.tensor(ids), ids[2], VOCAB + 5):
        assert tok.convert_ids_to_tokens(arg) == hf.convert_ids_to_tokens(arg), arg
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)


def test_a_reassigned_pad_token_is_still_skipped_in_decode_as_in_transformers(tok, hf):
    """pad_token = eos_token (a common idiom): a <pad> that padded a row is still dropped by
    decode(skip_special_tokens=True), as a live transformers tokenizer drops it."""
    assert tok.all_special_ids == sorted(hf.all_special_ids)
    ids = tok.encode("the city") + [3, 3]
    try:
        for t in (tok, hf):
            t.pad_token = t.eos_token
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "the city"
    finally:
        tok.pad_token = "<pad>"


def test_call_options_as_in_transformers(tok, hf, caplog):
    texts = ["music school river house", "the city"]
    cases = [{"padding": "max_length"}, {"padding": True, "pad_to_multiple_of": 8}, {"max_length": 4, "pad_to_multiple_of": 2,
             "padding": "max_length", "truncation": True}, {"padding": True, "return_length": True},
             {"return_length": True}, {"padding": True, "return_attention_mask": False, "return_tensors": "pt"},
             {"padding": True, "return_length": True, "return_tensors": "pt"},
             # max_length with padding and no truncation only pads, where alone it cuts
             {"padding": True, "max_length": 3}, {"padding": "max_length", "max_length": 4}, {"max_length": 3}]
    for kwargs in cases:
        assert _plain(tok(texts, **kwargs)) == _plain(hf(texts, **kwargs)), kwargs
        assert _plain(tok(texts[0], **kwargs)) == _plain(hf(texts[0], **kwargs)), kwargs
    assert tok.encode(texts[0], max_length=3, truncation=True) == hf.encode(texts[0], max_length=3, truncation=True)
    for t in (tok, hf):  # a cut that padding would not keep
        with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
            t(texts, max_length=5, truncation=True, padding=True, pad_to_multiple_of=8)
    for t in (tok, hf):
        t.truncation_side = "left"  # the bos stays, the start of the text goes
    assert tok(texts, max_length=3, truncation=True).input_ids == hf(texts, max_length=3, truncation=True)["input_ids"]
    assert tok(texts, max_length=3, truncation=True).input_ids[0] == [1, *tok.encode(texts[0])[-2:]]
    tok.truncation_side = "right"
    long = " ".join(["the city"] * 1100)
    assert len(tok(long).input_ids) > tok.model_max_length and "longer than this tokenizer's model_max_length" in caplog.text
    with pytest.raises(TypeError, match="one text"):
        tok.encode(texts)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tok.encode("a", return_lenght=True)


def test_save_returns_the_files_and_load_takes_overrides(tok, tmp_path):
    files = tok.save_pretrained(tmp_path / "t")
    assert sorted(Path(f).name for f in files) == sorted(p.name for p in (tmp_path / "t").iterdir())
    loaded = SlimPajamaTokenizer.from_pretrained(tmp_path / "t", padding_side="left", model_max_length=64,
                                                 truncation_side="left")
    assert (loaded.padding_side, loaded.model_max_length, loaded.truncation_side) == ("left", 64, "left")
    assert loaded.name_or_path == str(tmp_path / "t")
    with pytest.raises(TypeError, match="padding_sides"):
        SlimPajamaTokenizer.from_pretrained(tmp_path / "t", padding_sides="left")
    with pytest.raises(ValueError, match="padding_side='up'"):
        SlimPajamaTokenizer.from_pretrained(tmp_path / "t", padding_side="up")
    # a folder transformers saved (tokenizer.json, no tokenizer.model) is named as such
    (tmp_path / "t" / "tokenizer.model").unlink()
    (tmp_path / "t" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json only"):
        SlimPajamaTokenizer.from_pretrained(tmp_path / "t")
