"""Per-GPU memory of a run under each ZeRO stage, from the model's config alone.

The model is instantiated on the meta device (no memory, no weights) to count parameters.

Model states follow the ZeRO paper: with mixed precision, 2 bytes of weights and 2 of gradients
per parameter plus 12 of fp32 optimizer state (master weights, Adam m and v); fp32 training keeps
4 + 4 + 8. Stage 1 partitions the optimizer state across data-parallel ranks, stage 2 also the
gradients, stage 3 also the weights; CPU offload moves optimizer state (and, for params, the
weights) off the GPU. Only trainable parameters (all of them, or LoRA's) have gradients and
optimizer state.

Activations are what backward needs of one micro batch, counted per decoder layer for a
Llama-style block with a fused attention kernel (sdpa/flash keep no s x s score matrix). Measured
with ``saved_tensors_hooks`` on transformers' Llama, a layer keeps about (9h + 2kv + 4i) values
per token (h hidden, kv key/value width, i MLP width): both norms' inputs and outputs and the
projections' inputs, q/k/v, the attention output, and the MLP's gate, up, activation and product.
Gradient checkpointing keeps only each layer's input plus one layer's worth during recomputation.
The LM head adds the logits three times around the loss: in the compute dtype, upcast to fp32,
and log-softmax's fp32 output (the one kept for backward); with ``model.loss_chunk_tokens`` only
one chunk's worth exists at a time and nothing of it is kept.
DPO and IPO add no model: the reference log-probs are computed once, before the first step, by a
forward of the policy itself (``bigscale.train.reference``), with the model states already in
place. That forward keeps nothing for backward, so its peak is one reference batch's transient
values (``reference_activations``); the run's activation peak is the larger of it and a training
micro batch's.
It is an estimate: allocator fragmentation, temporary buffers and communication
buckets come on top, so ``strategy=auto`` leaves a margin.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from bigscale.config.derived import DataStats
from bigscale.config.schema import (
    ALL_LINEAR,
    FinetuneConfig,
    FinetuneMethod,
    Precision,
    StrategyConfig,
    TrainConfig,
)
from bigscale.data.preference import (
    REFERENCE_OBJECTIVES,
    REFERENCE_TABLE_COLUMNS,
    reference_pairs,
)

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its parameter count and layer dimensions."""

    params: int
    layers: int
    hidden: int
    kv_width: int
    """Width of the key (and value) projection: key/value heads x head size."""
    intermediate: int
    vocab: int
    trainable: int | None = None
    """Parameters with gradients and optimizer state; ``None``: all of them."""
    adaptable: tuple[tuple[str, int, int, bool], ...] = ()
    """Modules LoRA can adapt (linear layers and embeddings): qualified name, input and output
    width, and whether ``all-linear`` takes it (a linear layer other than the LM head)."""
    module_params: tuple[tuple[str, int], ...] = ()
    """Each module's own parameters (not its children's), for ``finetune.modules_to_save``."""
    heads: int = 0
    """Attention (query) heads; 0: unknown, and then no sequence parallelism is proposed."""
    kv_heads: int = 0
    """Key-value heads (``heads`` without grouped-query attention)."""

    @classmethod
    def from_config(cls, config: Any, params: int) -> ModelShape:
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            params=params,
            layers=config.num_hidden_layers,
            hidden=hidden,
            kv_width=kv_heads * head_dim,
            intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=kv_heads,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float = 0.0
    trainable: int = 0
    """Parameters with gradients and optimizer state."""

    reference_gib: float = 0.0
    """DPO/IPO: the activations of one forward of the reference pass, which runs before the
    first step beside the same model states (not beside a training micro batch's activations)."""

    @property
    def total_gib(self) -> float:
        states = self.weights_gib + self.grads_gib + self.optimizer_gib
        return states + max(self.activations_gib, self.reference_gib)


# Once per model and process: with strategy=auto the plan needs the shape to choose, then again
# to print its estimate, and a sweep plans every job with the same model.
@functools.lru_cache(maxsize=8)
def model_shape(name_or_path: str, revision: str | None, trust_remote_code: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    # The meta device, not accelerate's init_empty_weights: that one re-creates every parameter
    # as it is registered, which unties tied embeddings and counts them twice.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    shape = ModelShape.from_config(config, sum(p.numel() for p in model.parameters()))
    return dataclasses.replace(shape, **_modules(model))


def _modules(model: Any) -> dict[str, Any]:
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    adaptable: list[tuple[str, int, int, bool]] = []
    own: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            own.append((name, n))
        if isinstance(module, torch.nn.Linear):
            adaptable.append((name, module.in_features, module.out_features, module is not head))
        elif isinstance(module, Conv1D):  # GPT-2's linear layers: weight is (in, out)
            fan_in, fan_out = module.weight.shape
            adaptable.append((name, int(fan_in), int(fan_out), module is not head))
        elif isinstance(module, torch.nn.Embedding):
            adaptable.append((name, module.num_embeddings, module.embedding_dim, False))
    return {"adaptable": tuple(adaptable), "module_params": tuple(own)}


def _matches(module_name: str, target: str) -> bool:
    # peft's rule for a list of targets (as bigscale.model.lora applies it): the whole name, or
    # its last dotted components.
    return module_name == target or module_name.endswith(f".{target}")


def finetuned(shape: ModelShape, f: FinetuneConfig) -> ModelShape:
    """The shape as trained: with LoRA, the adapters and the trained copies of
    ``finetune.modules_to_save`` are added and are all that is trainable; full fine-tuning
    trains everything."""
    if f.method != FinetuneMethod.lora:
        return shape
    # peft wraps every module whose name ends with an entry (no dot needed) in a trained copy.
    named = {name for name, _ in shape.module_params} | {a[0] for a in shape.adaptable}
    roots = sorted(n for n in named if any(n.endswith(m) for m in f.modules_to_save))

    def saved(name: str) -> bool:
        return any(name == root or name.startswith(f"{root}.") for root in roots)

    copies = sum(n for name, n in shape.module_params if saved(name))
    targets = list(f.target_modules)
    if targets == [ALL_LINEAR]:
        linear = (name.rsplit(".", 1)[-1] for name, _, _, lin in shape.adaptable if lin)
        targets = list(dict.fromkeys(linear))
    # lora_A maps the input width to r, lora_B r to the output width; no biases. peft adds no
    # adapter inside a module it trains whole.
    adapters = sum(
        f.r * (fan_in + fan_out)
        for name, fan_in, fan_out, _ in shape.adaptable
        if any(_matches(name, t) for t in targets) and not saved(name)
    )
    trainable = adapters + copies
    return dataclasses.replace(shape, params=shape.params + trainable, trainable=trainable)


@dataclass(frozen=True)
class Workload:
    """What one micro batch puts through the model, and how activations are kept."""

    micro_batch: int
    seq_len: int
    checkpointing: bool = False
    checkpoint_every: int = 1
    """With ``checkpointing``, only every N-th decoder layer is recomputed."""
    loss_chunk_tokens: int = 0
    """0: full logits around the loss; N: the chunked loss, N tokens of logits at a time."""
    seq_from: str = "data.max_length"
    """Where ``seq_len`` comes from, for the plan."""
    reference_batch: int = 0
    """Sequences per forward of the reference pass (DPO, IPO: both sides of
    ``reference_pairs`` pairs, of at most ``seq_len`` tokens); 0: no such pass."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, data: DataStats | None = None) -> Workload:
        """A micro batch of ``data.max_length`` tokens, or, when the tokenized data is known
        and not packed (packed rows are padded to ``data.max_length``), of its longest example:
        the batch that sets the peak, since a micro batch is padded to its longest row."""
        m = cfg.model
        seq_len, source = cfg.data.max_length, "data.max_length"
        if data is not None and not data.packed and data.longest:
            seq_len, source = min(data.longest, seq_len), "longest tokenized example"
        # A preference micro batch of n pairs is one forward over 2n sequences (chosen and
        # rejected side by side); the rejected side may be the longer, so max_length bounds it.
        pairs = cfg.data.style.value == "preference"
        if pairs:
            seq_len, source = cfg.data.max_length, "data.max_length (pairs)"
        reference = cfg.objective.name in REFERENCE_OBJECTIVES
        return cls(
            micro_batch=cfg.trainer.micro_batch_size * (2 if pairs else 1),
            seq_len=seq_len,
            checkpointing=m.gradient_checkpointing,
            checkpoint_every=m.checkpoint_every,
            loss_chunk_tokens=m.loss_chunk_tokens,
            seq_from=source,
            reference_batch=2 * reference_pairs(cfg) if reference else 0,
        )


@dataclass(frozen=True)
class Activations:
    stored: float
    """Bytes forward keeps for backward (what ``saved_tensors_hooks`` would see)."""
    transient: float
    """Bytes that exist only around the loss and in backward: the logits in the compute dtype
    and in fp32, and with gradient checkpointing one layer's recomputed activations."""

    @property
    def peak(self) -> float:
        return self.stored + self.transient


def activations(shape: ModelShape, work: Workload, precision: Precision) -> Activations:
    """Activation memory of one micro batch (see the module docstring for what is counted)."""
    elem = 2 if precision in (Precision.bf16, Precision.fp16) else 4
    tokens = work.micro_batch * work.seq_len
    layer = tokens * elem * (9 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate)
    recomputed = -(-shape.layers // work.checkpoint_every) if work.checkpointing else 0
    kept = recomputed * tokens * elem * shape.hidden + (shape.layers - recomputed) * layer
    head = 3 * tokens * elem * shape.hidden  # the final norm's input and output, the head's input
    recompute = layer if recomputed else 0
    if work.loss_chunk_tokens:
        # Nothing of the loss is kept; one chunk's logits exist at a time, in forward and again
        # when backward recomputes them.
        logits = min(tokens, work.loss_chunk_tokens) * shape.vocab
        return Activations(stored=kept + head, transient=recompute + logits * (elem + 8))
    logits = tokens * shape.vocab
    return Activations(
        # The loss keeps only log-softmax's fp32 output; the logits themselves, their fp32
        # upcast and then their gradients live only around the loss.
        stored=kept + head + logits * 4,
        transient=recompute + logits * (elem + 4),
    )


def reference_activations(shape: ModelShape, work: Workload, precision: Precision) -> float:
    """Peak bytes of one forward of the reference pass (``work.reference_batch`` sequences of
    ``work.seq_len`` tokens) under ``torch.no_grad``, where no layer keeps anything: the larger
    of one decoder layer's live values (measured on transformers' Llama: about 4h + 2kv + 3i
    per token, the residual stream and the MLP's gate, up and product at once) and the head's
    moment (the final hidden states, then the logits' fp32 copy and logsumexp's fp32 temporary
    in ``bigscale.train.objectives.sequence_logps``, the compute-dtype logits freed by then; one
    chunk's worth with ``model.loss_chunk_tokens``). 0 without a reference pass."""
    if not work.reference_batch:
        return 0.0
    elem = 2 if precision in (Precision.bf16, Precision.fp16) else 4
    tokens = work.reference_batch * work.seq_len
    layer = tokens * elem * (4 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate)
    logits = min(tokens, work.loss_chunk_tokens) if work.loss_chunk_tokens else tokens
    # 8 bytes a logit: the fp32 copy and the temporary (bf16 logits go once copied).
    head = tokens * elem * 2 * shape.hidden + logits * shape.vocab * 8
    return float(max(layer, head))


def reference_table_bytes(pairs: int) -> int:
    """Disk size of a split's reference table (``bigscale.train.reference``): a float64
    (chosen, rejected) row per pair, in ``torch.save``'s zip framing (under 2 KB)."""
    return REFERENCE_TABLE_COLUMNS * 8 * pairs + 2048


def estimate(
    shape: ModelShape,
    strategy: StrategyConfig,
    precision: Precision,
    dp_ranks: int,
    work: Workload | None = None,
) -> MemoryEstimate:
    """Per-GPU memory; activations only when a ``work`` load is given. ``dp_ranks``: all the
    ranks of the job. Tensor parallelism divides weights, gradients and optimizer state by its
    size and ZeRO partitions over the rest; sequence parallelism leaves the weights whole (ZeRO
    partitions over every rank) and divides the activations, each rank holding 1/N of the
    tokens (attention's all-to-all holds the whole sequence only for 1/N of the heads)."""
    half = precision in (Precision.bf16, Precision.fp16)
    weight_bytes, grad_bytes = (2, 2) if half else (4, 4)
    optim_bytes = 12 if half else 8
    trainable = shape.params if shape.trainable is None else shape.trainable
    stage = strategy.zero_stage
    tp, sp = strategy.tensor_parallel_size, strategy.sequence_parallel_size
    zero_ranks = max(1, dp_ranks // tp)
    weights = shape.params * weight_bytes / tp / (zero_ranks if stage >= 3 else 1)
    grads = trainable * grad_bytes / tp / (zero_ranks if stage >= 2 else 1)
    optim = trainable * optim_bytes / tp / (zero_ranks if stage >= 1 else 1)
    if strategy.offload_optimizer:
        optim = 0.0
    if strategy.offload_params:
        weights = 0.0
    acts = activations(shape, work, precision).peak / sp if work else 0.0
    reference = reference_activations(shape, work, precision) if work else 0.0
    return MemoryEstimate(
        shape.params,
        weights / GIB,
        grads / GIB,
        optim / GIB,
        acts / GIB,
        trainable,
        reference / GIB,
    )


def checkpoint_snapshot_gib(
    est: MemoryEstimate, strategy: StrategyConfig, precision: Precision, dp_ranks: int
) -> float:
    """Host memory one rank holds for an asynchronous checkpoint's snapshot: what it saves,
    i.e. the weights (rank 0 of each ZeRO 0-2 group saves them whole) and its partition of the
    optimizer state (fp32 master and Adam moments), offloaded or not. Reused from save to
    save, pinned when the state lives on a GPU. Counted from the plan's memory estimate, whose
    parameter counts are the model's as trained."""
    half = precision in (Precision.bf16, Precision.fp16)
    trainable = est.trainable
    tp = strategy.tensor_parallel_size
    zero_ranks = max(1, dp_ranks // tp)
    stage = strategy.zero_stage
    weights = est.params * (2 if half else 4) / tp / (zero_ranks if stage >= 3 else 1)
    optim = trainable * (12 if half else 8) / tp / (zero_ranks if stage >= 1 else 1)
    return (weights + optim) / GIB


def saved_activation_bytes(model: Any, **inputs: Any) -> int:
    """Measure what the estimate predicts: bytes of the distinct tensors autograd keeps for
    backward during one forward (weights excluded). Used by the test and bench/memory_plan.py."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(kept.values())
