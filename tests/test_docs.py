"""The documents (README.md and docs/*.md) say what the code does: their code blocks run.

Every fenced block (```lang … ```) of the documents is found and checked by its language:

* ``python``: executed, one test per block, in the order of the document. **Each block
  runs in a fresh namespace** (``__name__ == "__main__"``), so every block must be
  complete in itself: a reader can copy any one of them. The working directory is a fresh
  temporary folder per block. Under ``mpiexec`` every rank runs every block (the blocks
  use MPI.COMM_WORLD collectively); after a block the ranks agree on whether it failed, so
  all of them fail together, and a rank whose block failed while another one waits in a
  collective call aborts the job after :data:`ABORT_AFTER_S` seconds instead of hanging.
  Tracebacks point at the document's own line numbers.
* ``bash``: each command line (backslash continuations joined, comments and blank lines
  skipped) runs in a subprocess with bash, cwd = the repository root, ``.venv/bin`` first
  on PATH, within :data:`SHELL_TIMEOUT_S`, on rank 0 only, outside any MPI job (the
  environment variables by which a process manager marks a rank are dropped, so that an
  ``mpiexec`` inside the line starts a job of its own). A line starting with ``make`` is
  not run: its targets must be rules of the Makefile.
* ``toml``: parsed with tomllib; a training configuration (one with a ``[data]`` table)
  must also be accepted by :class:`~neuroscale_coupling.training.config.TrainConfig`.
* ``text``: output or listings; not run.
* any other language (or none) is refused, so that no command is shown without being run.

Besides, the documents hold no web links (http/https), no reference to files outside the
repository (``../shared``, DESIGN.md) and no issue numbers; their relative links and the
repository paths they name (``examples/…py``, ``docs/…md``) exist; every dotted name
``neuroscale_coupling.x.y`` they mention imports; and ``neuroscale --help`` (with each
command's help) holds no reStructuredText markup. Failure messages name the document
and the line of the block.
"""

import contextlib
import importlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "toml", "text")
SHELL_TIMEOUT_S = 300
#: A rank whose block failed waits this long for the others before aborting the MPI job.
ABORT_AFTER_S = 120

#: Prefixes of the environment variables by which an MPI process manager (MPICH's Hydra:
#: PMI_*, HYDRA_*, HYDI_*, MPI_LOCALNRANKS, MPI_LOCALRANKID; PMIx, Open MPI, PRRTE) tells a
#: process that it is a rank of a job: a shell line started from a rank must see none.
_MPI_JOB_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCAL", "OMPI_", "PRTE_")

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
_FORBIDDEN = (
    (re.compile(r"https?://", re.I), "a web link"),
    (re.compile(r"DESIGN\.md"), "a reference to DESIGN.md"),
    (re.compile(r"\.\./shared"), "a path outside the repository (../shared)"),
    (re.compile(r"\bissues?[- ]?#?\d", re.I), "an issue number"),
    (re.compile(r"(?:^|\s)#\d+(?![\w-])"), "an issue number (#N)"),
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:neuroscale_coupling|examples|benchmarks|tools|tests|docs)/[\w./-]*"
    r"\.(?:py|toml|md|sh))\b"
)
_DOTTED = re.compile(r"\bneuroscale_coupling(?:\.[A-Za-z_]\w*)+")
_RST = re.compile(r"``|:(?:mod|func|class|meth|attr|data|exc|obj|ref):`")


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # line of the opening fence (1-based)
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line} ({self.language} block)"


def blocks_of(document: Path) -> list[Block]:
    """The fenced code blocks of a Markdown document, in order."""
    out: list[Block] = []
    lines = document.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language = m.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{document.relative_to(ROOT)}:{start}: unclosed code fence")
        out.append(Block(document, start, language, "\n".join(body) + "\n"))
        i += 1
    return out


ALL_BLOCKS = [b for d in DOCUMENTS for b in blocks_of(d)]


def _ids(blocks: list[Block]) -> list[str]:
    return [f"{b.document.relative_to(ROOT)}:{b.line}" for b in blocks]


def _of(language: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.language == language]


# ------------------------------------------------------------------------ the documents
def test_the_documents_exist():
    names = {d.relative_to(ROOT).as_posix() for d in DOCUMENTS}
    assert {"README.md", "docs/design.md", "docs/training.md", "docs/results.md"} <= names


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), "README.md: the first line is the title"
    head = [line for line in lines[1:8] if line.strip()]
    assert head[:4] == [
        "```bash",
        "make run    # creates .venv (Python 3.12), installs everything, runs the main job",
        "make test   # the whole test suite, serially and then under mpiexec -n 2 (builds "
        ".venv if missing)",
        "```",
    ], "README.md: the title must be followed by the make run / make test block"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=_ids(ALL_BLOCKS))
def test_block_language_is_known(block):
    assert block.language in LANGUAGES, (
        f"{block.where}: fenced blocks must be one of {LANGUAGES} (python and bash are run, "
        "toml parsed, text shown as it is)"
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_no_outside_references_or_issue_numbers(document):
    problems = []
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
        for pattern, what in _FORBIDDEN:
            if m := pattern.search(line):
                problems.append(f"{document.relative_to(ROOT)}:{number}: {what}: {m.group(0)!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_links_and_repository_paths_exist(document):
    missing = []
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
        for target in dict.fromkeys(_LINK.findall(line)):
            path, _, anchor = target.partition("#")
            linked = document.parent / path if path else document
            if not linked.exists():
                missing.append(f"{document.relative_to(ROOT)}:{number}: link to {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                missing.append(
                    f"{document.relative_to(ROOT)}:{number}: no heading #{anchor} in {path or 'it'}"
                )
        for path in dict.fromkeys(_REPO_PATH.findall(line)):
            if not (ROOT / path).exists():
                missing.append(f"{document.relative_to(ROOT)}:{number}: no file {path}")
    assert not missing, "\n".join(missing)


def _anchors(document: Path) -> set[str]:
    """The anchors of a Markdown document's headings, as GitHub makes them (lower case,
    punctuation dropped, spaces to hyphens)."""
    out = set()
    for block_free in _prose_lines(document):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", block_free):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-"))
    return out


def _prose_lines(document: Path) -> list[str]:
    """The lines of a document outside its fenced code blocks."""
    lines, inside = [], False
    for line in document.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def _resolve(dotted: str) -> None:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for name in parts[k:]:
            obj = getattr(obj, name)
        return
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_named_modules_and_objects_exist(document):
    """Every ``neuroscale_coupling.a.b.C`` a document names is importable (the package was
    rearranged once: this keeps the documents on the current module paths)."""
    stale = []
    for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
        for dotted in _DOTTED.findall(line):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError) as exc:
                stale.append(f"{document.relative_to(ROOT)}:{number}: {dotted} ({exc})")
    assert not stale, "\n".join(stale)


def test_cli_help_has_no_restructuredtext(capsys):
    from neuroscale_coupling.cli import main

    found = []
    for argv in (["--help"], ["homogenize", "--help"], ["train", "--help"], ["evaluate", "-h"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "usage: neuroscale" in text
        found += [f"neuroscale {' '.join(argv)}: {line.strip()!r}" for line in text.splitlines()
                  if _RST.search(line)]  # fmt: skip
    assert not found, "reStructuredText markup in the help:\n" + "\n".join(found)


# ------------------------------------------------------------------------ toml blocks
@pytest.mark.parametrize("block", _of("toml"), ids=_ids(_of("toml")))
def test_toml_block_parses(block, tmp_path):
    try:
        data = tomllib.loads(block.code)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where}: not valid TOML: {exc}", pytrace=False)
    if "data" in data:  # a training configuration
        from neuroscale_coupling.training.config import TrainConfig

        try:
            TrainConfig.from_dict(data, base=tmp_path)
        except (ValueError, TypeError) as exc:
            pytest.fail(f"{block.where}: not a valid training config: {exc}", pytrace=False)


# ------------------------------------------------------------------------ bash blocks
def _command_lines(block: Block) -> list[tuple[int, str]]:
    """(document line, command) for every command of a bash block."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(block.code.splitlines(), 1):
        if not pending:
            first = block.line + offset
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            out.append((first, command))
    assert not pending, f"{block.where}: the last line ends with a backslash"
    return out


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def _shell_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_JOB_PREFIXES)}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.parametrize("block", _of("bash"), ids=_ids(_of("bash")))
def test_bash_block_runs(block):
    targets = _make_targets()
    commands = _command_lines(block)
    assert commands, f"{block.where}: empty bash block"
    for line, command in commands:
        if command.split()[0] == "make":
            words = shlex.split(command, comments=True)[1:]
            wanted = [w for w in words if not w.startswith("-") and "=" not in w]
            unknown = [t for t in wanted if t not in targets]
            assert not unknown, (
                f"{block.document.relative_to(ROOT)}:{line}: make target(s) {unknown} are not "
                f"rules of the Makefile (it has {sorted(targets)})"
            )
            continue
        if MPI.COMM_WORLD.rank != 0:
            continue
        try:
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=_shell_environment(),
                capture_output=True,
                text=True,
                timeout=SHELL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{block.document.relative_to(ROOT)}:{line}: `{command}` ran past "
                f"{SHELL_TIMEOUT_S} s",
                pytrace=False,
            )
        if result.returncode != 0:
            pytest.fail(
                f"{block.document.relative_to(ROOT)}:{line}: `{command}` exited with status "
                f"{result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
                f"--- stderr ---\n{result.stderr[-4000:]}",
                pytrace=False,
            )


# ------------------------------------------------------------------------ python blocks
def _abort(comm: MPI.Comm, where: str, message: str) -> None:
    sys.stderr.write(
        f"\n{where} failed on rank {comm.rank} while another rank did not finish it within "
        f"{ABORT_AFTER_S} s (probably waiting in a collective call); aborting:\n{message}\n"
    )
    sys.stderr.flush()
    comm.Abort(1)


@contextlib.contextmanager
def _in_temporary_folder():
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="docs_snippet_") as folder:
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(previous)


@pytest.mark.parametrize("block", _of("python"), ids=_ids(_of("python")))
def test_python_block_runs(block):
    comm = MPI.COMM_WORLD
    # padded so that tracebacks show the document's own line numbers
    source = "\n" * block.line + block.code
    code = compile(source, str(block.document), "exec")
    namespace = {"__name__": "__main__", "__file__": str(block.document)}
    error = None
    t0 = time.perf_counter()
    with _in_temporary_folder():
        try:
            exec(code, namespace)
        except Exception:
            error = traceback.format_exc(limit=-8)
    seconds = time.perf_counter() - t0
    timer = None
    if error is not None and comm.size > 1:
        timer = threading.Timer(ABORT_AFTER_S, _abort, args=(comm, block.where, error))
        timer.daemon = True
        timer.start()
    errors = comm.allgather(error)
    if timer is not None:
        timer.cancel()
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        detail = "\n".join(f"--- rank {rank} ---\n{e}" for rank, e in failed)
        pytest.fail(f"{block.where} failed after {seconds:.1f} s:\n{detail}", pytrace=False)
