"""The decoder blocks of a training step replayed from CUDA graphs (forward and backward).

A LoRA step of the 9.6B model at batch 4 runs ~5,000 small kernels in its decoder blocks;
launched one by one from Python (with autograd's bookkeeping) they keep the GPU waiting for
the host for about a third of the step. ``torch.cuda.make_graphed_callables`` captures the
blocks' forward and their backward once per input shape, and each step then replays the two
graphs: the same kernels on the same addresses, so the same results as the eager step.

Where it applies (``TrainingGraphs.run`` returns None otherwise, and the caller runs the
blocks eagerly): training mode, CUDA, no KV cache, plain causal attention (right-padded
batches need no mask), no logn scaling, plain (not FSDP-wrapped) blocks, and at most
``max_graphs`` distinct shapes (the recipe pads lengths to a multiple of 32 to keep them few).
The graphs share one memory pool: a step's forward and backward replay before the next
step's, so their working memory never overlaps in time.

Randomness: dropout replays fine (each replay draws new numbers), but not together with
gradient checkpointing: a block recomputed inside the replayed backward would draw other
masks than its forward did. So with dropout active (LoRA's ``lora_dropout``) and blocks
recomputed the graphs are not used; without dropout the checkpointed blocks skip saving the
RNG state (nothing to replay).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


# Graphs only for adapters: with most block weights trainable (full fine-tuning) the graph's
# own gradient buffers would double the gradients' memory.
MAX_TRAINABLE_SHARE = 0.05


def blocks_use_rng(blocks: nn.Module) -> bool:
    """Whether any dropout in ``blocks`` is active: an ``nn.Dropout`` (LoRA's) or attention's."""
    for m in blocks.modules():
        if not m.training:
            continue
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0:  # QWenAttention
            return True
    return False


class _Blocks(nn.Module):
    """The decoder blocks and final norm of ``owner`` as one module taking only tensors."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.h = owner.h
        self.ln_f = owner.ln_f
        self._owner = [owner]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from .qwen import RopeState

        return self._owner[0].run_blocks_eager(x, RopeState(cos, sin, None), "causal", preserve_rng_state=False)


class TrainingGraphs:
    """Graphed forward+backward of ``QWenModel``'s blocks, one capture per input shape."""

    def __init__(self, owner: nn.Module, max_graphs: int = 16):
        self.owner = owner
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, object] = {}
        self.refused: set[tuple] = set()
        self.pool = None
        self.captures = 0  # how many shapes were captured, and steps replayed (tests, logs)
        self.replays = 0
        self.grad_buffers: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.owner.h.parameters() if p.requires_grad] + \
            [p for p in self.owner.ln_f.parameters() if p.requires_grad]

    def attach_grads(self) -> None:
        """Give every trainable block parameter a ``.grad`` before backward.

        The graphed backward hands out its gradients in static buffers, overwritten by the next
        replay. Into an existing ``.grad`` autograd adds them in place; with ``.grad`` None it
        would keep the static buffer itself as ``.grad``, and the next micro-batch's replay
        would overwrite (then double) it. So a parameter whose ``.grad`` was set to None (by
        ``zero_grad``) gets its own zeroed buffer back.
        """
        if self.grad_buffers is None:
            self.grad_buffers = [(p, torch.zeros_like(p)) for p in self.trainable()]
        empty = [(p, buf) for p, buf in self.grad_buffers if p.grad is None]
        if empty:
            torch._foreach_zero_([buf for _, buf in empty])
            for p, buf in empty:
                p.grad = buf

    def key(self, x: torch.Tensor) -> tuple:
        owner = self.owner
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad, owner.gradient_checkpointing,
                owner.checkpoint_layers)

    def applies(self, x: torch.Tensor, rope, mask, cache) -> bool:
        from .qwen import QWenBlock

        return (self.owner.training and torch.is_grad_enabled() and x.is_cuda and cache is None
                and isinstance(mask, str) and mask == "causal" and rope.logn is None
                and type(self.owner.h[0]) is QWenBlock and not torch.cuda.is_current_stream_capturing()
                and self.refusal() is None)

    def refusal(self) -> str | None:
        """Why no step of the model as it is set up now can be graphed, whatever its inputs (or None)."""
        owner = self.owner
        recomputes = owner.gradient_checkpointing and owner.checkpoint_layers != 0
        if recomputes and blocks_use_rng(owner.h):
            return ("dropout is active in decoder blocks that recompute in backward (a recomputation "
                    "replayed from a graph would draw new dropout masks)")
        return None

    def few_trainable(self) -> bool:
        total = sum(p.numel() for p in self.owner.h.parameters())
        return sum(p.numel() for p in self.trainable()) <= MAX_TRAINABLE_SHARE * total

    def run(self, x: torch.Tensor, rope, mask, cache) -> torch.Tensor | None:
        """The blocks' output replayed from the graph of ``x``'s shape, or None (run them eagerly)."""
        if not self.applies(x, rope, mask, cache):
            return None
        key = self.key(x)
        graphed = self.graphs.get(key)
        if graphed is None:
            if key in self.refused or len(self.graphs) >= self.max_graphs:
                return None
            if not self.few_trainable():
                self.refused.add(key)
                return None
            graphed = self.capture(key, x, rope)
            if graphed is None:
                return None
        self.attach_grads()
        self.replays += 1
        return graphed(x, rope.cos, rope.sin)

    def capture(self, key: tuple, x: torch.Tensor, rope):
        sample = (x.detach().clone().requires_grad_(x.requires_grad), rope.cos.detach().clone(),
                  rope.sin.detach().clone())
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with warnings.catch_warnings():
                # Its warm-up runs backward on a side stream by design; autograd notes the other stream.
                warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
                graphed = torch.cuda.make_graphed_callables(_Blocks(self.owner), sample, num_warmup_iters=2,
                                                            allow_unused_input=True, pool=self.pool)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, AssertionError) as e:  # capture not possible: keep this shape eager
            self.refused.add(key)
            warnings.warn(f"training step not graphed for input shape {tuple(x.shape)}: {e}", stacklevel=2)
            return None
        self.graphs[key] = graphed
        self.captures += 1
        return graphed
