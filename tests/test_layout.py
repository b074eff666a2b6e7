"""The package's layers: no import cycle, no module over ~500 lines, light imports where a command
only reads files, and each ``generate`` setting declared once (the CLI, the config file, the
fingerprint and the docs derived from the declaration)."""

import ast
import dataclasses
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qstar_cli
from qstar_cli.cli import generate_options
from qstar_cli.distributions.alpha_methods import ALPHA_METHODS, AlphaMethodInfo
from qstar_cli.distributions.mixture import solve_alpha
from qstar_cli.generate.config import (
    ConfigError,
    GenerateConfig,
    flag,
    flag_table,
    setting,
    settings,
)
from qstar_cli.grading.command import grade_command
from qstar_cli.grading.graders import GRADERS, Grader, GraderError, GraderSpec, grade, resolve_grader

PACKAGE = Path(qstar_cli.__file__).parent
REPO = PACKAGE.parent
MAX_LINES = 510


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The qstar_cli modules ``path`` imports anywhere (functions too), but under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}  # fmt: skip
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from package import module
    return {name for name in found if name.startswith("qstar_cli")}


def test_no_import_cycle():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [name, nxt]) if nxt in path else f"{name} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    # The maths imports nothing of ours but the table of its alpha methods, which imports nothing of ours.
    assert graph["qstar_cli.distributions.mixture"] == {"qstar_cli.distributions.alpha_methods"}
    assert graph["qstar_cli.distributions.alpha_methods"] == set()


def test_no_module_is_over_500_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize(
    "module",
    ["qstar_cli", "qstar_cli.cli", "qstar_cli.runfiles.merge", "qstar_cli.analysis.statistics", "qstar_cli.analysis.export",
     "qstar_cli.analysis.html_report", "qstar_cli.generate.config"],
)  # fmt: skip
def test_reading_commands_import_neither_torch_nor_datasets(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_the_loss_maths_is_tested_without_trl():
    """The losses' tests need torch, not the ``train`` extra; the trainer's are in test_weighted_sft.py."""
    code = "import sys, tests.training.test_losses; print('trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_api_is_importable_from_the_package():
    assert qstar_cli.GenerateConfig is GenerateConfig
    for name in qstar_cli.__all__:
        assert getattr(qstar_cli, name) is not None


def test_every_setting_is_one_option_and_one_table_row():
    options = {p.name: p.default.param_decls for p in generate_options()}
    names = [f.name for f, _ in settings()]
    assert list(options) == [*names, "config"]
    assert all(options[name] in ((flag(name),), (f"{flag(name)}/--no-{flag(name)[2:]}",)) for name in names)
    table = flag_table()
    assert all(f"| `{flag(name)}` |" in table for name in names)


def test_a_setting_declared_once_reaches_the_cli_the_config_the_fingerprint_and_the_docs():
    extended = dataclasses.make_dataclass(
        "Extended",
        [("beam_width", int, setting(3, "A new setting.", since="0.2.0")),
         ("log_every", int, setting(10, "Another, which does not change the samples.", fingerprinted=False))],
        bases=(GenerateConfig,),
    )  # fmt: skip
    config = extended.from_dict({"model-theta": "demo", "model_t": "demo", "dataset": "d.jsonl", "beam-width": "5"})
    assert config.beam_width == 5  # the YAML config and its types
    fingerprint = config.fingerprint_config()
    assert fingerprint["beam_width"] == 5 and "log_every" not in fingerprint
    options = {p.name: p for p in generate_options(extended)}
    assert options["beam_width"].default.param_decls == ("--beam-width",) and options["beam_width"].annotation is int
    assert "A new setting. (default: 3)" in options["beam_width"].default.help
    assert "| `--beam-width` | A new setting. | `3` | yes | 0.2.0 |" in flag_table(extended)
    assert "| `--log-every` | Another, which does not change the samples. | `10` | no | 0.1.0 |" in flag_table(extended)
    assert dataclasses.asdict(config)["beam_width"] == 5  # what the manifest's config records


def docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_the_docs_tables_are_the_declarations():
    """docs/generate.md holds the flag, grader and alpha-method tables as their declarations make
    them, docs/model-families.md the family table as the family matrix makes it (rewrite them with
    docs/hooks.py)."""
    hooks = docs_hooks()
    for page, name, make in hooks.TABLES:
        text = (REPO / "docs" / page).read_text()
        assert hooks.markers(name)[0] in text and hooks.with_table(text, name, make) == text, f"{page}: run .venv/bin/python docs/hooks.py"


def generated_page(hooks, page: str) -> str:
    """``docs/PAGE`` with every table of it made afresh."""
    text = (REPO / "docs" / page).read_text()
    for table_page, name, make in hooks.TABLES:
        text = hooks.with_table(text, name, make) if table_page == page else text
    return text


def test_a_grader_and_an_alpha_method_added_to_their_registries_reach_the_cli_the_checks_and_the_docs(monkeypatch):
    """One entry in each table is all it takes: the command line's choices and help, the config and
    grader checks, and the docs' tables show it; an unknown name stays an error."""
    monkeypatch.setitem(GRADERS, "length", Grader(lambda response, reference: {"correct": len(response) < 9}, "under nine characters",
                                                  needs_reference=False))  # fmt: skip
    monkeypatch.setitem(ALPHA_METHODS, "half", AlphaMethodInfo("one half", lambda logp_theta, logp_t, **_: logp_theta[..., 0] * 0 + 0.5))
    generate_help = {p.name: p.default.help for p in generate_options()}
    assert "length (under nine characters)" in generate_help["grader"] and "half: one half" in generate_help["alpha_method"]
    grade_help = {name: p.default.help for name, p in inspect.signature(grade_command(None, None)).parameters.items()}
    assert "length (under nine characters)" in grade_help["grader"]
    page = generated_page(docs_hooks(), "generate.md")
    assert "| `length` | under nine characters | no |" in page and "| `half` | one half | no |" in page

    config = GenerateConfig(model_theta="demo", model_t="demo", dataset="d.jsonl", alpha_method="HALF", grader="length")
    assert config.alpha_method == "half" and config.fingerprint_config()["alpha"] is None  # half takes no --alpha
    logp = torch.randn(3, 7).log_softmax(-1)
    assert solve_alpha(logp, logp.flip(-1), method="half").tolist() == [0.5] * 3
    assert grade(resolve_grader("length", None), "short", {}) == {"correct": True}  # no reference needed
    with pytest.raises(ConfigError, match="unknown alpha method 'halves'; choose one of kl_symmetry, entropy, fixed, half"):
        GenerateConfig(model_theta="demo", model_t="demo", dataset="d.jsonl", alpha_method="halves")
    for unknown in (lambda: resolve_grader("lengths", None), lambda: GraderSpec("lengths")):
        with pytest.raises(GraderError, match="unknown grader 'lengths'; choose one of math, exact, length, none, FILE.py:FUNCTION"):
            unknown()
