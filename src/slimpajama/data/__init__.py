from slimpajama.data.corpus import MarkovCorpus, TextCorpus
from slimpajama.data.datamodule import SlimPajamaDataModule
from slimpajama.data.reader import CorpusError, Document, read_corpus, read_file, resolve_paths

__all__ = ["CorpusError", "Document", "MarkovCorpus", "SlimPajamaDataModule", "TextCorpus", "read_corpus",
           "read_file", "resolve_paths"]
