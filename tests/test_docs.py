"""Every measured figure of README.md, docs/ and benchmarks/README.md is rendered from the file a
script wrote (make docs, python -m tools.docs): none is typed by hand, so none can drift."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT
from tools import docs


def test_every_rendered_figure_is_that_of_its_file():
    assert docs.main(["--check"]) == 0, "run `make docs` after reproducing the default or a benchmark"


def git(folder, *args):
    return subprocess.run(["git", "-c", "user.name=docs test", "-c", "user.email=docs-test@localhost", *args],
                          cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def commit(folder, message="results"):
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "--allow-empty", "-m", message)
    return git(folder, "rev-parse", "HEAD")


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """A clone of this repository (its real history) with this workspace's files committed on top:
    `--check` reads the result files as that commit has them, the code is this workspace's."""
    git(tmp_path, "clone", "-q", "--shared", str(ROOT), "repo")
    repo = tmp_path / "repo"
    for name in git(ROOT, "ls-files", "-co", "--exclude-standard").splitlines():
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
        elif (repo / name).is_file():
            (repo / name).unlink()
    commit(repo, "the workspace")
    monkeypatch.setattr(docs, "ROOT", repo)
    monkeypatch.setattr(docs, "REPO", repo)
    return repo


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_number_changed_by_hand_in_a_results_file_fails_the_check(copy, capsys):
    docs.main([])  # the pages as this workspace's files render them, committed
    commit(copy)
    assert docs.main(["--check"]) == 0
    edit_json(copy / "metrics/evaluate.json", test_accuracy=0.5)
    commit(copy)
    assert docs.main(["--check"]) == 1
    assert "README.md: default-scores" in capsys.readouterr().err
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0, "make docs renders it afresh"
    assert "**0.5** [" in (copy / "README.md").read_text()


def test_the_check_holds_the_pages_to_the_committed_results_not_the_workspace(copy, capsys):
    """A `make repro` on another CPU rewrites metrics/ with other last digits: `make test` still passes,
    and `make docs` then renders the new figures, which the check takes once they are committed."""
    docs.main([])
    commit(copy)
    edit_json(copy / "metrics/evaluate.json", test_accuracy=0.5)  # not committed
    assert docs.main(["--check"]) == 0, "the check reads metrics/ as committed"
    assert docs.main([]) == 0 and "**0.5** [" in (copy / "README.md").read_text(), "make docs reads the workspace"
    assert docs.main(["--check"]) == 1 and "README.md: default-scores" in capsys.readouterr().err
    commit(copy)
    assert docs.main(["--check"]) == 0


def fresh(copy, name="train-vs-trl"):
    """Every row of a results file stamped with the clone's HEAD, whose code is the working tree's."""
    path = copy / f"benchmarks/results/{name}.json"
    data = json.loads(path.read_text())
    head = git(copy, "rev-parse", "--short", "HEAD")
    for row in data["tools"].values():
        row["provenance"] = dict(row.get("provenance", {}), commit=head, command=None)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path, data


def test_a_row_measured_before_its_code_changed_is_marked_with_its_commit_and_the_refresh_command(copy, capsys):
    path, data = fresh(copy)
    commit(copy)
    docs.main([])
    commit(copy)
    page = (copy / "benchmarks/README.md").read_text()
    table = page.split("<!-- begin train-vs-trl (make docs) -->")[1].split("<!-- end train-vs-trl -->")[0]
    assert "stale" not in table and docs.main(["--check"]) == 0, "measured at the code there is: current"

    # the commit before the last change of the train stage's code (comments and docstrings aside), in git's history
    changes = git(copy, "log", "--format=%H", "--", "stages/train.py").split()
    _, before = next((c, p) for c, p in zip(changes, changes[1:])
                        if docs.fingerprint("stages/train.py", git(copy, "show", f"{c}:stages/train.py"))
                        != docs.fingerprint("stages/train.py", git(copy, "show", f"{p}:stages/train.py")))
    data["tools"]["ours"]["provenance"]["commit"] = before[:7]
    path.write_text(json.dumps(data, indent=2) + "\n")
    commit(copy)
    assert docs.main(["--check"]) == 1, "the page shows a stale row as current"
    assert "benchmarks/README.md: train-vs-trl" in capsys.readouterr().err
    docs.main([])
    table = (copy / "benchmarks/README.md").read_text().split("<!-- begin train-vs-trl (make docs) -->")[1]
    note = next(line for line in table.splitlines() if line.startswith("- stale:"))
    assert f"`ours` measured at {before[:7]}" in note and "`trl sft`" not in note
    assert "refresh: `.venv/bin/python benchmarks/bench_train.py --steps 78 --reps 2`" in note
    assert docs.main(["--stale"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("benchmarks/results/train-vs-trl")]
    assert len(listed) == 1 and before[:7] in listed[0] and "bench_train.py --steps 78" in listed[0]
    changed = docs.stale_rows("benchmarks/results/train-vs-trl")[0]
    assert git(copy, "merge-base", "--is-ancestor", before, git(copy, "rev-parse", changed.changed)) == "" \
        and changed.changed != before[:7], "the change named is one after the row's commit"


def test_a_comment_or_docstring_edit_leaves_a_row_current_and_a_code_edit_does_not(copy):
    fresh(copy)
    commit(copy)
    docs.main([])
    assert docs.stale_rows("benchmarks/results/train-vs-trl") == []
    module = copy / "stages/train.py"
    code = module.read_text()
    start = code.index('"""') + 3  # the module's docstring
    module.write_text(code[:start] + "Reworded. " + code[start:] + "\n# a comment, and one more\n")
    docs.main([])
    assert docs.stale_rows("benchmarks/results/train-vs-trl") == []
    module.write_text(module.read_text() + "LIMIT = 1\n")
    docs.main([])
    stale = docs.stale_rows("benchmarks/results/train-vs-trl")
    assert {s.row for s in stale} == {"ours", "ours, checkpointing every layer", "trl sft"}
    assert all(s.changed == "" and s.path == "stages/train.py" for s in stale), "uncommitted edits to the stage"
    assert "uncommitted edits to `stages/train.py`" in (copy / "benchmarks/README.md").read_text()


def test_every_results_file_names_its_script_and_the_files_its_figures_depend_on():
    files = [f"benchmarks/results/{p.stem}" for p in sorted((ROOT / "benchmarks/results").glob("*.json"))]
    assert sorted(set(files) - set(docs.RESULTS)) == [], "add it to tools/docs.py RESULTS"
    for name, written in docs.RESULTS.items():
        declared = docs.declared(written.code)
        assert declared and all((ROOT / path).is_file() for path in declared), (name, declared)
        script = written.code if isinstance(written.code, str) else None
        assert script is None or script in declared, f"{script}: its own code shapes its figures"


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


def test_every_cost_figure_dvc_lists_counts_as_a_cost():
    # after-repro says the metrics that differ after a fresh repro are costs only when each is in COST_KEYS
    from stages.evaluate import COST

    assert set(COST) | set(COST.values()) <= docs.COST_KEYS
