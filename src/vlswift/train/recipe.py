"""``vlswift sft``: LoRA or full fine-tuning of Qwen-VL-Chat on one process or several.

Read it top to bottom: :func:`sft_main` re-launches under torchrun when ``NPROC_PER_NODE`` asks
for it, then :meth:`SftRecipe.setup` builds everything (process group, data, model, what trains,
DDP/FSDP wrapping, optimizer, run folder, resume state) and :meth:`SftRecipe.train` runs the
loop (step, log, evaluate, save). The helpers live beside it: ``data`` (files to batches),
``lora`` (what trains), ``distributed`` (torchrun, DDP, FSDP2, data shards), ``checkpointing``
(run folder, atomic checkpoints, training state), ``tracking`` (logs, TensorBoard, plots, bar).

The loss of a step is the mean cross-entropy over every labelled token of the global batch (all
micro-batches of all ranks), so N processes with batch size B give the same steps as one
process with batch size N x B.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..api import get_model_tokenizer, get_template, seed_everything
from ..models.loading import default_device, resolve_dtype
from ..models.qwen import IGNORE_INDEX
from ..template import get_default_template_type
from . import distributed
from .args import SftArguments, default_gradient_accumulation_steps
from .checkpointing import (
    SHARDED_OPTIMIZER, TRAINING_STATE, Checkpoints, find_resume_checkpoint, load_training_state, new_run_dir,
    rng_state, save_full_model, save_lora_adapter, set_rng_state, write_json,
)
from .data import (
    DatasetError, DatasetReport, EncodedDataset, collate, length_of, load_dataset, split_dataset, validate_samples,
)
from .lora import (
    apply_lora, count_parameters, freeze_vision_tower, load_lora_weights, resolve_target_modules, vision_is_trainable,
)
from .tracking import RunLog, Throughput, memory_gib


def sft_main(args: SftArguments) -> dict[str, Any]:
    """Fine-tune as ``args`` say; returns the run folder, best/last checkpoints and final metrics.

    With ``NPROC_PER_NODE=N`` in the environment the run happens in N torchrun processes and
    this returns rank 0's result.
    """
    if distributed.torchrun_requested():
        return distributed.launch_torchrun(dataclasses.asdict(args))
    recipe = SftRecipe(args)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.close()


class SftRecipe:
    def __init__(self, args: SftArguments):
        self.args = args
        self.log: RunLog | None = None

    # -----------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        args = self.args
        self.dist = distributed.init_distributed(args.ddp_backend, default_device(), force=args.fsdp)
        self.device = self.dist.device
        self.dtype = resolve_dtype(args.dtype, self.device)
        if args.gradient_accumulation_steps is None:
            args.gradient_accumulation_steps = default_gradient_accumulation_steps(args.batch_size, self.dist.world_size)
        self.resume_dir = find_resume_checkpoint(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        resume_state = load_training_state(self.resume_dir) if self.resume_dir else None
        # Dataset files are read before the model is looked for: a typo fails in a second, not after a download.
        rows = distributed.on_main(self.read_data)
        # Full fine-tuning resumes from the checkpoint's weights; LoRA from the base plus the adapter.
        self.base_dir = self.resolve_base_dir()
        weights_dir = self.resume_dir if self.resume_dir and args.sft_type == "full" else self.base_dir

        _, tokenizer = get_model_tokenizer(args.model_type, load_model=False, model_id_or_path=str(weights_dir))
        self.template = get_template(get_default_template_type(args.model_type), tokenizer, args.system,
                                     args.max_length, args.truncation_strategy)
        self.pad_id = tokenizer.pad_token_id
        self.train_samples, self.val_samples = distributed.on_main(lambda: self.validate_data(*rows), share=True)

        seed_everything(args.seed)  # the same LoRA initialisation on every rank
        self.model = self.build_model(weights_dir)
        self.optimizer = self.build_optimizer()
        self.steps_per_epoch = self.count_steps_per_epoch()
        self.total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, kind=args.lr_scheduler_type, total=self.total_steps,
            warmup=math.ceil(args.warmup_ratio * self.total_steps)))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        self.run_dir = distributed.on_main(lambda: new_run_dir(args.output_dir, args.model_type), share=True)
        self.sft_args = self.describe_run()
        if self.dist.is_main:
            write_json(self.run_dir / "sft_args.json", self.sft_args)
        self.checkpoints = Checkpoints(self.run_dir, args.save_total_limit, self.dist.is_main)

        self.step, self.epoch, self.samples_done = 0, 0, 0
        self.rng_to_restore = None
        history = None
        if resume_state is not None:
            history = self.restore(resume_state)
        self.log = RunLog(self.run_dir, self.total_steps, self.step, self.dist.is_main,
                          show_progress=not args.disable_tqdm, history=history)
        trainable, total = count_parameters(self.model)
        self.log.info(f"run folder {self.run_dir}")
        self.log.info(f"{args.sft_type}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.3f}%); "
                      f"{len(self.train_samples)} train / {len(self.val_samples)} val rows; {self.total_steps} steps of "
                      f"{self.describe_step_sizes()}; {self.dist.world_size} process(es), "
                      f"{'FSDP' if args.fsdp else 'DDP' if self.dist.distributed else 'single'} on {self.device}")

    def resolve_base_dir(self) -> Path:
        """The base model folder (hub ids downloaded); on resume, the one the run was trained from."""
        from ..models.loading import resolve_model_dir

        base = self.args.model_id_or_path
        if self.resume_dir is not None and not base:
            base = json.loads((self.resume_dir / "sft_args.json").read_text()).get("model_id_or_path")
        return resolve_model_dir(self.args.model_type, base).absolute()

    def say(self, message: str, warning: bool = False) -> None:
        """Print ``message`` on rank 0, as plain text: it holds file names and rows, which may hold brackets."""
        if self.dist.is_main:
            from rich.console import Console
            from rich.markup import escape

            # soft_wrap: a long path stays in one piece, to copy from the terminal.
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                ("[yellow]warning:[/] " if warning else "") + escape(message))

    def read_data(self) -> tuple[list, list, list]:
        """Rank 0: the dataset files as (train rows, validation rows, reports), split as swift does."""
        args = self.args
        samples, report = load_dataset(args.dataset, args.check_dataset_strategy, args.dataset_seed)
        train, val = split_dataset(samples, args.dataset_test_ratio, args.dataset_seed, args.train_dataset_sample)
        reports = [report]
        if args.val_dataset:
            extra, val_report = load_dataset(args.val_dataset, args.check_dataset_strategy, args.dataset_seed,
                                             option="--val_dataset")
            val, reports = val + extra, reports + [val_report]
        return train, val, reports

    def validate_data(self, train: list, val: list, reports: list) -> tuple[list, list]:
        """Rank 0: encode every row once with the template (over-long rows, unloadable images are
        reported and skipped) and print what each file and split lost; returns (train, val).

        Each split has its own count. Only training must keep rows: a validation split left
        empty (say every held-out row names a missing image) means no evaluation, not no run.
        """
        args = self.args
        files = ", ".join(reports[0].sources)
        if not train:
            raise DatasetError(f"no training rows: --dataset_test_ratio {args.dataset_test_ratio} holds out "
                               f"all {len(val)} rows of {files}", "empty dataset")
        strategy = args.check_dataset_strategy
        splits = {"training": DatasetReport(strategy, [f"the training split of {files}"], len(train)),
                  "validation": DatasetReport(strategy, ["the validation split"], len(val))}
        train = validate_samples(train, self.template, splits["training"], args.preprocess_num_proc)
        val = validate_samples(val, self.template, splits["validation"], args.preprocess_num_proc)
        for report in reports + list(splits.values()):
            for message in report.messages:
                self.say(message, warning=True)
        for report in reports:
            self.say(report.summary())
        for name, report in splits.items():
            if report.n_skipped:
                self.say(f"{name} split: {report.summary()}")
        splits["training"].require_rows(train)
        if splits["validation"].total and not val:
            self.say(f"no validation row is left (all {splits['validation'].total} skipped): "
                     "no evaluation and no best checkpoint in this run", warning=True)
        return train, val

    def build_model(self, weights_dir: Path) -> torch.nn.Module:
        args, dist = self.args, self.dist
        # fp16 full fine-tuning keeps fp32 weights and runs in fp16 under autocast (as swift):
        # pure fp16 weights with Adam diverge, and a GradScaler cannot unscale fp16 gradients.
        self.param_dtype = torch.float32 if (self.dtype == torch.float16 and args.sft_type == "full") else self.dtype
        # FSDP moves each shard to the GPU itself: load on the CPU so no rank holds the whole model there.
        load_device = "cpu" if args.fsdp else str(self.device)
        model, _ = get_model_tokenizer(args.model_type, self.param_dtype, {"device_map": load_device},
                                       model_id_or_path=str(weights_dir))
        self.model_config = model.config
        if args.sft_type == "lora":
            self.lora_targets = resolve_target_modules(model, args.lora_target_modules)
            if args.gradient_checkpointing:
                model.gradient_checkpointing_enable(self.checkpointing_kwargs())
            model = apply_lora(model, self.lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout_p)
            if self.resume_dir is not None:
                load_lora_weights(model, self.resume_dir)
        else:
            self.lora_targets = None
            if args.freeze_vit:
                freeze_vision_tower(model)
            if args.gradient_checkpointing:
                model.gradient_checkpointing_enable(self.checkpointing_kwargs())
        model.train()
        self.training_graphs = self.build_training_graphs(model)
        self.cuda_graphs = self.training_graphs is not None
        if args.fsdp:
            distributed.keep_vision_in_every_step(model)
            return distributed.wrap_fsdp(model, dist)
        if dist.distributed:
            if vision_is_trainable(model):
                distributed.keep_vision_in_every_step(model.get_base_model() if args.sft_type == "lora" else model)
            return distributed.wrap_ddp(model, dist)
        return model

    def checkpointing_kwargs(self) -> dict:
        layers = self.args.gradient_checkpointing_layers
        return {"layers": None if layers == -1 else layers}

    def build_training_graphs(self, model):
        """--cuda_graphs where it applies (LoRA, one process, CUDA): the model's ``TrainingGraphs``,
        else None with a note saying why."""
        args = self.args
        if not args.cuda_graphs:
            return None
        reason = ("it needs a CUDA device" if self.device.type != "cuda" else
                  "it is for LoRA (--sft_type lora)" if args.sft_type != "lora" else
                  "it is for one process" if self.dist.distributed else None)
        graphs = None
        if reason is None:
            base = model.get_base_model()
            base.enable_training_graphs()
            graphs = base.transformer.training_graphs
            if graphs.refusal() is not None:
                reason = f"{graphs.refusal()}; set --lora_dropout_p 0 (or --gradient_checkpointing_layers 0)"
                base.disable_training_graphs()
                graphs = None
        if reason:
            self.say(f"--cuda_graphs true not used: {reason}", warning=True)
        return graphs

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (not on biases, norms and the like)."""
        args = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = params
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2))

    @property
    def global_batch_size(self) -> int:
        return self.args.batch_size * self.args.gradient_accumulation_steps * self.dist.world_size

    def count_steps_per_epoch(self) -> int:
        per_rank = -(-len(self.train_samples) // self.dist.world_size)
        micro_batches = -(-per_rank // self.args.batch_size)
        return max(1, -(-micro_batches // self.args.gradient_accumulation_steps))

    def describe_step_sizes(self) -> str:
        """How many samples a step holds: a full global batch, except the last step of an epoch
        (or every step, when the data is smaller than one global batch), which takes what is left."""
        per_rank = -(-len(self.train_samples) // self.dist.world_size)  # the sampler evens out the shards
        per_step = self.args.batch_size * self.args.gradient_accumulation_steps
        last = (per_rank - (self.steps_per_epoch - 1) * per_step) * self.dist.world_size
        full = self.global_batch_size
        if self.steps_per_epoch == 1 or last == full:
            return f"{last} samples"
        return f"{full} samples (the last of each epoch: {last})"

    def describe_run(self) -> dict[str, Any]:
        """``sft_args.json``: every option, with the base folder, data paths and defaults resolved."""
        info = dataclasses.asdict(self.args)
        info["model_id_or_path"] = str(self.base_dir)
        for key in ("dataset", "val_dataset"):
            info[key] = [os.path.abspath(spec) if Path(spec).expanduser().is_file() else spec for spec in info[key]]
        if info["resume_from_checkpoint"]:
            info["resume_from_checkpoint"] = str(self.resume_dir)
        info["world_size"] = self.dist.world_size
        info["resolved_lora_target_modules"] = self.lora_targets
        return info

    def restore(self, state: dict[str, Any]) -> dict[str, list]:
        """Optimizer, scheduler, scaler, step, data position and best metric of the checkpoint."""
        if self.args.fsdp:
            distributed.load_sharded_optimizer(self.model, self.optimizer, self.resume_dir / SHARDED_OPTIMIZER)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.samples_done = state["step"], state["epoch"], state["samples_done"]
        self.checkpoints.load_state(state)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            self.rng_to_restore = rngs[self.dist.rank]
        else:
            self.say(f"the checkpoint was written by {len(rngs)} process(es), this run has "
                     f"{self.dist.world_size}: random streams (dropout) restart from --seed", warning=True)
        self.say(f"resumed from {self.resume_dir} at step {self.step} (epoch {self.epoch})")
        return state.get("history")

    # -----------------------------------------------------------------------------------------
    # Training

    def train(self) -> dict[str, Any]:
        args = self.args
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore, self.device)
        else:
            seed_everything(args.seed + self.dist.rank)  # different dropout masks per rank
        started = time.perf_counter()
        throughput = Throughput()
        window: list[float] = []
        last_eval: float | None = None
        evaluated_step = None
        while self.step < self.total_steps:
            for group in self.micro_batch_groups():
                loss, grad_norm, lr, tokens = self.train_step(group)
                self.step += 1
                window.append(loss)
                throughput.add(tokens)
                final = self.step >= self.total_steps
                logging = self.step % args.logging_steps == 0 or self.step == 1 or final
                tokens_per_s = throughput.rate() if logging else None
                if logging:
                    self.log.log({"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                                  "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                                  "tokens_per_s": round(tokens_per_s, 1), "memory_GiB": round(memory_gib(self.device), 3)})
                    window = []
                self.log.advance(self.step, loss, lr, tokens_per_s)
                if self.val_samples and (self.step % args.eval_steps == 0 or final):
                    last_eval, evaluated_step = self.evaluate(), self.step
                    self.log.log({"step": self.step, "eval_loss": last_eval})
                if self.step % args.save_steps == 0 or final:
                    self.save_checkpoint(last_eval if evaluated_step == self.step else None)
                if final:
                    break
        result = {
            "run_dir": str(self.run_dir),
            "last_model_checkpoint": str(self.checkpoints.last) if self.checkpoints.last else None,
            "best_model_checkpoint": str(self.checkpoints.best) if self.checkpoints.best else None,
            "best_metric": self.checkpoints.best_metric,
            "global_step": self.step,
            "train_loss": self.log.history["train_loss"][-1][1] if self.log.history["train_loss"] else None,
            "eval_loss": last_eval,
            "train_runtime_s": round(time.perf_counter() - started, 3),
        }
        if self.cuda_graphs:
            result["cuda_graph_shapes"] = self.training_graphs.captures
            result["cuda_graph_replays"] = self.training_graphs.replays
        result["checkpoint"] = result["best_model_checkpoint"] or result["last_model_checkpoint"]
        self.log.close(final=result)
        self.say(f"last checkpoint: {result['last_model_checkpoint']}")
        self.say(f"best checkpoint: {result['best_model_checkpoint'] or 'none (no validation rows, no evaluation)'}")
        if self.cuda_graphs:
            self.say(f"cuda graphs: {result['cuda_graph_replays']} micro-batches replayed from "
                     f"{result['cuda_graph_shapes']} captured batch shape(s)")
        if self.dist.is_main and os.environ.get(distributed.RESULT_ENV):
            write_json(Path(os.environ[distributed.RESULT_ENV]), result)
        return result

    def micro_batch_groups(self):
        """The rest of the current epoch as groups of ``gradient_accumulation_steps`` micro-batches.

        The data position (samples of the epoch already trained on, all ranks together) is
        kept up to date so a checkpoint can resume from exactly the next batch.
        """
        args, dist = self.args, self.dist
        grouping = {}
        if args.group_by_length:
            grouping = {"lengths": self.train_lengths(), "group_size": 50 * args.batch_size * dist.world_size}
        sampler = distributed.ShardSampler(len(self.train_samples), dist.rank, dist.world_size, args.seed,
                                           self.epoch, skip=self.samples_done // dist.world_size, **grouping)
        loader = torch.utils.data.DataLoader(
            EncodedDataset(self.train_samples, self.template), batch_size=args.batch_size, sampler=sampler,
            collate_fn=functools.partial(collate, pad_id=self.pad_id, pad_to_multiple_of=32 if self.cuda_graphs else 1),
            num_workers=args.dataloader_num_workers,
            # Its own generator: creating the iterator then leaves the global RNG (dropout) alone,
            # so a resumed run draws the same random numbers as an uninterrupted one.
            generator=torch.Generator().manual_seed(args.seed + self.epoch),
            pin_memory=self.device.type == "cuda")
        group: list[dict] = []
        for batch in loader:
            group.append(batch)
            if len(group) == args.gradient_accumulation_steps:
                self.samples_done += sum(len(b["input_ids"]) for b in group) * dist.world_size
                yield group
                group = []
        if group:
            self.samples_done += sum(len(b["input_ids"]) for b in group) * dist.world_size
            yield group
        self.epoch, self.samples_done = self.epoch + 1, 0

    def train_lengths(self) -> list[int]:
        """Token counts of the training samples' texts (for --group_by_length; computed once)."""
        if getattr(self, "_train_lengths", None) is None:
            tokenizer = self.template.tokenizer
            self._train_lengths = [length_of(sample, tokenizer) for sample in self.train_samples]
        return self._train_lengths

    def train_step(self, group: list[dict]) -> tuple[float, float, float, float]:
        """One optimizer step over a group of micro-batches; returns (loss, grad norm, lr, tokens)."""
        model, world = self.model, self.dist.world_size
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group]
        tokens = float(sum(int(b["attention_mask"].sum()) for b in group))
        (total_labels,) = distributed.all_reduce_sum([sum(counts)], self.device)
        loss_sum = 0.0
        for i, (batch, count) in enumerate(zip(group, counts)):
            with distributed.gradient_sync(model, enabled=i == len(group) - 1):
                with self.autocast():
                    out = model(**self.to_device(batch, training=True))
                # DDP and FSDP average gradients over ranks; x world makes it a sum, / total a token mean.
                self.scaler.scale(out.loss * (count * world / total_labels)).backward()
            loss_sum += out.loss.item() * count
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: a step with inf/nan gradients is skipped and the scale lowered; the schedule waits too.
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale:
            self.scheduler.step()
        loss_total, tokens_total = distributed.all_reduce_sum([loss_sum, tokens], self.device)
        return loss_total / total_labels, grad_norm, lr, tokens_total

    def clip_gradients(self) -> float:
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def autocast(self):
        # CUDA graphs cannot capture autocast's weight cache (make_graphed_callables refuses it).
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                              cache_enabled=False if self.cuda_graphs else None)

    def to_device(self, batch: dict, training: bool = False) -> dict:
        """The model inputs of ``batch`` on the device.

        In training a right-padded batch goes without its attention mask: under causal
        attention no real token sees the pads after it, positions count from 0 either way,
        and training uses neither NTK scaling nor logn (which read the lengths). Attention then
        runs the flash kernel instead of a masked one, and the blocks can be CUDA-graphed.
        """
        keep = ("input_ids", "labels", "attention_mask", "images")
        mask = batch.get("attention_mask")
        if training and mask is not None and bool((mask[:, :-1] >= mask[:, 1:]).all()) and bool(mask[:, 0].all()):
            keep = ("input_ids", "labels", "images")
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items() if k in keep}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over every labelled token of the validation rows (all ranks together)."""
        args, dist = self.args, self.dist
        model = distributed.unwrap(self.model)
        sampler = distributed.ShardSampler(len(self.val_samples), dist.rank, dist.world_size, shuffle=False)
        loader = torch.utils.data.DataLoader(
            EncodedDataset(self.val_samples, self.template), batch_size=args.eval_batch_size, sampler=sampler,
            collate_fn=functools.partial(collate, pad_id=self.pad_id), num_workers=args.dataloader_num_workers)
        model.eval()
        loss_sum = count_sum = 0.0
        for j, batch in enumerate(loader):
            # Rows that only pad the last shard (so every rank runs the same batches) do not count.
            padding = sampler.is_padding[j * args.eval_batch_size:(j + 1) * args.eval_batch_size]
            batch["labels"][torch.tensor(padding)] = IGNORE_INDEX
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with self.autocast():
                out = model(**self.to_device(batch))
            loss_sum += out.loss.item() * count
            count_sum += count
        model.train()
        loss_total, count_total = distributed.all_reduce_sum([loss_sum, count_sum], self.device)
        return loss_total / max(count_total, 1)

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, eval_loss: float | None) -> None:
        args, dist = self.args, self.dist
        full_state = None
        if args.sft_type == "full" and (args.fsdp or dist.is_main):
            full_state = distributed.full_state_dict(self.model)  # a collective under FSDP
        rngs = distributed.gather_objects(rng_state(self.device))

        def write(folder: Path) -> None:
            if args.fsdp:
                distributed.save_sharded_optimizer(self.model, self.optimizer, folder / SHARDED_OPTIMIZER)
            if not dist.is_main:
                return
            if args.sft_type == "lora":
                save_lora_adapter(distributed.unwrap(self.model), folder)
            else:
                save_full_model(full_state, self.model_config, folder, self.param_dtype, self.base_dir)
            write_json(folder / "sft_args.json", self.sft_args)
            torch.save({
                "step": self.step, "epoch": self.epoch, "samples_done": self.samples_done,
                "optimizer": None if args.fsdp else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "history": self.log.history, "world_size": dist.world_size,
                **self.checkpoints.state(),
            }, folder / TRAINING_STATE)

        self.checkpoints.save(self.step, write, eval_loss)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if hasattr(self, "dist"):
            distributed.close_distributed(self.dist)


def lr_factor(step: int, kind: str, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then linear/cosine decay to 0 or constant."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    return max(0.0, 1.0 - progress)


def main(argv: list[str]) -> None:
    """``python -m vlswift.train.recipe ARGS.json``: what each torchrun process runs.

    A user error goes to the re-launching process, which shows it (see
    :func:`distributed.report_error`); under a torchrun started by hand each rank prints its own.
    """
    from ..cli import debug_enabled, print_error

    args = SftArguments(**json.loads(Path(argv[0]).read_text()))
    try:
        sft_main(args)
    except distributed.MainRankFailed:
        sys.exit(1)  # rank 0 reports why
    except (ValueError, FileNotFoundError, OSError) as e:
        if debug_enabled():
            raise
        if not distributed.report_error(e):
            print_error(f"[rank {os.environ.get('RANK', 0)}] {e}")  # print_error escapes markup
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
