"""SentencePiece BPE tokenizer with a Hugging Face-style API.

Ids 0-3 are `<unk>`, `<s>`, `</s>`, `<pad>` (Llama's order, plus a pad token); control tokens such
as `<|style:formal|>` are SentencePiece user-defined symbols, so they are always single tokens.
The saved folder (`tokenizer.model` + `tokenizer_config.json`) also loads with
`transformers.AutoTokenizer` as a `LlamaTokenizer`, and `encode` and `decode` give exactly its ids and
text (but for ids that are not valid UTF-8 as a whole: a broken run of byte-fallback ids decodes as in
SentencePiece, each bad byte a U+FFFD, where transformers' fast tokenizer makes every byte of the
run one). Where that differs from SentencePiece alone, we follow transformers: a text that starts with a
space gets no extra dummy-prefix space (so " x" encodes as "x" does), U+2581 ("▁") reads as a space,
and the strings of the special tokens are those tokens. Byte fallback and the identity normaliser
make `decode(encode(text), skip_special_tokens=True) == text` for any other Unicode text.

Untrusted text: a user who types `<|task:translate|>` or `</s>` would inject a control code or end
the sequence. `encode(..., split_special_tokens=True)` encodes such strings as plain text (several
ordinary tokens that decode back to the same string). The default is False, as in transformers: a
prompt template written by the application puts its control tokens in by their strings. Encode the
application's parts (template, control) with the default and the end user's text with
`split_special_tokens=True`, then concatenate the ids; the fine-tuning data module does exactly this
with the `input` and `output` fields of every example. The corpus (`encode_batch`) reads the special
tokens' strings as text too.
"""

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm
import torch

from slimpajama.pretrained import write_together
from slimpajama.registry import resolve_model

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPACE_MARKER = "\u2581"  # SentencePiece's visible space
PADDING = (True, False, "longest", "max_length", "do_not_pad")  # __call__'s and pad's padding, as in transformers
TRUNCATION = (None, True, False, "longest_first", "only_first", "do_not_truncate")  # __call__'s truncation
SIDES = ("left", "right")  # padding_side and truncation_side
RETURN_TENSORS = (None, "pt", "np")
FROM_PRETRAINED_OPTIONS = ("model_max_length", "padding_side", "truncation_side", *SPECIAL_TOKENS)
CONTROL_SHAPE = re.compile(r"<\|[^|\s]+\|>")  # the shape of control tokens: <|style:formal|>


class BatchEncoding(dict):
    """A dict of `input_ids` and `attention_mask` whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device: Union[str, torch.device]) -> "BatchEncoding":
        """The tensors moved to `device` (as transformers' `BatchEncoding.to`); lists stay as they are."""
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class _SpecialToken:
    """A special token's string (`pad_token`) or id (`pad_token_id`), linked as in transformers: setting
    either sets both, so `tokenizer.pad_token = tokenizer.eos_token` pads with the end id."""

    def __set_name__(self, owner, name):
        self.name, self.key, self.is_id = name, name.removesuffix("_id"), name.endswith("_id")

    def __get__(self, tokenizer, owner=None):
        if tokenizer is None:
            return self
        i = tokenizer._special_ids[self.key]
        return i if self.is_id else tokenizer.sp.id_to_piece(i)

    def __set__(self, tokenizer, value):
        tokenizer._special_ids[self.key] = tokenizer._existing_id(value, self.name)


class SlimPajamaTokenizer:
    model_input_names = ["input_ids", "attention_mask"]
    unk_token, bos_token, eos_token, pad_token = (_SpecialToken() for _ in range(4))
    unk_token_id, bos_token_id, eos_token_id, pad_token_id = (_SpecialToken() for _ in range(4))

    def __init__(self, model_proto: bytes, control_tokens: Sequence[str] = (), model_max_length: int = 2048):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self.control_tokens = list(control_tokens)
        self.model_max_length = model_max_length
        self.padding_side = "right"
        self.truncation_side = "right"
        self.clean_up_tokenization_spaces = False
        self.name_or_path = ""
        self._warned = set()  # the one-time warnings already given
        sp_ids = {"unk_token": self.sp.unk_id(), "bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(),
                  "pad_token": self.sp.pad_id()}
        self._special_ids = dict(sp_ids)
        missing = [t for t in self.control_tokens if self.sp.piece_to_id(t) == self.unk_token_id]
        if missing:
            raise ValueError(f"control tokens {missing} are not in the SentencePiece model")
        self.control_token_ids = [self.sp.piece_to_id(t) for t in self.control_tokens]
        self.newline_id = self.sp.piece_to_id("\n")
        self._controls = _alternation(self.control_tokens)  # read as single tokens by SentencePiece itself
        self._sp_plain = None  # a copy that reads them as text (`_encode_ordinary`)
        self._tokens = _alternation([*SPECIAL_TOKENS.values(), *self.control_tokens])  # and by encode()
        # the special tokens SentencePiece does not print (decode puts their strings in)
        self._unspoken = set(sp_ids.values())
        # fixed at load, as a live transformers tokenizer keeps a reassigned token's special flag: after
        # pad_token = eos_token, decode(skip_special_tokens=True) still drops a <pad> that padded a row
        self.all_special_ids = sorted(self._unspoken | set(self.control_token_ids))

    def _existing_id(self, token: Union[str, int], name: str) -> int:
        """The id of `token` (a piece or an id) of this vocabulary, for the special token `name`."""
        if isinstance(token, str):
            i = self.sp.piece_to_id(token)
            if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
                raise ValueError(f"{name}={token!r} is not a piece of this tokenizer: use one of its pieces "
                                 "(e.g. tokenizer.eos_token), or add it first with add_control_tokens")
            return i
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool) and 0 <= token < self.vocab_size:
            return int(token)
        raise ValueError(f"{name}={token!r}: expected a piece or an id below {self.vocab_size}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """As transformers': the bos, eos, unk and pad strings (the control tokens are `control_tokens`)."""
        return {name: getattr(self, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.all_special_ids]

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        control_tokens: Sequence[str] = (),
        character_coverage: float = 0.9995,
        max_sentence_bytes: int = 8192,
        num_threads: Optional[int] = None,
        model_max_length: int = 2048,
    ) -> "SlimPajamaTokenizer":
        """Train BPE with byte fallback on `texts` (documents; split into lines for the trainer)."""

        def sentences():
            for text in texts:
                for line in text.split("\n"):
                    while line:  # the trainer silently drops longer sentences: cut them instead
                        piece, line = line[: max_sentence_bytes // 4], line[max_sentence_bytes // 4 :]
                        if piece.strip():
                            yield piece

        model = _BytesWriter()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",  # exact round trips: no NFKC, no whitespace folding
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,  # code indentation becomes a few tokens, not many
            user_defined_symbols=["\n", *control_tokens],
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            max_sentence_length=max_sentence_bytes,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        return cls(model.data, control_tokens, model_max_length)

    # ---- encoding -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def _encode_piece(self, text: str, dummy_prefix: bool = True, sp=None) -> list[int]:
        sp = sp or self.sp
        if dummy_prefix:
            return sp.encode(text)
        # "\n" is a single token and nothing after it gets the dummy-prefix space: encode behind one
        tail = sp.encode("\n" + text)
        return tail[tail.index(self.newline_id) + 1 :]

    def _encode_text(self, text: str, as_tokens: Optional[re.Pattern], continuation: bool = False) -> list[int]:
        """The ids transformers' LlamaTokenizer (legacy=False) gives `text`.

        as_tokens: the strings read as single tokens, found anywhere in the text (None: none; a
        control-token string is then plain text, several ordinary tokens). The text between them is
        SentencePiece's, which reads U+2581 ("▁") as a space, as transformers does. The dummy-prefix
        space goes only before the start of the text, and not when the text starts with a space: that
        space stands for it, so " x" and "x" encode alike. continuation: `text` continues earlier ids
        (no dummy prefix)."""
        parts = as_tokens.split(text) if as_tokens is not None else [text]  # text, token, text, ...
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                prefix = i == 0 and not continuation and not _starts_with_space(part)
                ids += self._encode_ordinary(part, prefix)
        return ids

    def _encode_ordinary(self, text: str, dummy_prefix: bool) -> list[int]:
        """SentencePiece's ids with no control token among them. SentencePiece reads a control-token
        string as the token, so text that holds one is encoded by a copy of the model in which the control
        tokens are unused pieces: the same merges as transformers' BPE, which never forms them either."""
        if self._controls is None or not self._controls.search(text):
            return self._encode_piece(text, dummy_prefix)
        if self._sp_plain is None:
            from sentencepiece import sentencepiece_model_pb2 as spm_pb2

            proto = spm_pb2.ModelProto()
            proto.ParseFromString(self._proto)
            for i in self.control_token_ids:
                proto.pieces[i].type = spm_pb2.ModelProto.SentencePiece.UNUSED
            self._sp_plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._encode_piece(text, dummy_prefix, self._sp_plain)

    def encode(
        self, text: str, *, return_tensors: Optional[str] = None, add_special_tokens: bool = True,
        split_special_tokens: bool = False, **options,
    ):
        """The ids of one text (`__call__`'s input_ids; `options` are its truncation, max_length, padding,
        pad_to_multiple_of and padding_side). split_special_tokens=True: control-token and special-token
        strings in `text` are plain text (for untrusted input, see the module docstring); False (default):
        they are those tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one text, not {type(text).__name__}: call the tokenizer on a list "
                            "for a batch")
        bad = set(options) - {"truncation", "max_length", "padding", "pad_to_multiple_of", "padding_side"}
        if bad:
            raise TypeError(f"encode() got unexpected keyword arguments {sorted(bad)}")
        if not options:  # the common case, without __call__'s padding
            _check_pad_options(False, None, None, None, return_tensors)
            ids = self._encode_text(text, None if split_special_tokens else self._tokens)
            ids = [self.bos_token_id] * add_special_tokens + ids
            self._check_length(len(ids))
            return ids if return_tensors is None else _as_tensors([ids], return_tensors, "input_ids")
        return self(text, return_tensors=return_tensors, add_special_tokens=add_special_tokens,
                    split_special_tokens=split_special_tokens, **options)["input_ids"]

    def _check_length(self, n: int) -> None:
        if n > self.model_max_length:
            self._warn_once("length", "a sequence of %d tokens is longer than this tokenizer's model_max_length "
                            "(%d): the model cannot take it whole (pass truncation=True to cut it)",
                            n, self.model_max_length)

    def tokenize(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[str]:
        """The pieces of `text`, as transformers' `tokenize` (no bos unless add_special_tokens)."""
        return self.convert_ids_to_tokens(
            self.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens))

    def encode_continuation(self, text: str, split_special_tokens: bool = True) -> list[int]:
        """Ids of `text` as it continues earlier ids (no dummy-prefix space, no bos): the pieces of a
        prompt built from trusted and untrusted parts are encoded one by one and concatenated."""
        return self._encode_text(text, None if split_special_tokens else self._tokens, continuation=True)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Fast multi-threaded encoding of many texts (for corpus tokenization): `encode`'s ids, except
        that the strings of `<s>`, `</s>`, `<pad>` and `<unk>` are plain text (a document's text is data)."""
        out = self.sp.encode(list(texts), num_threads=num_threads)
        for i, text in enumerate(texts):
            if _starts_with_space(text) or (self._controls is not None and self._controls.match(text)):
                out[i] = self._encode_text(text, self._controls)  # no dummy prefix there
        bos, eos = [self.bos_token_id] * add_bos, [self.eos_token_id] * add_eos
        return [bos + ids + eos for ids in out]

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        *,
        padding: Union[bool, str] = False,
        truncation: Union[bool, str, None] = None,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        return_tensors: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
        return_length: bool = False,
        add_special_tokens: bool = True,
        padding_side: Optional[str] = None,
        split_special_tokens: bool = False,
    ) -> BatchEncoding:
        """transformers' rules for one text or a batch: `padding`, `max_length`, `pad_to_multiple_of`,
        `padding_side` and `return_attention_mask` as in `pad`; `truncation` True / "longest_first" /
        "only_first" cuts each text to `max_length` (default model_max_length) from `truncation_side`,
        keeping the bos, False / "do_not_truncate" does not cut, and None (the default) cuts only when
        max_length is given without padding, with a warning, as transformers does (with padding it
        only pads: padding=True to the longest row, "max_length" to max_length). return_length: the
        length of each row (after padding, as in transformers). Pairs of texts are not supported (the options are
        keyword-only, so a second text is an error)."""
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: expected one of {', '.join(map(repr, TRUNCATION))}")
        if self.truncation_side not in SIDES:
            raise ValueError(f"truncation_side={self.truncation_side!r}: expected 'left' or 'right'")
        _check_pad_options(padding, max_length, pad_to_multiple_of, padding_side, return_tensors)
        texts = [text] if isinstance(text, str) else text
        batch = [self._encode_text(t, None if split_special_tokens else self._tokens) for t in texts]
        if truncation is None and max_length is not None and padding in (False, "do_not_pad"):
            self._warn_once("truncation", "max_length=%d without truncation: truncating to it, as transformers "
                            "does (pass truncation=True to say so, or truncation=False to keep every token)",
                            max_length)
            truncation = True
        head = [self.bos_token_id] * add_special_tokens
        if truncation not in (None, False, "do_not_truncate"):
            limit = self.model_max_length if max_length is None else max_length
            if padding not in (False, "do_not_pad") and pad_to_multiple_of and limit % pad_to_multiple_of:
                raise ValueError(f"truncation length ({limit}) is not a multiple of pad_to_multiple_of "
                                 f"({pad_to_multiple_of}): padding would make rows longer than the cut")
            room = limit - len(head)
            if room < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the bos token")
            cut = (lambda ids: ids[:room]) if self.truncation_side == "right" else (lambda ids: ids[len(ids) - room:])
            batch = [cut(ids) if len(ids) > room else ids for ids in batch]
        batch = [head + ids for ids in batch]
        for ids in batch:
            self._check_length(len(ids))
        enc = self.pad({"input_ids": batch}, padding=padding, max_length=max_length,
                       pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                       return_attention_mask=return_attention_mask, return_tensors=return_tensors)
        if return_length:
            rows = enc["input_ids"]
            enc["length"] = [len(r) for r in rows] if return_tensors is None else _as_tensors(
                [rows.shape[1]] * rows.shape[0], return_tensors, "length")
        if isinstance(text, str) and return_tensors is None:  # one text: flat rows (length stays a list)
            enc = BatchEncoding({k: v if k == "length" else v[0] for k, v in enc.items()})
        return enc

    def pad(
        self,
        encoded_inputs,
        *,
        padding: Union[bool, str] = True,
        max_length: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
        return_tensors: Optional[str] = None,
    ) -> BatchEncoding:
        """Pad encoded rows as transformers' `pad` does (what its data collators call).

        encoded_inputs: a dict (or BatchEncoding) of `input_ids` (one row or a batch; lists, arrays or
        tensors) and optionally `attention_mask`, or a list of such dicts, one per row. padding: True /
        "longest" pads to the longest row, "max_length" to `max_length` (default model_max_length), False
        / "do_not_pad" not at all; pad_to_multiple_of rounds the padded width up. Pads go on
        `padding_side` (default the tokenizer's) with `pad_token_id`, and the mask is 0 there; an existing
        mask is kept and padded, a missing one made (return_attention_mask=False: none is returned, where
        transformers returns a given mask unpadded). Other
        keys, such as `labels`, are returned as they are, as in transformers: pad them yourself. Without
        return_tensors, rows given as tensors (arrays) come back as tensors (arrays), as in transformers."""
        _check_pad_options(padding, max_length, pad_to_multiple_of, padding_side, return_tensors)
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            keys = list(encoded_inputs[0])
            for n, row in enumerate(encoded_inputs):
                if not isinstance(row, Mapping) or set(row) != set(keys):
                    raise ValueError(f"pad: row {n} has keys {sorted(row) if isinstance(row, Mapping) else row!r}, "
                                     f"row 0 has {sorted(keys)}: every row needs the same keys")
            encoded_inputs = {k: [row[k] for row in encoded_inputs] for k in keys}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            raise ValueError("pad takes a dict of input_ids (and attention_mask), or a list of such dicts; got "
                             f"{type(encoded_inputs).__name__}"
                             + (f" with keys {sorted(encoded_inputs)}" if isinstance(encoded_inputs, Mapping) else ""))
        if return_tensors is None:  # as transformers: rows given as tensors (or arrays) come back as such
            ids = encoded_inputs["input_ids"]
            first = ids[0] if isinstance(ids, (list, tuple)) and len(ids) else ids
            return_tensors = "pt" if isinstance(first, torch.Tensor) else "np" if isinstance(first, np.ndarray) else None
        out = {k: _to_list(v) for k, v in encoded_inputs.items()}
        single = not out["input_ids"] or not isinstance(out["input_ids"][0], list)
        rows = [out["input_ids"]] if single else out["input_ids"]
        masks = out.get("attention_mask")
        masks = None if masks is None else [masks] if single else masks
        if masks is not None and [len(m) for m in masks] != [len(r) for r in rows]:
            raise ValueError("pad: attention_mask and input_ids differ in length")
        if masks is None:
            masks = [[1] * len(r) for r in rows]
        width = None
        if padding in (True, "longest"):
            width = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            width = self.model_max_length if max_length is None else max_length
        if width is not None and pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        if width is not None:
            side = padding_side or self.padding_side
            if side not in SIDES:
                raise ValueError(f"padding_side={side!r}: expected 'left' or 'right'")
            for i, (ids, mask) in enumerate(zip(rows, masks)):
                n = max(width - len(ids), 0)
                pads = [self.pad_token_id] * n
                rows[i], masks[i] = (pads + ids, [0] * n + mask) if side == "left" else (ids + pads, mask + [0] * n)
        out["input_ids"] = rows[0] if single else rows
        out["attention_mask"] = masks[0] if single else masks
        if return_attention_mask is False:
            del out["attention_mask"]
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("sequences differ in length: pass padding=True to return tensors")
            out = {k: _as_tensors(v, return_tensors, k) for k, v in out.items()}
        return BatchEncoding(out)

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: Optional[bool] = None):
        """transformers' text for `ids` (an id, a sequence, or a batch: a list of texts, as in
        transformers): special tokens as their strings (`<s>`, `</s>`, `<pad>`, `<unk>`, control tokens)
        unless skip_special_tokens; only the first token loses its leading space (the dummy prefix), so in
        `[<s>, ▁Hello]` the space stays: "<s> Hello". clean_up_tokenization_spaces=True is ignored with a
        warning, as transformers ignores it for BPE tokenizers (it would strip real spaces before
        punctuation)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        if clean_up_tokenization_spaces or (clean_up_tokenization_spaces is None and self.clean_up_tokenization_spaces):
            self._warn_once("clean_up", "clean_up_tokenization_spaces=True is ignored: it would strip real spaces "
                            "before punctuation from BPE text (transformers ignores it for BPE tokenizers too)")
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        # ids past the tokenizer (the model's vocab may be padded) decode to nothing
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if not self._unspoken.intersection(ids):
            return self.sp.decode(ids)
        # SentencePiece decodes <s>, </s> and <pad> to nothing and <unk> to " ⁇ ": put their strings in
        # between runs of the other ids; a run after one decodes behind "\n", which keeps its first space
        text, run, first = [], [], True
        for i in ids + [None]:
            if i is None or i in self._unspoken:
                if run:
                    text.append(self.sp.decode(run) if first else self.sp.decode([self.newline_id] + run)[1:])
                if i is not None:
                    text.append(self.sp.id_to_piece(i))
                run, first = [], False
            else:
                run.append(i)
        return "".join(text)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in _to_list(sequences)]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """The piece of an id, or the pieces of a sequence of ids; an id past the vocabulary gives None,
        as in transformers."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids) if 0 <= ids < self.vocab_size else None
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None for i in ids if i not in special]

    def convert_tokens_to_ids(self, tokens):
        return self.sp.piece_to_id(tokens)

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return self.decode(self.convert_tokens_to_ids(list(tokens)))

    # ---- control tokens ---------------------------------------------------------------------
    def add_control_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add control tokens to the trained SentencePiece model as user-defined pieces (always single
        tokens) at the end of the vocabulary, so every existing id keeps its meaning. Returns the ids
        of `tokens` (existing ones included). The model proto itself is edited, so the saved
        `tokenizer.model` carries them and transformers' LlamaTokenizer reads them unchanged; grow
        the model's embeddings to `len(tokenizer)` to match (`SlimPajamaModel.resize_token_embeddings`)."""
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2

        new = [t for t in dict.fromkeys(tokens) if t not in self.control_tokens]
        clash = [t for t in new if self.sp.piece_to_id(t) != self.unk_token_id]
        if clash:
            raise ValueError(f"{clash} are already ordinary pieces of this tokenizer: choose other control strings")
        bad = [t for t in new if not t or any(c.isspace() for c in t)]
        if bad:
            raise ValueError(f"control tokens must be non-empty and contain no whitespace: {bad}")
        if new:
            proto = spm_pb2.ModelProto()
            proto.ParseFromString(self._proto)
            for t in new:
                piece = proto.pieces.add()
                piece.piece, piece.score, piece.type = t, 0.0, spm_pb2.ModelProto.SentencePiece.USER_DEFINED
            state = self.__dict__.copy()
            self.__init__(proto.SerializeToString(), self.control_tokens + new, self.model_max_length)
            for name in ("padding_side", "truncation_side", "clean_up_tokenization_spaces", "name_or_path",
                         "_special_ids", "_warned"):
                setattr(self, name, state[name])
            log.info("added %d control tokens (vocabulary %d)", len(new), self.vocab_size)
        return [self.sp.piece_to_id(t) for t in tokens]

    def unknown_control_tokens(self, text: str) -> list[str]:
        """The strings of `text` in the shape of a control token (`<|...|>`, no whitespace) that are not
        control tokens of this tokenizer: `encode` reads them as plain text, a few ordinary tokens each."""
        return [t for t in CONTROL_SHAPE.findall(text) if t not in self.control_tokens]

    # ---- files ----------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> tuple[str, ...]:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json together (a failed
        save changes none of them); returns their paths (as transformers does). The special tokens
        saved are the current ones (a changed pad_token too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_bos_token": True,  # as our encode(add_special_tokens=True)
            "add_eos_token": False,
            "add_prefix_space": None,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "sp_model_kwargs": {},
            **{name: getattr(self, name) for name in SPECIAL_TOKENS},
            "additional_special_tokens": self.control_tokens,
            "slimpajama_control_tokens": self.control_tokens,
        }
        special_map = {**{name: getattr(self, name) for name in SPECIAL_TOKENS},
                       "additional_special_tokens": self.control_tokens}
        write_together({
            directory / MODEL_FILE: lambda p: p.write_bytes(self._proto),
            directory / CONFIG_FILE: lambda p: p.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n"),
            directory / "special_tokens_map.json":
                lambda p: p.write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"),
        })
        return tuple(str(directory / f) for f in (CONFIG_FILE, "special_tokens_map.json", MODEL_FILE))

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], **overrides) -> "SlimPajamaTokenizer":
        """directory: a saved folder or a name of the local model index (see `slimpajama.registry`).
        overrides: the saved model_max_length, padding_side, truncation_side or special tokens
        (`pad_token="</s>"`), as transformers' from_pretrained takes them."""
        bad = sorted(set(overrides) - set(FROM_PRETRAINED_OPTIONS))
        if bad:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {bad} "
                            f"(it takes {', '.join(FROM_PRETRAINED_OPTIONS)})")
        directory = Path(directory)
        if not directory.is_dir() or (directory / "model" / MODEL_FILE).is_file():
            directory = resolve_model(directory)  # a registered name, or a run folder
        model_file = directory / MODEL_FILE
        if not model_file.is_file():
            hint = (" (the folder has transformers' tokenizer.json only, as its save_pretrained writes: load it "
                    "with AutoTokenizer, or copy tokenizer.model in from the folder it came from)"
                    if (directory / "tokenizer.json").is_file() else "")
            raise FileNotFoundError(f"{model_file} not found: not a saved SlimPajama tokenizer folder{hint}")
        config = {}
        if (directory / CONFIG_FILE).is_file():
            config = json.loads((directory / CONFIG_FILE).read_text())
        config.update(overrides)
        tokenizer = cls(
            model_file.read_bytes(),
            control_tokens=config.get("slimpajama_control_tokens", config.get("additional_special_tokens", [])),
            model_max_length=config.get("model_max_length", 2048),
        )
        for name in ("padding_side", "truncation_side"):
            side = config.get(name, "right")
            if side not in SIDES:
                raise ValueError(f"{name}={side!r} (in {directory / CONFIG_FILE} or the arguments): "
                                 "expected 'left' or 'right'")
            setattr(tokenizer, name, side)
        for name in SPECIAL_TOKENS:
            token = config.get(name)
            if token is not None:  # transformers may save {"content": "</s>", ...}
                setattr(tokenizer, name, token["content"] if isinstance(token, dict) else token)
        tokenizer.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        tokenizer.name_or_path = str(directory)
        return tokenizer

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self._proto).hexdigest()[:16]


def _check_pad_options(padding, max_length, pad_to_multiple_of, padding_side, return_tensors) -> None:
    if padding not in PADDING:
        raise ValueError(f"padding={padding!r}: expected one of {', '.join(map(repr, PADDING))}")
    for name, value, low in (("max_length", max_length, 0), ("pad_to_multiple_of", pad_to_multiple_of, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{name}={value!r}: expected an integer of at least {low}")
    if padding_side not in (None, *SIDES):
        raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    if return_tensors not in RETURN_TENSORS:
        raise ValueError(f"return_tensors={return_tensors!r} is not supported (use None, 'pt' or 'np')")


def _to_list(x):
    """Python ints and lists from tensors, arrays and tuples (what transformers' `to_py_obj` does)."""
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        if not x or isinstance(x[0], int):  # a row of ids: copied whole, not walked id by id
            return list(x)
        return [_to_list(v) for v in x]
    return x


def _as_tensors(rows, return_tensors: str, key: str):
    """`rows` as a torch tensor ("pt") or a numpy array ("np"); ids and masks as int64."""
    ints = key in ("input_ids", "attention_mask", "length")
    try:
        if return_tensors == "pt":
            return torch.tensor(rows, dtype=torch.long if ints else None)
        return np.array(rows, dtype=np.int64 if ints else None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key!r} cannot be made a tensor ({e}); its rows must be of one length: pad them "
                         "first (pad() pads only input_ids and attention_mask, as transformers' does)") from e


def _starts_with_space(text: str) -> bool:
    """Whether the space at the start of `text` stands for the dummy prefix (transformers' rule)."""
    return text.startswith((" ", SPACE_MARKER))


def _alternation(strings: Sequence[str]) -> Optional[re.Pattern]:
    """A pattern that matches any of `strings`, the longest first, as one group (None: no strings)."""
    if not strings:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)) + ")")


class _BytesWriter:
    def __init__(self):
        self.data = b""

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)
