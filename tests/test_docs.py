"""Every measured figure of README.md, docs/ and benchmarks/README.md is rendered from the file a
script wrote (make docs, python -m tools.docs): none is typed by hand, so none can drift."""

import json
import shutil

import pytest

from conftest import ROOT
from tools import docs


def test_every_rendered_figure_is_that_of_its_file():
    assert docs.main(["--check"]) == 0, "run `make docs` after reproducing the default or a benchmark"


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """The docs and the files they render from, in a folder of their own."""
    for folder in ("docs", "metrics", "benchmarks/results", "reports"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    for name in ("README.md", "benchmarks/README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    return tmp_path


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_number_changed_by_hand_in_a_results_file_fails_the_check(copy, capsys):
    assert docs.main(["--check"]) == 0
    edit_json(copy / "metrics/evaluate.json", test_accuracy=0.5)
    assert docs.main(["--check"]) == 1
    assert "README.md: default-scores" in capsys.readouterr().err
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0, "make docs renders it afresh"
    assert "**0.5** [" in (copy / "README.md").read_text()


def test_a_figure_in_prose_is_rendered_and_checked(copy, capsys):
    page = copy / "docs/levers.md"
    page.write_text(page.read_text() + "\nThe export agrees on <!-- = metrics.export.answer_agreement | pct -->"
                    "12%<!-- / --> of test answers.\n")
    assert docs.main(["--check"]) == 1
    assert "docs/levers.md: <!-- = metrics.export.answer_agreement | pct -->" in capsys.readouterr().err
    docs.main([])
    agreement = json.loads((copy / "metrics/export.json").read_text())["answer_agreement"]
    assert f"agrees on <!-- = metrics.export.answer_agreement | pct -->{100 * agreement:.1f}%<!-- / -->" \
        in page.read_text()


def test_a_marker_without_a_source_names_the_file_and_the_key(copy):
    page = copy / "docs/levers.md"
    page.write_text(page.read_text() + "\n<!-- = metrics.export.no_such_key -->1<!-- / -->\n")
    with pytest.raises(SystemExit, match=r"docs/levers.md: cannot render <!-- = metrics.export.no_such_key -->"):
        docs.main(["--check"])
    page.write_text(page.read_text() + "\n<!-- begin nothing (make docs) -->\n<!-- end nothing -->\n")
    with pytest.raises(SystemExit, match=r"docs/levers.md: no block named 'nothing'"):
        docs.main(["--check"])


def test_user_facing_text_is_short_and_names_no_issue_or_commit():
    """The README is the first five minutes, the pages in docs/ the rest; history belongs in git."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    assert {"levers.md", "data.md", "experiments.md", "sharing.md", "scaling.md", "reliability.md",
            "development.md"} <= pages
    for path in [ROOT / "README.md", ROOT / "benchmarks/README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        prose = docs.BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())  # rendered output aside
        for number, line in enumerate(prose.splitlines(), 1):
            found = re.search(r"issue [0-9]|issue #|\b[0-9a-f]{7,40}\b", line)
            assert not found, f"{path.relative_to(ROOT)}:{number}: {found.group()!r} in {line!r}"


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_leads_somewhere():
    import re

    pages = [ROOT / "README.md", ROOT / "benchmarks/README.md", ROOT / "data/README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                fence, headings = False, set()
                for line in linked.read_text().splitlines():
                    fence ^= line.startswith("```")
                    if not fence and line.startswith("#"):
                        headings.add(slug(line.lstrip("#")))
                if anchor not in headings:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
