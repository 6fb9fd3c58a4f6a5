"""The docs tell the truth: their commands run, their Python runs, their references match the code.

Every ```bash and ```python block of README.md and docs/ runs here (tests/docs/ has the
machinery), in a workspace holding the files the docs name; a block marked
``<!-- not-run: REASON -->`` is parsed instead and listed, a ``<!-- synopsis -->`` has its
options checked. The CLI and API references are compared with the parser and with
``xattn_compiler.__all__`` in both directions; sample outputs are compared with what the
commands print today.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xattn_compiler as xc
from xattn_compiler.cli import build_parser, main
from xattn_compiler.examples import example_path

from .docs import workspace
from .docs.blocks import ROOT, blocks, doc_files
from .docs.commands import commands, kept_logging, subcommand_parsers
from .docs.run import check_block

DOCS = ROOT / "docs"


def code_blocks(path: Path, language: str) -> list[str]:
    return [block.text for block in blocks(path, language)]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="session")
def doc_files_template(tmp_path_factory) -> Path:
    return workspace.build(tmp_path_factory.mktemp("doc-workspace"))


# --- every block -----------------------------------------------------------------------------

@pytest.mark.parametrize("page", doc_files(), ids=page_id)
def test_the_page_runs(page, doc_files_template, tmp_path, monkeypatch):
    """Each block in document order, in a fresh workspace: shell commands exit 0, Python runs."""
    monkeypatch.chdir(workspace.copy(doc_files_template, tmp_path / "work"))
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        check_block(block, namespace)


def test_blocks_not_run_say_why():
    """The inventory of what the tests do not run, each with its reason."""
    skipped = [b for page in doc_files() for b in blocks(page) if b.not_run is not None]
    for block in skipped:
        assert block.not_run, f"{block.where}: a not-run marker needs a reason"
        assert block.language in ("bash", "python"), f"{block.where}: only code blocks run"
        print(f"{block.where}: not run: {block.not_run}")
    assert len(skipped) < 15, "most blocks should run; a new marker needs a good reason"


def test_markers_are_spelled_right():
    marker = re.compile(r"<!--\s*(not-run:\s*\S.*?|synopsis|output)\s*-->")
    for page in doc_files():
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if "<!--" in line and re.search(r"run|synopsis|output", line):
                assert marker.fullmatch(line.strip()), f"{page_id(page)}:{number}: {line!r}"


def test_commands_are_only_in_blocks_that_are_checked():
    """A command in a ```sh or unlabeled block would escape every check above."""
    for page in doc_files():
        for block in blocks(page):
            if block.language in ("bash", "python"):
                continue
            assert block.language not in ("sh", "shell", "console", "zsh"), block.where
            starts = [line for line in block.text.splitlines()
                      if re.match(r"\$? *(xattn-compiler|pip|python|pytest) ", line)]
            assert not starts, f"{block.where}: commands belong in a ```bash block: {starts}"


def test_relative_links_point_at_files_and_headings():
    for page in doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            assert linked.exists(), f"{page_id(page)}: broken link {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page_id(page)}: no heading #{anchor}"


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


# --- the README and the getting-started page ---------------------------------------------------

def test_ci_runs_the_readme_test_command():
    readme_commands = [block.strip() for block in code_blocks(ROOT / "README.md", "bash")]
    test_command = next(c for c in readme_commands if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_getting_started_shows_the_readme_commands():
    readme = {b.strip() for b in code_blocks(ROOT / "README.md", "bash")}
    guide = {b.strip() for b in code_blocks(DOCS / "getting-started.md", "bash")}
    assert {c for c in readme if c.startswith("pip install")} <= guide


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _timings_removed(text: str) -> str:
    # The progress line is redrawn with '\r'; what stays on screen is the text after the last.
    lines = [line.rsplit("\r", 1)[-1] for line in text.strip().split("\n")]
    return "\n".join(re.sub(r"\d+\.\d+ s\b", "N s", line) for line in lines)


def test_getting_started_shows_what_the_commands_print(tmp_path, monkeypatch):
    """The sample outputs are today's: progress lines, summary line, the inspect table."""
    monkeypatch.chdir(tmp_path)
    progress, table = [b.text for b in blocks(DOCS / "getting-started.md", "")][:2]
    terminal = _Terminal()
    with kept_logging(), contextlib.redirect_stderr(terminal):
        assert main(["optimize", "--example", "-o", "out.onnx", "--verify",
                     "--report", "report.json"]) == 0
    assert _timings_removed(terminal.getvalue()) == _timings_removed(progress)
    out = io.StringIO()
    with kept_logging(), contextlib.redirect_stdout(out):
        assert main(["inspect", "out.onnx"]) == 0
    assert out.getvalue().strip() == table.strip()


# --- the pre-build guide: its Makefile, CI job and gate -----------------------------------------

PREBUILD = DOCS / "guides" / "prebuild-step.md"


def _make(directory: Path, *variables: str) -> str:
    tool = f"{sys.executable} -m xattn_compiler.cli"
    proc = subprocess.run(["make", "-C", str(directory), "optimized", f"XATTN={tool}", *variables],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_makefile_builds_once_and_again_when_the_flags_change(tmp_path):
    [makefile] = code_blocks(PREBUILD, "make")
    (tmp_path / "Makefile").write_text(makefile)
    (tmp_path / "models").mkdir()
    shutil.copyfile(example_path(), tmp_path / "models" / "decoder.onnx")
    output = tmp_path / "build" / "decoder.opt.onnx"

    assert "optimize" in _make(tmp_path)
    report = json.loads((tmp_path / "build" / "decoder.report.json").read_text())
    assert report["verify"]["ok"] and report["after"]["ops"]["Attention"] == 4
    built = output.stat().st_mtime_ns

    assert "optimize" not in _make(tmp_path)           # up to date: nothing runs
    assert output.stat().st_mtime_ns == built

    assert "optimize" in _make(tmp_path, "XATTN_FLAGS=--target canonical --verify")
    assert "Attention" not in json.loads((tmp_path / "build" / "decoder.report.json")
                                         .read_text())["after"]["ops"]


def test_the_ci_job_runs_the_guide_s_makefile_target_and_gate():
    yaml = pytest.importorskip("yaml")
    [job] = code_blocks(PREBUILD, "yaml")
    steps = yaml.safe_load(job)["jobs"]["optimize"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    [makefile] = code_blocks(PREBUILD, "make")
    [gate] = code_blocks(PREBUILD, "python")
    targets = set(re.findall(r"^([\w.%/-]+):", makefile, flags=re.M))
    for run in runs:
        words = run.split("#")[0].split()
        if words[0] == "make":
            assert set(w for w in words[1:] if not w.startswith("-")) <= targets, run
        elif words[0] == "python":
            assert gate.startswith(f'"""{words[1]}'), f"{run}: not the gate the guide shows"
    assert any(r.startswith("python ci/check_reports.py") for r in runs)


def test_the_ci_gate_fails_on_an_unfused_block(tmp_path, monkeypatch):
    """The gate bites: fp32 blocks are not taken by the fp16-only plugin presets."""
    monkeypatch.chdir(tmp_path)
    with kept_logging():
        assert main(["optimize", "--example", "-o", "build/decoder.opt.onnx", "--verify", "-q",
                     "--target", "trt-plugin", "--report", "build/decoder.report.json"]) == 0
    [gate] = code_blocks(PREBUILD, "python")
    monkeypatch.setattr(sys, "argv", ["ci/check_reports.py"])
    with pytest.raises(SystemExit) as failure:
        exec(compile(gate, "ci/check_reports.py", "exec"), {"__name__": "__main__"})
    assert "attn_0 (self) left unfused" in str(failure.value.code)


# --- the CLI reference ----------------------------------------------------------------------------

CLI_DOC = DOCS / "reference" / "cli.md"
COMMON = {"-h", "--help", "-v", "--verbose", "-q", "--quiet"}


def _cli_sections() -> dict[tuple[str, ...], str]:
    """Each `## `xattn-compiler X`` section's text by the words of X."""
    parts = re.split(r"^## (.*)$", CLI_DOC.read_text(), flags=re.M)
    sections = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        command = re.fullmatch(r"`xattn-compiler ?([a-z -]*)`\s*", heading)
        if command:
            sections[tuple(command[1].split())] = body
    return sections


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines()
            if line.startswith("| `")]


def _documented(section: str) -> tuple[set[str], set[str]]:
    """Options and positionals named in the first column of a section's table."""
    options, positionals = set(), set()
    for row in _table_rows(section):
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            word = name.split()[0]
            (options if word.startswith("-") else positionals).add(word)
    return options, positionals


def test_the_cli_reference_documents_every_command():
    documented, commands_ = set(_cli_sections()), {(), *subcommand_parsers()}
    assert documented == commands_, (f"not documented: {sorted(commands_ - documented)}; "
                                     f"documented but unknown: {sorted(documented - commands_)}")


def test_the_cli_reference_documents_every_option_and_nothing_else():
    sections = _cli_sections()
    common_section = CLI_DOC.read_text().split("## Options every command takes")[1].split("\n## ")[0]
    assert _documented(common_section)[0] == COMMON
    assert _documented(sections[()])[0] == {o for a in build_parser()._actions
                                            for o in a.option_strings}
    for path, parser in subcommand_parsers().items():
        actions = [a for a in parser._actions if not a.option_strings and a.nargs != "A..."]
        options = {o for a in parser._actions for o in a.option_strings}
        assert COMMON <= options, f"{path} lacks the common options"
        doc_options, doc_positionals = _documented(sections[path])
        command = f"xattn-compiler {' '.join(path)}"
        assert doc_options == options - COMMON, (
            f"{command}: not documented {sorted(options - COMMON - doc_options)}, "
            f"documented but unknown {sorted(doc_options - options)}")
        expected = {(a.metavar or a.dest).upper() for a in actions}
        if any(a.nargs == "A..." for a in parser._actions):
            expected.add("ACTION")
        assert doc_positionals == expected, f"{command}: arguments {doc_positionals} != {expected}"


def test_the_cli_reference_shows_every_choice_and_default():
    sections = _cli_sections()
    for path, parser in subcommand_parsers().items():
        rows = _table_rows(sections[path])
        for action in parser._actions:
            if not action.option_strings or action.option_strings[0] in COMMON:
                continue
            [row] = [r for r in rows if f"`{action.option_strings[-1]}" in r.split("|")[1]]
            for choice in action.choices or ():
                assert f"`{choice}`" in row, f"{path} {action.option_strings}: choice {choice}"
            default = action.default
            if default not in (None, False, []) and not isinstance(default, bool):
                assert f"`{default}`" in row, f"{path} {action.option_strings}: default {default}"


def test_the_cli_reference_examples_cover_every_option():
    """Each command's examples use every one of its options at least once (parsed or run)."""
    sections = _cli_sections()
    for path, parser in subcommand_parsers().items():
        section = sections[path]
        used = set()
        for block in blocks(CLI_DOC, "bash"):
            if block.synopsis or block.text not in section:
                continue
            for command in commands(block):
                used.update(w.split("=")[0] for w in command.argv if w.startswith("-"))
        options = {a.option_strings[-1] for a in parser._actions if a.option_strings} - COMMON
        missing = {o for o in options if not any(s in used for s in _spellings(parser, o))}
        if path == ("zoo",):
            continue  # a group: its actions have their own sections
        assert not missing, f"xattn-compiler {' '.join(path)}: no example uses {sorted(missing)}"


def _spellings(parser, option: str) -> list[str]:
    return next(a.option_strings for a in parser._actions if option in a.option_strings)


# --- the API reference ----------------------------------------------------------------------------

API_DOC = DOCS / "reference" / "api.md"


def test_the_api_reference_documents_every_public_name():
    headings = set(re.findall(r"^### `xc\.(\w+)", API_DOC.read_text(), flags=re.M))
    public = set(xc.__all__)
    assert headings == public, (f"not documented: {sorted(public - headings)}; "
                                f"documented but not in __all__: {sorted(headings - public)}")


def test_the_api_reference_signatures_are_the_code_s():
    """`xc.f(a, b=1, *, c=None)` headings name the parameters the function takes, in order."""
    for name, params in re.findall(r"^### `xc\.(\w+)\((.*)\)`", API_DOC.read_text(), flags=re.M):
        documented = [p.split("=")[0].strip() for p in params.split(", ") if p.strip("* ")]
        actual = list(inspect.signature(getattr(xc, name)).parameters)
        assert documented == actual, f"xc.{name}: documented {documented}, takes {actual}"


def test_every_name_the_api_reference_mentions_exists():
    text = API_DOC.read_text()
    for dotted in set(re.findall(r"\bxc((?:\.\w+)+)", text)):
        _resolve(xc, dotted.lstrip(".").split("."), f"xc{dotted}")
    for dotted in set(re.findall(r"\bxattn_compiler((?:\.\w+)+)", text)):
        parts = dotted.lstrip(".").split(".")
        for cut in range(len(parts), -1, -1):
            try:
                module = importlib.import_module(".".join(["xattn_compiler", *parts[:cut]]))
            except ModuleNotFoundError:
                continue
            _resolve(module, parts[cut:], f"xattn_compiler{dotted}")
            break


def _resolve(obj, names: list[str], mention: str) -> None:
    for name in names:
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif inspect.isclass(obj) and _instance_attribute(obj, name):
            return
        else:
            raise AssertionError(f"api.md mentions {mention}, but {obj!r} has no {name!r}")


def _instance_attribute(cls: type, name: str) -> bool:
    fields = getattr(cls, "__dataclass_fields__", {})
    source = inspect.getsource(cls)
    return name in fields or re.search(rf"\bself\.{name}\s*=", source) is not None


def test_the_api_reference_names_every_pass_and_strategy():
    from xattn_compiler.passes import BUILTIN_PASSES

    from xattn_compiler.testing import strategies

    text = API_DOC.read_text()
    for cls in BUILTIN_PASSES:
        assert f"`xattn_compiler.passes.{cls.__name__}` | `{cls.name}`" in text, cls.name
    for name in strategies.__all__:
        assert f"xattn_compiler.testing.strategies.{name}`" in text, name
