"""Learning efficiency: validation loss after a fixed token budget, xiaolm's pretraining vs transformers' Trainer.

    python benchmarks/learning_efficiency.py [--steps 300] [--work /tmp/xiaolm-learning]

All runs train the demo model (Llama d256, 4 layers, 4.0M parameters) from the same initial weights on the same
packed demo corpus (built in --work on first use), batch 16 × 256 tokens for --steps steps:
  1. xiaolm's defaults (`xiaolm pretrain` with the demo recipe: AdamW lr 2e-3, betas 0.9/0.95, weight decay 0.1,
     30 warmup steps, cosine to 10%, document masking, dtype auto);
  2. transformers' Trainer with its defaults (lr 5e-5, linear decay, no warmup, weight decay 0, fp32);
  3. transformers' Trainer given xiaolm's optimizer settings, so the recipe and the loop can be told apart.
Each run is scored the same way: mean next-token loss of the trained weights, loaded into transformers'
LlamaForCausalLM, on the same fixed validation windows with plain causal attention.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from xiaolm.model.llama import Llama, LlamaConfig
from xiaolm.train.config import DataConfig, TrainConfig
from xiaolm.train.pretrain import PretrainObjective, run_pretrain

SEQ, BATCH = 256, 16


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


def model_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)


def hf_model(state: dict[str, torch.Tensor], cfg: LlamaConfig):
    """transformers' LlamaForCausalLM holding these weights."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(**cfg.hf_config(), attn_implementation="sdpa"))
    hf.load_state_dict(state, strict=False)  # a tied lm_head is re-tied from the embedding
    hf.tie_weights()
    return hf


@torch.no_grad()
def val_loss(hf, objective: PretrainObjective) -> float:
    """Mean next-token loss over the fixed validation windows, plain causal attention."""
    hf.eval()
    losses = []
    for batch in objective.eval_batches():
        logits = hf(input_ids=batch["x"]).logits.float()
        losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())))
    return sum(losses) / len(losses)


class Rows(torch.utils.data.Dataset):
    """The first n rows of xiaolm's pretraining stream, as Trainer examples (labels shifted by the model)."""

    def __init__(self, objective: PretrainObjective, n: int):
        self.objective, self.n = objective, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.objective.train_batch(i, 1)
        ids = torch.cat([b["x"][0], b["y"][0, -1:]])
        return {"input_ids": ids, "labels": ids}


def train_hf(init: dict[str, torch.Tensor], cfg: LlamaConfig, objective: PretrainObjective, steps: int,
             out: Path, **overrides) -> object:
    """Train with transformers' Trainer (its defaults unless overridden) and return the model."""
    from transformers import Trainer, TrainingArguments

    model = hf_model(init, cfg)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps,
                             report_to=[], save_strategy="no", logging_steps=50, seed=0, use_cpu=True,
                             dataloader_num_workers=0, **overrides)
    Trainer(model=model, args=args, train_dataset=Rows(objective, steps * BATCH)).train()
    return model


def main() -> None:
    """Train the three ways and print validation loss, perplexity and wall time."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", default="/tmp/xiaolm-learning")
    a = p.parse_args()
    work = Path(a.work)
    packed, tok = prepare(work)
    vocab = json.loads((packed / "meta.json").read_text())["vocab_size"]
    mcfg = model_config(vocab)
    torch.manual_seed(0)
    init = Llama(mcfg).state_dict()
    objective = PretrainObjective(packed, SEQ, seed=0, eval_batches=8, eval_batch_size=BATCH)
    results = {}

    start = time.perf_counter()
    out = work / f"xiaolm-{a.steps}"
    if not (out / "done.json").is_file():
        cfg = TrainConfig(out=str(out), max_steps=a.steps, batch_size=BATCH, lr=2e-3, warmup_steps=30,
                          log_every=50, eval_every=a.steps, save_every=a.steps, device="cpu", model=mcfg,
                          data=DataConfig(path=str(packed), tokenizer=str(tok), seq_len=SEQ))
        run_pretrain(cfg)  # seeds itself with cfg.seed=0: the same initial weights as `init`
    from xiaolm.model.export import load_model

    ours, _ = load_model(out, with_tokenizer=False)
    results["xiaolm defaults"] = (val_loss(hf_model(ours.state_dict(), mcfg), objective), time.perf_counter() - start)

    for name, overrides in [
        ("Trainer defaults", {}),
        ("Trainer, xiaolm's optimizer settings", dict(learning_rate=2e-3, warmup_steps=30, weight_decay=0.1,
                                                       adam_beta2=0.95, lr_scheduler_type="cosine_with_min_lr",
                                                       lr_scheduler_kwargs={"min_lr_rate": 0.1})),
    ]:
        start = time.perf_counter()
        model = train_hf(init, mcfg, objective, a.steps, work / f"hf-{len(results)}", **overrides)
        results[name] = (val_loss(model, objective), time.perf_counter() - start)

    tokens = a.steps * BATCH * SEQ
    params = Llama(mcfg).num_params()
    print(f"{a.steps} steps × {BATCH} × {SEQ} = {tokens / 1e6:.2f}M tokens, {params / 1e6:.2f}M params")
    for name, (loss, secs) in results.items():
        print(f"{name:40s} val loss {loss:.4f}  ppl {math.exp(loss):8.1f}  {secs:6.0f} s")
    base = results["Trainer defaults"][0]
    print(f"xiaolm − Trainer defaults: {results['xiaolm defaults'][0] - base:+.4f} nats (negative = xiaolm better)")


if __name__ == "__main__":
    main()
