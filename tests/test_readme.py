"""The README as a reader uses it: its ```python blocks run as pasted, in order, in one namespace (as a
reader pastes them into one interpreter; the first block is self-contained and later ones continue it), in an
empty directory.
Also its size, its links, and words that do not belong in a user's documentation.
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# documentation pages this file checks for code blocks and wording
OWN_PAGES = [README, ROOT / "docs" / "design.md", ROOT / "docs" / "compatibility.md"]
# pages the README links to that other parts of the project provide
LINKED_PAGES = ["docs/errors.md", "docs/migration.md", "docs/demo.md", "docs/results-fashion-mnist.md",
                "docs/compatibility.md", "docs/design.md", "benchmarks/RESULTS.md", "LICENSE"]
# (spelled with character classes so that a grep of the tree for these words finds only real uses)
FORBIDDEN = [r"\ble[n]t\b", r"\bpe[n]ding\b", r"is[s]ue\s*#?\d", r"/wo[r]k/", r"\bsessio[n]s?\b", r"\bhelpers?\b",
             r"not mi[n]e", r"shared/DESIG[N]"]


def python_blocks(path: Path):
    """[(first line number, code)] of the ```python blocks of a Markdown file."""
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def test_readme_is_short_and_links_resolve():
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes"
    links = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text))
    local = {l for l in links if not re.match(r"https?://", l)}
    assert set(LINKED_PAGES) <= local, f"README links none of {sorted(set(LINKED_PAGES) - local)}"
    missing = [l for l in local - set(LINKED_PAGES) if not (ROOT / l).exists()]
    assert not missing, f"README links missing files {missing}"
    for command in ("pip install .", "make test", "make demo", "make test-fast", "TORCH_INDEX_URL",
                    "pip install notebook"):
        assert command in text, command


def test_docs_speak_of_the_project_only():
    for page in OWN_PAGES:
        text = page.read_text()
        for pattern in FORBIDDEN:
            hit = re.search(pattern, text, re.I)
            assert hit is None, f"{page.relative_to(ROOT)}: {hit.group(0)!r}"


def test_readme_has_the_blocks_this_test_checks():
    blocks = python_blocks(README)
    assert len(blocks) >= 4
    joined = "\n".join(code for _, code in blocks)
    for needle in ("ParameterChangePlugin", "compute_importance", "ParameterChangeReg", "include=",
                   "exclude=", "parameters=", "save_checkpoint"):
        assert needle in joined, needle


def _check_plugins_against_models(new: dict, line: int):
    """Every plugin a block builds selects parameters of a model that the same block builds: each
    include / exclude pattern matches one of its parameter names (fnmatch, the documented rule), and a
    filter leaves a non-empty, proper subset."""
    from avalanche_pcreg import ParameterChangePlugin

    plugins = [v for v in new.values() if isinstance(v, ParameterChangePlugin)]
    models = [v for v in new.values() if isinstance(v, nn.Module)]
    for plugin in plugins:
        filtered = plugin.include is not None or plugin.exclude is not None or plugin.parameters is not None
        if not filtered:
            continue
        assert models, f"README block at line {line}: a plugin with include/exclude/parameters but no model"
        names = [n for m in models for n, _ in m.named_parameters()]
        for pat in list(plugin.include or ()) + list(plugin.exclude or ()):
            assert any(fnmatch.fnmatchcase(n, pat) for n in names), \
                f"README block at line {line}: pattern {pat!r} matches no parameter of its model"
        for model in models:
            chosen = plugin.selected_parameters(model)
            assert 0 < len(chosen) < len(list(model.parameters())), (line, plugin.include, plugin.exclude)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {"__name__": "__readme__"}
    for line, code in python_blocks(README):
        before = dict(ns)
        exec(compile(code, f"README.md:{line}", "exec"), ns)
        new = {k: v for k, v in ns.items() if k not in before or before[k] is not v}
        _check_plugins_against_models(new, line)

    # the usage example trained three experiences with the plugin
    ewc, model = ns["ewc"], ns["model"]
    assert ewc.num_consolidations == 6  # three in the usage example, three more in the checkpoint recipe
    assert ewc.penalty(model).item() > 0
    # the stand-alone pieces: importances for every parameter, a finite loss with gradients
    fisher = ns["fisher"]
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    assert math.isfinite(float(ns["loss"].detach())) and all(p.grad is not None for p in model.parameters())
    # the checkpoint recipe wrote both files
    assert (tmp_path / "ckpt.pkl").is_file() and (tmp_path / "optim.pt").is_file()
