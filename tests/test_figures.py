"""No measured figure is typed by hand: not in the comments and docstrings of qlora/ and stages/,
nor in the prose of README.md and docs/*.md outside what tools/docs.py renders. A figure there
is rendered from the file a script wrote (`<!-- = results.x.key -->...<!-- / -->`), or the text
cites that file and key and gives no number.

A measured figure is a number with a unit of time, size, throughput or share, or a ratio:
`3x faster`, `1.5×`, `10%`, `2.1 s`, `40 ms`, `3 minutes`, `0.4 GB`, `48 KB`, `560 tokens/s`,
`three times slower`. A number with no unit (a count, a dimension `8 x 576`, a param value
`r: 16`, `4-bit`) is not one. The few figures with a unit that are not measurements are in
ALLOWED, each with its reason.
"""

import ast
import io
import re
import tokenize

import pytest

from conftest import ROOT
from tools.docs import BLOCK, INLINE

CODE = ["qlora/**/*.py", "stages/*.py"]
PAGES = ["README.md", "docs/*.md"]

NUMBER = r"(?<![\w.])\d[\d,]*(?:\.\d+)?"
UNIT = (r"[x×](?![\w×])(?!\s*\d)|%|ms|µs|us|s|sec|secs|seconds?|min|mins|minutes?|h|hours?|days?"
        r"|[KMGT]i?B|[KMGT]B/s|bytes|(?:tokens?|tok|it|steps?|samples?|examples?)/s|[GT]?FLOP/s|W")
FIGURE = re.compile(
    rf"{NUMBER}(?:[\s-]?(?:{UNIT})(?![\w/])"  # 3x, 2.1 s, 0.4 GB, 3-minute, 10%
    rf"|\s+times\s+(?:faster|slower|more|less|fewer|smaller|larger|as))"  # 3 times faster
    r"|\b(?:twice|three|four|five|ten)\s+(?:times\s+)?(?:as fast|as slow|as long|faster|slower)\b"  # twice as fast
    r"|\b(?:costs?|takes?|took)\s+(?:twice|half|a third|a quarter)(?:\s+of)?\s+(?:the|a)\s+"
    r"(?:time|step|training|matmul|run|epoch)"  # took a third of the step: time ("twice the memory" is bytes)
    r"|\b(?:a|one|two)\s+(?:half|third|quarter|fifth|tenth)s?\s+of\s+(?:a|the|each)\s+"
    r"(?:training\s+)?(?:step|run|epoch)",  # a third of a training step
    re.I)

# Figures with a unit that are not measurements: a pattern for the figure with the words that
# make it a setting (only that span of the line is exempt), and why.
ALLOWED = [
    (r"\b95% (?:percentile|paired|bootstrap|interval|confidence)|\b95% ?(?:CI|interval)",
     "the confidence level of every interval the evaluate stage reports, a fixed setting"),
    (r"\ban? \d+ ?Gi?B (?:GPU|card|machine)\b",
     "a hardware requirement (on a 16 GB GPU), not a measurement"),
    (r"\b[ABH]\d{2,3}\b\W{0,3}\d+\s?(?:GB|GiB)\b",
     "the memory of a named GPU model, as its maker states it"),
    (r"\b\d+x(?:(?:,| and) \d+x)* (?:its|the) examples\b",
     "a multiple of the examples, a setting of the run (the data scale, the processes)"),
    (r"\b\d+(?:\.\d+)?x the float32 floor",
     "the export test's bound, checked against tests/test_export.py below"),
]


def python_text(path):
    """(line number, text) of each comment line and docstring line of a Python file."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                for number in range(first.lineno, first.end_lineno + 1):
                    yield number, lines[number - 1]


def blank(match):
    """The matched text with everything but its line breaks removed, so line numbers stay."""
    return "\n" * match.group(0).count("\n")


def page_text(path):
    """(line number, text) of each line of a page outside what tools/docs.py renders (its blocks and
    inline figures) and outside HTML comments."""
    text = BLOCK.sub(blank, path.read_text())
    text = INLINE.sub(blank, text)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    yield from enumerate(text.splitlines(), 1)


def typed_figures(name, lines):
    """`FILE:LINE: 'figure' in 'line'` for each typed measured figure, outside the spans ALLOWED exempts."""
    for number, line in lines:
        rest = line
        for pattern, _ in ALLOWED:
            rest = re.sub(pattern, " ", rest)
        for match in FIGURE.finditer(rest):
            yield f"{name}:{number}: {match.group(0)!r} in {line.strip()!r}"


def files(patterns):
    return sorted({path for pattern in patterns for path in ROOT.glob(pattern)})


def scan():
    found = []
    for path in files(CODE):
        found += typed_figures(path.relative_to(ROOT), python_text(path))
    for path in files(PAGES):
        found += typed_figures(path.relative_to(ROOT), page_text(path))
    return found


def test_no_measured_figure_is_typed_by_hand():
    found = scan()
    assert not found, ("measured figures typed by hand; render them from their results file "
                       "(tools/docs.py) or cite the file and key without the number:\n" + "\n".join(found))


@pytest.mark.parametrize("line", [
    "took 2.1 of 3.9 s per step", "sdpa about 3x slower", "4x faster", "a 1.6 MB copy per norm",
    "10% slower per step", "0.4 GB more here", "the gain is 1.5× the noise", "a 3-minute training",
    "at 560 tokens/s", "eager 10 ms vs sdpa", "three times faster", "twice as fast", "48 KB",
    "the whole dropout took a third of a training step", "a copy that costs twice the matmul",
    "it took 6 GB of GPU memory",
])
def test_a_figure_with_a_unit_is_caught(line):
    assert list(typed_figures("f", [(1, line)])), line


@pytest.mark.parametrize("line", [
    "r: 16", "4-bit weights", "an 8 GB GPU is enough", "chance 1/k", "the paired 95% bootstrap interval",
    "8 x 576 tokens", "batch 8, SmolLM2 heads", "30 layers that is 120 masks per step", "LLM.int8",
    "LOG_INTERVAL = 10", "x / rms(x)", "a 2x2 grid", "1 / (1 - p)", "the H200 (141 GB)", "python 3.11",
    "fine-tune on a 16 GB GPU", "4 bit: about a quarter of bf16", "twice the bytes of the bfloat16 input",
    "runs each forward twice", "float32 costs twice the memory", "at 1x, 4x and 16x its examples per label",
    "a queued 2 x 2 grid on 2 workers",
])
def test_a_count_a_setting_or_a_requirement_is_not(line):
    assert not list(typed_figures("f", [(1, line)])), line


def test_what_tools_docs_renders_is_not_scanned(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- begin t (make docs) -->\n| 3.1 s |\n<!-- end t -->\n"
                    "runs at <!-- = results.x.y -->560 tokens/s<!-- / --> here\ntyped 2.5x faster\n")
    found = list(typed_figures("page.md", page_text(page)))
    assert found == ["page.md:6: '2.5x' in 'typed 2.5x faster'"]


def test_the_export_bounds_in_the_docs_are_those_of_the_test():
    """docs/sharing.md states the bounds of tests/test_export.py, which ALLOWED exempts: the two agree."""
    tree = ast.parse((ROOT / "tests/test_export.py").read_text())
    bounds = {node.targets[0].id: node.value.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    text = " ".join((ROOT / "docs/sharing.md").read_text().split())
    assert f"{bounds['NOISE_FLOOR_FACTOR']:g}x the float32 floor's (`NOISE_FLOOR_FACTOR`" in text
    assert f"{100 * bounds['AGREEMENT_BELOW_FLOOR']:g} points below the floor's (`AGREEMENT_BELOW_FLOOR`)" in text
