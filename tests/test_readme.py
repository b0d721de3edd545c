"""The README runs as written, and the documentation's links lead somewhere.

Every ```python block of README.md runs as a script, and every line of every ```bash block runs as a shell
command, in document order, in one temporary working folder, with the interpreter and console scripts of the
environment running the tests (``mone-export`` and ``python`` resolve to its ``bin/``). Each must exit 0.

Tested by default, skipped only where the README says so:

- a ``<!-- test: skip REASON -->`` comment right before a block skips the whole block (the test shows REASON);
- in bash blocks, environment set-up lines are not run: creating or activating a virtual environment and
  ``pip`` (they need the network, and the tests already run in an installed environment).

After a block has run, what it promises must exist: for every ``mone-export`` line with ``-o OUT``, the output
folder with the files the README lists (export) or the pruned checkpoint and its plan (prune), and the files
named in a ``<!-- test: expect PATH ... -->`` comment before the block.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
TIMEOUT = 600

BLOCK = re.compile(r"((?:^<!--.*?-->\n)*)^```(\w*)\n(.*?)^```", re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*test:\s*(skip|expect)\b(.*?)-->", re.S)
SETUP_LINE = re.compile(r"^(pip3?\s|python3?\s+-m\s+(venv|pip)\s|\.\s|source\s)")

# What README.md says an export folder holds (tokenizer files: the bundled models have one).
EXPORT_FILES = ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "genai_config.json",
                "mone_export.json", "plan/plan.json", "plan/novices.safetensors", "report.json", "report.md",
                "experts.png")
PRUNE_FILES = ("config.json", "plan/plan.json", "plan/novices.safetensors", "report.json")


@dataclasses.dataclass
class Block:
    index: int
    line: int
    language: str
    code: str
    skip: str | None
    expect: list[str]

    @property
    def id(self) -> str:
        return f"{self.language}-block-{self.index}-line-{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The ```python and ```bash blocks of a markdown text, with their ``<!-- test: ... -->`` directives."""
    blocks = []
    for match in BLOCK.finditer(text):
        comments, language, code = match.group(1), match.group(2), match.group(3)
        if language not in ("python", "bash"):
            continue
        skip, expect = None, []
        for kind, argument in DIRECTIVE.findall(comments):
            if kind == "skip":
                skip = argument.strip() or "marked skip in README.md"
            else:
                expect += argument.split()
        line = text.count("\n", 0, match.start(2)) + 1
        blocks.append(Block(len(blocks) + 1, line, language, code, skip, expect))
    return blocks


def shell_lines(code: str) -> list[str]:
    """The commands of a bash block: comment-only, blank and set-up lines dropped."""
    commands = []
    for raw in code.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or SETUP_LINE.match(line):
            continue
        commands.append(line)
    return commands


def promised_files(command: str) -> list[str]:
    """The files a ``mone-export`` command line promises (relative to the working folder)."""
    words = shlex.split(command, comments=True)
    if not words or words[0] != "mone-export":
        return []
    sub = words[1] if len(words) > 1 and not words[1].startswith("-") else "export"
    out = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-o", "--output")), None)
    if out is None or sub == "validate":
        return []
    folder = str(Path(out).parent) if out.endswith(".onnx") else out.rstrip("/")
    if sub == "export":
        return [f"{folder}/{name}" for name in EXPORT_FILES]
    if sub == "prune":
        return [f"{folder}/{name}" for name in PRUNE_FILES]
    return [folder]


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    env["MONE_EXPORT_LOG_DIR"] = str(workdir / "crash-logs")
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    return env


def _run(args, workdir: Path, what: str, shell: bool = False) -> None:
    done = subprocess.run(args, cwd=workdir, env=_env(workdir), shell=shell, executable="/bin/bash" if shell else None,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, (f"README {what} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
                                  f"--- stderr\n{done.stderr[-4000:]}")


def run_block(block: Block, workdir: Path) -> None:
    """Run one block in ``workdir`` and check the files it promises."""
    expected = list(block.expect)
    if block.language == "python":
        script = workdir / f"readme_block_{block.index}.py"
        script.write_text(block.code)
        _run([sys.executable, str(script)], workdir, f"python block at line {block.line}")
    else:
        commands = shell_lines(block.code)
        assert commands, f"bash block at line {block.line} has nothing to run: mark it <!-- test: skip REASON -->"
        for command in commands:
            _run(command, workdir, f"line {command!r} (block at line {block.line})", shell=True)
            expected += promised_files(command)
    missing = [path for path in expected if not (workdir / path).exists()]
    assert not missing, f"README block at line {block.line} ran but did not write {missing}"


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Runs the README's blocks in order, in one folder, each once, up to the one a test asks for.

    Later blocks may use what earlier ones wrote (``out/`` of the quick start), so asking for block i first runs
    every earlier block that is not skipped; a failed block is reported by its own test, and by the later ones.
    """
    workdir = tmp_path_factory.mktemp("readme")
    results: dict[int, Exception | None] = {}

    def upto(block: Block) -> None:
        for earlier in BLOCKS[: block.index]:
            if earlier.skip or earlier.index in results:
                continue
            try:
                run_block(earlier, workdir)
                results[earlier.index] = None
            except Exception as exc:  # recorded, re-raised by the tests that need it
                results[earlier.index] = exc
        failed = [b for b in BLOCKS[: block.index - 1] if results.get(b.index) is not None]
        if results[block.index] is not None:
            raise results[block.index]
        if failed:
            pytest.fail(f"earlier README blocks failed: {[b.id for b in failed]}")

    return upto


def test_readme_has_runnable_blocks():
    assert any(b.language == "python" and not b.skip for b in BLOCKS)
    assert any(b.language == "bash" and not b.skip for b in BLOCKS)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.skip)] if b.skip
                                                else []) for b in BLOCKS])
def test_readme_block_runs(block, readme_run):
    readme_run(block)


def test_directive_parsing():
    text = ("<!-- test: skip needs a GPU -->\n```bash\nmone-export x\n```\n\n"
            "<!-- test: expect a/b c -->\n```python\nprint(1)\n```\n```\nnot run\n```\n")
    first, second = readme_blocks(text)
    assert (first.language, first.skip, first.expect) == ("bash", "needs a GPU", [])
    assert (second.language, second.skip, second.expect) == ("python", None, ["a/b", "c"])
    assert shell_lines("python3 -m venv .venv && . .venv/bin/activate\npip install -e .\n# note\nmone-export a") == [
        "mone-export a"]
    assert promised_files("mone-export --model m --ratio 0.5 -o out/model.onnx  # comment")[0] == "out/model.onnx"
    assert promised_files("mone-export validate out") == []


# --- links -------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
DOC_REFERENCE = re.compile(r"\bdocs/(\w+\.md)(?:#([\w-]+))?")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)  # a "# comment" in a code block is no heading
    for heading in re.findall(r"^#+\s+(.+?)\s*$", prose, re.M):
        text = re.sub(r"[`*]", "", heading).strip().lower()
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


def _check_target(source: Path, target: str) -> str | None:
    if re.match(r"^[a-z]+:", target):
        return None  # a URL
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
        return f"{source.name}: {target} (no such file)"
    if anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
        return f"{source.name}: {target} (no such heading)"
    return None


def test_documentation_links_resolve():
    """Relative links of README.md and docs/*.md name existing files and headings."""
    problems = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            problem = _check_target(page, target)
            if problem:
                problems.append(problem)
    assert not problems, problems


def test_code_cites_existing_documentation():
    """``docs/X.md#anchor`` in the package's docstrings and messages names an existing page and heading."""
    problems = []
    for source in [*sorted((ROOT / "mone_export").glob("*.py")), *sorted((ROOT / "graph_passes").glob("*.py"))]:
        for page, anchor in DOC_REFERENCE.findall(source.read_text(encoding="utf-8")):
            problem = _check_target(DOCS / "x.md", f"{page}#{anchor}" if anchor else page)
            if problem:
                problems.append(f"{source.relative_to(ROOT)} cites docs/{page}#{anchor}: {problem}")
    assert not problems, problems
