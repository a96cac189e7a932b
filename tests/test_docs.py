"""Every pointer in the README and docs/ resolves inside the repo: relative links (and their anchors),
backticked repo paths, and the docs/ and params/ files the package's comments and docstrings name.
The README stays short, and nothing points at a reference file outside the repo."""

import ast
import io
import os
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

README_MAX_LINES = 200
# Backticked paths checked: under these folders, or these top-level files. Other paths name what a run
# writes (results/demo/..., eval/..., study/...) and are not in the repo.
REPO_PREFIXES = (
    "params/",
    "saets_utils/",
    "notebooks/",
    "tests/",
    "benchmarks/",
    "docs/",
    "results/published/",
    ".ci/",
)
TOP_LEVEL_FILES = {
    "Makefile",
    "environment.yml",
    "pyproject.toml",
    "LICENSE",
    "CITATION.cff",
    "README.md",
    ".pre-commit-config.yaml",
}
SUBPACKAGES = {p.parent.name for p in (ROOT / "saets_utils").glob("*/__init__.py")}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".cfg", ".txt", ".sh", ""}
PLACEHOLDER = re.compile(r"[<>{}*$]")  # results/<run>/, params/study/pilot_*.yaml, $SAETS_CACHE

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # a span may wrap, but not across paragraphs
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(md: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", md.read_text()))


def _code_paths(md: Path) -> list[str]:
    """Repo paths written in backticks, in code spans and in fenced blocks (split into words)."""
    text = md.read_text()
    words = [w for block in FENCE.findall(text) for w in block.split()]
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        words += span.split()
    paths = []
    for w in words:
        w = w.strip("()[],;:'\"").split("::", 1)[0]  # tests/x.py::test_name -> tests/x.py
        if not w or PLACEHOLDER.search(w) or "://" in w:
            continue
        if w.startswith(REPO_PREFIXES) or w in TOP_LEVEL_FILES:
            paths.append(w)
        elif w.split("/", 1)[0] in SUBPACKAGES and w.endswith(".py"):  # evaluation/methods.py
            paths.append(f"saets_utils/{w}")
    return paths


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_relative_links_resolve():
    missing = []
    for md in DOCS:
        for target in _links(md):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                missing.append(f"{_rel(md)}: [..]({target}) -> {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                missing.append(f"{_rel(md)}: [..]({target}) -> no heading with anchor #{anchor} in {_rel(dest)}")
    assert not missing, "broken links:\n" + "\n".join(missing)


def test_backticked_repo_paths_exist():
    missing = [f"{_rel(md)}: `{p}`" for md in DOCS for p in _code_paths(md) if not (ROOT / p).exists()]
    assert not missing, "backticked paths that are not in the repo:\n" + "\n".join(missing)


def _comments_and_docstrings(source: str) -> list[str]:
    texts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append(doc)
    return texts


def test_package_comments_name_existing_docs_and_params():
    pattern = re.compile(r"(?<![\w/.<{-])((?:docs/[\w./-]+\.md)|(?:params/[\w./-]+\.yaml))\b")
    missing = []
    for py in sorted((ROOT / "saets_utils").rglob("*.py")):
        for text in _comments_and_docstrings(py.read_text()):
            missing += [f"{_rel(py)}: {p}" for p in pattern.findall(text) if not (ROOT / p).exists()]
    assert not missing, "files named in comments or docstrings that do not exist:\n" + "\n".join(missing)


def _repo_text_files() -> list[Path]:
    """The repo's own text files, outside docs/, run outputs, caches and environments."""
    skip = {"node_modules", "__pycache__"}
    out = []
    for folder, dirs, files in os.walk(ROOT):
        top = Path(folder) == ROOT
        dirs[:] = [
            d
            for d in dirs
            if d not in skip
            and not (top and d in {"docs", "results"})
            and not d.endswith(".egg-info")
            and (d in {".ci", ".github"} or not d.startswith("."))
        ]
        out += [Path(folder) / f for f in files if Path(f).suffix in TEXT_SUFFIXES]
    return sorted(out)


def test_no_pointer_to_a_reference_file_outside_the_repo():
    """The reference facts live in docs/reference.md; a bare REFERENCE.md is a file readers do not have."""
    found = []
    for path in _repo_text_files():
        if path == Path(__file__).resolve():
            continue
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        found += [f"{_rel(path)}:{i}" for i, line in enumerate(lines, 1) if "REFERENCE.md" in line]
    assert not found, "pointers to REFERENCE.md (point to docs/reference.md instead):\n" + "\n".join(found)
