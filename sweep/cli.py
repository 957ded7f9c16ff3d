"""Command line: ``sweep run | plan | status | report | export | similarity | tasks | heal | browse``.

The only place that turns errors into exit codes. Torch-free: each command imports the engine (or an extra) when it
runs, so ``sweep report`` and ``sweep --help`` never load torch.
"""
from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from sweep import Log, __version__, store
from sweep.config import SweepConfig, build_config, command_fields, default, field_docs, flag
from sweep.errors import SweepError
from sweep.plan import format_duration, needing, strategy_help

EXIT_USAGE = 2

def _add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per SweepConfig field ``sweep COMMAND`` offers (:func:`command_fields`), help taken from the field's
    docstring; default None = 'not given'."""
    docs = {**field_docs(), "strategy": strategy_help()}  # the names come from the strategy registry
    names = command_fields(command)
    for f in fields(SweepConfig):
        if f.name not in names:
            continue
        option = f"--{flag(f.name)}"
        if f.type.startswith("bool"):
            parser.add_argument(option, action="store_const", const=True, default=None, help=docs.get(f.name))
        else:
            metavar = f.name.upper()
            kind = int if f.type.startswith("int") else str
            parser.add_argument(option, type=kind, default=None, metavar=metavar,
                                help=f"{docs.get(f.name, '')} (default: {f.default})")


def _config_command(sub, command: str, summary: str) -> argparse.ArgumentParser:
    """The parser of ``sweep COMMAND``, configured by a preset and the config flags it offers."""
    parser = sub.add_parser(command, help=summary)
    parser.add_argument("--config", metavar="PRESET",
                        help="YAML preset: a path or a name in configs/ (e.g. gpt2); flags override its values")
    _add_config_flags(parser, command)
    return parser


def _add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_db_flag(parser: argparse.ArgumentParser) -> None:
    """``--db`` of the commands that only read the DB (no other config flag)."""
    parser.add_argument("--db", default=default("db"), help=f"results database (default: {default('db')})")


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

    _add_quiet_flag(_config_command(sub, "run", "measure every planned variant and store each result in the DB"))
    _config_command(sub, "plan", "show how many variants a plan has, how many are measured, and an estimate")

    report = sub.add_parser("report", help="write markdown reports from the DB (no model loaded)")
    _add_db_flag(report)
    report.add_argument("--out", default="reports", help="directory for reports/<model>.md (default: reports)")
    report.add_argument("--model", default=None, help="only this model (default: every model in the DB)")
    report.add_argument("--setup", default=None, help="setup id when a model has several (default: newest)")
    report.add_argument("--format", default="md", choices=("md", "csv", "json"),
                        help="md: reports with figures and index.md; csv/json: the view's rows, one file per model "
                             "in --out, or standard output with --out - (default: md)")
    report.add_argument("--no-figures", action="store_true", help="(md) write the markdown without PNG figures")

    status = sub.add_parser("status", help="progress of running and past sweeps in a DB (safe while one runs)")
    _add_db_flag(status)

    export = _config_command(sub, "export", "save a physically pruned model that reloads with from_pretrained")
    export.add_argument("--remove", required=True, help='layers to remove, e.g. "9,10,11"')
    export.add_argument("--out", required=True, help="output directory")

    _add_quiet_flag(_config_command(sub, "similarity", "angular distances and Block Influence of every layer on "
                                    "calibration text, stored in the DB (for --strategy "
                                    f"{'/'.join(needing('signals'))})"))
    _add_tasks_and_heal_parsers(sub)
    return parser


def _add_tasks_and_heal_parsers(sub) -> None:
    """`sweep tasks` and `sweep heal`."""
    _add_quiet_flag(_config_command(sub, "tasks", "accuracy of chosen variants on lm-eval tasks, stored in table "
                                    "task_results"))
    heal = _config_command(sub, "heal", "LoRA-heal one pruned variant, re-measure it, store it in table heals")
    heal.add_argument("--export", metavar="DIR", default=None,
                      help="save the healed (LoRA-merged, physically pruned) model to DIR; reloads with from_pretrained")
    _add_quiet_flag(heal)

    browse = sub.add_parser("browse", help="explore the DB in a browser (Datasette, read-only): tables, one-click "
                            "queries and interactive charts; needs sweep[browse]")
    _add_db_flag(browse)
    browse.add_argument("--port", type=int, default=8001, help="port to serve on (default: 8001)")
    browse.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes it to the network (default: 127.0.0.1)")


def _config_from(args: argparse.Namespace) -> SweepConfig:
    """The config of ``args.command``: its preset, then the config flags it offers (not its own, like --remove of
    `sweep export`)."""
    given = {name: getattr(args, name) for name in command_fields(args.command)}
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

    print(export_variant(_config_from(args), args.remove, args.out))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    describe_status(args.db)
    return 0


def describe_status(db_path: str, log: Log = print) -> list[dict]:
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

    run_tasks(_config_from(args), progress=not args.quiet)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from sweep.extras.heal import run_heal  # deferred: torch and peft

    row = run_heal(_config_from(args), export=args.export, progress=not args.quiet)
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
