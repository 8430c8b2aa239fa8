"""The documentation stays true to the repository: its links resolve and its commands use real flags.

Every relative link and #anchor in README.md and docs/*.md must reach a file and a heading, and every
flag of a documented `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` command (in fenced code
blocks) must appear in that script's --help. The help is read in-process, not by starting scripts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
import unicodedata
from pathlib import Path

import pytest

from augment import AUGMENTATIONS, crop_source_size

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250  # a newcomer's five minutes; the rest lives in the guides under docs/

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
FLAG = re.compile(r"\[?(-{1,2}[A-Za-z][\w-]*)(?:=\S*)?\]?")
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")"}


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): lines inside fenced code blocks are code, the fences themselves neither."""
    prose, code, in_code = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        else:
            (code if in_code else prose).append(line)
    return prose, code


def heading_text(markdown: str) -> str:
    """A heading as GitHub renders it to text: code spans, links and emphasis reduced to their words."""
    text = re.sub(r"`([^`]*)`", r"\1", markdown)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "")


def slug(text: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation and symbols dropped (not - or _), spaces to -."""
    kept = (
        char for char in text.lower()
        if char in " -_" or unicodedata.category(char)[0] in "LM" or unicodedata.category(char) in ("Nd", "Nl")
    )
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file; a repeated slug gets -1, -2, ..."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(heading_text(match.group(1)))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(path: Path) -> list[str]:
    """The targets of a markdown file's links and images (Markdown and HTML), outside code."""
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    targets = []
    for line in prose:
        line = INLINE_CODE.sub("", line)
        targets += MARKDOWN_LINK.findall(line) + HTML_LINK.findall(line)
    return targets


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file, or whose #anchor in a markdown file, does not exist."""
    problems = []
    for target in link_targets(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ... are outside the repository
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: {file_part} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading of {linked.name} has the anchor #{anchor}")
    return problems


def commands(code_lines: list[str]) -> list[list[str]]:
    """Shell words of each command in code: continuation lines joined, prompts and comments dropped."""
    joined, pending = [], ""
    for line in code_lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    words = []
    for line in joined:
        line = re.sub(r"^\s*\$\s", "", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words.append(list(lexer))
        except ValueError:  # an unbalanced quote, as in program output: plain words still show any flags
            words.append(line.split())
    return words


def script_calls(words: list[str]) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` in one command."""
    calls = []
    for index, word in enumerate(words):
        launcher = words[index - 1] if index else ""
        by_python = launcher in ("python", "python3") and word.endswith(".py")
        by_torchrun = word.endswith(".py") and "torchrun" in words[:index]
        if by_python or by_torchrun:
            arguments = []
            for argument in words[index + 1:]:
                if argument in SHELL_SEPARATORS:
                    break
                arguments.append(argument)
            calls.append((word, arguments))
    return calls


def flags(arguments: list[str]) -> list[str]:
    """The flags among a command's arguments: `-e`, `--tta`, `[--tta]` (an optional one), `--x=1`."""
    found = []
    for argument in arguments:
        match = FLAG.fullmatch(argument)
        if match:
            found.append(match.group(1))
    return found


@functools.cache
def help_text(script: Path) -> str:
    """What `python SCRIPT --help` prints, from the script run in this process."""
    output = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [str(script), "--help"]
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    return output.getvalue()


def unknown_flags(path: Path) -> list[str]:
    """Flags of the documented commands in a markdown file that their script's --help does not list."""
    _, code = split_code(path.read_text(encoding="utf-8"))
    problems = []
    for words in commands(code):
        for script, arguments in script_calls(words):
            script_path = REPO_ROOT / script
            if not script_path.is_file():
                problems.append(f"{script}: no such script in the repository")
                continue
            listed = set(re.findall(r"(?<![\w-])-{1,2}[A-Za-z][\w-]*", help_text(script_path)))
            problems += [f"{script} {flag}: not in its --help" for flag in flags(arguments) if flag not in listed]
    return problems


def document_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.mark.parametrize("document", DOCUMENTS, ids=document_id)
def test_relative_links_and_anchors_resolve(document: Path) -> None:
    problems = broken_links(document)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=document_id)
def test_documented_commands_use_flags_their_script_has(document: Path) -> None:
    problems = unknown_flags(document)
    assert not problems, "commands with flags their script lacks:\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    lines = len((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into a guide under docs/"


def test_the_augmentation_table_of_recipe_md_is_what_the_presets_do() -> None:
    header = "| `--augment` | squashed to, at `--image-size 256` | then, in this order |"
    expected = [header, "|---|---|---|"]
    for name, preset in AUGMENTATIONS.items():
        side = crop_source_size(256, preset)
        expected.append(f"| `{name}` | {side}×{side} ({side / 256:.2f}×) | {preset.describe()} |")
    lines = (REPO_ROOT / "docs" / "recipe.md").read_text(encoding="utf-8").splitlines()
    assert header in lines, "docs/recipe.md lost its table of the --augment presets"
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = "\n".join(expected)
    assert lines[start:end] == expected, f"docs/recipe.md's table should say what the presets do:\n{table}"


def test_slugs_follow_github() -> None:
    assert slug(heading_text("Test-time augmentation (`--tta`)")) == "test-time-augmentation---tta"
    heading = "Comparing runs: the lab's figure and table"
    assert slug(heading_text(heading)) == "comparing-runs-the-labs-figure-and-table"
    assert slug(heading_text("Dice at 256×256, per_image")) == "dice-at-256256-per_image"


def test_checks_catch_a_wrong_link_anchor_and_flag(tmp_path: Path) -> None:
    (tmp_path / "guide.md").write_text("# Guide\n\n## Usage\n\n## Usage\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](guide.md#usage-1) [ok](#page) [web](https://example.org/x#y) `[code](not-a-link.md)`\n"
        "[gone](missing.md) [no anchor](guide.md#usage-2) <img src=\"missing.png\">\n\n"
        "```bash\n"
        "$ python src/train.py -e 3 \\\n"
        "    --epoch 3 && python src/compare.py a b [--bogus]   # --comment-flag is a comment\n"
        "torchrun --standalone --nproc_per_node=2 src/train.py --resume RUN --nproc_per_node=2\n"
        "python src/no_such_script.py\n"
        "```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md: missing.md does not exist",
        "guide.md#usage-2: no heading of guide.md has the anchor #usage-2",
        "missing.png: missing.png does not exist",
    ]
    assert unknown_flags(page) == [
        "src/train.py --epoch: not in its --help",
        "src/compare.py --bogus: not in its --help",
        "src/train.py --nproc_per_node: not in its --help",
        "src/no_such_script.py: no such script in the repository",
    ]
