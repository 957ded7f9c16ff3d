"""Command line: ``sweep plan | run | status | report | export``. The only place that turns errors into exit codes."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from sweep import __version__
from sweep.config import COMMAND_ONLY_FIELDS, TASK_FIELDS, SweepConfig, build_config, field_docs, flag
from sweep.errors import SweepError

EXIT_USAGE = 2

MODEL_FIELDS = ("model", "revision", "dtype", "device", "tokenizer", "random_init", "trust_remote_code")
"""Fields `sweep export` needs (it evaluates nothing)."""

TASKS_COMMAND_FIELDS = MODEL_FIELDS + ("db", "batch_size", "seed", "strategy", "k", "n", "remove", "force") + TASK_FIELDS
"""Fields of `sweep tasks`: the model, the variant choice and the lm-eval settings (no perplexity text)."""
HEAL_COMMAND_FIELDS = tuple(f.name for f in fields(SweepConfig)
                            if f.name not in ("strategy", "k", "n", "force", "best", "pareto"))
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
    """`sweep tasks` and `sweep heal` (issue #7)."""
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


def _config_from(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> SweepConfig:
    given = {f.name: getattr(args, f.name) for f in fields(SweepConfig)
             if (names is None or f.name in names) and hasattr(args, f.name)}
    return build_config(resolve_preset(args.config), **given)


def cmd_run(args: argparse.Namespace) -> int:
    from sweep.runner import run_sweep

    summary = run_sweep(_config_from(args), progress=not args.quiet)
    return 130 if summary.interrupted else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sweep.runner import describe_plan

    describe_plan(_config_from(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.report import export_rows, report_text, write_reports

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
    from sweep import models
    from sweep.plan import parse_remove
    from sweep.worker import load_tokenizer

    cfg = _config_from(args, MODEL_FIELDS)
    n_layers = models.n_layers_of(models.load_config(cfg.model, cfg.revision, cfg.trust_remote_code))
    removals = parse_remove(args.remove, n_layers)
    if len(removals) != 1:
        raise SweepError("`--remove` for export takes one group of layers, e.g. \"9,10,11\"")
    tokenizer = load_tokenizer(cfg)
    # Export keeps the checkpoint's dtype unless --dtype says otherwise (auto would upcast to float32 on CPU).
    dtype = models.checkpoint_dtype(models.load_config(cfg.model, cfg.revision, cfg.trust_remote_code)) \
        if cfg.dtype == "auto" else cfg.dtype
    model = models.load_model(cfg.model, cfg.revision, dtype, "cpu" if cfg.device == "auto" else cfg.device,
                              cfg.random_init, cfg.trust_remote_code)
    out = models.export_pruned(model, tokenizer, removals[0], args.out)
    print(f"saved {cfg.model} without layers {','.join(map(str, removals[0]))} "
          f"({n_layers - len(removals[0])} of {n_layers} layers) to {out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sweep.runner import describe_status

    describe_status(args.db)
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    from sweep.similarity import run_similarity

    run_similarity(_config_from(args), progress=not args.quiet)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from sweep.tasks import run_tasks

    run_tasks(_config_from(args, TASKS_COMMAND_FIELDS), progress=not args.quiet)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from sweep import models
    from sweep.heal import heal_variant
    from sweep.plan import parse_remove

    cfg = _config_from(args, HEAL_COMMAND_FIELDS)
    n_layers = models.n_layers_of(models.load_config(cfg.model, cfg.revision, cfg.trust_remote_code))
    removals = parse_remove(cfg.remove, n_layers) if cfg.remove else []
    if len(removals) != 1 or not removals[0]:
        raise SweepError('`--remove` for heal takes one group of layers to remove, e.g. --remove "9,10,11"')
    row = heal_variant(cfg, removals[0], export=args.export, progress=not args.quiet)
    return 0 if row["status"] == "ok" else 1


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "report": cmd_report, "export": cmd_export, "status": cmd_status}
COMMANDS.update(similarity=cmd_similarity, tasks=cmd_tasks, heal=cmd_heal)


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


if __name__ == "__main__":
    raise SystemExit(main())
