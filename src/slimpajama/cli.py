"""`slimpajama-generate`: load a saved model, stream a generation to the terminal, or chat.

    slimpajama-generate --prompt "The Congress"                       # the furthest stage's newest model
    slimpajama-generate logs/latest/finetune/model --control "<|source:plays|>" --prompt "..." \
        --temperature 0.7 --top-p 0.9 --max-new-tokens 200
    slimpajama-generate slimpajama/finetune --chat --control "<|task:dialogue|>"
    slimpajama-generate slimpajama/finetune --control "<|source:plays|>" --prompt "" --guidance-scale 2 --do-sample

The prompt is built with the model's `prompt_template` (saved in generation_config.json by the
fine-tuning stage; default "{control}{input}"), so a control signal lands where training put it,
and the text is encoded as fine-tuning encoded its inputs (plain text: a "</s>" in it stays text).
`--guidance-scale` is classifier-free guidance towards `--control`, against the same prompt without it
(as evaluation's "guided" mode). A control token the model does not know (`<|style:formal|>` for the
demo's model, whose tokens are `<|source:...|>` and `<|task:...|>`) is refused with the list of those
it knows.
"""

import argparse
import re
import sys
from typing import Optional, Union

import torch

from slimpajama.generation import (
    TextStreamer,
    check_template,
    continuation_ids,
    encode_prompt,
    is_guided,
    prompt_template,
)
from slimpajama.pretrained import SlimPajamaModel
from slimpajama.tokenizer import SlimPajamaTokenizer


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
CHAT_REPLY = 64  # --chat's reply length without --max-new-tokens: at most half the model's max_seq_len


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
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: up to the model's max_seq_len; with --chat, a reply's length: {CHAT_REPLY}, "
                        "or half the max_seq_len when that is less")
    g.add_argument("--max-length", type=int, default=None, help="prompt + new tokens")
    g.add_argument("--min-new-tokens", type=int, default=None, help="new tokens before the end token may come")
    g.add_argument("--min-length", type=int, default=None, help="prompt + new tokens before the end token may come")
    g.add_argument("--eos-token-id", type=int, nargs="+", default=None, metavar="ID",
                   help="the id(s) that end a sequence (default: the model's end token; -1: never end)")
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
    g.add_argument("--num-return-sequences", type=int, default=1, help="sequences to sample (not with --chat)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance towards --control, against the same prompt without it: "
                        "1 is plain conditioning, larger pushes further (needs --control)")
    g.add_argument("--seed", type=int, default=None)
    r = p.add_argument_group("runtime")
    r.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 | auto (as saved)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step: the first reply waits for the compile "
                        "(about 20 s on a 2-core CPU), every token after that is faster")
    return p


def generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {
        "max_new_tokens": args.max_new_tokens, "max_length": args.max_length, "min_new_tokens": args.min_new_tokens,
        "min_length": args.min_length, "eos_token_id": args.eos_token_id, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size, "stop_strings": args.stop,
        "num_return_sequences": args.num_return_sequences, "seed": args.seed, "guidance_scale": args.guidance_scale,
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
             new_ids: Optional[list] = None, negative: Optional[list[int]] = None) -> list[str]:
    """Generate from `prompt` (text, or its ids with bos); stream the text to `out` (stdout) when asked
    (one sequence). `negative`: the ids (with bos) of the unconditional prompt of classifier-free
    guidance. Returns the new texts; `new_ids`, when given, receives each row's new ids."""
    out = out or sys.stdout
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    device = model.lm_head.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    if negative is not None:
        kwargs = {**kwargs, "negative_prompt_ids": torch.tensor([negative], dtype=torch.long, device=device)}
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
    by the model's reply; a reply ends at a newline or EOS, and is `--max-new-tokens` long at most (default
    `CHAT_REPLY`, or half the model's max_seq_len when that is less). The conversation is kept as ids and
    cut to leave room for the reply: older turns go first, from the left; a newest turn that alone is too
    long keeps its template and control and loses the end of its line, as fine-tuning cuts a long prompt
    (`fit_prompt`). Both cuts fall between whole characters. With guidance, the unconditional prompt is the
    same conversation with the newest turn's control left out."""
    inp, out = inp or sys.stdin, out or sys.stdout
    if "max_length" in kwargs and "max_new_tokens" not in kwargs:
        raise ValueError("--chat takes --max-new-tokens, the length of a reply, not --max-length")
    if "min_length" in kwargs:
        raise ValueError("--chat takes --min-new-tokens, the least length of a reply, not --min-length")
    if kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError(f"--chat gives one reply a turn: --num-return-sequences {kwargs['num_return_sequences']} "
                         "works with --prompt")
    limit = model.config.max_seq_len
    reply_flag = (f"--max-new-tokens {kwargs['max_new_tokens']}" if "max_new_tokens" in kwargs else
                  f"the default reply length of {min(CHAT_REPLY, limit // 2)} tokens (set it with --max-new-tokens)")
    kwargs = {"max_new_tokens": min(CHAT_REPLY, limit // 2), **kwargs}
    kwargs["stop_strings"] = list(kwargs.get("stop_strings") or []) + ["\n"]
    continuation = continuation_ids(tokenizer)
    newline = tokenizer.encode_continuation("\n", split_special_tokens=False)
    end = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    before, after = check_template(template)
    tail = tokenizer.encode_continuation(after, split_special_tokens=False) + ([] if template.endswith("\n") else newline)
    room = limit - kwargs["max_new_tokens"] - 1  # the conversation's ids after bos
    control = args.control or ""

    def head(control: str) -> int:
        """How many ids of a turn come before its line: the template's text and the control."""
        return len(tokenizer.encode(before.format(control=control))) - 1

    least = head(control) + len(tail) + 1  # a turn with one token of its line
    if room < least:
        raise ValueError(f"{reply_flag} leaves {max(room, 0)} of the model's max_seq_len of {limit} tokens for the "
                         f"conversation after bos; a turn needs at least {least} (its template and control, and a "
                         "token of the line)")

    def turn(control: str, line: str) -> list[int]:
        """The turn's ids without bos, at most `room`: a long line loses its end, on whole characters."""
        ids = encode_prompt(tokenizer, template, control, line)[1:] + ([] if template.endswith("\n") else newline)
        if len(ids) <= room:
            return ids
        keep, least_kept = room - len(tail), head(control)
        while keep > least_kept and ids[keep] in continuation:  # the next id would end the kept part mid-character
            keep -= 1
        return ids[:keep] + tail

    def window(history: list[int], turn: list[int]) -> list[int]:
        """bos, the newest of `history` that fits beside `turn` (whole characters), `turn`."""
        ids = history + turn
        start = max(0, len(ids) - room)
        while start < len(history) and ids[start] in continuation:
            start += 1
        return [tokenizer.bos_token_id] + ids[start:]

    history: list[int] = []
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line.strip():
            return
        prompt = window(history, turn(control, line.strip()))
        negative = window(history, turn("", line.strip())) if is_guided(kwargs.get("guidance_scale")) else None
        replies: list = []
        complete(model, tokenizer, prompt, kwargs, stream=not args.no_stream, out=out, new_ids=replies,
                 negative=negative)
        reply = [i for i in replies[0] if i not in end]  # the reply's own ids, without an end id or padding
        history = prompt[1:] + reply + ([] if tokenizer.decode(reply).endswith("\n") else newline)


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


def check_eos_ids(ids: Optional[list[int]], vocab_size: int) -> None:
    """Refuse an --eos-token-id outside the vocabulary (which would never end a sequence); -1 means never end."""
    bad = [i for i in ids or [] if i != -1 and not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"--eos-token-id {bad[0]} is outside the model's vocabulary of {vocab_size} (-1: never end)")


def run(args: argparse.Namespace) -> int:
    checked_device(args.device)
    if args.guidance_scale is not None and not args.control:
        raise ValueError("--guidance-scale guides towards --control, against the same prompt without it: give --control")
    tokenizer = SlimPajamaTokenizer.from_pretrained(args.model)
    check_control(tokenizer, args.model, "--control", args.control)
    model = SlimPajamaModel.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    check_eos_ids(args.eos_token_id, model.config.vocab_size)
    template = checked_template(model, args.model)
    kwargs = generation_kwargs(args)
    if args.chat:
        chat(model, tokenizer, args, kwargs, template)
        return 0
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    # as fine-tuning built its prompts: the control a token, the text plain (a "</s>" in it is text)
    prompt = encode_prompt(tokenizer, template, args.control or "", text)
    guided = is_guided(kwargs.get("guidance_scale"))
    negative = encode_prompt(tokenizer, template, "", text) if guided else None  # as evaluation's "guided"
    complete(model, tokenizer, prompt, kwargs, stream=not args.no_stream, negative=negative)
    return 0


if __name__ == "__main__":
    sys.exit(main())
