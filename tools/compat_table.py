"""Render docs/compatibility.md (strategy -> works / how the penalty interacts / not applicable and why)
from the RESULTS of tests/test_strategies.py, never by hand.

    python tools/compat_table.py                       # runs the tests (junit XML), writes docs/compatibility.md
    python tools/compat_table.py --junit results.xml   # reads an existing junit XML instead
    python tools/compat_table.py --out -               # prints the Markdown
    python tools/compat_table.py --readme README.md    # also a short summary (strategies by result) in README

The outcome of each ``test_strategy[<case>]`` (passed / skipped / xfailed / failed) comes from the junit
XML; the declared notes (strategy class, expectation, importance, interaction) come from the ``CASES``
of tests/test_strategies.py, and the measured figures from the properties that each test records
(run with ``-o junit_family=xunit1`` so that they reach the XML).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = ROOT / "tests" / "test_strategies.py"
DEFAULT_OUT = ROOT / "docs" / "compatibility.md"
PARAM_TEST = "test_strategy"


def run_tests(junit_path: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
           f"--junitxml={junit_path}", str(TEST_FILE.relative_to(ROOT))]
    print("running:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=ROOT)
    return proc.returncode


def load_cases():
    """The CASES declared in tests/test_strategies.py (imported from its file)."""
    sys.path.insert(0, str(TEST_FILE.parent))
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("_compat_test_strategies", TEST_FILE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.CASES


def parse_junit(path: Path) -> dict:
    """{test name: {"outcome", "message", "props"}} for every testcase of test_strategies.py."""
    tree = ET.parse(path)
    out = {}
    for tc in tree.iter("testcase"):
        if not tc.get("classname", "").endswith("test_strategies"):
            continue
        name = tc.get("name")
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome, message = ("failed" if child.tag == "failure" else "error"), child.get("message", "")
            elif child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "xfailed" if "xfail" in kind else "skipped"
                message = child.get("message", "")
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        out[name] = {"outcome": outcome, "message": _clean(message), "props": props}
    return out


def _clean(msg: str) -> str:
    msg = (msg or "").strip()
    for prefix in ("Skipped: ", "xfail: ", "reason: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


RESULT_TEXT = {
    ("passed", "applies"): "**works**: penalty in the loss on experiences 1-2, final model closer to experience 0's solution",
    ("passed", "no_effect"): "**runs, no effect**: the penalty is added but has zero gradient on every trained parameter",
    ("passed", "joint"): "**runs, no effect**: one consolidation, after the only training run",
    ("passed", "raises"): "**not applicable**: the plugin raises RuntimeError naming the strategy",
}


def result_text(res, case) -> str:
    if res is None:
        return "not run"
    o = res["outcome"]
    if o == "passed":
        return RESULT_TEXT.get((o, case.expect), "passed")
    if o == "skipped":
        return f"**not tested**: {res['message'] or case.skip}"
    if o == "xfailed":
        return f"**bug (xfail)**: {res['message'] or case.xfail}"
    return f"**FAILS** ({o}): {res['message'][:200]}"


def measured(res) -> str:
    if res is None:
        return ""
    p = res["props"]
    parts = []
    if "mean_penalty_after_exp0" in p:
        parts.append(f"mean penalty {p['mean_penalty_after_exp0']}")
    if "exp0_distance_ratio" in p:
        parts.append(f"exp-0 distance ratio {p['exp0_distance_ratio']}")
    if "max_param_diff_vs_no_plugin" in p:
        parts.append(f"max param diff {p['max_param_diff_vs_no_plugin']}")
    if "num_consolidations" in p:
        parts.append(f"{p['num_consolidations']} consolidation(s)")
    return ", ".join(parts)


def render(results: dict, cases, source: str) -> str:
    import avalanche
    import torch

    counts = OrderedDict((k, 0) for k in ("passed", "skipped", "xfailed", "failed", "error"))
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [
        "# Compatibility with Avalanche strategies",
        "",
        f"<!-- generated by tools/compat_table.py from {source}; do not edit by hand -->",
        "",
        f"`ParameterChangePlugin` with every strategy class that `avalanche.training` exports "
        f"(avalanche-lib {getattr(avalanche, '__version__', '?')}, torch {torch.__version__}). "
        "Each row is one parametrization of `tests/test_strategies.py::test_strategy`: a tiny model on a "
        "3-experience benchmark, trained from the same seed with and without the plugin. "
        "*works* means: on every training iteration after the first consolidation `strategy.loss` grew by "
        "exactly the penalty (recomputed in float64 from the plugin's state), the two runs are identical "
        "until the penalty acts, and the final parameters differ and are closer (in experience 0's "
        "importance metric) to experience 0's solution. The *exp-0 distance ratio* is "
        "`sum F0 (theta - theta0*)^2` with the plugin over the same without it (< 1: protected).",
        "",
        "Test results: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ".",
        "",
        "| Strategy | Case | Result | Importance (factor) | Measured | How the penalty interacts |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        res = results.get(f"{PARAM_TEST}[{case.name}]")
        label = case.name if case.name != case.strategy else ""
        lines.append("| " + " | ".join(_md(x) for x in (
            f"`{case.strategy}`", label, result_text(res, case),
            f"{case.importance} ({case.factor:g})", measured(res), case.interaction)) + " |")
    others = [(n, r) for n, r in results.items() if not n.startswith(PARAM_TEST + "[")]
    if others:
        lines += ["", "## Other checks in the same file", "", "| Test | Result |", "|---|---|"]
        for n, r in others:
            text = {"passed": "passed", "skipped": "skipped"}.get(r["outcome"], r["outcome"])
            if r["message"]:
                text += f": {r['message']}"
            lines.append(f"| `{_md(n)}` | {_md(text)} |")
    lines.append("")
    return "\n".join(lines)


README_START, README_END = "<!-- compat:start -->", "<!-- compat:end -->"


SUMMARY_GROUPS = (
    ("works", "works"),
    ("no_effect", "runs, no effect"),
    ("not_applicable", "not applicable (the plugin raises instead of training without its penalty)"),
    ("not_tested", "not tested"),
    ("bug", "Avalanche bug (xfail)"),
    ("fails", "FAILS"),
)


def outcome_group(res, case) -> str:
    """One of the SUMMARY_GROUPS keys for a case's result."""
    if res is None or res["outcome"] == "skipped":
        return "not_tested"
    if res["outcome"] == "xfailed":
        return "bug"
    if res["outcome"] != "passed":
        return "fails"
    return {"applies": "works", "no_effect": "no_effect", "joint": "no_effect",
            "raises": "not_applicable"}.get(case.expect, "works")


def render_summary(results: dict, cases, source: str) -> str:
    """The README's short summary: strategies grouped by result (the full table is in docs/)."""
    groups = OrderedDict((key, []) for key, _ in SUMMARY_GROUPS)
    for case in cases:
        name = f"`{case.strategy}`"
        members = groups[outcome_group(results.get(f"{PARAM_TEST}[{case.name}]"), case)]
        if name not in members:
            members.append(name)
    lines = [f"<!-- generated by tools/compat_table.py from {source}; do not edit by hand -->", ""]
    for key, label in SUMMARY_GROUPS:
        if groups[key]:
            lines.append(f"* **{label}** ({len(groups[key])}): {', '.join(groups[key])}")
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> None:
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no {README_START} ... {README_END} block to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junit", type=Path, help="read this junit XML instead of running the tests")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output Markdown file, or - for stdout")
    ap.add_argument("--readme", type=Path, default=None,
                    help="also fill the compat:start/compat:end block of this README with a short summary")
    args = ap.parse_args(argv)
    if args.junit is None:
        tmp = Path(tempfile.mkdtemp(prefix="compat_")) / "junit.xml"
        rc = run_tests(tmp)
        if not tmp.exists():
            print(f"pytest produced no junit XML (exit status {rc})", file=sys.stderr)
            return 2
        junit, source = tmp, "a fresh run of tests/test_strategies.py"
    else:
        if not args.junit.exists():
            print(f"--junit: no such file {args.junit}", file=sys.stderr)
            return 2
        junit, source = args.junit, f"junit XML {args.junit.name}"
    results = parse_junit(junit)
    if not results:
        print(f"{junit} holds no test of tests/test_strategies.py", file=sys.stderr)
        return 2
    text = render(results, load_cases(), source)
    if args.readme is not None:
        update_readme(args.readme, render_summary(results, load_cases(), source))
        print(f"updated {args.readme}", file=sys.stderr)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
