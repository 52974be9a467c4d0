"""`slimpajama-generate`: load a saved model, stream a generation to the terminal, or chat.

    slimpajama-generate --prompt "The Congress"                       # the furthest stage's newest model
    slimpajama-generate logs/latest/finetune/model --control "<|source:plays|>" --prompt "..." \
        --temperature 0.7 --top-p 0.9 --max-new-tokens 200
    slimpajama-generate slimpajama/finetune --chat --control "<|task:dialogue|>"

The prompt is built with the model's `prompt_template` (saved in generation_config.json by the
fine-tuning stage; default "{control}{input}"), so a control signal lands where training put it,
and the text is encoded as fine-tuning encoded its inputs (plain text: a "</s>" in it stays text).
A control token the model does not know (`<|style:formal|>` for the demo's model, whose tokens are
`<|source:...|>` and `<|task:...|>`) is refused with the list of those it knows.
"""

import argparse
import re
import sys
from typing import Optional, Union

import torch

from slimpajama.generation import TextStreamer, check_template, continuation_ids, encode_prompt, prompt_template
from slimpajama.pretrained import SlimPajamaModel
from slimpajama.tokenizer import SlimPajamaTokenizer


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`text` with the escapes \\n, \\t, \\r and \\\\ read as the characters (a shell passes "\\n" as two);
    any other backslash stays."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m[1], m[0]), text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimpajama-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="slimpajama",
                   help="a model folder, or a registry name: slimpajama (the newest finished model of the furthest stage: finetune > prune > distill > pretrain), slimpajama/<stage>")
    p.add_argument("-p", "--prompt", help="the prompt (read from stdin when omitted and not --chat)")
    p.add_argument("-c", "--control", default="", help='a control token such as "<|style:formal|>" or an instruction')
    p.add_argument("--chat", action="store_true", help="interactive chat: one line per turn, empty line or Ctrl-D ends")
    g = p.add_argument_group("decoding (as in generate(); a sampling option samples unless --greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--max-length", type=int, default=None, help="prompt + new tokens")
    g.add_argument("--min-new-tokens", type=int, default=None, help="new tokens before the end token may come")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="do_sample=False")
    mode.add_argument("--do-sample", action="store_true", help="sample with the model's defaults")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--no-repeat-ngram-size", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, type=unescape,
                   help=r'a stop string (repeatable); \n, \t, \r and \\ are read as in Python: --stop "\n\n"')
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step: the first reply waits for the compile "
                        "(about 20 s on a 2-core CPU), every token after that is faster")
    return p


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {
        "max_new_tokens": args.max_new_tokens, "max_length": args.max_length, "min_new_tokens": args.min_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size, "stop_strings": args.stop,
        "num_return_sequences": args.num_return_sequences, "seed": args.seed,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args.greedy:
        kwargs["do_sample"] = False
    elif args.do_sample:
        kwargs["do_sample"] = True
    if args.compile:
        kwargs["compile"] = True
    return kwargs


def check_control(tokenizer: SlimPajamaTokenizer, model: str, flag: str, control: Optional[str]) -> None:
    """Refuse a control token the model does not know, which it would read as plain text, naming the
    ones it knows."""
    unknown = tokenizer.unknown_control_tokens(control or "")
    if unknown:
        known = ", ".join(tokenizer.control_tokens) or "none (fine-tuning adds them)"
        raise SystemExit(f"{flag} {unknown[0]!r} is not a control token of {model}; its control tokens: {known}. "
                         "An instruction in plain words works with any model.")


def checked_template(model, name: str) -> str:
    """The model's prompt template, or an exit naming the file when it is not {control} then {input},
    once each (as fine-tuning saves it)."""
    template = prompt_template(model)
    try:
        check_template(template, "prompt_template")
    except ValueError as e:
        raise SystemExit(f"{name}: generation_config.json: {e}") from e
    return template


def complete(model, tokenizer, prompt: Union[str, list[int]], kwargs: dict, stream: bool, out=None,
             new_ids: Optional[list] = None) -> list[str]:
    """Generate from `prompt` (text, or its ids with bos); stream the text to `out` (stdout) when asked
    (one sequence). Returns the new texts; `new_ids`, when given, receives each row's new ids."""
    out = out or sys.stdout
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    ids = torch.tensor([prompt], dtype=torch.long, device=model.lm_head.weight.device)
    streamer = None
    if stream and kwargs.get("num_return_sequences", 1) == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, on_text=lambda t: (out.write(t), out.flush()))
    output = model.generate(ids, tokenizer=tokenizer, streamer=streamer, **kwargs)
    texts = [tokenizer.decode(row[ids.size(1):], skip_special_tokens=True) for row in output]
    if new_ids is not None:
        new_ids += [row[ids.size(1):].tolist() for row in output]
    # each text ends its line, once: a reply stopped at "\n" has ended it already
    if streamer is None:
        for i, text in enumerate(texts):
            out.write((f"--- {i + 1} ---\n" if len(texts) > 1 else "") + text + ("" if text.endswith("\n") else "\n"))
    elif not texts[0].endswith("\n"):
        out.write("\n")
    return texts


def chat(model, tokenizer, args, kwargs: dict, template: str, inp=None, out=None) -> None:
    """Turns are `template` (control + the user's line, encoded as fine-tuning encoded its prompts) followed
    by the model's reply; a reply ends at a newline or EOS. The conversation is kept as ids, cut from the
    left to leave room for the reply."""
    inp, out = inp or sys.stdin, out or sys.stdout
    if "max_length" in kwargs and "max_new_tokens" not in kwargs:
        raise ValueError("--chat takes --max-new-tokens, the length of a reply, not --max-length")
    kwargs = {"max_new_tokens": 64, **kwargs, "num_return_sequences": 1}
    kwargs["stop_strings"] = list(kwargs.get("stop_strings") or []) + ["\n"]
    history: list[int] = []
    budget = model.config.max_seq_len - kwargs["max_new_tokens"]
    if budget < 2:  # bos and at least one token of the conversation
        raise ValueError(f"--max-new-tokens {kwargs['max_new_tokens']} leaves no room for the conversation in the "
                         f"model's max_seq_len of {model.config.max_seq_len}")
    continuation = continuation_ids(tokenizer)
    newline = tokenizer.encode_continuation("\n", split_special_tokens=False)
    end = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line.strip():
            return
        turn = encode_prompt(tokenizer, template, args.control or "", line.strip())[1:]  # without its bos
        if not template.endswith("\n"):
            turn += newline
        ids = history + turn
        start = max(0, len(ids) - (budget - 1))  # keep the newest tokens; the bos token starts the window
        while start < len(ids) - 1 and ids[start] in continuation:  # and whole characters
            start += 1
        kept = ids[start:]
        replies: list = []
        complete(model, tokenizer, [tokenizer.bos_token_id] + kept, kwargs, stream=not args.no_stream, out=out,
                 new_ids=replies)
        reply = [i for i in replies[0] if i not in end]  # the reply's own ids, without an end id or padding
        history = kept + reply + ([] if tokenizer.decode(reply).endswith("\n") else newline)


def main(argv: Optional[list[str]] = None) -> int:
    return run_command("slimpajama-generate", run, build_parser().parse_args(argv))


def run_command(prog: str, run, args: argparse.Namespace) -> int:
    """`run(args)`; a user's mistake (a missing folder, a bad setting) is the message alone, no traceback."""
    try:
        return run(args)
    except (OSError, ValueError) as e:  # OSError: a missing folder, an output path that is a file, ...
        raise SystemExit(f"{prog}: error: {e}") from e


def checked_device(name: str) -> str:
    """`name` if torch can place a tensor there, else a ValueError naming --device."""
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # a CPU-only build asserts for "cuda"
        raise ValueError(f"--device {name!r}: {e}") from None
    return name


def run(args: argparse.Namespace) -> int:
    checked_device(args.device)
    tokenizer = SlimPajamaTokenizer.from_pretrained(args.model)
    check_control(tokenizer, args.model, "--control", args.control)
    model = SlimPajamaModel.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    template = checked_template(model, args.model)
    kwargs = generation_kwargs(args)
    if args.chat:
        chat(model, tokenizer, args, kwargs, template)
        return 0
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    # as fine-tuning built its prompts: the control a token, the text plain (a "</s>" in it is text)
    prompt = encode_prompt(tokenizer, template, args.control or "", text)
    complete(model, tokenizer, prompt, kwargs, stream=not args.no_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
