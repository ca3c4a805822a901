"""The Chinese edition stays in step with the English (llmbook/_book/i18n.py).

Every English prose block has a current translation (a block whose English changed is stale until its
translation is rewritten); each translation keeps its source's roles, formulas, code spans, link targets
and numbers, and follows the glossary; the Chinese notebooks are the English ones with only their prose
replaced; and the built Chinese site has every page, links each page to its English twin and back, and
serves its own CJK font.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from llmbook._book import i18n

ROOT = Path(__file__).resolve().parents[1]
SOURCE_MESSAGES = i18n.source_messages(ROOT)  # read every notebook once, for all the catalogs
CATALOGS = sorted(SOURCE_MESSAGES)
_IDS = [str(c) for c in CATALOGS]


@pytest.fixture(scope="module")
def found() -> dict[Path, list[i18n.Problem]]:
    return {catalog: i18n.problems(catalog, ROOT, SOURCE_MESSAGES[catalog]) for catalog in CATALOGS}


def _of(found, catalog, kinds) -> list[str]:
    return [str(p) for p in found[catalog] if p.kind in kinds]


@pytest.mark.parametrize("catalog", CATALOGS, ids=_IDS)
def test_every_english_block_has_a_current_translation(found, catalog):
    problems = _of(found, catalog, {"missing", "stale", "obsolete"})
    assert not problems, (
        "English prose without a current Chinese translation (`python -m llmbook._book.i18n update`, then "
        "`todo` / `put`):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("catalog", CATALOGS, ids=_IDS)
def test_translations_keep_roles_maths_code_links_and_numbers(found, catalog):
    problems = _of(found, catalog, {"markup", "numbers", "heading", "untranslated"})
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("catalog", CATALOGS, ids=_IDS)
def test_translations_follow_the_glossary(found, catalog):
    problems = _of(found, catalog, {"glossary"})
    assert not problems, "\n".join(problems)


def test_every_catalog_has_messages_and_every_page_a_catalog():
    pages = {i18n.catalog_path(path) for path in i18n.sources(ROOT)}
    assert pages | {i18n.BOOK_CATALOG} == set(CATALOGS)
    on_disk = set(ROOT.glob(f"*/{i18n.SUBDIR}/*.po"))
    assert on_disk == {ROOT / c for c in CATALOGS}, "catalogs no page uses, or pages without a catalog"
    empty = [c for c, messages in SOURCE_MESSAGES.items() if not messages]
    assert not empty


def test_the_translated_prose_is_counted():
    messages = sum(len(m) for m in SOURCE_MESSAGES.values())
    assert messages > 800  # every chapter, the intro, the exercises and the site's strings


# ------------------------------------------------------------------------------------------------
# The checks themselves, on small examples


def test_blocks_keep_fences_and_displays_whole():
    parts = [
        "# Title",
        "A paragraph\nover two lines.",
        "```python\nx = 1\n\ny = 2\n```",
        "$$\na\n\nb\n$$",
        "- one\n- two",
    ]
    text = "\n\n".join(parts)
    assert i18n.blocks(text) == parts
    assert [i18n.translatable(b) for b in i18n.blocks(text)] == [True, True, False, False, True]
    assert i18n.translatable("```text\nthe diagram's words\n```")
    assert not i18n.translatable("(sec-x)=")


_TERMS = [i18n.Term(name="token", en=["tokens?"], zh="词元", alt="令牌")]


@pytest.mark.parametrize(
    ("chinese", "kind"),
    [
        ("共 {glue:text}`n:,` 个**词元**。每个长度为 $T$，见 `ids`。", None),
        ("共 {glue:text}`n` 个词元，长度为 $T$，见 `ids`。", "markup"),  # a glue format changed
        ("共 {glue:text}`n:,` 个词元，长度为 $N$，见 `ids`。", "markup"),  # a formula changed
        ("共 {glue:text}`n:,` 个词元，长度为 $T$，见 ids。", "markup"),  # a code span dropped
        ("共 {glue:text}`n:,` 个令牌，长度为 $T$，见 `ids`。", "glossary"),  # the other rendering
        ("共 {glue:text}`n:,` 个单位，长度为 $T$，见 `ids`。", "glossary"),  # the term not rendered
        ("共 {glue:text}`n:,` 个词元，长度为 $T$，见 `ids`，共 1,024 个。", "numbers"),  # a number added
        ("There are {glue:text}`n:,` **tokens**. Each of them has length $T$, in `ids`.", "untranslated"),
        ("共 {glue:text}`n:,` 个**词元。**每个长度为 $T$，见 `ids`。", "markup"),  # bold that does not close
    ],
)
def test_a_translation_that_departs_from_its_source_is_caught(chinese, kind):
    english = "There are {glue:text}`n:,` **tokens**. Each of them has length $T$, in `ids`."
    kinds = {k for k, _ in i18n.translation_problems(english, chinese, _TERMS)}
    assert kinds == ({kind} if kind else set()) or (kind == "untranslated" and kinds == {kind, "glossary"})


def test_a_cross_reference_may_translate_its_title_but_not_its_target():
    english = "Work in the {download}`blank notebook <01_tokenization.ipynb>` and see {doc}`02_embeddings`."
    ok = "在{download}`空白笔记本 <01_tokenization.ipynb>`中完成，并参见 {doc}`02_embeddings`。"
    moved = "在{download}`空白笔记本 <02_embeddings.ipynb>`中完成，并参见 {doc}`02_embeddings`。"
    assert i18n.translation_problems(english, ok, []) == []
    assert [k for k, _ in i18n.translation_problems(english, moved, [])] == ["markup"]


def _tiny_book(tmp_path: Path) -> Path:
    """A book of one notebook page, the real glossary, and the site strings of the real config."""
    root = tmp_path / "book"
    (root / "chapters").mkdir(parents=True)
    (root / "chapters" / i18n.SUBDIR).mkdir()
    shutil.copy(ROOT / i18n.GLOSSARY, root / i18n.GLOSSARY)
    (root / "_toc.yml").write_text("format: jb-book\nroot: chapters/page\n")
    config = {
        "title": "A title",
        "html": {"extra_footer": "A footer"},
        "execute": {"execute_notebooks": "cache"},
    }
    (root / "_config.yml").write_text(yaml.safe_dump({**config, "sphinx": {"config": {}}}))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 1. Tokens\n\nEach token is an id: {glue:text}`n`."),
        nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output("stream", text="1\n")]),
    ]
    nbformat.write(nb, root / "chapters" / "page.ipynb")
    return root


def test_an_edited_english_paragraph_makes_its_translation_stale(tmp_path):
    root = _tiny_book(tmp_path)
    i18n.update(root)
    catalog = Path("chapters") / i18n.SUBDIR / "page.po"
    assert {p.kind for p in i18n.problems(catalog, root)} == {"missing"}
    i18n.put(catalog, "=== 0\n# 1. 词元\n\n=== 1\n每个词元都是一个 id：{glue:text}`n`。\n", root)
    book = Path("chapters") / i18n.SUBDIR / "book.po"
    i18n.put(book, "=== 0\n一个标题\n=== 1\n一个页脚\n", root)
    assert i18n.problems(catalog, root) == [] and i18n.problems(book, root) == []

    nb = nbformat.read(root / "chapters" / "page.ipynb", as_version=4)
    nb.cells[0].source = "# 1. Tokens\n\nEach token is an integer id: {glue:text}`n`."
    nbformat.write(nb, root / "chapters" / "page.ipynb")
    assert [p.kind for p in i18n.problems(catalog, root)] == ["missing", "stale"]
    i18n.update(root)  # the old translation is kept beside the new English, marked fuzzy
    [stale] = i18n.problems(catalog, root)
    assert stale.kind == "stale" and "integer id" in stale.english
    current, _ = i18n.read_catalog(root / catalog)
    assert current[stale.english].previous == "Each token is an id: {glue:text}`n`."
    i18n.put(catalog, "=== 1\n每个词元都是一个整数 id：{glue:text}`n`。\n", root)
    assert i18n.problems(catalog, root) == []


def test_the_chinese_notebook_is_the_english_one_with_only_its_prose_replaced(tmp_path):
    root = _tiny_book(tmp_path)
    i18n.update(root)
    catalog = Path("chapters") / i18n.SUBDIR / "page.po"
    i18n.put(catalog, "=== 0\n# 1. 词元\n\n=== 1\n每个词元都是一个 id：{glue:text}`n`。\n", root)
    missing = i18n.stage(tmp_path / "zh", outputs="saved", root=root)
    assert missing == ["A title", "A footer"]  # the site strings have no translation in this book
    english = nbformat.read(root / "chapters" / "page.ipynb", as_version=4)
    chinese = nbformat.read(tmp_path / "zh" / "chapters" / "page.ipynb", as_version=4)
    assert [c.cell_type for c in chinese.cells] == [c.cell_type for c in english.cells]
    assert chinese.cells[1] == english.cells[1]  # code and outputs untouched
    assert chinese.cells[0].source.startswith("# 1. 词元\n\n每个词元都是一个 id")
    config = (tmp_path / "zh" / "_config.yml").read_text()
    assert "execute_notebooks: 'off'" in config or "execute_notebooks: off" in config


def test_put_refuses_a_message_number_the_catalog_does_not_have(tmp_path):
    root = _tiny_book(tmp_path)
    i18n.update(root)
    with pytest.raises(ValueError, match="messages 0..1, not 7"):
        i18n.put(Path("chapters") / i18n.SUBDIR / "page.po", "=== 7\n多余\n", root)
