"""The README's measured figures are rendered from the committed metrics (python -m qlora.readme)."""

from qlora import readme


def test_readme_figures_are_those_of_the_committed_metrics():
    assert readme.main(["--check"]) == 0, "run `python -m qlora.readme` after reproducing the default"
