"""A Llama-architecture decoder in one file that imports only torch.

RMSNorm, rotary position embeddings (Llama's "rotate half" layout), SwiGLU, grouped-query
attention through `scaled_dot_product_attention`, optional tied embeddings, and a
preallocated KV cache so that decoding one token costs one forward over one position
(`Transformer.decode_step`, which skips the Python of `forward` that one position does not need).

The query/key/value projections and the MLP's gate/up projections are fused into one matmul
each (bigger matmuls run closer to peak on a CPU); `pretrained.py` splits them into
Hugging Face's Llama parameter names on save and fuses them again on load.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SlimPajamaConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (multi-head); fewer: grouped-query attention
    d_model: int = 128
    intermediate_size: Optional[int] = None  # None: ~8/3 * d_model rounded up to a multiple of 64
    head_dim: Optional[int] = None  # None: d_model // n_head; explicit after structured pruning removes heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02  # GPT-2 style; PyTorch's N(0, 1) embedding init causes denormal slowdowns on CPU
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = 3

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "intermediate_size", "head_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"model.{name}={value!r} must be a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout!r} must lie in [0, 1)")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"the head size {self.head_dim} (model.head_dim, else model.d_model / model.n_head) "
                             "must be even for rotary embeddings")

    @property
    def n_query_groups(self) -> int:
        return self.n_kv_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SlimPajamaConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DECODE_MAX_ROWS = 32  # measured on small's weights (bench/matvec.py): faster up to 32 rows, level at 128
# the kernels a decoding step's products can run on (`Linear`): "blocks" (`row_block_linear`, a block of
# the weight's rows per thread) or "gemm" (`F.linear`); which is faster depends on the CPU and the model
DECODE_KERNELS = ("blocks", "gemm")


def check_decode_kernel(kernel: str) -> None:
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decoding kernel must be one of {DECODE_KERNELS}, got {kernel!r}")


def decoding_step(x: torch.Tensor, max_rows: int = DECODE_MAX_ROWS) -> bool:
    """Whether x is the input of a decoding step's layer: float32 inference on a CPU with at most
    `max_rows` rows, where a small model's step costs its number of ops more than its arithmetic."""
    return (
        x.numel() <= max_rows * x.size(-1) and x.dtype == torch.float32 and x.device.type == "cpu"
        and inference_without_autocast()
    )


def inference_without_autocast() -> bool:
    """No autograd and no CPU autocast: what a decoding step runs under."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32.

    A CPU has no fused kernel for it: `F.rms_norm` runs about 12 ops there (powers, a mean, casts),
    and in a small model's decoding step every op counts (docs/benchmarks.md). So the rows of a
    decoding step (`decoding_step`, after `prepare_decoding`, which `Transformer.setup_kv_cache`
    calls) take 2 ops and 2 views: the pair (x, -x) in one product, then `layer_norm` over the pair,
    whose mean is zero, so that its variance is x's mean square, and the pair's first half."""

    pair_weight: Optional[torch.Tensor] = None  # (2, dim): the weight twice, set by prepare_decoding
    pair_signs: Optional[torch.Tensor] = None  # (2, 1): 1 and -1

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def prepare_decoding(self, enable: bool = True) -> None:
        """Keep the weight twice for the pair form of a float32 CPU weight (enable=False: drop it);
        like a KV cache it assumes the weight does not change until it is dropped."""
        self.pair_weight = self.pair_signs = None
        w = self.weight
        if enable and w.dtype == torch.float32 and w.device.type == "cpu":
            self.pair_weight = w.detach().expand(2, -1).contiguous()
            self.pair_signs = torch.tensor([[1.0], [-1.0]])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The pair form, for the rows of a decoding step (the caller has checked that they are:
        `decoding_step`, or `Transformer.decode_step`'s checks)."""
        return pair_rms_norm(x, self.pair_weight, self.pair_signs, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair_weight is not None and decoding_step(x) and not torch.compiler.is_compiling():
            return self.decode(x)
        if x.dtype == torch.float32:  # the same maths in one call, without the no-op casts
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()  # normalise in float32, as Llama does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def pair_rms_norm(
    x: torch.Tensor, pair_weight: torch.Tensor, signs: torch.Tensor, eps: float
) -> torch.Tensor:
    """`RMSNorm`'s pair form: layer_norm over (x, -x), whose mean is zero, then the pair's first half."""
    pair = x.unsqueeze(-2) * signs  # (..., 2, dim): x and -x
    return F.layer_norm(pair, pair_weight.shape, pair_weight, None, eps).select(-2, 0)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (seq_len, head_dim), in Llama's layout (the frequencies repeated twice).

    The sin table's first half is negated, so that `apply_rope` needs one `roll` where Llama's
    rotate-half needs two slices, a negation and a concatenation (the same products and sums:
    identical results)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotation x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1);
    with `rope_cache`'s signed sin that is x * cos + (x2, x1) * sin.
    x: (B, nh, T, hs); cos/sin: (T, hs) or (B, 1, T, hs)."""
    out = torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def key_padding_mask(
    attention_mask: torch.Tensor, n_keys: int, causal: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The real keys among the first n_keys of attention_mask (B, S >= n_keys; 1 real, 0 padding) as a
    boolean attention mask, (B, 1, 1, n_keys), and with `causal` (1, 1, T, n_keys) when given. A query
    left with no key (a padding position's) sees every key instead: softmax over none would give NaN,
    and its output is never used."""
    mask = attention_mask[:, None, None, :n_keys].bool()
    if causal is not None:
        mask = causal & mask
    return mask | ~mask.any(-1, keepdim=True)


class KVCache(nn.Module):
    """Preallocated keys and values for `max_seq_len` positions; positions are written in place."""

    def __init__(self, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hs) into slots start .. start + T - 1; returns the keys and values
        of slots 0 .. start + T - 1 (views, no copy)."""
        B, T = k.size(0), k.size(2)
        keys, values = (self.k, self.v) if B == self.k.size(0) else (self.k[:B], self.v[:B])
        keys.narrow(2, start, T).copy_(k)
        values.narrow(2, start, T).copy_(v)
        return keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)


def row_blocks(weight: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """The weight (out, in) as n blocks of out / n output rows each, transposed: a (n, in, out / n)
    view for `row_block_linear`; None when n < 2 or n does not divide out."""
    out_features, in_features = weight.shape
    if n < 2 or out_features % n:
        return None
    return weight.view(n, out_features // n, in_features).transpose(1, 2)


def row_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    blocks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) as one `bmm` over blocks of the weight's output rows, one block per
    thread: `blocks` (n, in, out / n) is `row_blocks(weight, n)` or a contiguous copy of it, by default
    the view for `torch.get_num_threads()` blocks; `F.linear` with one thread or rows that do not divide.
    Each output is the same dot product as in `F.linear`, so the results agree to float32 rounding
    (without a bias and with the view, MKL's are equal)."""
    if blocks is None:
        blocks = row_blocks(weight, torch.get_num_threads())
        if blocks is None:
            return F.linear(x, weight, bias)
    n, in_features, _ = blocks.shape
    shape = (*x.shape[:-1], weight.size(0))
    if x.numel() == in_features:  # one row (leading sizes all 1): the blocks' outputs are in order
        y = torch.bmm(x.expand(n, 1, in_features), blocks).view(shape)
    else:  # every row for each block: (n, rows, in) @ (n, in, out / n), then (..., out)
        rows = x.reshape(1, -1, in_features).expand(n, -1, in_features)
        y = torch.bmm(rows, blocks).transpose(0, 1).reshape(shape)
    return y if bias is None else y + bias


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], blocks: Optional[torch.Tensor]
) -> torch.Tensor:
    """A decoding step's product from `Linear.decode_operands`: over the row blocks, or `F.linear` where
    there are none (the "gemm" kernel, or rows that do not divide into blocks)."""
    if blocks is None:
        return F.linear(x, weight, bias)
    return row_block_linear(x, weight, bias, blocks)


# named apart from the earlier 3-argument `slimpajama::row_block_linear`, whose kernels inductor's
# on-disk cache may still hold: a cached graph calling it with the old arguments would crash
@torch.library.custom_op("slimpajama::row_block_linear_kept", mutates_args=())
def row_block_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    blocks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`row_block_linear` as one opaque op for torch.compile: the thread count is read when the step
    runs (dynamo cannot trace `torch.get_num_threads`), and inductor calls the op as it is, with the
    blocks `Linear.prepare_decoding` kept (graph inputs like the weights, not constants)."""
    return row_block_linear(x, weight, bias, blocks)


@row_block_linear_op.register_fake
def _(x, weight, bias=None, blocks=None):
    return x.new_empty(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """`nn.Linear` that runs a decoding step's product as one batched product over blocks of the
    weight's output rows, a block per thread (`row_block_linear`), when it is float32 inference on a
    CPU with at most `max_rows` rows of input.

    A decoding step reads every weight once, so its speed is the rate weights are read at. For a few
    rows, MKL's gemm behind `F.linear` (and so behind transformers) leaves a weight with fewer
    outputs than inputs on one core, and reads the others well below the memory's rate; the blocks
    of a `bmm` run on all threads. Training, autocast, bf16, other devices and a prefill take
    `F.linear`; under torch.compile the blocked product is the opaque op `row_block_linear_op`, which
    reads the same kept blocks.

    A wide weight (more outputs per block than inputs: the MLP's gate/up, the head) is read faster
    from a contiguous copy of its blocks than through the transposed view: 1.4-2.4x for one row of
    input on an AMD EPYC (bench/matvec.py), and a step of 8 rows takes 0.91x the time on an Intel
    Xeon. `prepare_decoding` keeps the blocks decoding products use: that copy for a wide weight,
    the view for the others (a few ops less per product). `Transformer.setup_kv_cache` calls it,
    and `clear_kv_cache` drops them. The copies hold about half a Llama's weights again (gate/up and
    the head) while they are kept; `Linear.copy_wide = False` keeps views only.

    Where few ops matter more than the reading rate (a small model, on a CPU whose gemm reads fast
    with few rows, as `micro` on an Intel Xeon with AMX), `F.linear` is the faster kernel for a step:
    `prepare_decoding(kernel="gemm")` runs the decoding products on it and keeps no blocks
    (`DECODE_KERNELS`; `generation.fastest_decode_kernel` races the two)."""

    max_rows = DECODE_MAX_ROWS
    copy_wide = True  # prepare_decoding copies a wide weight's blocks
    decode_blocks: Optional[torch.Tensor] = None  # set by prepare_decoding
    decode_ready = False  # set by prepare_decoding: `decode` may be called
    kernel = "blocks"  # set by prepare_decoding: the decoding products' kernel, one of DECODE_KERNELS

    def decodes(self, x: torch.Tensor) -> bool:
        """Whether the product with x is a decoding step's that goes through `row_block_linear`."""
        w = self.weight
        return (
            self.kernel == "blocks" and decoding_step(x, self.max_rows)
            and w.dtype == torch.float32 and w.is_contiguous()
        )

    def prepare_decoding(self, enable: bool = True, kernel: str = "blocks") -> None:
        """Run decoding products on `kernel` and, for "blocks", keep the row blocks of a float32 CPU
        weight for decoding products, a contiguous copy if the weight is wide (enable=False: back to
        "blocks" with nothing kept). A copy is taken now: like a KV cache, the blocks assume the
        weight does not change until they are dropped."""
        check_decode_kernel(kernel)
        self.decode_blocks = None
        self.kernel = kernel if enable else "blocks"
        w = self.weight
        self.decode_ready = (
            enable and w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
        )
        if not self.decode_ready or kernel == "gemm":
            return
        blocks = row_blocks(w.detach(), torch.get_num_threads())
        if blocks is not None and self.copy_wide and blocks.size(2) > blocks.size(1):
            blocks = blocks.contiguous()
        self.decode_blocks = blocks

    def decode_operands(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(weight, bias, blocks) of a decoding step's product for `decode_linear`, on `kernel`: the kept
        blocks, or the view where none were kept (a "gemm" set-up), for "blocks"; None for "gemm"."""
        blocks = None
        if self.kernel == "blocks":
            blocks = self.decode_blocks
            if blocks is None:
                blocks = row_blocks(self.weight.detach(), torch.get_num_threads())
        return self.weight, self.bias, blocks

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """A decoding step's product, eagerly, on `kernel` (the caller has checked that it is one:
        `decodes`, or `Transformer.decode_step`'s checks)."""
        return decode_linear(x, *self.decode_operands())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.decodes(x):
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            return row_block_linear_op(x, self.weight, self.bias, self.decode_blocks)
        return self.decode(x)


class Attention(nn.Module):
    def __init__(self, config: SlimPajamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # fused [q; k; v] projection: (n_head + 2 * n_kv_head) * head_dim output rows
        self.qkv = Linear(config.d_model, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.o_proj = Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask=None, cache_start=None):
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        heads = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh + 2 n_kv, T, hs)
        qk = apply_rope(heads[:, : nh + nkv], cos, sin)  # queries and keys rotated in one go
        q, k, v = qk[:, :nh], qk[:, nh:], heads[:, nh + nkv :]  # (B, nh, T, hs), (B, n_kv, T, hs) x 2
        if cache_start is not None:
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, n_kv, S, hs), S = cache_start + T
        # each key/value head serves a group of n_head // n_kv_head query heads (enable_gqa: no copies)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1 and T == k.size(2),  # else one query row sees every key
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config: SlimPajamaConfig):
        super().__init__()
        self.gate_up = Linear(config.d_model, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.d_model, bias=False)

    def forward(self, x):
        gate_up = self.gate_up(x)
        n = gate_up.size(-1) // 2
        return self.down_proj(F.silu(gate_up[..., :n]) * gate_up[..., n:])


class Block(nn.Module):
    def __init__(self, config: SlimPajamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache_start=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecodeLayer(NamedTuple):
    """What `Transformer.decode_step`'s own path reads of one block: each norm's pair weight, each
    product's `Linear.decode_operands` and the block's KV cache (kept by `setup_kv_cache`)."""

    attn_norm: torch.Tensor
    qkv: tuple
    o_proj: tuple
    mlp_norm: torch.Tensor
    gate_up: tuple
    down_proj: tuple
    kv_cache: KVCache

    @classmethod
    def of(cls, block: Block) -> "DecodeLayer":
        attn, mlp = block.self_attn, block.mlp
        return cls(
            block.input_layernorm.pair_weight, attn.qkv.decode_operands(), attn.o_proj.decode_operands(),
            block.post_attention_layernorm.pair_weight, mlp.gate_up.decode_operands(),
            mlp.down_proj.decode_operands(), attn.kv_cache,
        )


class Transformer(nn.Module):
    _decodes = False  # set by setup_kv_cache: decode_step may take its own path
    _decode_layers: tuple = ()  # set with _decodes: each block's DecodeLayer

    def __init__(self, config: SlimPajamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # residual projections scaled down with depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention's 12 L d T (PaLM appendix B)."""
        c = self.config
        seq_len = seq_len or c.max_seq_len
        n = self.num_params() - self.embed_tokens.weight.numel() * (not c.tie_embeddings)  # lookups are free
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def setup_kv_cache(
        self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, kernel: str = "blocks"
    ):
        """Preallocate every block's KV cache and keep what decoding steps use: each linear layer's
        kernel and row blocks (`Linear.prepare_decoding`; kernel: one of `DECODE_KERNELS`) and each
        norm's pair weight (`RMSNorm.prepare_decoding`); all hold until `clear_kv_cache`, for weights
        that do not change."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.cos.size(0):
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds model.max_seq_len={self.cos.size(0)}")
        p = self.lm_head.weight
        for block in self.layers:
            block.self_attn.kv_cache = KVCache(
                batch_size, self.config.n_kv_head, max_seq_len, self.config.head_dim, dtype or p.dtype, p.device
            )
        self._prepare_decoding(True, kernel)

    def use_decode_kernel(self, kernel: str) -> None:
        """Run the decoding products on `kernel` from the next step on, keeping what `setup_kv_cache`
        kept (so that a race can take turns between kernels; "blocks" after a "gemm" set-up reads
        views of the weights)."""
        check_decode_kernel(kernel)
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = kernel
        self._keep_decode_layers()

    def clear_kv_cache(self):
        for block in self.layers:
            block.self_attn.kv_cache = None
        self._prepare_decoding(False)

    def _prepare_decoding(self, enable: bool, kernel: str = "blocks"):
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_decoding(enable, kernel)
            elif isinstance(module, RMSNorm):
                module.prepare_decoding(enable)
        self._decodes = enable and all(self._has_decode(module) for module in self.modules())
        self._keep_decode_layers()

    def _keep_decode_layers(self):
        self._decode_layers = tuple(DecodeLayer.of(block) for block in self.layers) if self._decodes else ()

    def _has_decode(self, module: nn.Module) -> bool:
        """Whether decode_step's own path may stand for the module: it reads the module's tensors
        (`DecodeLayer`) and runs its maths for one position, bypassing hooks and other classes' code
        (a LoRA wrapper, say)."""
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if isinstance(module, Linear):
            return module.decode_ready
        if isinstance(module, RMSNorm):
            return module.pair_weight is not None
        if isinstance(module, nn.Embedding):  # its output is what decoding_step would check
            return module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
        return module is self or type(module) in (Block, Attention, MLP, KVCache, nn.ModuleList)

    def rotary(
        self, start: int, T: int, position_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for T positions: cache slots start .. start + T - 1, (T, hs) each, or the rotary
        positions position_ids (B, T), (B, 1, T, hs) each (left padding)."""
        if position_ids is not None:
            return self.cos[position_ids][:, None], self.sin[position_ids][:, None]
        return self.cos[start : start + T], self.sin[start : start + T]

    def decode_step(
        self,
        idx: torch.Tensor,
        pos: int,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row: idx (B, 1) goes into KV-cache slot `pos`, after
        `setup_kv_cache`; attention_mask (B, S >= pos + 1) and position_ids (B, 1) as in `forward`.

        The same maths as `lm_head(forward(idx, input_pos=pos, ...)[:, -1])`, which it returns for what
        its own path does not cover (training, autocast, another dtype or device, more than
        `DECODE_MAX_ROWS` rows, modules of other classes or with hooks). Its own path is the blocks'
        maths for one position written out in one loop, over the tensors `setup_kv_cache` kept
        (`DecodeLayer`): the products, norms and attention of `forward`, without `nn.Module.__call__`,
        the modules' methods and checks, and the general cases of `forward` (masks for several
        positions, dropout, compilation). A small model's decoding step on a CPU is bound by its
        Python and its number of ops as much as by its arithmetic, and the weight reads between them
        leave that code cold: a step of micro takes 0.76x the time it takes through `forward`, and
        one of small 0.87x (docs/benchmarks.md)."""
        own_path = self._decodes and idx.numel() <= DECODE_MAX_ROWS and inference_without_autocast()
        if not own_path or torch.compiler.is_compiling():
            kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
            return self.lm_head(self(idx, input_pos=pos, apply_head=False, **kwargs)[:, -1])
        x = self.embed_tokens(idx)  # (B, 1, d)
        cos, sin = self.rotary(pos, 1, position_ids)
        # the one query sees every real slot up to its own: no causal part
        mask = None if attention_mask is None else key_padding_mask(attention_mask, pos + 1)
        B, c = x.size(0), self.config
        nh, nkv, hs = c.n_head, c.n_kv_head, c.head_dim
        signs, eps = self.norm.pair_signs, c.norm_eps
        for layer in self._decode_layers:  # Block.forward for one position
            heads = decode_linear(pair_rms_norm(x, layer.attn_norm, signs, eps), *layer.qkv)
            heads = heads.view(B, 1, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2 n_kv, 1, hs)
            qk = apply_rope(heads[:, : nh + nkv], cos, sin)
            k, v = layer.kv_cache.update(pos, qk[:, nh:], heads[:, nh + nkv :])  # slots 0 .. pos
            y = F.scaled_dot_product_attention(qk[:, :nh], k, v, attn_mask=mask, enable_gqa=nkv != nh)
            x = x + decode_linear(y.view(B, 1, nh * hs), *layer.o_proj)  # (B, nh, 1, hs) is (B, 1, nh * hs)
            gate_up = decode_linear(pair_rms_norm(x, layer.mlp_norm, signs, eps), *layer.gate_up)
            n = gate_up.size(-1) // 2
            x = x + decode_linear(F.silu(gate_up[..., :n]) * gate_up[..., n:], *layer.down_proj)
        return self.lm_head.decode(self.norm.decode(x)).view(B, -1)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[Union[torch.Tensor, int]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        apply_head: bool = True,
    ):
        """idx: (B, T) token ids -> logits (B, T, vocab).

        Training / full forward: input_pos None, causal attention over the T positions.
        Decoding with the KV cache: input_pos (T,) are the contiguous cache slots start .. start + T - 1
        written by this call, or the int start (under torch.compile an int is a symbolic size, where
        reading the start out of a tensor would break the graph); its queries attend to slots
        0 .. start + T - 1 (a prefill is start 0, a decoding step is one slot), so no mask is built
        unless padding or a chunked prefill needs one.
        attention_mask (B, S) marks real (1) vs padding (0) key positions (S >= the keys attended to);
        position_ids (B, T) or (1, T) give rotary positions when they differ from the slots (left padding).
        apply_head=False returns the final normed hidden states (B, T, d) instead of logits, for a loss
        that applies the output head itself (losses.linear_cross_entropy).
        output_hidden_states=True returns (logits, hidden): the embeddings and every block's output,
        n_layer + 1 tensors, all before the final norm (transformers' last entry is after it).
        """
        B, T = idx.shape
        mask, start = None, None
        if input_pos is not None:
            cache = self.layers[0].self_attn.kv_cache
            if cache is None:
                raise ValueError("input_pos needs the KV cache: call setup_kv_cache first")
            start = input_pos if isinstance(input_pos, int) else int(input_pos[0])
            end = start + T
            if end > cache.k.size(2):
                raise ValueError(f"cache slots up to {end} exceed the KV cache's {cache.k.size(2)}")
            if attention_mask is not None or (T > 1 and start > 0):
                slots = torch.arange(end, device=idx.device)
                mask = (slots[None, :] <= slots[start:, None])[None, None]  # (1, 1, T, end): causal over the cache
        elif attention_mask is not None:
            mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]
        if attention_mask is not None:
            mask = key_padding_mask(attention_mask, mask.size(-1), mask)
        if position_ids is None and start is None and T > self.cos.size(0):  # packed rows bring their positions
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cos.size(0)}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.size(1) != T or position_ids.size(0) not in (1, B)):
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} for input_ids of shape {(B, T)}: "
                             f"expected ({B}, {T}) or (1, {T})")
        if position_ids is not None and not torch.compiler.is_compiling() and int(position_ids.max()) >= self.cos.size(0):
            raise ValueError(f"position {int(position_ids.max())} is past model.max_seq_len={self.cos.size(0)}")
        cos, sin = self.rotary(0 if start is None else start, T, position_ids)

        x = self.embed_tokens(idx)  # (B, T, d)
        hidden = [x] if output_hidden_states else None
        for block in self.layers:
            x = block(x, cos, sin, mask, start)
            if output_hidden_states:
                hidden.append(x)
        out = self.norm(x)
        if apply_head:
            out = self.lm_head(out)  # (B, T, vocab)
        return (out, hidden) if output_hidden_states else out
