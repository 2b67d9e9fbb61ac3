"""THE training loop shared by every objective: schedule, accumulation, clipping, eval, checkpoints, logs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from typing_extensions import Self

from xiaolm.config import save_config
from xiaolm.device import peak_memory_mb, resolve_autocast_dtype
from xiaolm.errors import XiaolmError
from xiaolm.model.llama import Llama, LlamaConfig, flops_per_token
from xiaolm.train.checkpoint import (
    OPTIMIZER_DIR,
    find_resumable,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from xiaolm.train.distributed import (
    DistContext,
    barrier,
    full_state_dict,
    gather_objects,
    gradient_sync,
    load_optimizer,
    mean_across,
    wrap_model,
)

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where a training stage reads its data."""

    path: str = ""  # pretrain: packed token dir, or record files/dirs to stream; sft: chat files, comma separated
    val_path: str = ""  # held-out records (sft: empty → a val_fraction split of `path`; streaming: required)
    val_fraction: float = 0.02
    tokenizer: str = ""  # tokenizer dir; empty → the one recorded by pack / the init_from run
    seq_len: int = 256
    doc_mask: bool = True  # pretrain: attention stays inside each packed document, positions restart at it
    shuffle_buffer: int = 1024  # streamed data (pretrain from records, sft with stream=true): items mixed in memory
    stream: bool = False  # sft: read the chats through the shuffle buffer instead of holding them all (needs val_path)


@dataclass
class TrainConfig:
    """Keys every training stage understands."""

    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast)
    max_steps: int = 1000
    batch_size: int = 16  # sequences per forward pass in each process
    grad_accum: int = 1  # forward passes per optimizer step (derived when global_batch_size is set)
    global_batch_size: int = 0  # sequences per optimizer step over all processes; 0 → batch × accum × processes
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard) when launched by torchrun with several processes
    compile: str = "auto"  # auto (on for CUDA) | true | false: torch.compile each transformer block
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay: constant lr, then linear decay at the end)
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    threads: int = 0  # CPU threads for torch; 0 → torch's default
    peak_tflops: float = 0.0  # the device's dense bf16 peak, for MFU; 0 → looked up for known GPUs
    wandb_project: str = ""  # also log to Weights & Biases (needs `pip install wandb`)
    init_from: str = ""  # run dir or HF model dir whose weights start this run
    model: LlamaConfig = field(default_factory=LlamaConfig)
    data: DataConfig = field(default_factory=DataConfig)


class Objective(Protocol):
    """What a stage plugs into the loop: deterministic batches by position, eval batches, and a loss."""

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Rows first … first+count-1 of the training stream: a pure function of (seed, row)."""
        ...

    def eval_batches(self) -> Iterable[dict[str, torch.Tensor]]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over targets != -100 (within documents when the batch numbers them)."""
    return model(batch["x"], batch["y"], doc_ids=batch.get("doc"))[1]




def resolve_compile(value: str, device: torch.device) -> bool:
    """`compile` setting → whether to torch.compile: auto means CUDA only (on CPU it gained 2% for 27 s)."""
    v = str(value).lower()
    if v not in ("auto", "true", "false"):
        raise XiaolmError(f"compile={value!r}", where="compile", hint="use auto, true or false")
    return device.type == "cuda" if v == "auto" else v == "true"


def resolve_accum(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(forward passes per step, global batch) from batch_size, grad_accum or global_batch_size, and processes."""
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0:
        raise XiaolmError(f"batch_size={cfg.batch_size} and grad_accum={cfg.grad_accum} must be positive")
    if cfg.global_batch_size <= 0:
        return cfg.grad_accum, cfg.batch_size * cfg.grad_accum * world
    per_pass = cfg.batch_size * world
    if cfg.global_batch_size % per_pass:
        raise XiaolmError(f"global_batch_size={cfg.global_batch_size} is not a multiple of batch_size × processes "
                          f"= {cfg.batch_size} × {world} = {per_pass}", where="global_batch_size",
                          hint="pick a global batch that every process can share in whole forward passes")
    return cfg.global_batch_size // per_pass, cfg.global_batch_size


# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU: peak_tflops if set, else a known GPU's data-sheet figure."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine (or warmup-stable-decay) down to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start) / max(1.0, cfg.max_steps - decay_start))
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)
    if cfg.schedule != "cosine":
        raise XiaolmError(f"unknown schedule {cfg.schedule!r}", where="schedule", hint="use cosine or wsd")
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms); fused on CUDA and CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (on CPU 10.7 → 2.2 ms a step for a 5M model)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, device: torch.device,
             amp: torch.dtype | None) -> float:
    """Mean loss over the objective's eval batches."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in objective.eval_batches():
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            losses.append(float(objective.loss(model, batch)))
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def plot_losses(log_path: Path, out_png: Path, title: str = "") -> None:
    """Draw train and val loss from log.jsonl into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=False), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="val", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.stop = True
        log.warning("signal %d received: saving a checkpoint after this step", signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> Llama:
    """Fresh model from cfg.model, or the weights of cfg.init_from (its architecture wins)."""
    if cfg.init_from:
        from xiaolm.model.export import load_model

        model, _ = load_model(cfg.init_from, with_tokenizer=False)
        cfg.model = model.cfg
        if model.cfg.vocab_size < vocab_size:
            raise XiaolmError(f"init_from model has vocab_size {model.cfg.vocab_size} but the tokenizer has "
                              f"{vocab_size}", where="init_from", hint="use the tokenizer the model was trained with")
    else:
        cfg.model.vocab_size = vocab_size
        cfg.model.check()
        torch.manual_seed(cfg.seed)
        model = Llama(cfg.model)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.data.seq_len > model.cfg.max_seq_len:
        raise XiaolmError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model.cfg.max_seq_len}",
                          hint="lower data.seq_len or raise model.max_seq_len (fresh models only)")
    return model.to(device)


def train(cfg: TrainConfig, objective: Objective, model: Llama, tokenizer_dir: str | Path,
          resume: bool = False, stage: str = "train", ctx: DistContext | None = None) -> dict[str, Any]:
    """Run the loop to cfg.max_steps (resuming if asked) and return a summary of the run.

    Under torchrun every process runs this and reads its own rows of each global batch; DDP averages the
    gradients (or FSDP2 shards the model) and only rank 0 writes files.
    """
    ctx = ctx or DistContext()
    main = ctx.is_main
    lr_at(max(cfg.warmup_steps, cfg.max_steps), cfg)  # refuses an unknown schedule before any work
    accum, global_batch = resolve_accum(cfg, ctx.world)
    run_dir = Path(cfg.out)
    device = next(model.parameters()).device
    amp = resolve_autocast_dtype(cfg.dtype, device)
    use_compile = resolve_compile(cfg.compile, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    resumable = find_resumable(run_dir) if run_dir.exists() else None
    if resumable is not None and not resume:
        raise XiaolmError("run directory already holds checkpoints", where=str(run_dir),
                          hint="pass --resume to continue it, or choose another out=")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        tok_dst = run_dir / "tokenizer"
        if not tok_dst.exists():
            shutil.copytree(tokenizer_dir, run_dir / ".tokenizer.tmp", dirs_exist_ok=True)
            (run_dir / ".tokenizer.tmp").replace(tok_dst)
    barrier(ctx)

    start_step, tokens_seen, best_val = 0, 0, math.inf
    log_path = run_dir / "log.jsonl"
    state: dict[str, Any] | None = None
    if resume and resumable is not None:
        _restore_weights(model, resumable)
        state = load_state(resumable)
        start_step, tokens_seen, best_val = state["step"], state["tokens_seen"], state["best_val"]
    if use_compile:
        for block in model.model.layers:
            block.compile()
    fwd_model = wrap_model(model, ctx, cfg.parallel)  # FSDP shards `model` in place; optimizer comes after
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    if state is not None:
        load_optimizer(resumable / OPTIMIZER_DIR, model, optimizer)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if hasattr(objective, "load_state_dict"):
            if len(state.get("data") or []) != ctx.world:
                raise XiaolmError(f"the checkpoint holds the data position of {len(state.get('data') or [])} "
                                  f"process(es), this run has {ctx.world}", where=str(resumable),
                                  hint="resume a streaming run with the process count it was saved with")
            objective.load_state_dict(state["data"][ctx.rank])
        if main:
            _truncate_log(log_path, start_step)
        log.info("%s: resumed from %s (step %d)", stage, resumable, start_step)
    else:
        if resume:
            log.info("%s: nothing to resume in %s, starting fresh", stage, run_dir)
        if main:
            log_path.unlink(missing_ok=True)

    n_params = model.num_params()
    flops_per_tok = flops_per_token(model.cfg, cfg.data.seq_len)
    peak = peak_flops(cfg, device)
    log.info("%s: %.2fM parameters on %s (%s%s), %d steps × %d sequences (%d per pass × %d accumulation × "
             "%d processes%s)", stage, n_params / 1e6, device, amp or "fp32", ", compiled" if use_compile else "",
             cfg.max_steps, global_batch, cfg.batch_size, accum, ctx.world,
             f", {cfg.parallel}" if ctx.world > 1 else "")

    from tqdm.auto import tqdm

    model.train()
    last_val: float | None = None
    ema_loss: float | None = None
    step = start_step

    def checkpoint(step: int) -> None:
        state = {"scaler": scaler.state_dict(), "rng": rng_state(), "step": step, "tokens_seen": tokens_seen,
                 "best_val": best_val}
        if hasattr(objective, "state_dict"):  # a streaming objective's position, one entry per process
            state["data"] = gather_objects(objective.state_dict(), ctx)
        save_checkpoint(run_dir, step, model, optimizer, state, ctx, keep_last=cfg.keep_last,
                        extra={"val_loss": last_val})

    loggers = _loggers(run_dir, cfg) if main else []
    with _StopFlag() as flag, open(log_path if main else os.devnull, "a", encoding="utf-8") as logf, \
            tqdm(total=cfg.max_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                 disable=not main) as bar:
        t_last, tokens_at_last = time.perf_counter(), tokens_seen
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(accum):
                first = step * global_batch + (micro * ctx.world + ctx.rank) * cfg.batch_size
                batch = {k: v.to(device) for k, v in objective.train_batch(first, cfg.batch_size).items()}
                with gradient_sync(fwd_model, enabled=micro == accum - 1 or ctx.world == 1):
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = objective.loss(fwd_model, batch) / accum
                    scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                tokens_seen += int(batch["x"].numel()) * ctx.world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = mean_across(step_loss, ctx, device)
            if not math.isfinite(step_loss):
                raise XiaolmError(f"loss became {step_loss} at step {step}", where=str(run_dir),
                                  hint="lower lr, or use dtype=fp32; the last checkpoint is intact")
            ema_loss = step_loss if ema_loss is None else 0.9 * ema_loss + 0.1 * step_loss
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_at_last) / max(now - t_last, 1e-9)
                t_last, tokens_at_last = now, tokens_seen
                row = {"step": step, "loss": round(step_loss, 6), "lr": lr, "tokens_per_s": round(tps, 1),
                       "grad_norm": round(grad_norm, 4), "tokens": tokens_seen,
                       "peak_mem_mb": round(peak_memory_mb(device), 1)}
                postfix = {"loss": f"{ema_loss:.3f}", "lr": f"{lr:.1e}", "tok_s": f"{tps:,.0f}"}
                if peak is not None:
                    row["mfu"] = round(tps * flops_per_tok / (peak * ctx.world), 4)
                    postfix["mfu"] = f"{row['mfu']:.1%}"
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                for write in loggers:
                    write({f"train/{k}": v for k, v in row.items() if k not in ("step", "tokens")}, step)
                bar.set_postfix(postfix)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                # averaged so every process takes the same branch below (saving best is collective under FSDP)
                last_val = mean_across(evaluate(model, objective, device, amp), ctx, device)
                if last_val < best_val:
                    _save_best(run_dir, model, step, last_val, ctx)
                best_val = min(best_val, last_val)
                logf.write(json.dumps({"step": step, "val_loss": round(last_val, 6)}) + "\n")
                logf.flush()
                for write in loggers:
                    write({"val/loss": last_val}, step)
                if main:
                    plot_losses(log_path, run_dir / "loss.png", title=stage)
                    bar.write(f"{stage} step {step}: val_loss {last_val:.4f} (ppl {math.exp(min(last_val, 50)):.1f})")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps or flag.stop:
                checkpoint(step)
            if flag.stop:
                raise XiaolmError(f"interrupted at step {step}; checkpoint saved", where=str(run_dir),
                                  hint="rerun the same command to continue "
                                       "(add --resume to pretrain/sft; demo resumes by itself)")
    for write in loggers:
        write(None, step)
    summary = {"stage": stage, "steps": step, "val_loss": last_val, "best_val_loss": best_val,
               "params": n_params, "tokens_seen": tokens_seen, "peak_mem_mb": round(peak_memory_mb(device), 1)}
    from xiaolm.io import atomic_write_json

    if main:
        atomic_write_json(run_dir / "done.json", summary)
    return summary


def _restore_weights(model: Llama, ckpt: Path) -> None:
    """Load a checkpoint's weights into the (not yet wrapped) model, refusing a different shape."""
    from xiaolm.model.export import load_model

    restored, _ = load_model(ckpt, with_tokenizer=False)
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len",
             "tie_embeddings", "rope_theta")
    clash = [f"{k}={getattr(model.cfg, k)} (checkpoint {getattr(restored.cfg, k)})" for k in shape
             if getattr(model.cfg, k) != getattr(restored.cfg, k)]
    if clash:
        raise XiaolmError(f"checkpoint has a different model shape: {', '.join(clash)}", where=str(ckpt),
                          hint="resume with the model.* settings of that run, or start a new out=")
    model.load_state_dict(restored.state_dict())



def _save_best(run_dir: Path, model: Llama, step: int, val_loss: float, ctx: DistContext) -> None:
    """Keep the weights with the lowest validation loss in run_dir/best (every process calls it)."""
    from xiaolm.io import atomic_write_json
    from xiaolm.model.export import save_weights

    weights = full_state_dict(model)
    if ctx.is_main:
        tmp = run_dir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(weights, model.cfg, tmp)
        atomic_write_json(tmp / "best.json", {"step": step, "val_loss": val_loss})
        shutil.rmtree(run_dir / "best", ignore_errors=True)
        tmp.replace(run_dir / "best")
    barrier(ctx)


def _loggers(run_dir: Path, cfg: TrainConfig) -> list[Callable[[dict[str, float] | None, int], None]]:
    """Metric sinks: TensorBoard (`tensorboard --logdir runs/`), and W&B when wandb_project is set.

    Each takes (metrics, step); (None, step) closes it.
    """
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tb"))

    def to_tensorboard(metrics: dict[str, float] | None, step: int) -> None:
        if metrics is None:
            tb.close()
            return
        for key, value in metrics.items():
            tb.add_scalar(key, value, step)
        tb.flush()

    sinks = [to_tensorboard]
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise XiaolmError("wandb_project is set but wandb is not installed", where="wandb_project",
                              hint="pip install wandb, or leave wandb_project empty") from None
        from xiaolm.config import config_to_dict

        wandb_run = wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir),
                               config=config_to_dict(cfg), resume="allow")

        def to_wandb(metrics: dict[str, float] | None, step: int) -> None:
            if metrics is None:
                wandb_run.finish()
            else:
                wandb_run.log(metrics, step=step)

        sinks.append(to_wandb)
    return sinks


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint being resumed, so the log tells one trajectory."""
    if not log_path.exists():
        return
    keep = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    from xiaolm.io import atomic_write_text

    atomic_write_text(log_path, "".join(line + "\n" for line in keep))
