"""Command line: ``sweep run | plan | status | report | export | similarity | tasks | heal | browse``.

The only place that turns errors into exit codes. Torch-free: each command imports the engine (or an extra) when it
runs, so ``sweep report`` and ``sweep --help`` never load torch.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from sweep import __version__, store
from sweep.config import COMMAND_ONLY_FIELDS, TASK_FIELDS, SweepConfig, build_config, field_docs, flag
from sweep.errors import SweepError
from sweep.plan import format_duration

EXIT_USAGE = 2

MODEL_FIELDS = ("model", "revision", "dtype", "device", "tokenizer", "random_init", "trust_remote_code")
"""Fields `sweep export` needs (it evaluates nothing)."""

TASKS_COMMAND_FIELDS = MODEL_FIELDS + ("db", "batch_size", "seed", "strategy", "k", "n", "remove", "force") + TASK_FIELDS
"""Fields of `sweep tasks`: the model, the variant choice and the lm-eval settings (no perplexity text)."""
HEAL_COMMAND_FIELDS = tuple(f.name for f in fields(SweepConfig)
                            if f.name not in ("strategy", "k", "n", "force", "best", "pareto", "unit", "span",
                                              "positions"))
"""Fields of `sweep heal`: everything of `sweep run` that defines its setup (so rows link), plus LoRA and tasks."""


def _add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per SweepConfig field, help taken from the field's docstring; default None = 'not given'."""
    docs = field_docs()
    for f in fields(SweepConfig):
        if names is not None and f.name not in names:
            continue
        if names is None and f.name in COMMAND_ONLY_FIELDS:
            continue  # settings of `sweep tasks` / `sweep heal` only: not flags of run and plan
        option = f"--{flag(f.name)}"
        if f.type.startswith("bool"):
            parser.add_argument(option, action="store_const", const=True, default=None, help=docs.get(f.name))
        else:
            metavar = f.name.upper()
            kind = int if f.type.startswith("int") else str
            parser.add_argument(option, type=kind, default=None, metavar=metavar,
                                help=f"{docs.get(f.name, '')} (default: {f.default})")


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PRESET",
                        help="YAML preset: a path or a name in configs/ (e.g. gpt2); flags override its values")


def resolve_preset(name: str | None) -> Path | None:
    """``gpt2`` -> ``configs/gpt2.yaml`` when that exists; otherwise the path as given."""
    if not name:
        return None
    path = Path(name)
    candidate = Path("configs") / f"{name}.yaml"
    if not path.exists() and candidate.exists():
        return candidate
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Measure a causal LM with decoder layers removed.")
    parser.add_argument("--version", action="version", version=f"sweep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="measure every planned variant and store each result in the DB")
    _add_preset_flag(run)
    _add_config_flags(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    plan = sub.add_parser("plan", help="show how many variants a plan has, how many are measured, and an estimate")
    _add_preset_flag(plan)
    _add_config_flags(plan)

    report = sub.add_parser("report", help="write markdown reports from the DB (no model loaded)")
    report.add_argument("--db", default="results.db", help="results database (default: results.db)")
    report.add_argument("--out", default="reports", help="directory for reports/<model>.md (default: reports)")
    report.add_argument("--model", default=None, help="only this model (default: every model in the DB)")
    report.add_argument("--setup", default=None, help="setup id when a model has several (default: newest)")
    report.add_argument("--format", default="md", choices=("md", "csv", "json"),
                        help="md: reports with figures and index.md; csv/json: the view's rows, one file per model "
                             "in --out, or standard output with --out - (default: md)")
    report.add_argument("--no-figures", action="store_true", help="(md) write the markdown without PNG figures")

    status = sub.add_parser("status", help="progress of running and past sweeps in a DB (safe while one runs)")
    status.add_argument("--db", default="results.db", help="results database (default: results.db)")

    export = sub.add_parser("export", help="save a physically pruned model that reloads with from_pretrained")
    _add_preset_flag(export)
    _add_config_flags(export, MODEL_FIELDS)
    export.add_argument("--remove", required=True, help='layers to remove, e.g. "9,10,11"')
    export.add_argument("--out", required=True, help="output directory")

    similarity = sub.add_parser("similarity", help="angular distances and Block Influence of every layer on "
                                "calibration text, stored in the DB (for --strategy angular/block-influence)")
    _add_preset_flag(similarity)
    _add_config_flags(similarity)
    similarity.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_tasks_and_heal_parsers(sub)
    return parser


def _add_tasks_and_heal_parsers(sub) -> None:
    """`sweep tasks` and `sweep heal`."""
    tasks = sub.add_parser("tasks", help="accuracy of chosen variants on lm-eval tasks, stored in table task_results")
    _add_preset_flag(tasks)
    _add_config_flags(tasks, TASKS_COMMAND_FIELDS)
    tasks.add_argument("--quiet", action="store_true", help="no progress bars")

    heal = sub.add_parser("heal", help="LoRA-heal one pruned variant, re-measure it, store it in table heals")
    _add_preset_flag(heal)
    _add_config_flags(heal, HEAL_COMMAND_FIELDS)
    heal.add_argument("--export", metavar="DIR", default=None,
                      help="save the healed (LoRA-merged, physically pruned) model to DIR; reloads with from_pretrained")
    heal.add_argument("--quiet", action="store_true", help="no progress bars")

    browse = sub.add_parser("browse", help="explore the DB in a browser (Datasette, read-only): tables, one-click "
                            "queries and interactive charts; needs sweep[browse]")
    browse.add_argument("--db", default="results.db", help="results database (default: results.db)")
    browse.add_argument("--port", type=int, default=8001, help="port to serve on (default: 8001)")
    browse.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes it to the network (default: 127.0.0.1)")


def _config_from(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> SweepConfig:
    given = {f.name: getattr(args, f.name) for f in fields(SweepConfig)
             if (names is None or f.name in names) and hasattr(args, f.name)}
    return build_config(resolve_preset(args.config), **given)


# Each command imports what it runs when it runs: the engine and the extras pull in torch (seconds to import),
# which `sweep report`, `sweep status` and `--help` do not need.


def cmd_run(args: argparse.Namespace) -> int:
    from sweep.engine import run_sweep  # deferred: torch

    summary = run_sweep(_config_from(args), progress=not args.quiet)
    return 128 + (summary.stop_signal or signal.SIGINT) if summary.interrupted else 0  # 130 Ctrl-C, 143 SIGTERM


def cmd_plan(args: argparse.Namespace) -> int:
    from sweep.engine import describe_plan  # deferred: torch

    describe_plan(_config_from(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.report import export_rows, report_text, write_reports  # deferred: pandas and matplotlib

    if args.format != "md":
        paths = export_rows(args.db, args.out, args.format, model=args.model, setup=args.setup)
        if paths:
            print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        return 0
    paths = write_reports(args.db, args.out, model=args.model, setup=args.setup, figures=not args.no_figures)
    print(report_text(paths))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sweep.engine import export_variant  # deferred: torch

    print(export_variant(_config_from(args, MODEL_FIELDS), args.remove, args.out))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    describe_status(args.db)
    return 0


def describe_status(db_path: str, log: Callable[[str], None] = print) -> list[dict]:
    """What ``sweep status`` prints: the newest runs, their progress, rate and ETA. Loads no model."""
    runs = store.runs_overview(db_path)
    if not runs:
        log(f"{db_path}: no sweep has run yet")
        return runs
    for run in runs:
        started = datetime.fromisoformat(run["started_at"])
        last = datetime.fromisoformat(run["heartbeat_at"])
        elapsed = max((last - started).total_seconds(), 1e-9)
        line = (f"run {run['id']:>3}  {run['status']:<11} {run['model']}  setup {run['setup_id']}  "
                f"{run['measured']:,}/{run['to_measure']:,} measured ({run['planned']:,} planned)  "
                f"started {run['started_at']}  pid {run['pid']} on {run['host']}")
        if run["status"] == "running" and run["measured"]:
            rate = run["measured"] / elapsed
            left = (run["to_measure"] - run["measured"]) / rate
            age = (datetime.now(timezone.utc) - last).total_seconds()
            line += f"  {rate * 60:.1f} variants/min, about {format_duration(left)} left, last beat {age:.0f} s ago"
        log(line)
    return runs



def cmd_similarity(args: argparse.Namespace) -> int:
    from sweep.engine import run_similarity  # deferred: torch

    run_similarity(_config_from(args), progress=not args.quiet)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from sweep.extras.tasks import run_tasks  # deferred: torch and lm-eval

    run_tasks(_config_from(args, TASKS_COMMAND_FIELDS), progress=not args.quiet)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from sweep.extras.heal import run_heal  # deferred: torch and peft

    row = run_heal(_config_from(args, HEAL_COMMAND_FIELDS), export=args.export, progress=not args.quiet)
    return 0 if row["status"] == "ok" else 1


def cmd_browse(args: argparse.Namespace) -> int:
    from sweep.extras.browse import serve  # deferred: datasette

    serve(args.db, host=args.host, port=args.port)
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "report": cmd_report, "export": cmd_export, "status": cmd_status}
COMMANDS.update(similarity=cmd_similarity, tasks=cmd_tasks, heal=cmd_heal, browse=cmd_browse)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sweep: interrupted; every result measured so far is in the database", file=sys.stderr)
        return 130


STOPPED_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""Exit codes of a run stopped by Ctrl-C (130) or SIGTERM (143)."""


def program() -> None:
    """The ``sweep`` program: :func:`main`, then exit with its code.

    A second Ctrl-C or SIGTERM may land after a stopped run has saved everything and recorded itself
    ``interrupted``, while the interpreter shuts down; Python would then die by the signal (exit -2, no message).
    Once the process is stopping, further stop signals are ignored, so the exit code stays 130 or 143.
    """
    try:
        code = main()
        if code in STOPPED_EXITS:
            _ignore_stop_signals()
    except KeyboardInterrupt:  # a signal between main's return and the line above
        _ignore_stop_signals()
        code = STOPPED_EXITS[0]
    raise SystemExit(code)


def _ignore_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    program()
