"""The README as a reader uses it: each ```python block runs as pasted, in an empty directory. A block
runs alone, in a fresh namespace, unless its first line is a comment saying which block it continues
(``# continues the block above``, ``# continues the Usage block above``): then it runs after that
block, in its namespace, as a reader pastes the two into one interpreter.
Also its size, its links, and words that do not belong in a user's documentation.
"""
from __future__ import annotations

import ast
import builtins
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
LINKED_PAGES = ["docs/errors.md", "docs/migration.md", "docs/demo.md", "docs/results-fashion-mnist.md", "docs/kfac.md",
                "docs/compatibility.md", "docs/design.md", "benchmarks/RESULTS.md", "LICENSE"]
# (spelled with character classes so that a grep of the tree for these words finds only real uses)
FORBIDDEN = [r"\ble[n]t\b", r"\bpe[n]ding\b", r"is[s]ue\s*#?\d", r"/wo[r]k/", r"\bsessio[n]s?\b", r"\bhelpers?\b",
             r"not mi[n]e", r"shared/DESIG[N]"]


def python_blocks(path: Path):
    """[(first line number, code)] of the ```python blocks of a Markdown file."""
    text = path.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


CONTINUES = re.compile(r"# continues the (?:(\w[\w ]*?) )?block above\s*$")


def continued_block(path: Path, index: int):
    """The index of the block that block ``index`` of ``path`` continues, by the comment on its first
    line (``# continues the block above``: the previous block; ``# continues the <Section> block
    above``: the first block under the heading ``## <Section>``), or None for a self-contained block."""
    blocks = python_blocks(path)
    first = blocks[index][1].split("\n", 1)[0]
    m = CONTINUES.match(first)
    if m is None:
        assert "continues" not in first, f"{path.name}:{blocks[index][0]}: unreadable continuation comment {first!r}"
        return None
    if m.group(1) is None:
        assert index > 0, f"{path.name}:{blocks[index][0]}: the first block continues no block"
        return index - 1
    text = path.read_text()
    heading = re.search(rf"^## {re.escape(m.group(1))}\n", text, re.M)
    assert heading, f"{path.name}:{blocks[index][0]}: no section {m.group(1)!r} for {first!r}"
    start = text[: heading.end()].count("\n") + 1
    after = [i for i, (line, _) in enumerate(blocks) if line > start]
    assert after and after[0] < index, f"{path.name}:{blocks[index][0]}: {first!r} names no block above"
    return after[0]


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


def _norm_parameter_names(model: nn.Module) -> set:
    """Parameters held by normalization modules, by module type (independently of the library)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if isinstance(m, norms)
            for pn, _ in m.named_parameters(recurse=False)}


def _check_plugins_against_models(new: dict, line: int):
    """Every plugin a block builds selects parameters of a model that the same block builds: each
    include / exclude pattern matches one of its parameter names (fnmatch, the documented rule), and a
    filter leaves a non-empty, proper subset. A plugin named ``no_norm...`` selects no parameter of a
    normalization layer."""
    from avalanche_pcreg import ParameterChangePlugin

    plugins = {k: v for k, v in new.items() if isinstance(v, ParameterChangePlugin)}
    models = [v for v in new.values() if isinstance(v, nn.Module)]
    for var, plugin in plugins.items():
        filtered = any(getattr(plugin, a) is not None
                       for a in ("include", "exclude", "parameters", "include_modules", "exclude_modules"))
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
            if var.startswith("no_norm"):
                norms = _norm_parameter_names(model)
                assert norms, f"README block at line {line}: {var} on a model without normalization layers"
                assert not norms & set(chosen), \
                    f"README block at line {line}: {var} selects normalization parameters {sorted(norms & set(chosen))}"


def test_readme_blocks_are_self_contained_or_say_what_they_continue():
    """Without running them: a block that uses a name it neither imports nor defines continues a block."""
    blocks = python_blocks(README)
    assert continued_block(README, 0) is None, "the first block must be self-contained"
    for i, (line, code) in enumerate(blocks):
        if continued_block(README, i) is not None:
            continue
        tree = ast.parse(code)
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= bound, (f"README block at line {line} uses {sorted(used - bound)} from another block: import "
                               "them, or start it with '# continues the block above'")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Each block as pasted: a self-contained one alone in a fresh namespace, a continuation after the
    block it continues, in that block's namespace."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    spaces: list = []
    for i, (line, code) in enumerate(python_blocks(README)):
        parent = continued_block(README, i)
        ns = spaces[parent] if parent is not None else {"__name__": "__readme__"}
        before = dict(ns)
        exec(compile(code, f"README.md:{line}", "exec"), ns)
        new = {k: v for k, v in ns.items() if k not in before or before[k] is not v}
        _check_plugins_against_models(new, line)
        spaces.append(ns)

    ns = spaces[0]  # the usage example, continued by the pieces and the checkpoint recipe
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
    # the parameter-selection block ran alone: its own imports, its own model
    selection = next(s for s in spaces if "resnet" in s)
    assert selection is not ns and "ewc" not in selection
