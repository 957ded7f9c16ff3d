"""LoRA healing of a pruned variant: fine-tune low-rank adapters on the kept layers, merge them, and
re-measure the variant with the evaluation protocol of `sweep run`.

A short LoRA fine-tune recovers much of what depth pruning loses (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers", https://arxiv.org/abs/2403.17887, heal with QLoRA on C4). Defaults follow
the LoRA/QLoRA literature: rank 16, alpha 32, dropout 0.05, every attention and MLP projection, lr 2e-4.

The heal runs on the model pruned in place (``engine.pruned``): LoRA wraps only the kept layers, the merge writes
into their weights, and the removed layers come back untouched when the context exits, so the healed variant is
measured by the same ``Worker.evaluate(removed)`` as the unhealed one. The in-memory model is altered for good;
one `sweep heal` heals one variant.
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from sweep import Log, engine, store
from sweep.config import SweepConfig
from sweep.engine import TokenizedText
from sweep.errors import DataError, MissingExtraError
from sweep.extras import tasks
from sweep.plan import Removal, variant_key

WARMUP_FRACTION = 0.1
"""Linear learning-rate warm-up over the first 10 % of steps, then constant (short runs need no decay)."""


def require_peft():
    """Import peft or say which extra installs it.

    Raises:
        MissingExtraError: peft is not installed.
    """
    try:
        import peft
    except ImportError:
        raise MissingExtraError("`sweep heal` needs peft: pip install 'sweep[heal]'") from None
    return peft


@dataclass(frozen=True)
class HealSettings:
    """Everything about the training that changes the healed numbers (hashed into the heal id)."""

    method: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    steps: int
    lr: float
    batch_size: int
    seq: int
    data: str
    data_fingerprint: str
    eval_data: str
    seed: int


def heal_settings(cfg: SweepConfig, targets: Sequence[str], train: TokenizedText,
                  held_out_name: str) -> HealSettings:
    return HealSettings(method="qlora" if cfg.qlora else "lora", lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout, lora_targets=",".join(targets), steps=cfg.heal_steps,
                        lr=cfg.heal_lr, batch_size=cfg.heal_batch_size, seq=cfg.heal_seq, data=train.name,
                        data_fingerprint=train.fingerprint, eval_data=held_out_name, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------- data


def sequences(ids, seq: int) -> torch.Tensor:
    """Non-overlapping training sequences: (N,) ids -> (N // seq, seq); the tail shorter than ``seq`` is dropped."""
    ids = torch.as_tensor(ids)
    n_seq = len(ids) // seq
    return ids[: n_seq * seq].view(n_seq, seq)


def heal_sequences(cfg: SweepConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, TokenizedText, str]:
    """(train, held-out) sequences of --heal-seq tokens, the tokenized training text, and the held-out name.

    The held-out text is --heal-eval-split of --heal-data; a local file has no splits, so then its last 10 % of
    sequences are held out instead.

    Raises:
        DataError: the text is too short for two sequences.
    """
    name = engine.describe(cfg.heal_data, cfg.heal_data_config, cfg.heal_split)
    text = _load_heal_text(cfg, cfg.heal_split)
    train_tokens = engine.tokenize(text, tokenizer, name, cfg.cache_dir)
    train = sequences(train_tokens.ids, cfg.heal_seq)
    held_name = engine.describe(cfg.heal_data, cfg.heal_data_config, cfg.heal_eval_split)
    if held_name == name:  # one local file: hold out its end
        if len(train) < 2:
            raise DataError(f"--heal-data {cfg.heal_data}: {len(train_tokens.ids):,} tokens, fewer than two "
                            f"sequences of --heal-seq {cfg.heal_seq}")
        n_held = max(1, len(train) // 10)
        return train[:-n_held], train[-n_held:], train_tokens, f"{name} (last {n_held} sequences)"
    held_text = _load_heal_text(cfg, cfg.heal_eval_split)
    held = sequences(engine.tokenize(held_text, tokenizer, held_name, cfg.cache_dir).ids, cfg.heal_seq)
    if not len(train) or not len(held):
        raise DataError(f"--heal-data {cfg.heal_data}: fewer tokens than one sequence of --heal-seq {cfg.heal_seq}")
    return train, held, train_tokens, held_name


def _load_heal_text(cfg: SweepConfig, split: str) -> str:
    """The healing text of one split; data errors name --heal-data (they are worded for --data)."""
    try:
        return engine.load_text(cfg.heal_data, cfg.heal_data_config, split, cfg.text_column)
    except DataError as exc:
        raise DataError(str(exc).replace("--data ", "--heal-data ", 1)) from None


def fixed_batches(seqs: torch.Tensor, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The first ``n_batches`` batches of ``seqs`` (B, T): the same sample before and after healing."""
    return [seqs[i : i + batch_size] for i in range(0, min(len(seqs), batch_size * n_batches), batch_size)]


# ---------------------------------------------------------------------------------------------- training


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch (B, T): logits at t predict token t + 1."""
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def mean_loss(model, batches: Sequence[torch.Tensor]) -> float:
    """Token-weighted mean loss over ``batches``, in eval mode (no dropout) without gradients."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += lm_loss(model, batch.to(device)).item() * n
            n_tokens += n
    model.train(was_training)
    return total / max(n_tokens, 1)


def lora_model(model, cfg: SweepConfig, targets: Sequence[str]):
    """Wrap ``model`` in peft LoRA adapters on ``targets`` (base weights frozen)."""
    peft = require_peft()
    if cfg.qlora:
        model = peft.prepare_model_for_kbit_training(model)
    # fan_in_fan_out: GPT-2's Conv1D stores weights transposed; peft needs to know to merge correctly.
    conv1d = any(type(m).__name__ == "Conv1D" for m in engine.decoder_layers(model).modules())
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(targets), task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    return peft.get_peft_model(model, config)


def train_lora(peft_model, train: torch.Tensor, held_batches: list[torch.Tensor], cfg: SweepConfig,
               progress: bool = True) -> list[tuple[int, float]]:
    """AdamW on the adapters for --heal-steps random batches of ``train`` (n_seq, T); return (step, held-out loss).

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
    """
    device = next(peft_model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.heal_lr, weight_decay=0.0)
    warmup = max(1, int(WARMUP_FRACTION * cfg.heal_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    evals: list[tuple[int, float]] = []
    bar = tqdm(range(1, cfg.heal_steps + 1), desc="heal", unit="step", disable=not progress, dynamic_ncols=True)
    peft_model.train()
    for step in bar:
        batch = train[torch.randint(len(train), (cfg.heal_batch_size,), generator=gen)].to(device)  # (B, T)
        loss = lm_loss(peft_model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}; lower --heal-lr")
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.heal_eval_every == 0 or step == cfg.heal_steps:
            evals.append((step, mean_loss(peft_model, held_batches)))
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_loss=f"{evals[-1][1]:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", eval_loss=f"{evals[-1][1]:.3f}" if evals else "-")
    bar.close()
    peft_model.eval()
    return evals


# ---------------------------------------------------------------------------------------------- orchestration


def ensure_measured(cfg: SweepConfig, worker, db, setup: str, variants: Sequence[Removal],
                    log: Log) -> dict[str, dict]:
    """Result rows of ``variants`` in ``setup``, measuring those `sweep run` has not exactly as it would
    (perplexity and latency; a later `sweep run` of the setup then finds them complete)."""
    done = store.done_keys(db, setup)
    todo = [tuple(r) for r in variants if variant_key(r) not in done]
    if todo:
        log(f"measuring [{'], ['.join(variant_key(r) for r in todo)}] (not yet in the DB for this setup)")
        # A QLoRA worker holds 4-bit weights: its timings are not the setup's, so it stores perplexity only.
        engine.measure_variants(replace(cfg, latency="off") if cfg.qlora else cfg, worker, db, setup, todo, log)
    return {variant_key(r): store.find_result(db, setup, variant_key(r)) for r in variants}


def load_heal_worker(cfg: SweepConfig):
    """The worker of `sweep run` (same evaluation protocol); with --qlora its model has 4-bit base weights."""
    if not cfg.qlora:
        return engine.load_worker(cfg)
    windows = engine.resolve_windows(cfg, engine.config_for(cfg))
    tokens = engine.load_tokens(cfg, engine.tokenizer_for(cfg), windows)
    model = engine.load_model_4bit(cfg.model, cfg.revision, cfg.device, cfg.trust_remote_code)
    return engine.Worker(model, tokens, windows, cfg)


def heal_and_measure(worker, removed: Removal, cfg: SweepConfig, targets: Sequence[str], train: torch.Tensor,
                     held: torch.Tensor, progress: bool) -> dict:
    """Train LoRA on the pruned model, merge it, and measure: the loss and perplexity columns of a heal row.

    Out of memory and a diverging loss become a ``failed``/``diverged`` status with the error, not a crash.
    """
    model = worker.model
    heal_batches = fixed_batches(train, cfg.heal_batch_size, cfg.heal_eval_batches)
    held_batches = fixed_batches(held, cfg.heal_batch_size, cfg.heal_eval_batches)
    start = time.perf_counter()
    columns: dict = {}
    try:
        with engine.pruned(model, removed):
            columns.update(heal_loss_before=mean_loss(model, heal_batches),
                           eval_loss_before=mean_loss(model, held_batches))
            torch.manual_seed(cfg.seed)  # LoRA's A matrices and dropout draw from the global generator
            peft_model = lora_model(model, cfg, targets)
            columns["trainable_params"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            train_lora(peft_model, train, held_batches, cfg, progress)
            peft_model.merge_and_unload()  # LoRA deltas written into the kept layers' weights
            model.eval()
            columns.update(heal_loss_after=mean_loss(model, heal_batches),
                           eval_loss_after=mean_loss(model, held_batches))
    except torch.OutOfMemoryError as exc:
        return {**columns, "status": "failed", "error": f"out of memory while healing: {str(exc).splitlines()[0]}",
                "train_seconds": time.perf_counter() - start}
    except FloatingPointError as exc:
        return {**columns, "status": "diverged", "error": str(exc), "train_seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    measured = worker.evaluate(removed)  # the protocol of `sweep run`, on the healed weights
    return {**columns, "train_seconds": seconds, "status": measured["status"], "error": measured.get("error"),
            **{k: measured.get(k) for k in ("ppl", "nll_sum", "n_tokens", "bpb")}}


def heal_variant(cfg: SweepConfig, removed: Removal, export: str | None = None, log: Log = print,
                 progress: bool = True) -> dict:
    """`sweep heal`: LoRA-heal one pruned variant, re-measure it, store the healed row linked to the unhealed one.

    Order: cheap checks, model and perplexity text, the unhealed rows (measured if missing), healing data, tasks
    before healing (with --heal-tasks), the heal, its row, tasks after healing, the export. A heal already in
    the DB with the same settings is not redone unless --export or --heal-tasks asks for the healed model.

    Returns:
        The heal row (columns of ``store.HEAL_COLUMNS`` plus ``ppl_pruned``).

    Raises:
        MissingExtraError, ConfigError, DataError, ModelLoadError, StoreError, ExportError.
    """
    require_peft()
    store.check_writable(cfg.db)
    task_run = _task_run(cfg) if cfg.heal_tasks else None
    worker = load_heal_worker(cfg)
    tokenizer = engine.tokenizer_for(cfg)
    db, setup = engine.open_setup(cfg, worker)
    key = variant_key(removed)
    unhealed = ensure_measured(cfg, worker, db, setup, [(), tuple(removed)], log)[key]
    train, held, train_tokens, held_name = heal_sequences(cfg, tokenizer)
    if train_tokens.fingerprint == worker.tokens.fingerprint:
        log("warning: --heal-data is the evaluation text (--data): the healed perplexity will be optimistic")
    targets = cfg.lora_targets.split(",") if cfg.lora_targets else engine.lora_target_modules(worker.model)
    settings = heal_settings(cfg, targets, train_tokens, held_name)
    hid = store.heal_id(setup, key, asdict(settings))
    existing = store.find_heal(db, hid)
    if existing and existing["status"] == "ok" and not export and not cfg.heal_tasks:
        log(f"[{key}] was already healed with these settings (heal {hid}): ppl {existing['ppl']:.3f}")
        return {**existing, "ppl_pruned": unhealed["ppl"]}
    if task_run is not None:
        task_run(worker.model, tokenizer, [(), tuple(removed)], "")
    log(f"healing [{key}] of {cfg.model}: LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {','.join(targets)}, "
        f"{cfg.heal_steps} steps of {cfg.heal_batch_size}x{cfg.heal_seq} tokens from {train_tokens.name}")
    row = {**_identity(db, cfg, worker, setup, removed, hid, settings), "ppl_unhealed": unhealed["ppl"],
           **heal_and_measure(worker, tuple(removed), cfg, targets, train, held, progress)}
    store.record_heal(db, row)
    if row["status"] == "ok" and task_run is not None:
        task_run(worker.model, tokenizer, [tuple(removed)], hid)
    if row["status"] == "ok" and export:
        engine.export_pruned(worker.model, tokenizer, removed, export)
        row["export_dir"] = str(export)
        store.record_heal(db, row)
    log(closing_line(row, export))
    return {**row, "ppl_pruned": unhealed["ppl"]}


def run_heal(cfg: SweepConfig, export: str | None = None, log: Log = print, progress: bool = True) -> dict:
    """`sweep heal`: the one group of layers in ``--remove``, healed (:func:`heal_variant`).

    Raises:
        PlanError: ``--remove`` names no group, several, or a layer out of range; and as :func:`heal_variant`.
    """
    removed, _ = engine.one_removal(cfg, cfg.remove, "heal")
    return heal_variant(cfg, removed, export, log, progress)


def _identity(db, cfg: SweepConfig, worker, setup: str, removed: Removal, hid: str,
              settings: HealSettings) -> dict:
    """The columns that say which variant was healed, how, and where."""
    model_id = engine.register_model(db, engine.model_identity(cfg, worker.model.config, worker.device))
    return {"id": hid, "model_id": model_id, "setup_id": setup,
            "removed": variant_key(removed), "n_removed": len(removed), "n_layers": worker.n_layers - len(removed),
            **asdict(settings), "settings": json.dumps(asdict(settings), sort_keys=True),
            "device": worker.device_name, "host": socket.gethostname(), "export_dir": None}


def _task_run(cfg: SweepConfig):
    """With --heal-tasks: check lm-eval and the task names now; return a function that evaluates variants."""
    names = tasks.task_names(cfg)
    manager = tasks.manager_for(names, cfg.task_include)
    tasks.check_task_names(names, manager)

    def run(model, tokenizer, variants, heal_id: str) -> None:
        db = store.open_db(cfg.db)
        device = engine.device_name(next(model.parameters()).device)
        setups = tasks.open_task_setups(cfg, db, model, names, manager, device)
        tasks.measure_tasks(db, model, tokenizer, variants, names, setups, cfg, manager, device, heal_id=heal_id,
                            progress=False)

    return run


def closing_line(row: dict, export: str | None) -> str:
    if row["status"] != "ok":
        return f"heal {row['id']} {row['status']}: {row['error']} (stored in table heals)"

    def change(before, after) -> str:
        return f"{before:.3f} -> {after:.3f}" if before is not None and after is not None else "n/a"

    saved = f"; merged model saved to {export}" if export else ""
    return (f"healed [{row['removed']}] (heal {row['id']}): perplexity {change(row['ppl_unhealed'], row['ppl'])}, "
            f"held-out loss {change(row['eval_loss_before'], row['eval_loss_after'])}, "
            f"{row['trainable_params']:,} trainable parameters, {row['train_seconds']:.0f} s{saved}")
