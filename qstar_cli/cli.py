"""The ``qstar`` command line: a thin layer over the Python API.

Exit codes: 0 done, 1 run error (the disk, the device or a model failed; one line, the samples
committed so far kept), 2 bad usage or bad input (one line, no traceback), 130 stopped by Ctrl-C or
SIGTERM after saving (re-run the same command to resume). A traceback is printed only under
``qstar --debug`` or ``QSTAR_DEBUG=1``.
"""

from __future__ import annotations

import atexit
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_type_hints

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

import qstar_cli
from qstar_cli.analysis import ESS_FLOOR
from qstar_cli.errors import QstarInputError, QstarRunError
from qstar_cli.paths import check_output_dir
from qstar_cli.progress import ExportProgress, GenerateProgress

err_console = Console(stderr=True)
EXIT_INPUT, EXIT_RUN, EXIT_INTERRUPTED = 2, 1, 130
#: Click's UsageError, from whichever click typer runs on (recent typers ship their own copy).
UsageError = typer.BadParameter.__base__


def fail(message: str, code: int = EXIT_INPUT) -> typer.Exit:
    """Print ``error: message`` on one line of stderr (never wrapped, never read as markup)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _usage_errors_on_one_line() -> Iterator[None]:
    try:
        yield
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: its help is the answer
            raise
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        raise fail(" ".join(err.format_message().split()).rstrip(".") + where, err.exit_code) from None


class OneLineUsageErrors(TyperGroup):
    """Click's own usage errors (unknown flag, bad value, missing argument) as one line and exit 2,
    like every other mistake, instead of a framed panel."""

    def make_context(self, *args, **kwargs) -> typer.Context:
        with _usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_errors_on_one_line():
            return super().invoke(ctx)

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple:
        """The command, refusing both spellings of one of its on/off flags (``--overwrite --no-overwrite``):
        click would keep the last silently."""
        name, command, rest = super().resolve_command(ctx, args)
        given = set(rest[: rest.index("--")] if "--" in rest else rest)
        for param in command.params if command is not None else ():
            spellings = [[opt for opt in opts if opt in given] for opts in (param.opts, getattr(param, "secondary_opts", []))]
            if all(spellings):
                raise UsageError(f"{spellings[0][0]} and {spellings[1][0]} contradict each other; give one of them")
        return name, command, rest


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="Generate fine-tuning data from the per-token geometric mixture q = pi_theta^alpha * pi_t^(1-alpha) / Z.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(qstar_cli.__version__)
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of a failure (also QSTAR_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the qstar version."),
) -> None:
    """qstar: training responses close to a target model and likely under the policy."""
    if debug:
        os.environ["QSTAR_DEBUG"] = "1"


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Every failure as one ``error:`` line: bad input exit 2, a run error exit 1; any other exception
    (a bug) exit 1 too, its traceback printed only under ``--debug`` or ``QSTAR_DEBUG=1``."""
    try:
        yield
    except Exception as err:
        debug = os.environ.get("QSTAR_DEBUG", "") not in ("", "0")
        if debug:
            err_console.print(traceback.format_exc(), highlight=False, markup=False)
        if isinstance(err, QstarInputError):
            raise fail(str(err)) from None
        if isinstance(err, QstarRunError):
            raise fail(str(err), EXIT_RUN) from None
        if isinstance(err, OSError):  # the machine: a file that cannot be read or written
            where = f" {err.filename}" if err.filename else ""
            raise fail(f"cannot read or write{where}: {err.strerror or err}", EXIT_RUN) from None
        hint = "" if debug else " (run with qstar --debug or QSTAR_DEBUG=1 for the traceback)"
        first = (str(err).strip().splitlines() or [""])[0]
        raise fail(f"{type(err).__name__}: {first}{hint}", EXIT_RUN) from None


def run() -> None:
    """Run the command line in this process, then end the process.

    Once the command is done (its files closed, its output flushed, the exit handlers run), the
    process ends at once with the command's exit code: the interpreter's teardown of torch and
    transformers would take about a second more, and a Ctrl-C during it would print a traceback
    from an exit handler, so signals are ignored from then on."""
    try:
        app(prog_name="qstar")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except KeyboardInterrupt:  # before the command began
        code = EXIT_INTERRUPTED
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe: nothing more can be said there
            pass
    atexit._run_exitfuncs()
    os._exit(code)


@app.command()
def version() -> None:
    """Print the qstar version."""
    typer.echo(qstar_cli.__version__)


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise QstarInputError(f"cannot read config {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise QstarInputError(f"config {path} is not UTF-8 text") from err
    except yaml.YAMLError as err:
        raise QstarInputError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise QstarInputError(f"config {path} must be a mapping of setting: value")
    return values


_CONFIG_HELP = "YAML file of settings (keys as the flags, e.g. model_theta); flags given here override it."


def generate_options(config_class: type | None = None) -> list[inspect.Parameter]:
    """The options of ``qstar generate``: one per setting of :class:`GenerateConfig`, its type, help
    and default text from the declaration, then ``--config``. A flag not given is None (unset)."""
    from qstar_cli.generate.config import GenerateConfig, flag, settings, shown_default

    config_class = config_class or GenerateConfig
    hints = get_type_hints(config_class)
    params = []
    for f, info in settings(config_class):
        default = shown_default(f, info)
        text = escape(info.text) + (f" (default: {escape(default)})" if default and hints[f.name] is not bool else "")
        if hints[f.name] is bool:
            # Both spellings, so that a YAML config's ``overwrite: true`` can be turned off here.
            option = typer.Option(None, f"{flag(f.name)}/--no-{flag(f.name)[2:]}", help=text)
            annotation = bool | None
        else:
            members = [t for t in getattr(hints[f.name], "__args__", (hints[f.name],)) if t is not type(None)]
            option, annotation = typer.Option(None, flag(f.name), help=text), info.cli_type or members[0]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    config = typer.Option(None, "--config", help=_CONFIG_HELP)
    return [*params, inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=Path)]


def generate(config: Path | None = None, **flags: Any) -> None:
    """Sample a response to every prompt of a dataset from q*, resumably, with per-token diagnostics."""
    flags = {k: v for k, v in flags.items() if v is not None}
    from qstar_cli.generate.config import GenerateConfig, setting_names
    from qstar_cli.generate.run import run_generate, stop_on_signals

    with one_line_errors():
        from_file = setting_names(read_config_file(config), str(config))
        settings = GenerateConfig.from_dict({**from_file, **flags}, source=str(config or "flags"))
        _quiet_libraries()
        with stop_on_signals() as stop, GenerateProgress(stop) as progress:
            summary = run_generate(settings, progress=progress, stop=stop)

    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items()))
    progress.print(
        f"{summary.done}/{summary.total} samples in {summary.paths.main}"
        + (f" (rows skipped: {skipped})" if skipped else "")
        + f"; {summary.new_tokens} new tokens in {summary.seconds:.1f} s ({summary.tokens_per_second:.1f} tok/s)"
    )
    if summary.status == "interrupted":
        why = "standard output was closed" if progress.stdout_closed.is_set() else "stopped"
        err_console.print(
            f"{why}: {summary.done} of {summary.total} samples are saved; re-run the same command to resume",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(EXIT_INTERRUPTED)
    files = [summary.paths.main, summary.paths.diagnostics, summary.paths.meta]
    progress.print("files: " + ", ".join(str(p) for p in files if p.exists()))


generate.__signature__ = inspect.Signature(generate_options())
app.command()(generate)


def _quiet_libraries() -> None:
    """Library progress bars and load reports would interleave with ours."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_runs(sidecars: list[Path]):
    from qstar_cli.analysis.statistics import analyze_sidecar
    from qstar_cli.runfiles.format import SIDECAR_SUFFIX, OutputPaths

    runs = []
    for path in sidecars:
        if path.is_dir():
            raise QstarInputError(f"{path} is a directory; give a run's {SIDECAR_SUFFIX} file")
        if not path.is_file():
            raise QstarInputError(f"diagnostics file not found: {path}")
        run = analyze_sidecar(path)
        if not run.samples:
            sidecar = OutputPaths(path).diagnostics
            hint = f"; its sidecar is {sidecar}" if sidecar.is_file() and not path.name.endswith(SIDECAR_SUFFIX) else ""
            unreadable = f" ({len(run.corrupt_lines)} unreadable lines)" if run.corrupt_lines else ""
            raise QstarInputError(f"{path} holds no readable samples{unreadable}{hint}")
        if run.corrupt_lines:
            shown = ", ".join(map(str, run.corrupt_lines[:10])) + (" ..." if len(run.corrupt_lines) > 10 else "")
            err_console.print(f"warning: {path}: skipped {len(run.corrupt_lines)} corrupt line(s): {shown}", highlight=False)
        runs.append(run)
    return runs


def _report(runs, labels, as_json: bool, plots: Path | None, single: bool) -> None:
    import orjson

    from qstar_cli.analysis.plots import plot_runs
    from qstar_cli.analysis.tables import field_table, overview_table

    if as_json:
        payload = (
            {"label": labels[0], **runs[0].summary} if single else {"runs": [{"label": lb, **r.summary} for r, lb in zip(runs, labels)]}
        )
        typer.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
    else:
        console = Console()
        console.width = max(console.width, 100)  # the field tables need 100 columns; never drop one
        console.print(overview_table(runs, labels))
        if single:
            console.print(field_table(runs[0], "tokens"))
            console.print(field_table(runs[0], "samples"))
    if plots is not None:
        written = plot_runs(runs, labels, plots)
        err_console.print("plots: " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)


@app.command()
def analyze(
    sidecar: Path = typer.Argument(..., help="A run's OUT.diagnostics.jsonl."),
    json_output: bool = typer.Option(False, "--json", help="Print the statistics as JSON instead of tables."),
    plots: Path = typer.Option(None, help="Write PNG plots into this directory."),
    export_weights: Path = typer.Option(None, help="Write per-sample training weights (JSONL) to this file."),
    ess_floor: float = typer.Option(ESS_FLOOR, help="Smallest ESS/n allowed for the exported weights w^gamma."),
) -> None:
    """Statistics, theoretical checks and importance weights of one run's diagnostics."""
    with one_line_errors():
        if not 0.0 < ess_floor <= 1.0:
            raise QstarInputError(f"--ess-floor must lie in (0, 1], got {ess_floor}")
        if plots is not None:
            check_output_dir(plots, "--plots")
        if export_weights is not None:
            from qstar_cli.runfiles.format import OutputPaths, check_one_run
            from qstar_cli.runfiles.output import check_output

            run = OutputPaths.of(sidecar)
            check_output(export_weights, "--export-weights", [sidecar, run.main, run.meta])
        if export_weights is not None and run.main.is_file():  # the weights go with the main file's samples
            check_one_run(run.main, sidecar, "give the sidecar of the run beside it")
        runs = _load_runs([sidecar])
        _report(runs, [_labels([sidecar])[0]], json_output, plots, single=True)
        if export_weights is not None:
            _export(runs[0], export_weights, ess_floor)


@app.command()
def compare(
    sidecars: list[Path] = typer.Argument(..., help="Two or more OUT.diagnostics.jsonl files."),
    json_output: bool = typer.Option(False, "--json", help="Print the statistics as JSON instead of a table."),
    plots: Path = typer.Option(None, help="Write overlaid PNG plots into this directory."),
) -> None:
    """Several runs side by side (e.g. fixed vs entropy vs kl_symmetry): one table, overlaid plots."""
    with one_line_errors():
        if len(sidecars) < 2:
            raise QstarInputError(f"compare needs two or more runs, got {len(sidecars)}; for one run use qstar analyze")
        if plots is not None:
            check_output_dir(plots, "--plots")
        from qstar_cli.analysis.tables import differing_settings

        runs = _load_runs(sidecars)
        if differing := differing_settings(sidecars):
            shown = "; ".join(f"{name} {', '.join(map(str, values))}" for name, values in differing.items())
            err_console.print(
                f"note: the runs differ in more than their alpha method ({shown}): their statistics are not like for like",
                highlight=False,
                soft_wrap=True,
            )
        _report(runs, _labels(sidecars), json_output, plots, single=False)


def _labels(sidecars: list[Path]) -> list[str]:
    from qstar_cli.analysis.tables import run_labels

    return run_labels(sidecars)


def _export(run, path: Path, ess_floor: float) -> None:
    import orjson

    from qstar_cli.analysis.statistics import weight_records
    from qstar_cli.runfiles.output import atomic_output

    records, chosen = weight_records(run, ess_floor)
    with atomic_output(path) as out:
        out.write(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records))
    err_console.print(
        f"weights: {path} ({len(records)} samples, gamma {chosen.gamma:.4f}, ESS/n {chosen.ess_ratio:.3f})",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def explain(
    output: Path = typer.Option(
        None, help="Directory for q_star_behavior_2d.png and q_alpha_evolution.png. (default: ., or none with --json)"
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the table as JSON instead of a table (figures only with --output)."),
) -> None:
    """q* on two 2-D Gaussians: the pictures and alpha* table, closed form beside solve_alpha on a grid."""
    import orjson

    from qstar_cli.explain.cases import explain_cases
    from qstar_cli.explain.plots import explain_table, write_figures

    if output is None and not json_output:
        output = Path(".")
    with one_line_errors():
        if output is not None:
            check_output_dir(output, "--output")
            output.mkdir(parents=True, exist_ok=True)
        explanation = explain_cases()
        if json_output:
            typer.echo(orjson.dumps({"cases": explanation.records()}, option=orjson.OPT_INDENT_2).decode())
        else:
            console = Console()
            console.width = max(console.width, 120)  # the table needs 120 columns; never drop one
            console.print(explain_table(explanation))
        if output is not None:
            written = write_figures(explanation, output)
            err_console.print("figures: " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run's main OUT.jsonl; its OUT.diagnostics.jsonl (level full) must lie beside it."),
    output: Path = typer.Option(..., help="The training set to write: FILE.parquet or FILE.jsonl."),
    include_truncated: bool = typer.Option(False, "--include-truncated", help="Keep samples that hit max_new_tokens."),
    ess_floor: float = typer.Option(ESS_FLOOR, help="Smallest ESS/n allowed for the weights w^gamma."),
    gamma: float = typer.Option(None, help="Fix the exponent of w^gamma in [0, 1] instead of choosing it at --ess-floor."),
    keep: str = typer.Option(
        "all", help="all, or correct: only the responses graded right (a graded run), weights renormalised over them."
    ),
    teacher_topk: bool = typer.Option(
        False, "--teacher-topk", help="Add pi_t's top-K per token (a run generated with --teacher-topk K), for distillation."
    ),
) -> None:
    """A pre-tokenized, weighted training set: the exact ids pi_theta saw and sampled, for TRL's SFTTrainer."""
    from qstar_cli.analysis.export import ExportConfig, export_training_set

    with one_line_errors():
        config = ExportConfig(run, output, include_truncated, ess_floor, gamma, keep=keep, teacher_topk=teacher_topk)
        with ExportProgress(err_console) as progress:
            summary = export_training_set(config, progress)
    if summary.incomplete:
        done, samples = summary.incomplete
        err_console.print(
            f"warning: the run is not finished ({done} of {samples} samples, as its manifest says): exported those it holds; "
            "re-run its generate command to finish it",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    if summary.skipped_lines:
        lines = summary.skipped_lines
        shown = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
        err_console.print(f"warning: skipped {len(lines)} torn or incomplete sample line(s): {shown}", highlight=False)
    left_out = f"; left out {summary.truncated_left_out} truncated (hit max_new_tokens)" if summary.truncated_left_out else ""
    typer.echo(
        f"{summary.exported} samples in {summary.output}{left_out}" + "".join(f"; left out {n} {g}" for g, n in summary.dropped.items())
    )
    typer.echo(f"weights: gamma {summary.weights.gamma:.4f}, ESS/n {summary.weights.ess_ratio:.3f}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run's main OUT.jsonl; its sidecar and manifest are read beside it."),
    output: Path = typer.Option(None, help="The HTML file to write. (default: OUT.report.html beside the run)"),
    tokenizer: str = typer.Option(None, help="pi_t's tokenizer: local directory, hub id, .gguf or demo. (default: the manifest's model_t)"),
    max_samples: int = typer.Option(200, help="Samples embedded: the highest and lowest weights and a random draw of the rest."),
    seed: int = typer.Option(0, help="Seed of the random draw of samples."),
) -> None:
    """One self-contained HTML page of a run: settings, statistics, plots and its samples token by token."""
    from qstar_cli.analysis.html_report import build_report

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]reading the run"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with one_line_errors(), bar:
        task = bar.add_task("read", total=None)
        summary = build_report(
            run, output, tokenizer, max_samples, seed, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    for note in summary.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    typer.echo(f"report: {summary.output} ({summary.embedded} of {summary.samples} samples embedded, {summary.bytes / 1e6:.2f} MB)")


@app.command()
def merge(
    output: Path = typer.Argument(..., help="The run's OUT.jsonl; its shards OUT-0000I-of-0000N.jsonl lie beside it."),
) -> None:
    """Join the shards of one run (generate --num-shards) into OUT.jsonl, its sidecar and manifest, in schedule order."""
    from qstar_cli.runfiles.merge import merge_shards

    with one_line_errors():
        summary = merge_shards(output)
    files = [summary.paths.main, summary.paths.diagnostics, summary.paths.meta]
    typer.echo(f"{summary.samples} samples from {summary.shards} shards in " + ", ".join(str(p) for p in files if p.exists()))


from qstar_cli.grading.command import grade_command  # noqa: E402 (its options live beside grading)

app.command("grade")(grade_command(one_line_errors, lambda: ExportProgress(err_console)))
