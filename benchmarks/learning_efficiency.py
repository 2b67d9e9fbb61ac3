"""Learning efficiency: validation loss after a fixed token budget, xiaolm's training loop vs transformers' Trainer
at equal optimizer settings, over several seeds.

    python benchmarks/learning_efficiency.py [--quick] [--steps 300 --batch 16 --seq 256 --seeds 0,1,2]
                                             [--lr 2e-3 --warmup 30 --weight-decay 0.1] [--dim 256 --layers 4]
                                             [--trainer-defaults] [--work /tmp/xiaolm-learning]

Full size (the defaults): the demo model (Llama d256, 4 layers, 4 heads / 2 kv heads, 4.0M parameters) on the
demo corpus (built in --work on first use, ~20 s), 300 steps × 16 × 256 tokens, three rows × three seeds: about
25 minutes on 2 idle cores (~170 s a run: 200 steps took 112-117 s on the machine of the 2026-11-25 results).
`--quick`: 60 steps × 8 × 128 tokens, warmup 6: about 3-4 minutes (~20 s a run). Both times are estimates from
short runs on a loaded machine, not measured.

Equal settings on every row: AdamW (fused) lr --lr, betas 0.9/0.95, eps 1e-8, weight decay --weight-decay on the
2-D weights only (embedding and projections; not the norms), --warmup steps of linear warmup, then cosine down to
10% of lr at the last step, gradient clipping at norm 1.0, fp32, batch --batch × --seq, --steps steps. Seed s
fixes the initial weights (torch.manual_seed(s) before building the model, as `xiaolm pretrain` does) and the data:
row k of the stream is the window at hash(s, k) of the packed training tokens, and every row reads the same rows
in the same order (the Trainer with a sequential sampler), so a seed's runs start from the same weights and see
the same batches. Rows:
  xiaolm loop: `xiaolm pretrain` (run_pretrain) with data.doc_mask=false: plain causal attention over each window;
  transformers Trainer: LlamaForCausalLM (sdpa, `labels=`) with the settings above given as TrainingArguments
    (optim adamw_torch_fused, lr_scheduler_type cosine_with_min_lr, min_lr_rate 0.1). What still differs from the
    row above is the loop and the model code, and the warmup by one step: the Trainer's lr at step k is lr·k/W
    (0 at the first step, which so changes nothing), xiaolm's lr·(k+1)/W;
  xiaolm loop + document masking (xiaolm's default, data.doc_mask=true): the same run as the first row except that
    each window is cut into its documents (an EOS token ends one): a token attends only to earlier tokens of its
    own document, and rotary positions restart at 0 at each document's first token. Same windows, same targets,
    same loss over every position.
  with --trainer-defaults, a secondary row: the Trainer with its own defaults (lr 5e-5, no warmup, linear decay,
    weight decay 0, betas 0.9/0.999), a fine-tuning default and no pretraining recipe; for reference only.
Scoring, the same for every run: mean next-token loss of the final weights on fixed, evenly spread windows of the
validation tokens (8 × --batch windows), twice: with plain causal attention (transformers' LlamaForCausalLM: the
condition the first two rows trained under), and with document masking (xiaolm's Llama given the document numbers:
the condition the masked row trained under). Printed per row: mean and min–max over seeds of the final validation
loss; per pair of rows, the per-seed differences (same weights and batches at the start). Wall time is each
run's own, overheads included (xiaolm: one evaluation and one checkpoint at the end; the Trainer: its set-up).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import argument_parser, load_average, markdown_table, parse_args, print_header

from xiaolm.model.llama import Llama, LlamaConfig
from xiaolm.train.config import DataConfig, TrainConfig
from xiaolm.train.pretrain import PretrainObjective, run_pretrain

QUICK = {"steps": 60, "batch": 8, "seq": 128, "warmup": 6}
XIAOLM, XIAOLM_MASKED, TRAINER, TRAINER_DEFAULTS = ("xiaolm loop", "xiaolm loop + document masking",
                                                    "transformers Trainer", "Trainer defaults (secondary)")
WHAT = {
    XIAOLM: "`xiaolm pretrain`, data.doc_mask=false",
    TRAINER: "Trainer, LlamaForCausalLM, same settings and batches",
    XIAOLM_MASKED: "`xiaolm pretrain`, data.doc_mask=true (its default): attention and positions within documents",
    TRAINER_DEFAULTS: "Trainer, lr 5e-5, no warmup, linear, wd 0, betas 0.9/0.999",
}


def prepare(work: Path) -> tuple[Path, Path]:
    """(packed dir, tokenizer dir) of the demo corpus, built with the xiaolm CLI on first use."""
    packed, tok = work / "packed", work / "tokenizer"
    if (packed / "meta.json").is_file():
        return packed, tok
    from xiaolm.data.demo.corpus import build_demo_corpus

    paths = build_demo_corpus(work / "corpus")
    cli = [sys.executable, "-m", "xiaolm"]
    subprocess.run([*cli, "data", "clean", str(paths["raw_text"]), "--out", str(work / "clean")], check=True)
    subprocess.run([*cli, "tokenizer", "train", str(work / "clean"), "--out", str(tok), "--vocab-size", "4096",
                    "--cjk-chars"], check=True)
    subprocess.run([*cli, "data", "pack", str(work / "clean"), "--tokenizer", str(tok), "--out", str(packed),
                    "--val-fraction", "0.02"], check=True)
    return packed, tok


def hf_model(state: dict[str, torch.Tensor], cfg: LlamaConfig):
    """transformers' LlamaForCausalLM holding these weights."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(**cfg.hf_config(), attn_implementation="sdpa"))
    load_weights(hf, state)
    hf.tie_weights()
    return hf


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load state into model; only a tied lm_head may be missing (it shares the embedding's tensor)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def val_losses(state: dict[str, torch.Tensor], cfg: LlamaConfig, scoring: PretrainObjective) -> tuple[float, float]:
    """(plain causal, document-masked) mean next-token loss of these weights over the fixed validation windows."""
    hf = hf_model(state, cfg).eval()
    ours = Llama(cfg).eval()
    load_weights(ours, state)
    causal, masked = [], []
    for batch in scoring.eval_batches():
        logits = hf(input_ids=batch["x"]).logits.float()
        causal.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())))
        masked.append(float(ours(batch["x"], batch["y"], doc_ids=batch["doc"])[1]))
    return statistics.mean(causal), statistics.mean(masked)


class Rows(torch.utils.data.Dataset):
    """Rows 0 … n-1 of xiaolm's pretraining stream, as Trainer examples (labels shifted by the model)."""

    def __init__(self, objective: PretrainObjective, n: int):
        self.objective, self.n = objective, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.objective.train_batch(i, 1)
        ids = torch.cat([b["x"][0], b["y"][0, -1:]])
        return {"input_ids": ids, "labels": ids}


def train_xiaolm(a: argparse.Namespace, mcfg: LlamaConfig, packed: Path, tok: Path, seed: int, doc_mask: bool,
                 out: Path) -> dict[str, torch.Tensor]:
    """`xiaolm pretrain` with the shared settings; returns the final weights."""
    from xiaolm.model.export import load_model

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(out=str(out), seed=seed, device="cpu", dtype="fp32", max_steps=a.steps, batch_size=a.batch,
                      lr=a.lr, min_lr_ratio=0.1, warmup_steps=a.warmup, schedule="cosine", weight_decay=a.weight_decay,
                      beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=max(1, a.steps // 6), eval_every=a.steps,
                      save_every=a.steps, compile="false", model=mcfg,
                      data=DataConfig(path=str(packed), tokenizer=str(tok), seq_len=a.seq, doc_mask=doc_mask))
    run_pretrain(cfg)
    return load_model(out, with_tokenizer=False)[0].state_dict()


def train_trainer(a: argparse.Namespace, mcfg: LlamaConfig, packed: Path, seed: int, out: Path,
                  defaults: bool) -> dict[str, torch.Tensor]:
    """transformers' Trainer from the seed's initial weights on the seed's rows, in order; returns the final weights."""
    from transformers import Trainer, TrainingArguments

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(seed)
    model = hf_model(Llama(mcfg).state_dict(), mcfg)
    settings = {} if defaults else dict(
        learning_rate=a.lr, warmup_steps=a.warmup, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=a.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.steps,
                             report_to=[], save_strategy="no", logging_steps=max(1, a.steps // 6), seed=seed,
                             use_cpu=True, dataloader_num_workers=0, **settings)
    objective = PretrainObjective(packed, a.seq, seed=seed, eval_batches=1, eval_batch_size=1)
    InOrderTrainer(model=model, args=args, train_dataset=Rows(objective, a.steps * a.batch)).train()
    return model.state_dict()


def spread(values: list[float]) -> str:
    """'mean (min–max)' with 4 decimals."""
    return f"{statistics.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def main() -> None:
    """Train every row once per seed, score each run, print per-run lines, summaries and Markdown tables."""
    p = argument_parser(__doc__)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; each row runs once per seed")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every row")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps of every row")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of every row")
    p.add_argument("--dim", type=int, default=256, help="model width (4 heads, 2 kv heads)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--trainer-defaults", action="store_true", help="add the secondary Trainer-defaults row")
    p.add_argument("--work", default="/tmp/xiaolm-learning", help="demo corpus (kept) and runs (replaced)")
    a = parse_args(p, QUICK, "about 3-4 minutes")
    seeds = [int(s) for s in a.seeds.split(",")]
    print_header(("torch", "transformers", "accelerate"))
    work = Path(a.work)
    packed, tok = prepare(work)
    meta = json.loads((packed / "meta.json").read_text())
    mcfg = LlamaConfig(vocab_size=meta["vocab_size"], dim=a.dim, n_layers=a.layers, n_heads=4, n_kv_heads=2,
                       max_seq_len=a.seq)
    scoring = PretrainObjective(packed, a.seq, seed=0, eval_batches=8, eval_batch_size=a.batch, eos_id=meta["eos_id"])
    rows = [XIAOLM, TRAINER, XIAOLM_MASKED] + ([TRAINER_DEFAULTS] if a.trainer_defaults else [])
    print(f"{Llama(mcfg).num_params() / 1e6:.2f}M params, {a.steps} steps × {a.batch} × {a.seq} = "
          f"{a.steps * a.batch * a.seq / 1e6:.2f}M tokens, seeds {seeds}; settings: AdamW lr {a.lr:g}, betas "
          f"0.9/0.95, weight decay {a.weight_decay:g}, warmup {a.warmup}, cosine to 10%, clip 1.0, fp32")
    print("the document-masking row is the xiaolm run with data.doc_mask=true instead of false: attention only "
          "within each document (an EOS ends one) and positions restarting at each document; same windows, targets, "
          "settings and seeds")
    results: dict[str, list[tuple[float, float, float]]] = {row: [] for row in rows}
    for seed in seeds:
        for row in rows:
            start = time.perf_counter()
            out = work / "runs" / f"{rows.index(row)}-seed{seed}"
            if row in (XIAOLM, XIAOLM_MASKED):
                state = train_xiaolm(a, mcfg, packed, tok, seed, doc_mask=row == XIAOLM_MASKED, out=out)
            else:
                state = train_trainer(a, mcfg, packed, seed, out, defaults=row == TRAINER_DEFAULTS)
            secs = time.perf_counter() - start
            causal, masked = val_losses(state, mcfg, scoring)
            results[row].append((causal, masked, secs))
            print(f"seed {seed} {row}: val loss {causal:.4f} causal, {masked:.4f} document-masked, {secs:.0f} s",
                  flush=True)

    print(f"\nload {load_average()} at the end; final validation loss, mean (min–max) over {len(seeds)} seeds:")
    table = []
    for row, runs in results.items():
        causal, masked, secs = ([r[i] for r in runs] for i in range(3))
        print(f"{row:32s} causal {spread(causal)}  document-masked {spread(masked)}  {statistics.mean(secs):.0f} s")
        table.append([row, WHAT[row], spread(causal), f"{math.exp(statistics.mean(causal)):.1f}", spread(masked),
                      f"{statistics.mean(secs):.0f}"])
    pairs = [(XIAOLM, TRAINER, "the loops at equal settings"),
             (XIAOLM_MASKED, XIAOLM, "document masking, xiaolm loop"),
             (XIAOLM_MASKED, TRAINER, "xiaolm's default recipe vs the Trainer at equal settings")]
    diffs = []
    for ours, theirs, meaning in pairs:
        d = [[o[i] - t[i] for o, t in zip(results[ours], results[theirs], strict=True)] for i in range(2)]
        print(f"{ours} − {theirs} ({meaning}), per seed: causal {spread(d[0])}, document-masked {spread(d[1])} "
              f"nats (negative: the first is better)")
        diffs.append([f"{ours} − {theirs}", meaning, spread(d[0]), spread(d[1])])
    print()
    print(markdown_table(["run", "what runs", f"val loss, causal scoring: mean (min–max of {len(seeds)} seeds)",
                          "ppl at the mean", "val loss, document-masked scoring", "wall s (mean)"], table))
    print()
    print(markdown_table(["difference (per seed, same start)", "what it measures", "Δ val loss, causal",
                          "Δ val loss, document-masked"], diffs))


if __name__ == "__main__":
    main()
