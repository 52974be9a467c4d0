"""The generation command line: streams to the terminal, every sampling option, control signals, chat."""

import io
import subprocess
import sys

import pytest
import torch

from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.cli import build_parser, chat, complete, generation_kwargs, main

from conftest import CONTROL, VOCAB


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = SlimPajamaConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, intermediate_size=64, max_seq_len=128)
    SlimPajamaModel(config).save_pretrained(path, generation_config={"prompt_template": "{control}{input}\n"})
    tok.save_pretrained(path)
    return path


def test_every_sampling_option_reaches_generate():
    args = build_parser().parse_args(
        ["m", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--min-p", "0.1", "--repetition-penalty", "1.2",
         "--no-repeat-ngram-size", "3", "--stop", "END", "--stop", "\n\n", "--num-return-sequences", "2", "--seed", "4",
         "--max-new-tokens", "9", "--min-new-tokens", "3"])
    assert generation_kwargs(args) == {
        "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3, "stop_strings": ["END", "\n\n"], "num_return_sequences": 2, "seed": 4,
        "max_new_tokens": 9, "min_new_tokens": 3}
    assert generation_kwargs(build_parser().parse_args(["m", "--greedy", "--temperature", "1"]))["do_sample"] is False
    assert generation_kwargs(build_parser().parse_args(["m", "--compile"]))["compile"] is True


def test_stop_strings_read_the_escapes_a_shell_passes_literally():
    """`--stop "\\n\\n"` in a shell is backslash, n, backslash, n: it stops at a blank line, as the README says."""
    args = build_parser().parse_args(["m", "--stop", r"\n\n", "--stop", r"\t|\r", "--stop", r"a\\n", "--stop", r"\x 。"])
    assert generation_kwargs(args)["stop_strings"] == ["\n\n", "\t|\r", "a\\n", "\\x 。"]


def test_prompt_with_control_streams_the_greedy_continuation(folder, tok, capsys):
    assert main([str(folder), "--prompt", "the river", "--control", CONTROL[0], "--greedy", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode(f"{CONTROL[0]}the river\n", return_tensors="pt")  # the folder's prompt_template
    expected = SlimPajamaModel.from_pretrained(folder).generate(ids, max_new_tokens=12, do_sample=False)
    assert printed == tok.decode(expected[0, ids.size(1):], skip_special_tokens=True) + "\n"


def test_a_control_token_the_model_does_not_know_is_refused_with_those_it_knows(folder, capsys):
    with pytest.raises(SystemExit, match=r"--control '<\|style:casual\|>' is not a control token of .*"
                                         + r"its control tokens: <\|style:formal\|>, <\|task:translate\|>"):
        main([str(folder), "-p", "the river", "--control", "<|style:casual|>", "--max-new-tokens", "2"])
    assert capsys.readouterr().out == ""  # refused before anything is generated
    assert main([str(folder), "-p", "the river", "--control", "write formally", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("command", ["generate", "explain"])
def test_a_prompt_template_with_another_field_is_refused_naming_the_file(tmp_path, tok, command, capsys):
    from slimpajama.explain import main as explain_main

    torch.manual_seed(0)
    config = SlimPajamaConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, intermediate_size=32, max_seq_len=32)
    SlimPajamaModel(config).save_pretrained(tmp_path, generation_config={"prompt_template": "{instruction}{input}"})
    tok.save_pretrained(tmp_path)
    run = main if command == "generate" else explain_main
    with pytest.raises(SystemExit, match=r"generation_config.json: prompt_template='\{instruction\}\{input\}' must "
                                         r"contain \{control\} then \{input\}, once each"):
        run([str(tmp_path), "-p", "the river", "--max-new-tokens", "2"])
    assert capsys.readouterr().out == ""  # nothing generated


def test_several_sequences_are_numbered(folder, capsys):
    main([str(folder), "-p", "the", "--temperature", "1.0", "--num-return-sequences", "2", "--seed", "0",
          "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert "--- 1 ---" in out and "--- 2 ---" in out


def test_chat_keeps_the_conversation(folder, tok):
    model = SlimPajamaModel.from_pretrained(folder)
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "8"])
    out = io.StringIO()
    prompts = []
    original = model.generate
    model.generate = lambda ids, **kw: prompts.append(tok.decode(ids[0], skip_special_tokens=True)) or original(ids, **kw)
    chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("hello\nthe city\n\n"), out=out)
    assert len(prompts) == 2 and prompts[0] == "hello\n"
    assert prompts[1].startswith("hello\n") and prompts[1].endswith("the city\n")  # the first turn is kept
    assert out.getvalue().count("> ") == 3


@pytest.mark.parametrize(("argv", "match"), [
    (["--prompt", "x", "--dtype", "float99"], "torch_dtype='float99' is not a torch dtype"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--chat", "--max-new-tokens", "127"], "leaves no room for the conversation"),
    (["--chat", "--max-length", "20"], "--chat takes --max-new-tokens"),
    (["--prompt", "x", "--device", "bogus"], "--device 'bogus'"),
])
def test_a_users_mistake_is_one_line_without_a_traceback(folder, argv, match):
    with pytest.raises(SystemExit, match="slimpajama-generate: error: .*" + match):
        main([str(folder), *argv])
    with pytest.raises(SystemExit, match="slimpajama-generate: error: .*not a model folder"):
        main([str(folder / "missing"), "--prompt", "x"])


def test_greedy_and_do_sample_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m", "--greedy", "--do-sample"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_reply_that_stops_at_a_newline_ends_its_line_once(folder, tok):
    """The chat's "\n" stop string ends the streamed reply's line: no blank line before the next prompt."""
    model = SlimPajamaModel.from_pretrained(folder)
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "6"])
    original = model.generate

    def replies_with_a_line(ids, streamer=None, **kw):  # the model "says" ab and a newline, then stops
        new = torch.tensor([tok.encode("ab\n", add_special_tokens=False)])
        out = torch.cat([ids, new], 1)
        streamer.put(ids), streamer.put(new), streamer.end()
        return out

    model.generate = replies_with_a_line
    out = io.StringIO()
    chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("hello\n\n"), out=out)
    assert out.getvalue() == "> ab\n> "
    for stream in (True, False):  # and a reply without its newline gets one, streamed or not
        model.generate = original
        out = io.StringIO()
        texts = complete(model, tok, "the river", {"max_new_tokens": 3, "do_sample": False, "eos_token_id": -1},
                         stream=stream, out=out)
        assert out.getvalue() == texts[0] + ("" if texts[0].endswith("\n") else "\n")


def test_chat_cuts_a_long_conversation_on_whole_characters_within_the_window(folder, tok):
    model = SlimPajamaModel.from_pretrained(folder)  # max_seq_len 128
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "4"])
    prompts = []
    original = model.generate
    model.generate = lambda ids, **kw: prompts.append(ids[0].tolist()) or original(ids, **kw)
    line = "😀" * 40 + "\n"  # 4 byte-fallback tokens a character: a cut by count alone splits one
    chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO(line + "\n"), out=io.StringIO())
    (ids,) = prompts
    assert ids[0] == tok.bos_token_id and len(ids) <= 128 - 4
    text = tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in text and text.strip("😀") == "\n"  # whole characters, then the turn's newline


def test_console_entry_point_runs(folder):
    result = subprocess.run([sys.executable, "-m", "slimpajama.cli", str(folder), "-p", "the city", "--greedy",
                             "--max-new-tokens", "4", "--no-stream"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_the_prompt_is_encoded_as_fine_tuning_encoded_it(folder, tok, monkeypatch):
    """The control is a token, the user's text plain text: a "</s>" or a control-token string in the
    prompt stays text, as in training (plain `tokenizer.encode` would make them special tokens)."""
    import slimpajama.cli as C
    from slimpajama.data.finetune import encode_prompt

    seen = []
    monkeypatch.setattr(C, "complete", lambda model, tokenizer, prompt, *a, **k: seen.append(prompt) or [""])
    text = f"river</s>x {CONTROL[1]}"
    assert main([str(folder), "-c", CONTROL[0], "-p", text, "--max-new-tokens", "2"]) == 0
    assert seen == [encode_prompt(tok, "{control}{input}\n", CONTROL[0], text)]  # the folder's template
    assert tok.eos_token_id not in seen[0] and tok.convert_tokens_to_ids(CONTROL[1]) not in seen[0]
    assert seen[0][1] == tok.convert_tokens_to_ids(CONTROL[0])


def test_chat_keeps_the_replies_ids_and_reads_the_users_line_as_text(folder, tok):
    """The second turn's prompt holds the first reply's generated ids as they were, and a "</s>" typed
    by the user is text, not the end token (as fine-tuning encoded its inputs)."""
    model = SlimPajamaModel.from_pretrained(folder)
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "6"])
    prompts, replies = [], []
    original = model.generate

    def generate(ids, **kw):
        prompts.append(ids[0].tolist())
        out = original(ids, **kw)
        replies.append(out[0, ids.size(1):].tolist())
        return out

    model.generate = generate
    chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("river</s>x\nthe city\n\n"),
         out=io.StringIO())
    first, second = prompts
    assert tok.eos_token_id not in first[1:]
    reply = [i for i in replies[0] if i not in (tok.eos_token_id, tok.pad_token_id)]
    assert second[: len(first) + len(reply)] == first + reply  # the conversation as generated, not re-encoded
