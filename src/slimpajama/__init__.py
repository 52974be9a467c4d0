"""SlimPajama: pretrain, distill, prune, fine-tune and generate with small Llama-style models."""

from slimpajama.model import SlimPajamaConfig
from slimpajama.pretrained import SlimPajamaModel
from slimpajama.tokenizer import SlimPajamaTokenizer

__all__ = ["SlimPajamaConfig", "SlimPajamaModel", "SlimPajamaTokenizer"]
__version__ = "0.1.0"
