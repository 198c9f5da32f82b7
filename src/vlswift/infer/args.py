"""``InferArguments``: the options of ``vlswift infer`` (swift's flag names).

Only the standard library is imported here so ``vlswift --help`` stays fast. A ``None``
generation option means "take it from the checkpoint's ``generation_config.json``".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InferArguments:
    """Options of ``vlswift infer``; ``infer_main(InferArguments(...))`` is the same as the CLI."""

    # What to load.
    model_type: str | None = field(default=None, metadata={
        "help": "qwen-vl-chat or qwen-vl (default: the checkpoint's, else qwen-vl-chat)."})
    model_id_or_path: str | None = field(default=None, metadata={
        "help": "Local model folder or hub id (default: the hub weights of --model_type; "
                "with a LoRA --ckpt_dir: the base model it was trained from)."})
    ckpt_dir: str | None = field(default=None, metadata={
        "help": "A checkpoint from `vlswift sft` (LoRA or full) or a merged one from `vlswift export`."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Merge the LoRA --ckpt_dir into the base model first (as `vlswift export`), then infer from it."})
    dtype: str = field(default="AUTO", metadata={
        "help": "bf16, fp16, fp32 or AUTO (bf16 on a recent GPU, fp16 on an older one, fp32 on the CPU)."})

    # Prompt.
    system: str | None = field(default=None, metadata={
        "help": "System prompt (default: the checkpoint's training system, else \"You are a helpful assistant.\")."})
    max_length: int = field(default=-1, metadata={
        "help": "Longest prompt in tokens (history included); longer ones are refused with a message. -1: no limit."})

    # Generation (None: from the checkpoint's generation_config.json).
    max_new_tokens: int | None = field(default=None, metadata={"help": "Longest reply in tokens."})
    do_sample: bool | None = field(default=None, metadata={"help": "Sample (true) or decode greedily (false)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature."})
    top_k: int | None = field(default=None, metadata={"help": "Sample from the k most likely tokens (0: all)."})
    top_p: float | None = field(default=None, metadata={
        "help": "Nucleus sampling: smallest set with this much probability."})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "Penalty on tokens already seen (1.0: none)."})
    num_beams: int | None = field(default=None, metadata={
        "help": "Beam search width (1: no beam search; no streaming)."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling."})

    # Chat.
    eval_human: bool | None = field(default=None, metadata={
        "help": "Interactive chat (default: true unless --val_dataset or --load_dataset_config is given)."})
    history: str | None = field(default=None, metadata={
        "help": "Continue a saved chat: a JSON file with a list of (query, response) pairs such as "
                "[[\"Hi\", \"Hello!\"]], or a result jsonl of `vlswift infer` (the chat goes on after its "
                "last line, with its system prompt unless --system is given)."})
    stream: bool = field(default=True, metadata={"help": "Print replies token by token."})
    draw_boxes: bool = field(default=False, metadata={
        "help": "When a reply holds grounding boxes (<ref>..</ref><box>..</box>), save the latest "
                "image with the boxes drawn and print its path."})

    # Dataset inference.
    val_dataset: list[str] = field(default_factory=list, metadata={
        "help": "Dataset file(s) to infer (json/jsonl in the formats `vlswift sft` accepts)."})
    load_dataset_config: bool = field(default=False, metadata={
        "help": "Infer the validation split of the --ckpt_dir's training run (rebuilt from its sft_args.json)."})
    show_dataset_sample: int = field(default=10, metadata={
        "help": "How many rows to infer, sampled with --dataset_seed (-1: all)."})
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the row sampling."})
    check_dataset_strategy: str = field(default="error", metadata={
        "help": "Rows that cannot be read or encoded: error (stop, naming the file and line), "
                "warning (skip each with a message), none or discard (skip silently)."})
    batch_size: int = field(default=1, metadata={"help": "Rows generated together (left padding)."})
    verbose: bool | None = field(default=None, metadata={
        "help": "Print every row's prompt, reply and label (default: when fewer than 100 rows)."})

    # Results.
    save_result: bool = field(default=True, metadata={
        "help": "Append every chat turn / dataset row to the result jsonl."})
    result_path: str | None = field(default=None, metadata={
        "help": "Result jsonl (default: <ckpt_dir or model dir>/infer_result/<YYYYmmdd-HHMMSS>.jsonl)."})

    def __post_init__(self) -> None:
        if self.load_dataset_config and not self.ckpt_dir:
            raise ValueError("--load_dataset_config true needs --ckpt_dir (the checkpoint whose training "
                             "run's validation split to infer)")
        if self.merge_lora and not self.ckpt_dir:
            raise ValueError("--merge_lora true needs --ckpt_dir (the LoRA checkpoint to merge)")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.eval_human is None:
            self.eval_human = not (self.val_dataset or self.load_dataset_config)
        if self.history and not self.eval_human:
            raise ValueError("--history is for the chat; in dataset inference every row has its own history")
