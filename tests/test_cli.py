"""The generation command line: streams to the terminal, every sampling option, control signals, chat."""

import io
import subprocess
import sys

import pytest
import torch

from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.cli import build_parser, chat, complete, generation_kwargs, main
from slimpajama.generation import encode_prompt

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
    (["--chat", "--max-new-tokens", "127"], "--max-new-tokens 127 leaves 0 of the model's max_seq_len of 128 tokens"),
    (["--chat", "--max-length", "20"], "--chat takes --max-new-tokens"),
    (["--chat", "--min-length", "20"], "--chat takes --min-new-tokens"),
    (["--chat", "--temperature", "1", "--num-return-sequences", "2"], "--chat gives one reply a turn: --num-return-sequences 2"),
    (["--prompt", "x", "--device", "bogus"], "--device 'bogus'"),
    (["--prompt", "x", "--dtype", "int8"], "torch_dtype='int8': a model runs in float32, bfloat16, float16 or float64"),
    (["--prompt", "x", "--dtype", "float8_e4m3fn"], "torch_dtype='float8_e4m3fn': a model runs in"),
    (["--prompt", "x", "--temperature", "0", "--num-return-sequences", "3"], "num_return_sequences=3 with greedy"),
    (["--prompt", "x", "--guidance-scale", "2"], "--guidance-scale guides towards --control.*: give --control"),
    (["--prompt", "x", "--eos-token-id", "2", "512"], "--eos-token-id 512 is outside the model's vocabulary of 512"),
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


def test_generate_options_the_readme_presents_are_on_the_command_line(folder, tok, capsys):
    """--guidance-scale (against the prompt without its control, as evaluation's "guided" mode),
    --min-length and --eos-token-id (one or more) reach generate."""
    args = build_parser().parse_args(["m", "--min-length", "7", "--eos-token-id", "3", "5", "--guidance-scale", "1.5"])
    assert generation_kwargs(args) == {"min_length": 7, "eos_token_id": [3, 5], "guidance_scale": 1.5,
                                       "num_return_sequences": 1}
    assert main([str(folder), "-p", "the river", "-c", CONTROL[0], "--guidance-scale", "3", "--greedy",
                 "--max-new-tokens", "8", "--eos-token-id", "-1"]) == 0
    model, template = SlimPajamaModel.from_pretrained(folder), "{control}{input}\n"
    ids = torch.tensor([encode_prompt(tok, template, CONTROL[0], "the river")])
    negative = torch.tensor([encode_prompt(tok, template, "", "the river")])
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=-1, guidance_scale=3.0,
                              negative_prompt_ids=negative)
    assert expected.size(1) == ids.size(1) + 8  # -1: no end id stops it
    assert capsys.readouterr().out == tok.decode(expected[0, ids.size(1):], skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("line", ["the river " * 80, "😀" * 40])
def test_chat_a_line_too_long_for_the_window_keeps_its_control_and_loses_its_end(folder, tok, line):
    """The history goes first; then the newest turn keeps its template and control and loses the end of its
    line (on whole characters), as fine-tuning cuts a long prompt. It used to be cut from the left, control first."""
    model = SlimPajamaModel.from_pretrained(folder)  # max_seq_len 128
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "8", "-c", CONTROL[0]])
    prompts, original = [], model.generate
    model.generate = lambda ids, **kw: prompts.append(ids[0].tolist()) or original(ids, **kw)
    template = "{control}{input}\n"
    chat(model, tok, args, generation_kwargs(args), template, inp=io.StringIO(f"hello\n{line}\n\n"), out=io.StringIO())
    _, ids = prompts
    tail = tok.encode_continuation("\n", split_special_tokens=False)
    full = encode_prompt(tok, template, CONTROL[0], line.strip())
    assert ids[0] == tok.bos_token_id and len(ids) == 128 - 8 and ids[-len(tail):] == tail  # the template's end
    start = ids.index(full[1])  # the control (a cut on whole characters may leave the history's last ids before it)
    assert start <= 4 and ids[start:-len(tail)] == full[1:][: len(ids) - start - len(tail)]  # and the line's beginning
    assert "hello" not in tok.decode(ids) and "\ufffd" not in tok.decode(ids)


def test_chat_guidance_leaves_the_newest_turns_control_out_of_the_unconditional_prompt(folder, tok):
    model = SlimPajamaModel.from_pretrained(folder)
    args = build_parser().parse_args([str(folder), "--chat", "--greedy", "--max-new-tokens", "4", "-c", CONTROL[0],
                                      "--guidance-scale", "2"])
    seen, original = [], model.generate
    model.generate = lambda ids, **kw: seen.append((ids[0].tolist(), kw["negative_prompt_ids"][0].tolist())) or original(ids, **kw)
    chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("hello\n\n"), out=io.StringIO())
    assert seen == [(encode_prompt(tok, "{control}{input}\n", CONTROL[0], "hello"),
                     encode_prompt(tok, "{control}{input}\n", "", "hello"))]


def test_chats_default_reply_length_fits_a_short_model_and_its_error_says_it_is_the_default(tok):
    """64 tokens, or half of max_seq_len when that is less: a 64-token model used to fail naming
    "--max-new-tokens 64", a flag never given."""
    args = build_parser().parse_args(["m", "--chat", "--greedy", "-c", CONTROL[0]])
    for limit, reply in ((64, 32), (256, 64)):
        torch.manual_seed(0)
        model = SlimPajamaModel(SlimPajamaConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16,
                                                 intermediate_size=32, max_seq_len=limit)).eval()
        lengths, original = [], model.generate
        model.generate = lambda ids, **kw: lengths.append(kw["max_new_tokens"]) or original(ids, **kw)
        chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("hi\n\n"), out=io.StringIO())
        assert lengths == [reply]
    model.config.max_seq_len = 6  # 3 for the reply, 2 after bos: a turn needs the control, a token, "\n"
    with pytest.raises(ValueError, match=r"^the default reply length of 3 tokens \(set it with --max-new-tokens\) "
                                         r"leaves 2 of the model's max_seq_len of 6 tokens"):
        chat(model, tok, args, generation_kwargs(args), "{control}{input}\n", inp=io.StringIO("hi\n\n"))


def test_the_reports_adherence_finds_without_for_a_task_named_with_with():
    from slimpajama.report import summary_table

    row = {"model": "fine-tuned", "stage": "finetune", "params": 1e6, "file_mb": 1.0, "val_ppl": 10.0,
           "gen_tokens_per_s": None, "sparsity": None, "tasks": {},
           "control": {"control/chat_with_style/adherence_with": 0.9, "control/chat_with_style/adherence_without": 0.2}}
    assert summary_table([row]).splitlines()[-1].endswith("| chat_with_style 90% / 20% |")  # was "90% / nan%"


def test_the_reports_mistakes_are_one_line_naming_the_flag(tmp_path):
    from slimpajama.report import main as report_main

    for argv, match in [(["--log-dir", str(tmp_path)], rf"{tmp_path}/latest: no finished stage runs"),
                        (["--log-dir", str(tmp_path / "nowhere")], "--log-dir .*nowhere: no such folder"),
                        (["--runs", str(tmp_path / "nowhere")], "--runs .*nowhere: no such folder"),
                        (["--runs", str(tmp_path)], "--runs .*: no finished stage runs"),
                        (["--log-dir", str(tmp_path), "--gen-tokens", "-1"], "--gen-tokens -1 must be >= 0")]:
        with pytest.raises(SystemExit, match=f"^python -m slimpajama.report: error: {match}"):
            report_main(argv)


def test_evaluates_arguments_are_checked_before_the_evaluation(folder, tmp_path, monkeypatch):
    """Each used to fail inside the evaluation (range(), random.sample), or, for --output, after all of it."""
    import types

    import slimpajama.evaluate as E

    calls = []
    monkeypatch.setattr(E, "load_task", lambda path: types.SimpleNamespace(controls=[]))
    monkeypatch.setattr(E, "evaluate_tasks", lambda *a, **k: calls.append(k) or ({"test/t/accuracy": 0.5}, {}))
    (tmp_path / "tasks" / "t").mkdir(parents=True)
    (tmp_path / "tasks" / "t" / "task.json").write_text("{}")
    (tmp_path / "afile").write_text("")
    base = [str(folder), "--tasks-dir", str(tmp_path / "tasks"), "--device", "cpu"]
    for argv, match in [(["--per-control", "0"], "--per-control 0 must be >= 1"),
                        (["--max-examples", "0"], "--max-examples 0 must be >= 1"),
                        (["--max-examples", "-1"], "--max-examples -1 must be >= 1"),
                        (["--output", str(tmp_path / "afile" / "m.json")], "--output .*afile.* is a file, not a folder"),
                        (["--output", str(tmp_path)], "--output .*: is a folder")]:
        with pytest.raises(SystemExit, match=f"^python -m slimpajama.evaluate: error: {match}"):
            E.main(base + argv)
    assert calls == []  # refused before the evaluation
    assert E.main(base + ["--output", str(tmp_path / "new" / "deeper" / "m.json")]) == 0  # its folder is made
    assert (tmp_path / "new" / "deeper" / "m.json").read_text().strip() == '{\n  "test/t/accuracy": 0.5\n}'
