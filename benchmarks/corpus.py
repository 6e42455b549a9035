"""Fetch, clean and split the English corpus the reference models are trained and evaluated on.

Nothing can come from model or dataset hubs, so the text comes from Debian packages with permissive or
public-domain licenses (see docs/corpus.md): ``apt-get download`` + ``dpkg -x`` (no install, no root), then
every source is cut into documents, cleaned, and each document goes to train / validation / test by a hash of
its id, so the split never depends on the order files are listed in or on what else is in the corpus.

    python benchmarks/corpus.py                      # -> benchmarks/.cache/corpus/{train,validation,test}.jsonl

Needs ``apt-get update`` to have run once (package lists). The output folder ignores itself in git.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_OUT = CACHE / "corpus"
SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.01
TEST_FRACTION = 0.01
MIN_DOC_CHARS = 40  # shorter records are headers or empty pages, not text
DOC_SEPARATOR = "<|endoftext|>"  # between documents in eval_slice.txt; never occurs in the corpus


@dataclass(frozen=True)
class Document:
    source: str
    id: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.source, self.id)


def split_of(source: str, doc_id: str) -> str:
    """Deterministic split by a hash of the document's id (about 98/1/1 train/validation/test)."""
    digest = hashlib.blake2b(f"{source}/{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VALIDATION_FRACTION:
        return "validation"
    return "train"


# --------------------------------------------------------------------------- cleaning


def normalize(text: str) -> str:
    """NFC, Unix newlines, no control characters or trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = text.replace("\t", "    ")
    text = re.sub(r"[ ]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: block elements become line breaks, ``<pre>`` keeps its layout, and
    navigation ``div``s (menus, sidebars, prev/next bars of Sphinx, DocBook and the SQLite site) are skipped."""

    BLOCK = frozenset("p div br li tr h1 h2 h3 h4 h5 h6 pre table dt dd blockquote section title ul ol".split())
    SKIP = frozenset({"script", "style", "head", "nav"})
    NAV_CLASSES = frozenset({"navheader", "navfooter", "sphinxsidebar", "nav", "menu", "searchmenu", "tagline",
                             "nosearch", "related", "footer"})
    NAV_IDS = frozenset({"hd", "ft", "sidebar", "global-nav", "searchbox"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0
        self.nav_depth = 0  # > 0 inside a navigation div: counts the divs open inside it

    def _is_nav(self, attrs) -> bool:
        values = dict(attrs)
        classes = set((values.get("class") or "").split())
        return (bool(classes & self.NAV_CLASSES) or values.get("id") in self.NAV_IDS
                or values.get("role") == "navigation")

    def handle_starttag(self, tag, attrs):
        if tag == "div" and (self.nav_depth or self._is_nav(attrs)):
            self.nav_depth += 1
        self.skip += tag in self.SKIP
        self.pre += tag == "pre"
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "div" and self.nav_depth:
            self.nav_depth -= 1
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip and not self.nav_depth:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    return "\n".join(line.strip() if not line.startswith("  ") else line.rstrip() for line in text.split("\n"))


def drop_boilerplate(docs: list[Document], min_fraction: float = 0.05, max_len: int = 120) -> list[Document]:
    """Remove short lines repeated on many pages of one source (site menus, 'Prev Up Home Next' bars).

    A line counts once per page; lines on at least ``min_fraction`` of the pages (and at least 5) go.
    """
    counts: collections.Counter[str] = collections.Counter()
    for doc in docs:
        counts.update({line.strip() for line in doc.text.split("\n") if 0 < len(line.strip()) <= max_len})
    floor = max(5, int(min_fraction * len(docs)))
    common = {line for line, n in counts.items() if n >= floor}
    return [
        Document(d.source, d.id, "\n".join(x for x in d.text.split("\n") if x.strip() not in common))
        for d in docs
    ]


# --------------------------------------------------------------------------- sources


def fetch_package(name: str, work: Path) -> tuple[Path, str]:
    """Download one .deb into ``work`` (kept as a cache) and extract it; returns (root, version)."""
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        try:
            subprocess.run(["apt-get", "download", name], cwd=debs, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as error:
            raise SystemExit(
                f"apt-get download {name} failed ({error.stderr.strip()}); run `apt-get update` first"
            ) from error
        found = sorted(debs.glob(f"{name}_*.deb"))
    deb = found[-1]
    root = work / "root" / name
    if not root.exists():  # extract next to it, then rename, so an interrupted run never leaves half a tree
        partial = root.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
        partial.rename(root)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    return root, version


def python_docs(root: Path) -> Iterator[Document]:
    """Python 3.11 documentation, reST sources: one document per page."""
    base = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(base.rglob("*.rst.txt")):
        yield Document("python-docs", str(path.relative_to(base)), path.read_text(encoding="utf-8"))


def postgres_docs(root: Path) -> Iterator[Document]:
    """PostgreSQL 15 manual, HTML: one document per page."""
    base = root / "usr/share/doc/postgresql-doc-15/html"
    for path in sorted(base.glob("*.html")):
        yield Document("postgresql-docs", path.name, html_text(path.read_text(encoding="utf-8", errors="replace")))


def sqlite_docs(root: Path) -> Iterator[Document]:
    """SQLite documentation, HTML: one document per page."""
    base = root / "usr/share/doc/sqlite3"
    for path in sorted(base.rglob("*.html")):
        text = html_text(path.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\nThis page last modified on [^\n]*\s*$", "", text.rstrip())
        yield Document("sqlite-docs", str(path.relative_to(base)), text)


def django_docs(root: Path) -> Iterator[Document]:
    """Django 3.2 documentation, Sphinx HTML (pilcrows and index pages dropped): one document per page."""
    base = root / "usr/share/doc/python-django-doc/html"
    for path in sorted(base.rglob("*.html")):
        relative = str(path.relative_to(base))
        if relative.startswith(("_", "genindex", "py-modindex", "search")):
            continue
        text = html_text(path.read_text(encoding="utf-8", errors="replace")).replace("\u00b6", "")
        yield Document("django-docs", relative, text)


def fortunes(roots: list[Path]) -> Iterator[Document]:
    """Fortune cookies (UTF-8 files, records between ``%`` lines): one document per fortune.

    ``ascii-art`` is pictures, ``translate-me`` is mostly not English.
    """
    skip = {"ascii-art", "translate-me"}
    for root in roots:
        for path in sorted((root / "usr/share/games/fortunes").glob("*.u8")):
            if path.stem in skip:
                continue
            records = re.split(r"\n%\n", "\n" + path.read_text(encoding="utf-8", errors="replace") + "\n")
            for index, record in enumerate(records):
                yield Document("fortunes", f"{path.stem}/{index}", record)


def bible(roots: tuple[Path, Path]) -> Iterator[Document]:
    """King James Bible, via the package's own ``bible`` program: one document per chapter, verse numbers
    dropped and wrapped lines joined so that each verse is one line."""
    program, text_root = roots
    output = subprocess.run(
        [str(program / "usr/bin/bible"), "-p", str(text_root / "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    chapters = re.split(r"\n\n(?=\S[^\n]* \d+\n\n)", "\n" + output)
    for chapter in chapters:
        chapter = chapter.strip()
        if not chapter:
            continue
        title, _, body = chapter.partition("\n\n")
        verses = re.split(r"\n *\d{1,3} ", "\n" + body)
        lines = [" ".join(v.split()) for v in verses if v.strip()]
        yield Document("bible-kjv", title, title + "\n\n" + "\n".join(lines))


SOURCES: dict[str, tuple[list[str], Callable[..., Iterator[Document]], bool]] = {
    # name: (packages, reader, html boilerplate removal)
    "python-docs": (["python3.11-doc"], lambda r: python_docs(r[0]), False),
    "postgresql-docs": (["postgresql-doc-15"], lambda r: postgres_docs(r[0]), True),
    "sqlite-docs": (["sqlite3-doc"], lambda r: sqlite_docs(r[0]), True),
    "django-docs": (["python-django-doc"], lambda r: django_docs(r[0]), True),
    "fortunes": (["fortunes", "fortunes-min"], lambda r: fortunes(r), False),
    "bible-kjv": (["bible-kjv", "bible-kjv-text"], lambda r: bible((r[0], r[1])), False),
}


def build(out: Path, work: Path) -> dict:
    """Fetch every source, clean, split and write ``{split}.jsonl`` plus ``manifest.json``; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    documents: list[Document] = []
    packages: dict[str, str] = {}
    for name, (package_names, reader, boilerplate) in SOURCES.items():
        roots = []
        for package in package_names:
            root, version = fetch_package(package, work)
            roots.append(root)
            packages[package] = version
        docs = [Document(d.source, d.id, normalize(d.text)) for d in reader(roots)]
        if boilerplate:
            docs = [Document(d.source, d.id, normalize(d.text)) for d in drop_boilerplate(docs)]
        docs = [d for d in docs if len(d.text) >= MIN_DOC_CHARS]
        if any(DOC_SEPARATOR in d.text for d in docs):
            raise ValueError(f"{name}: a document contains the separator {DOC_SEPARATOR!r}")
        print(f"{name}: {len(docs)} documents, {sum(len(d.text) for d in docs) / 1e6:.2f} M characters",
              file=sys.stderr)
        documents.extend(docs)
    stats: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        for doc in documents:
            files[doc.split].write(json.dumps({"source": doc.source, "id": doc.id, "text": doc.text}) + "\n")
            entry = stats[doc.split].setdefault(doc.source, {"documents": 0, "characters": 0})
            entry["documents"] += 1
            entry["characters"] += len(doc.text)
    finally:
        for f in files.values():
            f.close()
    manifest = {
        "packages": packages,
        "splits": stats,
        "sha256": {s: hashlib.sha256((out / f"{s}.jsonl").read_bytes()).hexdigest() for s in SPLITS},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_split(split: str, corpus: Path = DEFAULT_OUT) -> list[dict]:
    """The documents of one split, in the order ``build`` wrote them."""
    path = corpus / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/corpus.py` first")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=CACHE / "packages", help="downloaded and extracted .debs")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.work)
    for split, sources in manifest["splits"].items():
        docs = sum(v["documents"] for v in sources.values())
        chars = sum(v["characters"] for v in sources.values())
        print(f"{split}: {docs} documents, {chars / 1e6:.2f} M characters")
    print(json.dumps(manifest["packages"], indent=2))


if __name__ == "__main__":
    main()
