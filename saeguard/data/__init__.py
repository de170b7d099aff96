"""Corpora, splits, tokenisation and packing."""

from saeguard.data.corpora import CORPORA, Corpus, CorpusInfo, load_corpus
from saeguard.data.splits import SPLITS, Document, corpus_fingerprint, select_split, split_of
from saeguard.data.tokenize import PackingSpec, iter_contexts, packing_spec, tokenize_documents

__all__ = [
    "CORPORA",
    "SPLITS",
    "Corpus",
    "CorpusInfo",
    "Document",
    "corpus_fingerprint",
    "PackingSpec",
    "iter_contexts",
    "load_corpus",
    "packing_spec",
    "select_split",
    "split_of",
    "tokenize_documents",
]
