"""DeepSpeed, behind one module: the only place in bigscale that imports ``deepspeed``.

It turns the typed training config into a DeepSpeed config (one source of truth for batch sizes,
precision and clipping), builds the optimizer and the engine, and exposes the few operations the
trainer needs: forward, backward, step, gathered weights for export."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers.integrations import HfDeepSpeedConfig

from bigscale.config.derived import warmup_for
from bigscale.config.schema import OptimConfig, Precision, TrainConfig
from bigscale.data.collate import model_inputs
from bigscale.data.shard import LOSS_TOKENS, SHIFT_LABELS
from bigscale.dist.ds_files import (
    tensor_parallel_size,
    universal_copy,
    weights_only_loading,
    zero_partitions,
)
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError
from bigscale.logging import get_logger


def init_distributed(env: DistEnv, timeout_minutes: float = 30.0) -> None:
    """Join the process group (gloo on CPU, nccl on GPU). A lone process gets a group of one so
    the same code path runs everywhere."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    _skip_shared_memory_all_reduce()
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timedelta(minutes=timeout_minutes),
    )


def _skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend JIT-builds and loads a C++ shared-memory all-reduce when it joins
    the group. Only its inference all-reduce uses it (AutoTP layers under ``torch.no_grad``), and
    that falls back to the process group's all-reduce without it; bigscale trains and evaluates
    correctly either way. The op costs a C++ build on a new machine (and again whenever the
    DeepSpeed install moves: the build is keyed on its source paths), 1.7 s of loading in every
    rank of every run, and a process killed during the build leaves a lock file that every later
    rank waits on forever, silently."""
    # By name: `import deepspeed.comm.torch as m` binds the torch package, which deepspeed.comm
    # re-exports under that attribute.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_ds_config(cfg: TrainConfig, world_size: int, precision: Precision) -> dict[str, Any]:
    """The DeepSpeed config derived from the bigscale config, with the user's JSON merged in."""
    t, s = cfg.trainer, cfg.strategy
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.zero_stage > 0:
        zero.update(
            overlap_comm=s.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=s.reduce_bucket_size,
        )
    if s.zero_stage == 3:
        # Export gathers the partitioned weights; without this flag DeepSpeed refuses.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    pin = torch.cuda.is_available()
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed checks this against the ranks it knows when reading its config: without the
        # sequence-parallel ranks (given as mpu) but with the tensor-parallel ones (their groups
        # come later). bigscale's global batch counts only the data-parallel ranks.
        "train_batch_size": t.global_batch(world_size // s.sequence_parallel_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # A bf16 step with a non-finite gradient norm is skipped, as fp16 and fp32 ones are.
        "bf16": {"enabled": precision == Precision.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": precision == Precision.fp16, "loss_scale": 0},
        # bigscale logs its own metrics; DeepSpeed's periodic prints would duplicate them.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if s.sequence_parallel_size > 1:
        # Read where no mpu is given: transformers' zero.Init under ZeRO-3 checks the batch
        # against the whole world otherwise, and refuses the config (8 != 1 x 8 x 2).
        ds["sequence_parallel_size"] = s.sequence_parallel_size
    if s.tensor_parallel_size > 1:
        # AutoTP training: DeepSpeed shards the linear layers over consecutive ranks.
        ds["tensor_parallel"] = {"autotp_size": s.tensor_parallel_size}
    if s.deepspeed_config:
        user = json.loads(Path(s.deepspeed_config).read_text())
        ds = _deep_merge(ds, user)
    return ds


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@contextmanager
def partitioned_model_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, models loaded inside this block are built already partitioned across ranks
    (transformers reads the live HfDeepSpeedConfig); elsewhere it does nothing."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    marker = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        # transformers holds only a weak reference; keep it alive until loading is done.
        del marker


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then the schedule,
    never below ``min_lr_ratio``."""

    warmup = warmup_for(optim, max_steps)  # as RunShape.warmup_steps, which the plan prints

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if optim.schedule == "constant":
            decay = 1.0
        elif optim.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D). ZeRO-3 partitions parameters into flat
    placeholders, so the original shape comes from ``ds_shape``."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _cpu_adam_is_built() -> bool:
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if installed_ops.get("cpu_adam", False):
        return True  # installed prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return any(Path(root).glob("*/cpu_adam/cpu_adam.so"))


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = _param_groups(model, o.weight_decay)
    betas = (o.beta1, o.beta2)
    if cfg.strategy.offload_optimizer:
        # With the optimizer state in CPU memory DeepSpeed needs its own vectorized CPU Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if not _cpu_adam_is_built():
            # Otherwise the run looks hung: ninja's output goes nowhere while it compiles.
            get_logger(__name__).info(
                "building DeepSpeed's CPU Adam op (first use on this machine: minutes on a small "
                "CPU; `make ops` builds it ahead)"
            )
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=betas, eps=o.eps, adamw_mode=True)
    # torch has fused AdamW kernels for CUDA and CPU; on CPU it is 5.6x faster than the
    # per-tensor loop (bench/RESULTS.md).
    fused = True if o.fused is None else o.fused
    adamw = _SkippableAdamW if cfg.strategy.zero_stage == 0 else torch.optim.AdamW
    return adamw(groups, lr=o.lr, betas=betas, eps=o.eps, fused=fused or None)


def _plain(value: Any) -> Any:
    # Betas come back from a checkpoint as a list or tensors; compare them as plain numbers.
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return float(value)


class _SkippableAdamW(torch.optim.AdamW):
    """AdamW that leaves the weights alone when told the gradients are not finite.

    ZeRO's optimizers and DeepSpeed's fp16/bf16 wrappers check the gradient norm and skip such a
    step; plain data parallel in fp32 hands DeepSpeed this bare optimizer, which would write NaN
    into every weight. DeepSpeed reads ``overflow`` after ``step()`` to count the skip and hold
    the lr schedule, exactly as for its own optimizers."""

    overflow = False

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.overflow:
            return None
        return super().step(closure)


class Engine:
    """A DeepSpeed engine plus what bigscale asks of it."""

    def __init__(
        self, model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], max_steps: int
    ):
        self.ds_config = ds_config
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        optimizer = _build_optimizer(model, cfg)
        schedule = lr_lambda(cfg.optim, max_steps)
        mpu = None
        if cfg.strategy.sequence_parallel_size > 1:
            from bigscale.dist import sequence_parallel

            mpu = sequence_parallel.enable(
                model,
                cfg.strategy.sequence_parallel_size,
                cfg.trainer.micro_batch_size,
                cfg.model.name_or_path,
            )
        self._engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule),
            config=ds_config,
            mpu=mpu,
        )
        if cfg.model.compile:
            self._engine.compile()
        self._manual_grad_norm: float | None = None
        self._base_optimizer = optimizer
        # Frozen weights (LoRA's base model) are not checkpointed: they come from the
        # pretrained model again on resume, so loading must accept their absence.
        self.has_frozen = any(not p.requires_grad for p in model.parameters())

    @property
    def module(self) -> torch.nn.Module:
        return self._engine.module

    @property
    def device(self) -> torch.device:
        return self._engine.device

    def train(self, mode: bool = True) -> None:
        self._engine.train(mode)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in model_inputs(batch).items()
        }
        if SHIFT_LABELS not in batch:
            return self._engine(**inputs).loss
        # A sequence-parallel slice: the loss needs the labels shifted before the cut.
        from bigscale.dist.sequence_parallel import shard_loss

        logits = self._engine(**inputs).logits
        return shard_loss(logits, batch[SHIFT_LABELS], int(batch[LOSS_TOKENS]))

    def outputs(self, batch: dict[str, torch.Tensor], **extra: Any) -> Any:
        """The model's whole output for ``batch``'s model inputs plus ``extra`` arguments (a
        preference objective reads the logits, or per-token log-probs, not the loss)."""
        inputs = {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in {**model_inputs(batch), **extra}.items()
        }
        return self._engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> bool:
        """Advance one micro batch; at the accumulation boundary this clips and steps the
        optimizer and the lr schedule, or skips them when the gradient norm is not finite.
        Returns whether this was the boundary."""
        boundary = bool(self._engine.is_gradient_accumulation_boundary())
        if boundary and self.zero_stage == 0:
            self._manual_grad_norm = norm = self._local_grad_norm()
            if isinstance(self._base_optimizer, _SkippableAdamW):
                self._base_optimizer.overflow = norm is not None and not math.isfinite(norm)
        self._engine.step()
        return boundary

    @property
    def step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights (False: skipped as non-finite)."""
        return bool(self._engine.was_step_applied())

    def weights_finite(self) -> bool:
        """Collective: True when no rank holds a NaN or infinite weight (under ZeRO-3, in its
        own partition)."""
        # One read of each weight, no temporary the size of the model (isfinite's mask): a NaN
        # or inf propagates into the fp32 sum; finite weights overflow it only past 3e38.
        sums = [
            getattr(p, "ds_tensor", p).sum(dtype=torch.float32) for p in self.module.parameters()
        ]
        bad = torch.tensor([0.0 if not sums else float(~torch.stack(sums).isfinite().all())])
        if torch.distributed.is_initialized():
            bad = bad.to(self.device)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return not bool(bad.item())

    def _local_grad_norm(self) -> float | None:
        # Plain data parallel in fp32 has no DeepSpeed optimizer wrapper to report the norm; the
        # gradients are already averaged across ranks here, so every rank computes the same.
        if self._engine.get_global_grad_norm() is not None:
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    @property
    def grad_norm(self) -> float | None:
        norm = self._engine.get_global_grad_norm()
        if norm is None:
            norm = self._manual_grad_norm
        return None if norm is None else float(norm)

    def save_checkpoint(self, directory: Path, tag: str, writer: Any = None) -> None:
        """DeepSpeed's sharded model + optimizer + lr-schedule state (collective: every rank
        writes its part). ``latest`` is bigscale's to move, after the checkpoint is complete.
        ``writer`` (a DeepSpeed checkpoint engine) receives every file DeepSpeed saves: bigscale
        hashes them as they are written, or snapshots them for a background write."""
        own = self._engine.checkpoint_engine
        if writer is not None:
            self._engine.checkpoint_engine = writer
        try:
            self._engine.save_checkpoint(
                str(directory),
                tag=tag,
                save_latest=False,
                exclude_frozen_parameters=self.has_frozen,
            )
        finally:
            self._engine.checkpoint_engine = own

    def load_checkpoint(self, directory: Path, tag: str) -> None:
        """Restore model, optimizer and lr schedule, on this world size whatever the one that
        wrote the checkpoint. ZeRO stage 0 keeps the whole optimizer in one file, which loads on
        any number of ranks. A ZeRO-1/2/3 checkpoint partitioned over a different number of
        ranks, or sliced over another tensor-parallel size (AutoTP), is converted once to
        DeepSpeed's universal format (by rank 0, into ``<checkpoint>/universal``, renamed into
        place when complete and reused after) and loaded from there, each rank taking its new
        partition and its new slice."""
        source = Path(directory) / tag
        saved = zero_partitions(source)
        world = torch.distributed.get_world_size()
        # ZeRO partitions over the ranks of one tensor slice (all of them without AutoTP; with
        # Ulysses, every rank of the sequence-data-parallel world).
        tp = max(1, int(self._engine.autotp_size()))
        if tensor_parallel_size(source) == tp and saved in (0, world // tp):
            self._load(Path(directory), tag, universal=False)
            return
        if self._engine.zero_nvme_offload_optimizer():
            raise CheckpointError(
                f"{source} was written by {saved} ranks, this run has {world}: DeepSpeed cannot "
                f"re-partition ZeRO-{self.zero_stage} optimizer state offloaded to NVMe; resume "
                f"with launcher.nproc_per_node={saved}, or without NVMe offload"
            )
        universal = universal_copy(source)
        self._load(universal.parent, universal.name, universal=True)

    def _load(self, directory: Path, tag: str, universal: bool) -> None:
        # DeepSpeed reads this flag only while loading, so it is set for this load alone.
        config = self._engine._config
        before, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
        try:
            with weights_only_loading():
                path, _ = self._engine.load_checkpoint(
                    str(directory),
                    tag=tag,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                    load_module_strict=not self.has_frozen,
                )
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {Path(directory) / tag}")

    def apply_optim_settings(self, optim: OptimConfig) -> list[str]:
        """After a resume the optimizer's hyper-parameters and the schedule's peak lr are the
        checkpoint's; the config's must win, or resuming after a divergence "with a lower
        optim.lr" would silently keep the old one. Values already equal are left untouched, so
        an unchanged resume stays bitwise exact. Returns what changed, for the log."""
        changed: list[str] = []
        groups = self.scheduler.optimizer.param_groups
        for index, group in enumerate(groups):
            wanted = {
                "betas": (optim.beta1, optim.beta2),
                "eps": optim.eps,
                # _param_groups: the first group decays, the second (biases, norms) never does.
                "weight_decay": optim.weight_decay if index == 0 else 0.0,
            }
            for key, value in wanted.items():
                if key in group and _plain(group[key]) != value:
                    changed.append(f"{key} {_plain(group[key])} -> {value} (group {index})")
                    group[key] = value
        if any(base != optim.lr for base in self.scheduler.base_lrs):
            changed.append(f"peak lr {self.scheduler.base_lrs[0]:g} -> {optim.lr:g}")
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            self.scheduler.base_lrs = [optim.lr] * len(groups)
            for group in groups:
                group["lr"] = optim.lr * factor
        return changed

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters in the model, parameters stored on this rank): under ZeRO-3 each rank
        holds only its partition."""
        total = local = 0
        for p in self.module.parameters():
            total += int(getattr(p, "ds_numel", p.numel()))
            local += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
        return total, local

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
