"""Settings every training stage understands: the run, its data, its model, what trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import xiaolm.model.registry  # noqa: F401  (imports every architecture, so each config answers to model.arch)
from xiaolm.model.adapters import LoraSettings
from xiaolm.model.config import ModelConfig
from xiaolm.model.llama import LlamaConfig


@dataclass
class DataConfig:
    """Where a training stage reads its data."""

    path: str = ""  # pretrain: packed token dir, or record files/dirs to stream; sft: chat files, comma separated
    val_path: str = ""  # held-out records (sft: empty → a val_fraction split of `path`; streaming: required)
    val_fraction: float = 0.02
    tokenizer: str = ""  # tokenizer dir; empty → the one recorded by pack / the init_from run
    seq_len: int = 256
    doc_mask: bool = True  # pretrain: attention stays inside each packed document, positions restart at it
    source_min: float = 0.25  # pretrain, model.arch=t5: each window is cut at a seeded point between these shares
    source_max: float = 0.75  # of its length; the encoder reads the part before, the decoder predicts the rest
    pack: bool = True  # sft (in memory): whole chats share rows of seq_len tokens, each attending to itself only
    #                    (a T5: each chat's source and target to themselves); batch_size then counts rows.
    #                    finetune: each batch's batch_size chats share as few rows as they fit (same loss).
    #                    false: one chat per row, padded to the batch's longest
    shuffle_buffer: int = 1024  # streamed data (pretrain from records, sft with stream=true): items mixed in memory
    stream: bool = False  # sft: read the chats through the shuffle buffer instead of holding them all (needs val_path)
    chat_path: str = ""  # finetune: chat records mixed into its batches (finetune.chat_mix)
    chat_val_path: str = ""  # finetune: held-out {"messages", "answer"} items, chat ability before and after


@dataclass
class FinetuneSettings:
    """`xiaolm finetune`: the downstream task and how much chat data keeps the chat ability."""

    task: Literal["triplets"] = "triplets"
    chat_mix: float = 0.0  # share 0..1 of each batch's rows drawn from data.chat_path
    eval_records: int = 64  # held-out extraction records answered greedily at each evaluation (val_f1)
    max_new_tokens: int = 128  # answer budget of those generations
    retention_items: int = 64  # held-out chat items (data.chat_val_path) scored before and after


@dataclass
class DPOSettings:
    """Direct preference optimization (`xiaolm dpo`): the loss, its strength, and where the reference comes from."""

    beta: float = 0.1  # how far from the reference the policy may move (higher: stays closer)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo: squared loss on per-token-averaged log-ratios (as TRL)
    sft_weight: float = 0.0  # > 0 adds this × the mean NLL of the chosen answers' tokens
    ref: Literal["auto", "copy", "adapter", "precompute"] = "auto"  # auto: adapter when lora.r > 0, else copy


@dataclass
class RLSettings:
    """Rollouts, rewards and the guard of the RL stages (`xiaolm grpo`, `xiaolm ppo`)."""

    max_new_tokens: int = 64  # answer budget of each sampled reply
    temperature: float = 1.0  # sampling of the rollouts (evaluation answers greedily)
    top_p: float = 1.0
    top_k: int = 0
    rewards: list[str] = field(default_factory=lambda: ["exact"])  # exact | format | module:function
    reward_weights: list[float] = field(default_factory=list)  # one per rewards entry; empty → all 1
    reward_model: str = ""  # a `xiaolm reward` run dir or HF sequence-classification dir, added to the rewards
    reward_model_weight: float = 1.0
    ref: Literal["auto", "copy", "adapter"] = "auto"  # reference policy (KL): auto → adapter under LoRA, else copy
    clip: float = 0.2  # PPO-style ratio clip ε
    epochs: int = 1  # optimizer steps on each batch of rollouts (PPO epochs, GRPO's μ); > 1 makes the clip act
    kl_stop: float = 0.0  # > 0: the KL guard, when the mean per-token KL to the reference passes this
    kl_guard: Literal["stop", "rollback"] = "stop"  # stop there, or stop and put back the best/ weights
    eval_prompts: int = 64  # held-out prompts answered greedily at each evaluation (val_reward picks best/)


@dataclass
class GRPOSettings:
    """`xiaolm grpo`: group-relative advantages over G samples of each prompt."""

    group_size: int = 8  # G samples per prompt; batch_size × grad_accum rows per process must be a multiple
    scale_rewards: bool = True  # divide the advantages by the group's reward std (false: Dr. GRPO)
    loss: Literal["grpo", "dapo", "dr_grpo"] = "dapo"  # token-loss aggregation (TRL's default dapo)
    beta: float = 0.0  # KL to the reference in the loss (k3 estimator); 0: off, as TRL
    clip_high: float = 0.0  # upper ratio clip ε_high (DAPO's clip-higher, e.g. 0.28); 0 → rl.clip
    oversample: int = 1  # > 1: sample that many times the step's prompts, train on the groups whose answers
    #                      differ first (DAPO's dynamic sampling: a group scored alike has no gradient)


@dataclass
class PPOSettings:
    """`xiaolm ppo`: a value head, per-token KL penalty in the reward, GAE, clipped policy and value losses."""

    kl_coef: float = 0.05  # per-token KL penalty to the reference, subtracted from the reward
    gamma: float = 1.0
    lam: float = 0.95  # GAE λ
    vf_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # clip of the value update around the rollout's values
    whiten: bool = True  # normalize the advantages over the batch of rollouts


@dataclass
class TrainConfig:
    """Keys every training stage understands."""

    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast
    max_steps: int = 1000
    batch_size: int = 16  # sequences per forward pass in each process
    grad_accum: int = 1  # forward passes per optimizer step (derived when global_batch_size is set)
    global_batch_size: int = 0  # sequences per optimizer step over all processes; 0 → batch × accum × processes
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard, when torchrun starts several processes
    compile: Literal["auto", "true", "false"] = "auto"  # torch.compile each block; auto: on for CUDA
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup-stable-decay (constant lr, linear decay at the end)
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
    lora: LoraSettings = field(default_factory=LoraSettings)  # lora.r > 0: train adapters, not the whole model
    freeze: list[str] = field(default_factory=list)  # parts that do not train: embeddings, lm_head, layers.0-3
    model: ModelConfig = field(default_factory=LlamaConfig)  # model.arch picks the architecture
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)  # `xiaolm finetune` only
    rl: RLSettings = field(default_factory=RLSettings)  # `xiaolm grpo` and `xiaolm ppo`
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)
