"""The documentation stands alone and says only what exists.

For every Markdown page of ``docs/`` and the README:

- every relative link (and image) points to a file of the repository, and an ``#anchor`` to a
  heading of its page (GitHub's heading ids); no link or path leads outside the repository;
- every ``grapes-dask COMMAND ... --option`` written in code (fenced blocks and inline spans)
  is an option of that command's ``--help``, and an inline span holding only options names
  options of some command;
- every dotted name ``grapes_dask.module.name`` resolves to an object of the package;
- the user guide mentions every option of ``analyze``, ``operando`` and ``report`` and every
  parameter of :func:`grapes_dask.table.analyze` and :func:`grapes_dask.track.track`.

The checkers are plain functions, tested first on crafted pages that must fail them. The help
texts are read in-process with click's test runner (fast: no subprocess).
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
GUIDE = ROOT / "docs" / "guide.md"

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?\s*$", re.M)
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_DOTTED = re.compile(r"(?<![\w/.])grapes_dask(?:\.[A-Za-z_]\w*)+")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


# --------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(prose lines with code blocks blanked, the lines of every fenced code block)."""
    prose, blocks, current = [], [], None
    for line in text.splitlines():
        if _FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
            prose.append("")
            continue
        if current is not None:
            current.append(line)
            prose.append("")
        else:
            prose.append(line)
    if current is not None:
        blocks.append(current)
    return prose, blocks


def inline_spans(prose_lines: list[str]) -> list[str]:
    return [m.group(2).strip() for line in prose_lines for m in _INLINE.finditer(line)]


def links(text: str) -> list[str]:
    """Link and image targets of the prose (not of code)."""
    prose, _ = split_fences(text)
    body = "\n".join(_INLINE.sub("", line) for line in prose)
    return _LINK.findall(body) + _REFDEF.findall(body)


def slug(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Links of `page` that lead nowhere or outside `root`."""
    text = page.read_text()
    bad = []
    for target in links(text):
        if not target:
            bad.append("an empty link target")
            continue
        if _SCHEME.match(target):
            if target.lower().startswith("file:"):
                bad.append(f"{target}: a local file, outside the repository")
            continue  # web links are not checked here
        path, _, anchor = target.partition("#")
        if path.startswith("/"):
            bad.append(f"{target}: an absolute path, outside the repository")
            continue
        dest = (page.parent / path).resolve() if path else page.resolve()
        try:
            dest.relative_to(root.resolve())
        except ValueError:
            bad.append(f"{target}: leads outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file in the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def invocations(text: str) -> list[str]:
    """Every ``grapes-dask ...`` command line written in code: fenced blocks (with ``\\``
    continuations and the README's indented ``[--option]`` continuation lines) and inline spans."""
    prose, blocks = split_fences(text)
    out = []
    for block in blocks:
        current = None
        for line in block:
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:].lstrip()
            if stripped.startswith("grapes-dask ") or stripped == "grapes-dask":
                if current is not None:
                    out.append(current)
                current = stripped
            elif current is not None and (current.endswith("\\") or (
                    line[:1].isspace() and stripped.startswith(("[", "--")))):
                current = current.rstrip("\\") + " " + stripped
            else:
                if current is not None:
                    out.append(current)
                current = None
        if current is not None:
            out.append(current)
    out += [s for s in inline_spans(prose) if s.startswith("grapes-dask ")]
    return out


def option_only_spans(text: str) -> list[str]:
    prose, _ = split_fences(text)
    return [s for s in inline_spans(prose) if s.startswith("--")]


def parse_invocation(line: str) -> tuple[str | None, list[str]]:
    """(command, options) of ``grapes-dask [-v] COMMAND ARGS...``."""
    words = line.split()[1:]
    while words and words[0] in ("-v", "--verbose"):
        words = words[1:]
    if not words:
        return None, []
    return words[0], _OPTION.findall(" ".join(words[1:]))


# --------------------------------------------------------------------------------------------
# the package
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def commands() -> tuple[str, ...]:
    from grapes_dask.cli import cli

    return tuple(sorted(cli.commands))


@lru_cache(maxsize=None)
def help_options(command: str | None) -> frozenset:
    """Options shown by ``grapes-dask [COMMAND] --help``."""
    from grapes_dask.cli import cli

    args = ([command] if command else []) + ["--help"]
    res = CliRunner().invoke(cli, args, prog_name="grapes-dask")
    assert res.exit_code == 0, res.output
    return frozenset(_OPTION.findall(res.output))


def cli_problems(text: str) -> list[str]:
    bad = []
    known = commands()
    for line in invocations(text):
        cmd, opts = parse_invocation(line)
        if cmd is None:
            continue
        if cmd.startswith("-"):
            opts = [cmd] + opts
            cmd = None
        elif cmd not in known:
            bad.append(f"{line!r}: no command {cmd!r} (commands: {', '.join(known)})")
            continue
        allowed = help_options(cmd) | help_options(None)
        bad += [f"{line!r}: {o} is not in 'grapes-dask {cmd or ''} --help'" for o in opts if o not in allowed]
    every = frozenset().union(*(help_options(c) for c in known)) | help_options(None)
    for span in option_only_spans(text):
        bad += [f"`{span}`: {o} is an option of no command" for o in _OPTION.findall(span) if o not in every]
    return bad


def resolve(dotted: str):
    """The object a dotted name names, importing modules as needed (raises if none)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


def name_problems(text: str) -> list[str]:
    bad = []
    for dotted in sorted(set(_DOTTED.findall(text))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as exc:
            bad.append(f"{dotted}: {type(exc).__name__}: {exc}")
    return bad


# --------------------------------------------------------------------------------------------
# the checkers catch what they should
# --------------------------------------------------------------------------------------------


def test_checkers_on_crafted_pages(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## The z-test (eq. 6)\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# A page\n\n"
        "[ok](other.md) [ok anchor](other.md#the-z-test-eq-6) [self](#a-page) [web](https://example.org)\n"
        "[missing](nothere.md) [bad anchor](other.md#nope) [up](../../outside.md) [abs](/work/x.md)\n"
        "`[not a link](nowhere.md)`\n\n"
        "```\n[in code](nowhere.md)\n$ grapes-dask analyze g l --out t.parquet --no-such-option \\\n"
        "      --exclude-outer-layers 5 --also-wrong\nerror: pass --not-checked-in-output\n```\n\n"
        "Run `grapes-dask operando --state a=g,l --drop-smallest 0.2 --bogus` or `grapes-dask analyse x`.\n"
        "Inline `--memory-limit 8GiB` and `--made-up`; `grapes_dask.stats.z_test`, `grapes_dask.stats.nope`, "
        "`grapes_dask.nomodule.x`, `grapes_dask.track.Tracking.summary`.\n"
    )
    problems = link_problems(page, root=tmp_path)
    assert len(problems) == 4, problems
    assert any("nothere.md" in p for p in problems)
    assert any("#nope" in p for p in problems)
    assert any("outside the repository" in p and "../../outside.md" in p for p in problems)
    assert any("/work/x.md" in p for p in problems)

    text = page.read_text()
    assert len(invocations(text)) == 3  # the fenced one with its continuation, two inline
    cli = cli_problems(text)
    assert sorted(p.split(": ", 1)[1] for p in cli) == sorted([
        "--no-such-option is not in 'grapes-dask analyze --help'",
        "--also-wrong is not in 'grapes-dask analyze --help'",
        "--bogus is not in 'grapes-dask operando --help'",
        "no command 'analyse' (commands: " + ", ".join(commands()) + ")",
        "--made-up is an option of no command",
    ]), cli

    names = name_problems(text)
    assert [n.split(":")[0] for n in names] == ["grapes_dask.nomodule.x", "grapes_dask.stats.nope"], names


def test_readme_synopsis_continuations_are_parsed():
    text = "```\ngrapes-dask analyze GREY LABELS --out t.parquet [--spacing S]\n        [--layer-width W] [--bad]\n```\n"
    (line,) = invocations(text)
    assert parse_invocation(line) == ("analyze", ["--out", "--spacing", "--layer-width", "--bad"])


def test_slugs_as_github():
    assert slug("4. Operando: the same particles through states (case study 2)") == \
        "4-operando-the-same-particles-through-states-case-study-2"
    assert slug("Operando cleaning rules (paper 2.4)") == "operando-cleaning-rules-paper-24"
    assert slug("The `normalise` choices") == "the-normalise-choices"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


# --------------------------------------------------------------------------------------------
# the repository's pages
# --------------------------------------------------------------------------------------------


def _id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_pages_found():
    assert GUIDE in PAGES and (ROOT / "docs" / "statistics.md") in PAGES


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_links_stay_in_the_repository(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_no_path_outside_the_repository(page):
    text = page.read_text()
    for needle in ("/work/", "../shared", "file://"):
        assert needle not in text, f"{page.name} mentions {needle!r}: the repository must stand alone"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_cli_options_exist(page):
    assert cli_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_api_names_exist(page):
    assert name_problems(page.read_text()) == []


def test_guide_uses_the_commands():
    used = {parse_invocation(line)[0] for line in invocations(GUIDE.read_text())}
    assert {"analyze", "operando", "report", "synth", "convert", "demo", "info"} <= used


@pytest.mark.parametrize("command", ["analyze", "operando", "report"])
def test_guide_mentions_every_option(command):
    text = GUIDE.read_text()
    missing = sorted(o for o in help_options(command) - {"--help", "--verbose"}
                     if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert missing == [], f"docs/guide.md does not mention {missing} of 'grapes-dask {command}'"


@pytest.mark.parametrize("func", ["grapes_dask.table.analyze", "grapes_dask.track.track"])
def test_guide_mentions_every_parameter(func):
    text = GUIDE.read_text()
    params = inspect.signature(resolve(func)).parameters
    missing = sorted(p for p, v in params.items()
                     if v.kind is not inspect.Parameter.VAR_KEYWORD and f"`{p}`" not in text)
    assert missing == [], f"docs/guide.md does not mention the parameters {missing} of {func}"


def test_guide_plotting_names_exist():
    plotting = importlib.import_module("grapes_dask.plotting")
    names = set(re.findall(r"\b(plot_\w+)\(?", GUIDE.read_text()))
    assert names, "the guide names no figure function"
    assert sorted(n for n in names if not hasattr(plotting, n)) == []
