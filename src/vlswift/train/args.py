"""``SftArguments``: the options of ``vlswift sft`` (swift's flag names and defaults).

Only the standard library is imported here so ``vlswift --help`` stays fast. Defaults that
depend on other options (learning rate, save steps) are filled in ``__post_init__``; the one
that depends on the number of processes (gradient accumulation) is filled by the recipe once
the process group exists. ``sft_main(SftArguments(...))`` is the same as the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SFT_TYPES = ("lora", "full")
DTYPES = ("bf16", "fp16", "fp32", "AUTO")
LR_SCHEDULERS = ("linear", "cosine", "constant")
TRUNCATION_STRATEGIES = ("delete", "truncation_left")
CHECK_DATASET_STRATEGIES = ("none", "discard", "warning", "error")
DDP_BACKENDS = ("nccl", "gloo")
DEFAULT_LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}


@dataclass
class SftArguments:
    """Options of ``vlswift sft``; ``sft_main(SftArguments(...))`` is the same as the CLI."""

    # Model.
    model_type: str = field(default="qwen-vl-chat", metadata={"help": "qwen-vl-chat or qwen-vl."})
    model_id_or_path: str | None = field(default=None, metadata={
        "help": "Local model folder or hub id (default: the hub weights of --model_type)."})
    dtype: str = field(default="AUTO", metadata={
        "help": "bf16, fp16 (with a GradScaler; full fine-tuning keeps fp32 weights), fp32, or AUTO "
                "(bf16 on a recent GPU, fp16 on an older one, fp32 on the CPU)."})

    # What to train.
    sft_type: str = field(default="lora", metadata={"help": "lora (peft adapter) or full (every weight)."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["DEFAULT"], metadata={
        "help": "DEFAULT (the LLM's c_attn), ALL (every linear layer, vision tower included, not lm_head) "
                "or module names (e.g. c_attn w1 w2)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout_p: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    freeze_vit: bool = field(default=False, metadata={
        "help": "With --sft_type full: keep the vision tower (transformer.visual) frozen."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute activations in backward (less memory, about 30% slower)."})
    gradient_checkpointing_layers: int = field(default=-1, metadata={
        "help": "With gradient checkpointing: how many decoder blocks (the first ones) recompute "
                "(-1: all). Fewer: faster steps, more activation memory."})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "LoRA on one GPU: replay the decoder blocks' forward and backward from CUDA graphs "
                "(one capture per batch shape; lengths padded to a multiple of 32). Faster steps; "
                "not used where dropout meets gradient checkpointing (set --lora_dropout_p 0)."})

    # Data.
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Training data: .json/.jsonl files (conversations, messages or query/response rows) "
                "or builtin names (coco-en-mini); NAME#N samples N rows."})
    val_dataset: list[str] = field(default_factory=list, metadata={
        "help": "Validation data, added to the split taken from --dataset."})
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the train/validation split and row sampling."})
    dataset_test_ratio: float = field(default=0.01, metadata={
        "help": "Share of --dataset held out for validation (at least one row unless 0)."})
    train_dataset_sample: int = field(default=-1, metadata={
        "help": "Train on this many rows sampled from the training split (-1: all)."})
    check_dataset_strategy: str = field(default="none", metadata={
        "help": "Bad rows: none (skip, count in a summary), warning (skip, list each), error (stop at the first)."})
    system: str | None = field(default=None, metadata={
        "help": "System prompt for rows without one (default: \"You are a helpful assistant.\")."})
    max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens (-1: no limit)."})
    truncation_strategy: str = field(default="delete", metadata={
        "help": "Samples over --max_length: delete (skip, reported) or truncation_left (cut the oldest "
                "tokens, never half an image)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Batch samples of similar length together (within shuffled groups of 50 global "
                "batches): less padding, as transformers' option of that name."})
    dataloader_num_workers: int = field(default=1, metadata={
        "help": "DataLoader processes that tokenize and decode images in parallel (0: in the main process)."})
    preprocess_num_proc: int = field(default=1, metadata={
        "help": "Threads for the up-front validation pass (tokenizing, image loading)."})

    # Optimisation.
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate (1e-4 lora, 1e-5 full)."})
    num_train_epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."})
    batch_size: int = field(default=1, metadata={"help": "Samples per process per micro-batch."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Samples per process in evaluation (default: --batch_size)."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "Micro-batches per optimizer step (default: ceil(16 / batch_size / world_size), as swift)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only, not biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Clip the gradient norm to this (0: no clipping)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear, cosine or constant (after warmup)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps with a linear warmup."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, shuffling and dropout."})

    # Evaluation, checkpoints, logs.
    output_dir: str = field(default="output", metadata={
        "help": "Runs go to OUTPUT_DIR/<model_type>/v<N>-<YYYYmmdd-HHMMSS>/."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate on the validation split every N steps."})
    save_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps (default: --eval_steps)."})
    save_total_limit: int = field(default=2, metadata={
        "help": "Checkpoints kept: the newest ones, always including the best and the last (-1: all)."})
    logging_steps: int = field(default=5, metadata={"help": "Log loss, lr, grad norm, tokens/s, memory every N steps."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "A checkpoint-<step> folder of an earlier run: continue with its weights, optimizer, "
                "scheduler, RNG and data position."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar (log lines only)."})

    # Distributed (NPROC_PER_NODE=N vlswift sft ... runs N processes under torchrun).
    ddp_backend: str | None = field(default=None, metadata={
        "help": "Process group backend: nccl or gloo (default: nccl on GPUs, gloo on the CPU)."})
    fsdp: bool = field(default=False, metadata={
        "help": "With --sft_type full and several processes: shard weights, gradients and optimizer "
                "state with FSDP2 (per decoder and vision block)."})

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown --{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

        choice("sft_type", SFT_TYPES)
        choice("lr_scheduler_type", LR_SCHEDULERS)
        choice("truncation_strategy", TRUNCATION_STRATEGIES)
        choice("check_dataset_strategy", CHECK_DATASET_STRATEGIES)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.ddp_backend is not None:
            choice("ddp_backend", DDP_BACKENDS)
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if isinstance(self.val_dataset, str):
            self.val_dataset = [self.val_dataset]
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if not self.dataset:
            raise ValueError("--dataset: no training data given (pass .json/.jsonl files or a builtin name)")
        for name in ("batch_size", "num_train_epochs", "eval_steps", "logging_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "gradient_accumulation_steps", "save_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup_ratio must be between 0 and 1, got {self.warmup_ratio}")
        if self.save_total_limit == 0 or self.save_total_limit < -1:
            raise ValueError(f"--save_total_limit must be -1 (keep all) or at least 1, got {self.save_total_limit}")
        if self.fsdp and self.sft_type != "full":
            raise ValueError("--fsdp true shards a full fine-tune; use it with --sft_type full "
                             "(LoRA trains few weights: plain DDP is enough)")
        if self.fsdp and self.dtype == "fp16":
            raise ValueError("--fsdp true with --dtype fp16 is not supported: use bf16 or fp32")
        if self.gradient_checkpointing_layers < -1:
            raise ValueError(f"--gradient_checkpointing_layers must be -1 (all) or at least 0, "
                             f"got {self.gradient_checkpointing_layers}")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE[self.sft_type]
        if self.save_steps is None:
            self.save_steps = self.eval_steps
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size


def default_gradient_accumulation_steps(batch_size: int, world_size: int) -> int:
    """swift's default: enough micro-batches for a global batch of about 16 samples."""
    return max(1, -(-16 // (batch_size * world_size)))
