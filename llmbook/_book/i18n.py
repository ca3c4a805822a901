"""The Chinese edition: the English notebooks' prose, translated paragraph by paragraph, from one source.

The notebooks stay the only source of code, outputs and figures. Their prose is cut into blocks (a
paragraph, a heading, a list, a table: the text between blank lines of a markdown cell, a ``$$`` display
or a code fence kept whole), and each block that has words in it is one message of a gettext catalog:

    chapters/zh_CN/<page>.po     a chapter, the intro, the bibliography page
    exercises/zh_CN/<NN_name>.po an exercise notebook and its solution (they share most of their text)
    chapters/zh_CN/book.po       the site's own strings: the title, the toc's part captions, the footer
    chapters/zh_CN/glossary.toml the terms every translation uses

A message's msgid is the English block itself, so a block whose English changed has no translation
until someone writes one: ``update`` keeps the old translation beside it marked fuzzy (with the old
English, as msgmerge does), and ``check`` (and tests/test_i18n.py) fail on a missing, fuzzy or obsolete
message, on a translation that drops or changes a role, a formula, a code span or a link target of its
source, and on a glossary term rendered any other way.

The Chinese site is built from translated copies of the notebooks that carry the outputs of the English
build's executions (the Jupyter cache), so nothing runs twice:

    python -m llmbook._book.i18n update    # add new English blocks to the catalogs (keeps translations)
    python -m llmbook._book.i18n check     # every block translated, current, and faithful to its source
    python -m llmbook._book.i18n todo CATALOG [--all]   # the messages that need a translator, numbered
    python -m llmbook._book.i18n put CATALOG FILE       # write translations given as "=== N" blocks
    python -m llmbook._book.i18n build     # the Chinese site into _build/html/zh (after the English build)
"""

from __future__ import annotations

import difflib
import re
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import yaml

from llmbook._book.toc import toc_pages

ROOT = Path(__file__).resolve().parents[2]
LANGUAGE = "zh_CN"
SUBDIR = "zh_CN"  # the catalogs' folder beside the sources they translate
GLOSSARY = Path("chapters") / SUBDIR / "glossary.toml"
BOOK_CATALOG = Path("chapters") / SUBDIR / "book.po"

# ------------------------------------------------------------------------------------------------
# Cutting markdown into blocks

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
# Code fences whose body is prose drawn as text (the intro's diagram), translated like a paragraph.
_PROSE_FENCES = {"text"}


def blocks(markdown: str) -> list[str]:
    """The markdown's blocks in order: runs of lines between blank lines, with a code fence or a ``$$``
    display kept whole even when it holds blank lines. ``"\\n\\n".join(blocks(s))`` gives back s up to
    runs of blank lines and trailing spaces."""
    out: list[str] = []
    current: list[str] = []
    fence: str | None = None
    in_math = False
    for line in markdown.splitlines():
        stripped = line.strip()
        if fence is not None:
            current.append(line)
            if stripped.startswith(fence) and stripped.strip("`~") == "":
                fence = None
            continue
        if in_math:
            current.append(line)
            if stripped.endswith("$$"):
                in_math = False
            continue
        opened = _FENCE.match(line)
        if opened:
            fence = opened.group(1)
            current.append(line)
            continue
        if stripped.startswith("$$") and (stripped == "$$" or not stripped[2:].rstrip().endswith("$$")):
            in_math = True
            current.append(line)
            continue
        if not stripped:
            if current:
                out.append("\n".join(current).rstrip())
                current = []
            continue
        current.append(line)
    if current:
        out.append("\n".join(current).rstrip())
    return out


# The parts of a block that a translation must carry over unchanged, in the order they are taken out.
_PROTECTED = [
    ("math", re.compile(r"\$\$.+?\$\$", re.S)),
    ("role", re.compile(r"\{[A-Za-z0-9_:+-]+\}`[^`]*`")),
    ("code", re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)),
    ("math", re.compile(r"(?<![\\$])\$(?!\s)[^$\n]+?(?<![\s\\])\$")),
    ("link", re.compile(r"\]\(([^)\s]+)\)")),
    ("link", re.compile(r"<(https?://[^>\s]+)>")),
    ("label", re.compile(r"^\s*\([\w:.-]+\)=\s*$", re.M)),
    ("subst", re.compile(r"\{\{[^}]+\}\}")),
]


_TITLED_ROLE = re.compile(r"(\{(?:doc|ref|download|numref|term)\})`[^`<]*<([^`>]+)>`")


def protected(block: str, placeholder: str = " ") -> tuple[Counter, str]:
    """(the block's roles, formulas, code spans, link targets and labels, as a multiset; the prose left)."""
    found: Counter = Counter()
    rest = block
    fence = _FENCE.match(block.splitlines()[0]) if block else None
    if fence:  # a fence's info line and its closing line are structure, not prose
        lines = block.splitlines()
        found[("fence", lines[0].strip())] += 1
        rest = "\n".join(lines[1:-1])
    for kind, pattern in _PROTECTED:
        for match in pattern.finditer(rest):
            token = match.group(1) if kind == "link" else match.group(0)
            titled = _TITLED_ROLE.fullmatch(token) if kind == "role" else None
            if titled:  # a cross-reference with its own title: the title is prose, the target is not
                token = f"{titled.group(1)}`<{titled.group(2)}>`"
            found[(kind, token.strip())] += 1
        rest = pattern.sub(placeholder, rest)
    return found, rest


def translatable(block: str) -> bool:
    """Whether a block has prose to translate: a code fence (other than a text drawing), a ``$$``
    display, a label or a block of only roles and code spans has none."""
    fence = _FENCE.match(block.splitlines()[0])
    if fence and fence.group(2).strip() not in _PROSE_FENCES:
        return False
    _, prose = protected(block)
    return re.search(r"[A-Za-z]{2,}", prose) is not None


# ------------------------------------------------------------------------------------------------
# The sources and their catalogs


def page_source(page: str, root: Path = ROOT) -> Path:
    for suffix in (".ipynb", ".md"):
        if (root / f"{page}{suffix}").is_file():
            return Path(f"{page}{suffix}")
    raise FileNotFoundError(f"_toc.yml names {page!r}, but neither {page}.ipynb nor {page}.md exists")


def sources(root: Path = ROOT) -> list[Path]:
    """Every file whose prose the edition translates: the toc's pages and the unsolved exercise
    notebooks beside their solutions."""
    out = []
    for page in toc_pages(root):
        path = page_source(page, root)
        out.append(path)
        if path.stem.endswith("_solution"):
            template = path.with_name(path.name.replace("_solution", ""))
            if (root / template).is_file():
                out.append(template)
    return out


def catalog_path(source: Path) -> Path:
    """chapters/x.ipynb -> chapters/zh_CN/x.po; exercises/NN_x{,_solution}.ipynb -> exercises/zh_CN/NN_x.po"""
    return source.parent / SUBDIR / (source.stem.removesuffix("_solution") + ".po")


def markdown_texts(path: Path, root: Path = ROOT) -> list[tuple[str, str]]:
    """(where, markdown) for each prose cell of a notebook, or the whole of a markdown page."""
    if path.suffix == ".md":
        return [(str(path), (root / path).read_text())]
    nb = nbformat.read(root / path, as_version=4)
    return [(f"{path}:{i}", cell.source) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"]


def source_messages(root: Path = ROOT) -> dict[Path, dict[str, list[str]]]:
    """catalog -> {English block: [where it occurs]}, in order of first occurrence."""
    out: dict[Path, dict[str, list[str]]] = {}
    for path in sources(root):
        messages = out.setdefault(catalog_path(path), {})
        for where, text in markdown_texts(path, root):
            for block in blocks(text):
                if translatable(block):
                    messages.setdefault(block, []).append(where)
    out[BOOK_CATALOG] = {text: [where] for text, where in book_strings(root)}
    return out


def book_strings(root: Path = ROOT) -> list[tuple[str, str]]:
    """The site's own prose: the title, the footer and the captions of the toc's parts."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    footer = " ".join(config["html"]["extra_footer"].split())
    out = [(config["title"], "_config.yml:title"), (footer, "_config.yml:html.extra_footer")]
    out += [(part["caption"], "_toc.yml:caption") for part in toc.get("parts", []) if "caption" in part]
    return out


# ------------------------------------------------------------------------------------------------
# Catalogs (gettext .po, read and written with Babel, which Sphinx already depends on)


_PREVIOUS = "The English this fuzzy translation was written for:"
_EPOCH = datetime(2026, 12, 6, tzinfo=UTC)  # fixed, so that an update changes only what changed


@dataclass
class Message:
    english: str
    chinese: str = ""
    where: list[str] = field(default_factory=list)
    fuzzy: bool = False
    previous: str | None = None  # the English a fuzzy translation was written for


def read_catalog(path: Path) -> tuple[dict[str, Message], dict[str, Message]]:
    """(current messages, obsolete messages) of a .po file; both empty when the file does not exist."""
    from babel.messages.pofile import read_po

    if not path.is_file():
        return {}, {}
    with path.open("rb") as f:
        catalog = read_po(f, locale=LANGUAGE, abort_invalid=True)
    current = {}
    for m in catalog:
        if not m.id:
            continue
        comments = list(m.user_comments)
        previous = "\n".join(comments[1:]) if comments[:1] == [_PREVIOUS] else None
        where = [f"{path}:{cell}" if cell else path for path, cell in m.locations]
        current[m.id] = Message(m.id, m.string or "", where, m.fuzzy, previous)
    obsolete = {m.id: Message(m.id, m.string or "") for m in catalog.obsolete.values()}
    return current, obsolete


def write_catalog(path: Path, messages: list[Message], obsolete: list[Message]) -> None:
    from babel.messages.catalog import Catalog
    from babel.messages.catalog import Message as BabelMessage
    from babel.messages.pofile import write_po

    catalog = Catalog(
        locale=LANGUAGE,
        project="llmbook",
        copyright_holder="The llmbook authors",
        charset="utf-8",
        fuzzy=False,
        creation_date=_EPOCH,
        revision_date=_EPOCH,
        last_translator="The llmbook authors",
        language_team="llmbook",
        version="1",
        msgid_bugs_address="",
        header_comment="# llmbook's Chinese edition: one message per English block (llmbook/_book/i18n.py)",
    )
    for m in messages:
        previous = [_PREVIOUS, *m.previous.splitlines()] if m.fuzzy and m.previous else ()
        flags = {"fuzzy"} if m.fuzzy else ()
        added = catalog.add(
            m.english, m.chinese, [_location(w) for w in m.where], flags=flags, user_comments=previous
        )
        added.flags.discard("python-format")  # Babel's guess from the braces of a role; these are not formats
        added.flags.discard("python-brace-format")
    for m in obsolete:
        catalog.obsolete[m.english] = BabelMessage(m.english, m.chinese)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        write_po(f, catalog, width=0, omit_header=False, sort_output=False)


def _location(where: str) -> tuple[str, int | None]:
    path, _, cell = where.rpartition(":")
    return (path, int(cell)) if cell.isdigit() else (where, None)


def update(root: Path = ROOT, drop_obsolete: bool = False) -> dict[Path, tuple[int, int, int]]:
    """Bring every catalog in line with its sources and return {catalog: (new, fuzzy, obsolete)}.

    A block new in the English gets an empty translation, or, when it closely resembles a block that
    lost its translation (an edited paragraph), that old translation marked fuzzy with the old English
    beside it; a translation whose English is gone is kept as obsolete (``#~``) for reference, until an
    update with drop_obsolete removes it."""
    report = {}
    for catalog, wanted in source_messages(root).items():
        current, old_obsolete = read_catalog(root / catalog)
        orphans = {k: v for k, v in current.items() if k not in wanted and v.chinese}
        orphans.update({k: v for k, v in old_obsolete.items() if v.chinese and k not in wanted})
        messages, new, fuzzy = [], 0, 0
        for english, where in wanted.items():
            have = current.get(english)
            if have is not None and have.chinese:
                messages.append(Message(english, have.chinese, where, have.fuzzy, have.previous))
                fuzzy += have.fuzzy
                continue
            close = difflib.get_close_matches(english, list(orphans), n=1, cutoff=0.6)
            if close:
                old = orphans.pop(close[0])
                messages.append(Message(english, old.chinese, where, True, old.english))
                fuzzy += 1
            else:
                messages.append(Message(english, "", where))
                new += 1
        write_catalog(root / catalog, messages, [] if drop_obsolete else list(orphans.values()))
        report[catalog] = (new, fuzzy, len(orphans))
    return report


# ------------------------------------------------------------------------------------------------
# Checks


@dataclass
class Term:
    name: str
    en: list[str]
    zh: str
    alt: str | None = None
    keep: bool = False
    skip: list[str] = field(default_factory=list)

    def used_in(self, english_prose: str) -> bool:
        return any(re.search(rf"(?<![\w-]){p}(?![\w-])", english_prose, re.I) for p in self.en)


def glossary(root: Path = ROOT) -> list[Term]:
    data = tomllib.loads((root / GLOSSARY).read_text())
    return [Term(**entry) for entry in data["term"]]


_CJK = re.compile(r"[\u4e00-\u9fff]")


def _small(number: str) -> bool:
    return number.isdigit() and int(number) <= 10


_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a catalog. kind: missing | stale | obsolete (the catalog is out of step with
    the English), markup | numbers | heading | untranslated (the translation is unfaithful to its
    block), glossary (a term rendered otherwise)."""

    kind: str
    catalog: Path
    english: str
    detail: str

    def __str__(self) -> str:
        first = self.english.strip().splitlines()[0] if self.english.strip() else ""
        return f"{self.catalog}: {first[:70]!r}: {self.detail}"


def problems(catalog: Path, root: Path = ROOT, wanted: dict[str, list[str]] | None = None) -> list[Problem]:
    """What is wrong with one catalog: untranslated, fuzzy or obsolete messages, translations that do not
    carry their source's roles, formulas, code spans, link targets and numbers, and glossary terms
    rendered otherwise. Empty when the catalog is complete and faithful."""
    if wanted is None:
        wanted = source_messages(root)[catalog]
    current, obsolete = read_catalog(root / catalog)
    terms = glossary(root)
    found = []
    for english in wanted:
        message = current.get(english)
        if message is None or not message.chinese.strip():
            detail = (
                "no translation yet (`python -m llmbook._book.i18n todo CATALOG` lists them, `put` writes)"
            )
            found.append(Problem("missing", catalog, english, detail))
        elif message.fuzzy:
            detail = "stale: the English changed since this translation was written (it is marked fuzzy)"
            found.append(Problem("stale", catalog, english, detail))
        else:
            found += [
                Problem(kind, catalog, english, detail)
                for kind, detail in translation_problems(english, message.chinese, terms, catalog)
            ]
    for english in current.keys() - wanted.keys():
        detail = "stale: no such English block any more (`update` moves it to the obsolete entries)"
        found.append(Problem("stale", catalog, english, detail))
    for english in obsolete:
        detail = "an obsolete (#~) entry is left in the catalog (`update --drop-obsolete` removes them)"
        found.append(Problem("obsolete", catalog, english, detail))
    return found


def translation_problems(
    english: str, chinese: str, terms: list[Term], catalog: Path | str = ""
) -> list[tuple[str, str]]:
    """(kind, what) for each way a translation departs from its source, beyond its words."""
    out = []
    theirs, english_prose = protected(english)
    ours, chinese_prose = protected(chinese)
    if theirs != ours:
        lost, added = sorted(theirs - ours), sorted(ours - theirs)
        out.append(("markup", f"roles, maths, code spans or link targets differ: lost {lost}, added {added}"))
    numbers = Counter(_NUMBER.findall(english_prose)), Counter(_NUMBER.findall(chinese_prose))
    lost = numbers[0] - numbers[1]
    # Chinese writes small numbers in digits where English spells them ("power of two": 2 的幂).
    added = Counter({n: k for n, k in (numbers[1] - numbers[0]).items() if not _small(n)})
    if lost or added:
        out.append(("numbers", f"numbers differ: missing {sorted(lost)}, extra {sorted(added)}"))
    if re.search(r"[A-Za-z]{3,}(\s+[A-Za-z]{2,}){3,}", english_prose) and not _CJK.search(chinese_prose):
        out.append(("untranslated", "the translation has no Chinese in it"))
    for term in terms:
        if str(catalog) in term.skip:
            continue
        if term.used_in(english_prose) and term.zh.lower() not in chinese_prose.lower():
            out.append(("glossary", f"uses {term.name!r} but not the glossary's {term.zh!r}"))
        if term.alt and term.alt in chinese_prose:
            out.append(("glossary", f"uses {term.alt!r}, the rendering the glossary rejects for {term.zh!r}"))
    english_structure, english_stars = _rendered(english)
    chinese_structure, chinese_stars = _rendered(chinese)
    if english_structure != chinese_structure:
        out.append(("markup", "the markdown structure differs (headings, list items, table rows and cells)"))
    if chinese_stars > english_stars:
        out.append((
            "markup",
            "emphasis markers left as literal asterisks: a closing ** right after full-width punctuation and "
            "before a Chinese character does not close (write **加粗**。, not **加粗。**)",
        ))  # fmt: skip
    heading = re.match(r"#+ ", english)
    if heading and not chinese.startswith(heading.group(0)):
        out.append(("heading", f"the heading level changed (the English starts with {heading.group(0)!r})"))
    return out


_STRUCTURE = {
    "heading_open", "bullet_list_open", "ordered_list_open", "list_item_open", "table_open", "tr_open",
    "th_open", "td_open", "blockquote_open", "fence", "code_block", "hr",
}  # fmt: skip


def _rendered(markdown: str) -> tuple[Counter, int]:
    """(the block structure CommonMark parses from the markdown, asterisks left as text after parsing),
    with roles, code and maths taken out first."""
    from markdown_it import MarkdownIt

    _, prose = protected(markdown, placeholder="x")  # a word, so that `a` + `b` cannot start a list
    tokens = MarkdownIt("commonmark").enable("table").parse(prose)
    structure = Counter(t.type for t in tokens if t.type in _STRUCTURE)
    stars = sum(
        child.content.count("*") for t in tokens if t.type == "inline" for child in t.children or []
        if child.type == "text"
    )  # fmt: skip
    return structure, stars


def check(root: Path = ROOT, only: list[Path] | None = None) -> list[Problem]:
    found = []
    for catalog, wanted in source_messages(root).items():
        if only and catalog not in only:
            continue
        found += problems(catalog, root, wanted)
    return found


def todo(catalog: Path, everything: bool = False, root: Path = ROOT) -> str:
    """The catalog's messages that need a translator (all of them with everything=True), numbered in
    catalog order as ``=== N`` followed by the English, the format `put` reads back."""
    current, _ = read_catalog(root / catalog)
    out = []
    for n, message in enumerate(current.values()):
        if everything or message.fuzzy or not message.chinese.strip():
            out.append(f"=== {n}\n{message.english}\n")
            if message.fuzzy and message.previous:
                out.append(f"(fuzzy: written for the English\n{message.previous}\n as\n{message.chinese})\n")
    return "\n".join(out)


def put(catalog: Path, translations: str, root: Path = ROOT) -> int:
    """Write translations given as ``=== N`` blocks (N as numbered by `todo`) into the catalog; the text
    under each marker, stripped of blank lines around it, becomes message N's translation."""
    current, obsolete = read_catalog(root / catalog)
    messages = list(current.values())
    parts = re.split(r"^=== (\d+)[ \t]*$", translations, flags=re.M)
    if parts[0].strip():
        raise ValueError(f"text before the first '=== N' marker: {parts[0].strip()[:80]!r}")
    for number, text in zip(parts[1::2], parts[2::2], strict=True):
        n = int(number)
        if not 0 <= n < len(messages):
            raise ValueError(f"{catalog} has messages 0..{len(messages) - 1}, not {n}")
        messages[n].chinese = text.strip("\n").rstrip()
        messages[n].fuzzy, messages[n].previous = False, None
    write_catalog(root / catalog, messages, list(obsolete.values()))
    return len(parts) // 2


# ------------------------------------------------------------------------------------------------
# The Chinese site


def translations(root: Path = ROOT) -> dict[Path, dict[str, str]]:
    """catalog -> {English block: Chinese}, for every finished (non-fuzzy, non-empty) message."""
    out = {}
    for catalog in {catalog_path(path) for path in sources(root)} | {BOOK_CATALOG}:  # no notebook read
        current, _ = read_catalog(root / catalog)
        out[catalog] = {k: m.chinese for k, m in current.items() if m.chinese.strip() and not m.fuzzy}
    return out


def translate_markdown(text: str, table: dict[str, str], missing: list[str]) -> str:
    """The markdown with each translatable block replaced by its translation (English where there is
    none yet, noted in missing); blocks without prose are kept as they are."""
    out = []
    for block in blocks(text):
        if translatable(block):
            if block in table:
                block = table[block]
            else:
                missing.append(block)
        out.append(block)
    return "\n\n".join(out) + ("\n" if text.endswith("\n") else "")


def glossary_section(root: Path = ROOT) -> str:
    """The Chinese intro's closing section: every term of the glossary, with the rendering not used."""
    rows = []
    for term in glossary(root):
        note = "保留英文" if term.keep else ""
        if term.alt:
            note = (note + "；" if note else "") + f"另一常见译法：{term.alt}（本书不用）"
        rows.append(f"| {term.name} | {term.zh} | {note} |")
    return (
        "## 术语表\n\n本书译文统一使用下表中的译名。"
        "领域内另有常见译法的，在备注中列出一次，正文不再使用。\n\n"
        "| 英文 | 本书译名 | 备注 |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def executed(path: Path, outputs: str, root: Path = ROOT):
    """The notebook with the outputs the English site shows: from the Jupyter cache the English build
    executed into (outputs="cache"), or as saved in the file (outputs="saved")."""
    nb = nbformat.read(root / path, as_version=4)
    if outputs == "saved":
        return nb
    from jupyter_cache import get_cache

    cache = get_cache(str(root / "_build" / ".jupyter_cache"))
    try:
        _, merged = cache.merge_match_into_notebook(nb)
    except KeyError:
        raise RuntimeError(
            f"{path} has no executed copy in _build/.jupyter_cache: build the English site first "
            "(bash .ci/book); the Chinese site reuses its outputs instead of executing anything again"
        ) from None
    return merged


def stage(out: Path, outputs: str = "cache", root: Path = ROOT) -> list[str]:
    """Write the Chinese edition's sources into out (translated notebooks carrying the English build's
    outputs, translated pages, _config.yml and _toc.yml) and return the English blocks left untranslated."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tables = translations(root)
    missing: list[str] = []
    for folder in ("chapters", "exercises"):
        if not (root / folder).is_dir():
            continue
        shutil.copytree(
            root / folder, out / folder,
            ignore=shutil.ignore_patterns(SUBDIR, "*.ipynb", ".ipynb_checkpoints", "__pycache__"),
        )  # fmt: skip
    for path in sources(root):
        table = tables[catalog_path(path)]
        if path.suffix == ".md":
            text = translate_markdown((root / path).read_text(), table, missing)
            if path == Path(page_source(toc_pages(root)[0], root)):
                text = text.rstrip("\n") + "\n\n" + glossary_section(root)
            (out / path).write_text(text)
            continue
        in_toc = path.stem.endswith("_solution") or path.parent.name == "chapters"
        nb = executed(path, outputs if in_toc else "saved", root)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = translate_markdown(cell.source, table, missing)
        nbformat.write(nb, out / path)
    book = tables[BOOK_CATALOG]

    def zh(text: str) -> str:
        key = " ".join(text.split())
        if key not in book:
            missing.append(key)
        return book.get(key, text)

    config = yaml.safe_load((root / "_config.yml").read_text())
    config["title"] = zh(config["title"])
    config["html"]["extra_footer"] = zh(config["html"]["extra_footer"])
    config["execute"]["execute_notebooks"] = "off"  # the outputs are the English build's
    config["exclude_patterns"] = [*config.get("exclude_patterns", []), SUBDIR]
    sphinx_config = config["sphinx"].setdefault("config", {})
    sphinx_config["language"] = LANGUAGE
    sphinx_config["llmbook_assets_dir"] = str(root / "_build" / ".offline_assets")
    sphinx_config["llmbook_other_language"] = {"href": "../", "label": "English", "hreflang": "en"}
    (out / "_config.yml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    for part in toc.get("parts", []):
        if "caption" in part:
            part["caption"] = zh(part["caption"])
    (out / "_toc.yml").write_text(yaml.safe_dump(toc, allow_unicode=True, sort_keys=False))
    return missing


def build(
    outputs: str = "cache", root: Path = ROOT, site: Path | None = None, work: Path | None = None
) -> int:
    """Stage the Chinese sources in work (default _build/zh) and build them into site/zh (default
    _build/html/zh). Returns the builder's exit status."""
    import shutil
    import subprocess
    import time

    start = time.perf_counter()
    work = work or root / "_build" / "zh"
    src = work / "src"
    missing = stage(src, outputs, root)
    if missing:
        print(f"{len(missing)} English blocks have no current translation yet and stay in English, e.g. "
              f"{missing[0][:80]!r} (`python -m llmbook._book.i18n check` lists them)")  # fmt: skip
    cmd = [
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(src),
        "--path-output", str(work), "--warningiserror", "--keep-going",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        print("the Chinese site failed to build", file=sys.stderr)
        return result.returncode
    target = (site or root / "_build" / "html") / "zh"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work / "_build" / "html", target)
    print(f"The Chinese site is in {target}/index.html ({time.perf_counter() - start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["todo"] and len(args) in (2, 3):
        print(todo(Path(args[1]), everything="--all" in args))
        return 0
    if args[:1] == ["put"] and len(args) == 3:
        print(f"{put(Path(args[1]), Path(args[2]).read_text())} translations written to {args[1]}")
        return 0
    if args[:1] == ["update"] and set(args[1:]) <= {"--drop-obsolete"}:
        for catalog, (new, fuzzy, gone) in update(drop_obsolete="--drop-obsolete" in args).items():
            if new or fuzzy or gone:
                print(f"{catalog}: {new} new, {fuzzy} fuzzy, {gone} obsolete")
        return 0
    if args[:1] == ["check"]:
        found = check(only=[Path(a) for a in args[1:]] or None)
        for line in found:
            print(line)
        print(f"{len(found)} problems")
        return 1 if found else 0
    if args[:1] == ["build"] and set(args[1:]) <= {"--saved-outputs"}:
        return build("saved" if "--saved-outputs" in args else "cache")
    print(
        "usage: python -m llmbook._book.i18n update [--drop-obsolete] | check [CATALOG...] "
        "| todo CATALOG [--all] | put CATALOG FILE | build [--saved-outputs]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
