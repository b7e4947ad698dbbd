"""The README's and the docs' Python examples run as written (those that need a running
service say so on their first line and are run by the service tests instead)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _blocks(ROOT / "README.md")
    assert blocks, "the README should hold runnable examples"
    for code in blocks:
        if "# needs a running service" in code:
            continue
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "3"  # the three structure-level sequences
    assert "(124,) (124, 124)" in out


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if _blocks(p)], ids=lambda p: p.name)
def test_docs_python_blocks_run(page):
    for code in _blocks(page):
        if "# needs a running service" in code:
            continue
        exec(compile(code, str(page.relative_to(ROOT)), "exec"), {})


def test_docs_links_resolve():
    """Every relative link of the README and the docs names a file of the repository."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
