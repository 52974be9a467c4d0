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
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import sentencepiece as spm
import torch

from slimpajama.registry import resolve_model

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPACE_MARKER = "\u2581"  # SentencePiece's visible space
PADDING = (True, False, "longest", "max_length", "do_not_pad")  # __call__'s padding, as in transformers
TRUNCATION = (None, True, False, "longest_first", "only_first", "do_not_truncate")  # __call__'s truncation
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


class SlimPajamaTokenizer:
    def __init__(self, model_proto: bytes, control_tokens: Sequence[str] = (), model_max_length: int = 2048):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self.control_tokens = list(control_tokens)
        self.model_max_length = model_max_length
        self.padding_side = "right"
        for name, piece in SPECIAL_TOKENS.items():
            setattr(self, name, piece)
        self.unk_token_id, self.bos_token_id = self.sp.unk_id(), self.sp.bos_id()
        self.eos_token_id, self.pad_token_id = self.sp.eos_id(), self.sp.pad_id()
        missing = [t for t in self.control_tokens if self.sp.piece_to_id(t) == self.unk_token_id]
        if missing:
            raise ValueError(f"control tokens {missing} are not in the SentencePiece model")
        self.control_token_ids = [self.sp.piece_to_id(t) for t in self.control_tokens]
        self.newline_id = self.sp.piece_to_id("\n")
        self._controls = _alternation(self.control_tokens)  # read as single tokens by SentencePiece itself
        self._sp_plain = None  # a copy that reads them as text (`_encode_ordinary`)
        self._tokens = _alternation([*SPECIAL_TOKENS.values(), *self.control_tokens])  # and by encode()
        # the special tokens SentencePiece does not print (decode puts their strings in)
        self._unspoken = {self.unk_token_id, self.bos_token_id, self.eos_token_id, self.pad_token_id}
        self.all_special_ids = sorted(self._unspoken | set(self.control_token_ids))

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
        self, text: str, return_tensors: Optional[str] = None, add_special_tokens: bool = True,
        split_special_tokens: bool = False,
    ):
        """split_special_tokens=True: control-token and special-token strings in `text` are plain text
        (for untrusted input, see the module docstring); False (default): they are those tokens."""
        ids = self._encode_text(text, None if split_special_tokens else self._tokens)
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        if return_tensors == "pt":
            return torch.tensor([ids], dtype=torch.long)
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use None or 'pt')")
        return ids

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
        return_tensors: Optional[str] = None,
        add_special_tokens: bool = True,
        padding_side: Optional[str] = None,
        split_special_tokens: bool = False,
    ) -> BatchEncoding:
        """transformers' rules for one text or a batch: `padding` True / "longest" / "max_length" /
        False / "do_not_pad"; `truncation` True / "longest_first" / "only_first" cuts each text to
        `max_length` (default model_max_length), False / "do_not_truncate" does not, and None (the
        default) cuts only when max_length is given, with a warning, as transformers does. Pairs of
        texts are not supported (the options are keyword-only, so a second text is an error)."""
        if padding not in PADDING:
            raise ValueError(f"padding={padding!r}: expected one of {', '.join(map(repr, PADDING))}")
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: expected one of {', '.join(map(repr, TRUNCATION))}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use None or 'pt')")
        single = isinstance(text, str)
        batch = [
            self.encode(t, add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens)
            for t in ([text] if single else text)
        ]
        if truncation is None and max_length is not None:
            log.warning("max_length=%d without truncation: truncating to it, as transformers does (pass "
                        "truncation=True to say so, or truncation=False to keep every token)", max_length)
            truncation = True
        if truncation not in (None, False, "do_not_truncate"):
            if max_length is None:
                max_length = self.model_max_length
            batch = [ids[:max_length] for ids in batch]
        if padding in (True, "longest", "max_length"):
            width = max(len(ids) for ids in batch)
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max_length
            side = padding_side or self.padding_side
            masks = []
            for i, ids in enumerate(batch):
                pad = [self.pad_token_id] * (width - len(ids))
                masks.append([0] * len(pad) + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * len(pad))
                batch[i] = pad + ids if side == "left" else ids + pad
        else:
            masks = [[1] * len(ids) for ids in batch]
        if return_tensors == "pt":
            if len({len(ids) for ids in batch}) > 1:
                raise ValueError("sequences differ in length: pass padding=True to return tensors")
            return BatchEncoding(input_ids=torch.tensor(batch), attention_mask=torch.tensor(masks))
        if single:
            return BatchEncoding(input_ids=batch[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=batch, attention_mask=masks)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """transformers' text for `ids`: special tokens as their strings (`<s>`, `</s>`, `<pad>`, `<unk>`,
        control tokens) unless skip_special_tokens; only the first token loses its leading space (the
        dummy prefix), so in `[<s>, ▁Hello]` the space stays: "<s> Hello"."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
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

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        return self.sp.id_to_piece(ids)

    def convert_tokens_to_ids(self, tokens):
        return self.sp.piece_to_id(tokens)

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
            self.padding_side = state["padding_side"]
            log.info("added %d control tokens (vocabulary %d)", len(new), self.vocab_size)
        return [self.sp.piece_to_id(t) for t in tokens]

    def unknown_control_tokens(self, text: str) -> list[str]:
        """The strings of `text` in the shape of a control token (`<|...|>`, no whitespace) that are not
        control tokens of this tokenizer: `encode` reads them as plain text, a few ordinary tokens each."""
        return [t for t in CONTROL_SHAPE.findall(text) if t not in self.control_tokens]

    # ---- files ----------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self._proto)
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_bos_token": True,  # as our encode(add_special_tokens=True)
            "add_eos_token": False,
            "add_prefix_space": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "sp_model_kwargs": {},
            **SPECIAL_TOKENS,
            "additional_special_tokens": self.control_tokens,
            "slimpajama_control_tokens": self.control_tokens,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {**SPECIAL_TOKENS, "additional_special_tokens": self.control_tokens}
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "SlimPajamaTokenizer":
        """directory: a saved folder or a name of the local model index (see `slimpajama.registry`)."""
        directory = Path(directory)
        if not directory.is_dir() or (directory / "model" / MODEL_FILE).is_file():
            directory = resolve_model(directory)  # a registered name, or a run folder
        model_file = directory / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file} not found: not a saved SlimPajama tokenizer folder")
        config = {}
        if (directory / CONFIG_FILE).is_file():
            config = json.loads((directory / CONFIG_FILE).read_text())
        tokenizer = cls(
            model_file.read_bytes(),
            control_tokens=config.get("slimpajama_control_tokens", config.get("additional_special_tokens", [])),
            model_max_length=config.get("model_max_length", 2048),
        )
        tokenizer.padding_side = config.get("padding_side", "right")
        return tokenizer

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self._proto).hexdigest()[:16]


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
