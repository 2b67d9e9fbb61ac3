"""The shared training loop: schedule, resume equality, checkpoint integrity, refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xiaolm.errors import XiaolmError
from xiaolm.model.llama import LlamaConfig, flops_per_token
from xiaolm.train.checkpoint import find_resumable
from xiaolm.train.config import DataConfig, TrainConfig
from xiaolm.train.loop import lr_at, resolve_accum, resolve_compile, train
from xiaolm.train.metrics import peak_flops
from xiaolm.train.pretrain import PretrainObjective
from xiaolm.train.stage import build_model


def make_packed(tmp: Path, vocab: int = 64, n: int = 20_000) -> Path:
    """A packed token dir in the `data pack` layout, filled with a learnable repeating pattern."""
    d = tmp / "packed"
    d.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(1, vocab, size=97)
    tokens = np.tile(base, n // 97 + 1)[:n].astype(np.uint16)
    tokens.tofile(d / "train.bin")
    tokens[: n // 10].tofile(d / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "eos_id": 0, "pad_id": 0, "train_tokens": n,
            "val_tokens": n // 10}
    (d / "meta.json").write_text(json.dumps(meta))
    tok = tmp / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    return d


def tiny_cfg(tmp: Path, out: str, **kw) -> TrainConfig:
    model = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    base = dict(out=str(tmp / out), max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1,
                eval_every=6, eval_batches=2, save_every=4, device="cpu", dtype="fp32", model=model,
                data=DataConfig(path=str(tmp / "packed"), seq_len=32))
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig, tmp: Path, resume: bool = False) -> dict:
    cfg, model = build_model(cfg, 64, torch.device("cpu"))
    objective = PretrainObjective(cfg.data.path, cfg.data.seq_len, cfg.seed, cfg.eval_batches, cfg.batch_size)
    return train(cfg, objective, model, tmp / "tok", resume=resume, stage="test")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint's safetensors files, keyed file:name."""
    ckpt = run_dir / "checkpoints" / (run_dir / "latest").read_text().strip()
    found = {p.name: load_file(str(p)) for p in ckpt.glob("*.safetensors")}
    return {f"{name}:{k}": v for name, tensors in found.items() for k, v in tensors.items()}


def final_optimizer_state(run_dir: Path, tmp: Path) -> dict[str, object]:
    """The latest checkpoint's optimizer/ distributed checkpoint, flattened to dotted keys."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = run_dir / "checkpoints" / (run_dir / "latest").read_text().strip()
    out = tmp / f"{run_dir.name}-optimizer.pt"
    dcp_to_torch_save(ckpt / "optimizer", out)
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def assert_same_final_state(a: Path, b: Path, tmp: Path) -> None:
    """Two runs end with bitwise-equal weights and optimizer state (moments, step counts, hyperparameters)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa and wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    oa, ob = final_optimizer_state(a, tmp), final_optimizer_state(b, tmp)
    assert any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in oa.values())  # the moments are there
    assert oa.keys() == ob.keys()
    differ = [k for k in oa if not (torch.equal(oa[k], ob[k]) if isinstance(oa[k], torch.Tensor)
                                    else oa[k] == ob[k])]
    assert differ == []


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_training_reduces_loss_and_writes_run_dir(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", max_steps=30, eval_every=10)
    summary = run(cfg, tmp_path)
    out = Path(cfg.out)
    ls = losses(out)
    assert ls[-1][1] < ls[0][1] - 0.5
    for name in ("config.yaml", "log.jsonl", "loss.png", "latest", "done.json", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    best = json.loads((out / "best" / "best.json").read_text())
    vals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in vals if "val_loss" in r))
    assert (out / "best" / "model.safetensors").is_file()
    assert all(r["peak_mem_mb"] > 0 for r in vals if "loss" in r)
    assert (out / "latest").read_text().strip() == "step-30"
    assert summary["steps"] == 30 and summary["val_loss"] is not None
    assert len(list((out / "checkpoints").glob("step-*"))) == cfg.keep_last


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "full"), tmp_path)
    cfg = tiny_cfg(tmp_path, "killed")
    run(cfg, tmp_path)
    killed = Path(cfg.out)
    # simulate a kill after step 8: drop the final checkpoint and the log rows past it
    import shutil

    shutil.rmtree(killed / "checkpoints" / "step-12")
    (killed / "latest").write_text("step-8\n")
    (killed / "done.json").unlink()
    run(tiny_cfg(tmp_path, "killed"), tmp_path, resume=True)
    assert losses(tmp_path / "full") == losses(killed)
    assert_same_final_state(tmp_path / "full", killed, tmp_path)


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", keep_last=3)
    run(cfg, tmp_path)
    newest = Path(cfg.out) / "checkpoints" / "step-12" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert find_resumable(Path(cfg.out)).name == "step-8"


def test_existing_run_without_resume_is_refused(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "run", max_steps=4), tmp_path)
    with pytest.raises(XiaolmError, match="--resume"):
        run(tiny_cfg(tmp_path, "run", max_steps=4), tmp_path)


def test_sequence_longer_than_model_context_is_refused(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run")
    cfg.data.seq_len = 64
    with pytest.raises(XiaolmError, match="max_seq_len"):
        build_model(cfg, 64, torch.device("cpu"))


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(87, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(1 - 0.9 * 11 / 22)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    with pytest.raises(XiaolmError, match="schedule"):
        lr_at(100, TrainConfig(schedule="linear"))


def test_activation_checkpointing_gives_the_same_trajectory(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "plain", max_steps=4), tmp_path)
    run(tiny_cfg(tmp_path, "ckpt", max_steps=4, activation_checkpointing=True), tmp_path)
    plain, ckpt = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(plain, ckpt, strict=True))


def test_resume_with_a_different_model_shape_is_refused(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "run", max_steps=4), tmp_path)
    cfg = tiny_cfg(tmp_path, "run", max_steps=8)
    cfg.model.n_layers = 3
    with pytest.raises(XiaolmError, match="n_layers=3"):
        run(cfg, tmp_path, resume=True)


def test_best_and_step_checkpoints_load_with_the_run_tokenizer(tmp_path):
    from xiaolm.model.export import resolve_model_dir

    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", max_steps=4, eval_every=2, save_every=2)
    run(cfg, tmp_path)
    out = Path(cfg.out)
    assert resolve_model_dir(out / "best") == (out / "best", out / "tokenizer")
    assert resolve_model_dir(out / "checkpoints" / "step-4") == (out / "checkpoints" / "step-4", out / "tokenizer")


def test_global_batch_sets_accumulation_and_refuses_an_uneven_split():
    assert resolve_accum(TrainConfig(batch_size=4, grad_accum=3), world=2) == (3, 24)
    assert resolve_accum(TrainConfig(batch_size=4, global_batch_size=32), world=2) == (4, 32)
    with pytest.raises(XiaolmError, match="global_batch_size=30 is not a multiple of batch_size × processes"):
        resolve_accum(TrainConfig(batch_size=4, global_batch_size=30), world=2)


def test_accumulated_passes_follow_the_same_trajectory_as_one_big_batch(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "big", max_steps=4, batch_size=8), tmp_path)
    run(tiny_cfg(tmp_path, "accum", max_steps=4, batch_size=2, global_batch_size=8), tmp_path)
    big, accum = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert max(abs(a - b) for (_, a), (_, b) in zip(big, accum, strict=True)) < 1e-5


def test_mfu_is_logged_against_the_given_peak(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", max_steps=3, peak_tflops=0.001)
    run(cfg, tmp_path)
    rows = [json.loads(x) for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    for r in (r for r in rows if "loss" in r):
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, abs=1e-4)
    assert peak_flops(0.0, torch.device("cpu")) is None  # unknown CPU: no made-up MFU


def test_compile_setting_is_auto_true_or_false():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("True", torch.device("cpu")) is True
    with pytest.raises(XiaolmError, match="compile"):
        resolve_compile("fast", torch.device("cpu"))


def test_pretrain_windows_number_documents_after_each_eos(tmp_path):
    make_packed(tmp_path)
    objective = PretrainObjective(tmp_path / "packed", 32, seed=0, eval_batches=1, eval_batch_size=2, eos_id=5)
    batch = objective.train_batch(0, 3)
    for x, doc in zip(batch["x"].tolist(), batch["doc"].tolist(), strict=True):
        expected, current = [], 0
        for token in x:
            expected.append(current)
            current += token == 5
        assert doc == expected
    assert torch.equal(objective.train_batch(1, 2)["x"], batch["x"][1:])  # rows do not depend on the split


def test_corrupted_optimizer_shard_falls_back_to_previous(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", keep_last=3)
    run(cfg, tmp_path)
    shard = next((Path(cfg.out) / "checkpoints" / "step-12" / "optimizer").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # a partial write
    assert find_resumable(Path(cfg.out)).name == "step-8"


def test_wandb_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    make_packed(tmp_path)
    with pytest.raises(XiaolmError, match="wandb"):
        run(tiny_cfg(tmp_path, "run", max_steps=2, wandb_project="xiaolm-test"), tmp_path)


def test_token_files_of_another_tokenizer_are_refused(tmp_path):
    from xiaolm.train.pretrain import run_pretrain

    packed = make_packed(tmp_path)
    meta = json.loads((packed / "meta.json").read_text())
    (packed / "meta.json").write_text(json.dumps({**meta, "tokenizer_hash": "not-this-tokenizer"}))
    cfg = tiny_cfg(tmp_path, "run")
    cfg.data.tokenizer = str(tmp_path / "tok")
    with pytest.raises(XiaolmError, match="packed with another tokenizer"):
        run_pretrain(cfg)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path):
    make_packed(tmp_path)
    run(tiny_cfg(tmp_path, "eager", max_steps=3), tmp_path)
    run(tiny_cfg(tmp_path, "compiled", max_steps=3, compile="true"), tmp_path)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert max(abs(a - b) for (_, a), (_, b) in zip(eager, compiled, strict=True)) < 1e-4


def test_document_masking_without_an_eos_id_is_refused_not_silently_off(tmp_path):
    from xiaolm.train.pretrain import run_pretrain

    packed = make_packed(tmp_path)
    meta = json.loads((packed / "meta.json").read_text())
    del meta["eos_id"]
    (packed / "meta.json").write_text(json.dumps(meta))
    cfg = tiny_cfg(tmp_path, "run", max_steps=2)
    cfg.data.tokenizer = str(tmp_path / "tok")
    with pytest.raises(XiaolmError, match="no eos_id.*data.doc_mask=false"):
        run_pretrain(cfg)
    cfg.data.doc_mask = False
    assert run_pretrain(cfg)["steps"] == 2  # said plainly, it trains without document masks


def test_a_tokenizer_without_eos_or_padding_is_refused_for_streaming_and_sft(tmp_path, tiny_tokenizer_dir):
    from xiaolm.chat_format import load_tokenizer
    from xiaolm.data.stream import TokenStream
    from xiaolm.train.sft import pad_token_id

    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "你好"}\n')
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert pad_token_id(tok, "tok") == tok.pad_token_id
    tok.pad_token = None
    with pytest.raises(XiaolmError, match="no padding token"):
        pad_token_id(tok, "tok")
    tok.eos_token = None
    with pytest.raises(XiaolmError, match="no EOS token"):
        TokenStream([records], tok, seq_len=8)
