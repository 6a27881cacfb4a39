"""The plan of a run: everything ``bigscale train`` will do, computed without training.

``bigscale plan`` prints it; ``bigscale train`` prints it and then carries it out, so what a
user reviews is exactly what runs."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bigscale.checkpoint.select import select_resume_point
from bigscale.config.derived import DataStats, RunShape, derive
from bigscale.config.redact import redact_text
from bigscale.config.schema import LauncherKind, Precision, StrategyConfig, TrainConfig
from bigscale.config.validate import Hardware, precision_warning, resolve_precision, validate
from bigscale.dist.layout import layout_of
from bigscale.errors import ConfigError
from bigscale.launch import auto_strategy
from bigscale.launch.memory import (
    MemoryEstimate,
    ModelShape,
    Workload,
    checkpoint_snapshot_gib,
    estimate,
    finetuned,
    model_shape,
    reference_table_bytes,
)
from bigscale.launch.node import multinode_command
from bigscale.launch.topology import Topology, node_hardware, resolve_topology
from bigscale.model.gguf import model_dir
from bigscale.train.rundir import default_run_dir

_PLAIN_VALUE = re.compile(r"^[\w/.:~+@-]+$")


def override(key: str, value: object) -> str:
    """A Hydra override; the value is quoted only when the grammar needs it (an '=' or a space
    in a path, say), so printed commands stay readable."""
    text = str(value)
    if _PLAIN_VALUE.match(text):
        return f"{key}={text}"
    return f"{key}='{text}'" if "'" not in text else f'{key}="{text}"'


@dataclass
class Plan:
    cfg: TrainConfig
    overrides: list[str]
    run_dir: Path
    topology: Topology
    precision: Precision
    hardware: Hardware
    """The hardware of the nodes that run the ranks (as requested, for a Slurm job)."""
    shape: RunShape
    """Global batch and steps, derived as every rank derives them."""
    strategy_reason: str = ""
    """Why ``strategy=auto`` chose the strategy it did (empty for a named strategy)."""

    @property
    def kind(self) -> LauncherKind:
        return self.topology.kind

    @property
    def nproc(self) -> int:
        """Ranks per node."""
        return self.topology.nproc_per_node

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def global_batch(self) -> int:
        return self.shape.global_batch

    @property
    def rank_overrides(self) -> list[str]:
        """What every rank composes: the user's overrides plus the fixed run directory."""
        kept = [o for o in self.overrides if not o.lstrip("+~").startswith("run_dir=")]
        return [*kept, override("run_dir", self.run_dir)]

    @property
    def in_process(self) -> bool:
        """One local rank runs in this process, unless torchrun must be there to restart it."""
        lc = self.cfg.launcher
        return self.kind is LauncherKind.local and self.nproc == 1 and lc.max_restarts == 0

    def command(self) -> list[str]:
        """What ``bigscale train`` runs on this machine."""
        if self.kind is LauncherKind.multinode:
            return multinode_command(
                self.cfg.launcher, self.nproc, self.run_dir, self.rank_overrides
            )
        if self.kind is LauncherKind.slurm:
            return ["sbatch", "--parsable", str(self.run_dir / "train.sbatch")]
        if self.in_process:
            return [sys.executable, "-m", "bigscale.train", *self.rank_overrides]
        port = self.cfg.launcher.master_port
        rendezvous = (
            ["--standalone"]
            if port == 0
            else ["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        )
        restarts = self.cfg.launcher.max_restarts
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            *(["--max_restarts", str(restarts)] if restarts else []),
            "--nproc_per_node",
            str(self.nproc),
            "-m",
            "bigscale.train",
            *self.rank_overrides,
        ]


def make_plan(cfg: TrainConfig, overrides: list[str], hw: Hardware | None = None) -> Plan:
    """Validate for the world size this launch will have and fix the run directory."""
    hw = node_hardware(cfg, hw or Hardware.detect())
    topology = resolve_topology(cfg, hw)
    reason = ""
    if cfg.strategy.name == auto_strategy.AUTO:
        cfg, overrides, reason = _resolve_auto_strategy(cfg, overrides, topology, hw)
    validate(cfg, topology.world_size, hw)
    if topology.kind is LauncherKind.multinode and not cfg.run_dir:
        raise ConfigError(
            "launcher=multinode needs run_dir=PATH, the same on every node and on a filesystem "
            "they all see: each node would otherwise pick its own timestamped directory and "
            "split the run"
        )
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg.run_dir = str(run_dir.resolve())
    # trainer.epochs needs the data's length: tokenized here as the ranks will (they find it
    # in the tokenization cache), so the steps planned are the steps run.
    data = data_stats(cfg, run_dir.resolve()) if cfg.trainer.epochs is not None else None
    return Plan(
        cfg=cfg,
        overrides=list(overrides),
        run_dir=run_dir.resolve(),
        topology=topology,
        precision=resolve_precision(cfg.trainer.precision, hw),
        hardware=hw,
        shape=derive(cfg, topology.world_size, data),
        strategy_reason=reason,
    )


def data_stats(cfg: TrainConfig, run_dir: Path) -> DataStats | None:
    """The training split's counts, from the same tokenization (and cache) as the ranks'; None
    for a stream, which has no length."""
    if cfg.data.streaming:
        return None
    from bigscale.data.chat import set_chat_template
    from bigscale.data.pipeline import build_datasets
    from bigscale.data.sources import preflight
    from bigscale.dist.env import DistEnv
    from bigscale.model.load import load_tokenizer
    from bigscale.train.assets import prepare_assets
    from bigscale.train.data_feed import cache_dir

    prepare_assets(cfg)  # the default job's data and tiny model, as `bigscale train` writes them
    preflight(cfg.data)  # a bad file fails with the same message as without trainer.epochs
    tokenizer = load_tokenizer(cfg.model)
    set_chat_template(tokenizer, cfg.data)
    bundle = build_datasets(
        cfg.data, tokenizer, DistEnv(), cfg.trainer.seed, cache_dir(cfg, run_dir)
    )
    return replace(
        DataStats.of(bundle.train, bundle.packed), validation_rows=len(bundle.validation)
    )


def with_data_stats(plan: Plan) -> Plan:
    """The plan with the training data measured (``bigscale plan`` sizes activations by it)."""
    if plan.shape.data is not None or plan.cfg.data.streaming:
        return plan
    data = data_stats(plan.cfg, plan.run_dir)
    return replace(plan, shape=derive(plan.cfg, plan.world_size, data))


def _resolve_auto_strategy(
    cfg: TrainConfig, overrides: list[str], topology: Topology, hw: Hardware
) -> tuple[TrainConfig, list[str], str]:
    """Pick the strategy and rewrite the overrides, so the ranks compose a named one."""
    from bigscale.config.compose import compose_config
    from bigscale.model.load import ensure_model_files

    if topology.kind is LauncherKind.slurm:
        raise ConfigError(
            "strategy=auto sizes the run for the GPUs on this machine, but a launcher=slurm job "
            "runs on other nodes; name the strategy (run `bigscale plan strategy=auto` on a "
            "compute node to see which one fits)"
        )
    m = cfg.model
    ensure_model_files(m)  # the tiny model is created on first use; its config is needed now
    try:
        shape = finetuned(model_shape(model_dir(m), m.revision, m.trust_remote_code), cfg.finetune)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"strategy=auto needs the config of model.name_or_path={m.name_or_path!r} to "
            f"estimate memory, and cannot read it ({str(exc).splitlines()[0]}); name a strategy "
            "instead (ddp, zero1, zero2, zero3, zero3_offload)"
        ) from None
    budget, source = auto_strategy.memory_budget_gib(hw, topology.nproc_per_node)
    precision = resolve_precision(cfg.trainer.precision, hw)
    sizes = [cfg.strategy.sequence_parallel_size]
    if auto_strategy.may_split_sequences(cfg):
        sizes = auto_strategy.sequence_parallel_sizes(
            shape, topology.nproc_per_node, cfg.data.max_length, cfg.data.packing
        )
    work = Workload.from_config(cfg)
    choice = auto_strategy.choose_layout(shape, work, precision, topology.world_size, budget, sizes)
    chosen = {"strategy": choice.strategy}
    if choice.sequence_parallel_size != cfg.strategy.sequence_parallel_size:
        # The ranks of a sequence group share a micro batch: more accumulation keeps the
        # global batch the user asked for.
        sp = choice.sequence_parallel_size
        chosen["strategy.sequence_parallel_size"] = str(sp)
        chosen["trainer.grad_accum"] = str(cfg.trainer.grad_accum * sp)
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in chosen]
    overrides = [*kept, *(f"{key}={value}" for key, value in chosen.items())]
    reason = f"chosen by strategy=auto: {choice.estimate.total_gib:.2f} GiB estimated of {source}"
    if choice.whole is not None:
        reason += (
            f"; whole sequences of {work.seq_len} tokens need at least "
            f"{choice.whole.total_gib:.2f} GiB, so each is split across "
            f"{choice.sequence_parallel_size} ranks (strategy.sequence_parallel_size="
            f"{choice.sequence_parallel_size}, trainer.grad_accum={chosen['trainer.grad_accum']} "
            "keeps the global batch)"
        )
    return compose_config(overrides), overrides, reason


def memory_estimate(plan: Plan) -> tuple[MemoryEstimate, Workload] | str:
    c = plan.cfg
    m = c.model
    try:
        shape: ModelShape = model_shape(model_dir(m), m.revision, m.trust_remote_code)
    except (OSError, ValueError) as exc:
        if m.create_if_missing is not None or m.gguf_file is not None:
            return "model is created on first use"
        return f"unknown (model config not readable: {str(exc).splitlines()[0]})"
    work = Workload.from_config(c, plan.shape.data)
    shape = finetuned(shape, c.finetune)
    return estimate(shape, c.strategy, plan.precision, plan.world_size, work), work


def render(plan: Plan, with_memory: bool = True) -> str:
    c = plan.cfg
    t = c.trainer
    device = f"{plan.hardware.cuda_devices} GPU(s)" if plan.hardware.cuda_devices else "CPU"
    if plan.kind is not LauncherKind.local:
        device += " per node"
    lines = [
        f"run directory   {plan.run_dir}",
        f"experiment      {_experiment_summary(plan)}",
        f"model           {_model_summary(c)}",
        f"data            {c.data.path} (style={c.data.style.value}, max_length="
        f"{c.data.max_length}, packing={c.data.packing})",
        f"strategy        {c.strategy.name} (ZeRO stage {c.strategy.zero_stage}, offload "
        f"optimizer={c.strategy.offload_optimizer}, params={c.strategy.offload_params})"
        + (f"; {plan.strategy_reason}" if plan.strategy_reason else ""),
        f"precision       {plan.precision.value} on {device}"
        + (f" (warning: {w})" if (w := precision_warning(plan.precision, plan.hardware)) else ""),
        f"ranks           {plan.topology.describe()}",
        *_layout_lines(plan),
        f"batch           {t.micro_batch_size} micro x {t.grad_accum} accum x "
        f"{plan.global_batch // (t.micro_batch_size * t.grad_accum)} ranks = "
        f"{_batch_unit(c, plan.global_batch)}, at most "
        f"{plan.global_batch * _sides(c) * c.data.max_length:,} tokens/step",
        f"steps           {plan.shape.steps_text()}",
        f"schedule        lr {c.optim.lr:g}, {c.optim.schedule.value}, warmup "
        f"{plan.shape.warmup_steps} of {plan.shape.max_steps} steps"
        + (f" (optim.warmup_ratio={c.optim.warmup_ratio:g})" if c.optim.warmup_ratio else ""),
        f"speed           {_speed_summary(c)}",
        f"W&B             {c.logger.mode.value} (project {c.logger.project})",
    ]
    lines += objective_lines(plan)
    if plan.kind is LauncherKind.slurm:
        lines.append(f"slurm           {_slurm_summary(plan)}")
    lines += _resume_lines(plan)
    if with_memory:
        mem = memory_estimate(plan)
        if isinstance(mem, tuple):
            est, work = mem
            lines.append(f"parameters      {est.params:,} ({est.trainable:,} trainable)")
            lines.append(
                f"memory/GPU      {est.total_gib:.2f} GiB estimated for {est.params / 1e6:.1f}M "
                f"params: weights {est.weights_gib:.2f}, grads {est.grads_gib:.2f}, optimizer "
                f"{est.optimizer_gib:.2f}, activations {est.activations_gib:.2f} "
                f"({work.micro_batch} x {work.seq_len} tokens: {work.seq_from}"
                + _split_note(c.strategy)
                + ")"
                + _reference_note(c, est, work)
            )
            lines.append(_checkpoint_line(plan, est))
        else:
            lines.append(f"memory/GPU      {mem}")
    lines.append(f"command         {redact_text(shlex.join(plan.command()))}")
    return "\n".join(lines)


def _checkpoint_line(plan: Plan, est: MemoryEstimate) -> str:
    c = plan.cfg
    if not c.checkpoint.async_:
        return "checkpoint      synchronous (checkpoint.async=false): training waits for each save"
    gib = checkpoint_snapshot_gib(est, c.strategy, plan.precision, plan.world_size)
    return (
        f"checkpoint      asynchronous: {gib:.2f} GiB of host memory per rank (at most) for the "
        "snapshot written in the background (checkpoint.async=false to save synchronously)"
    )


def _sides(c: TrainConfig) -> int:
    """Sequences per batch row: a preference pair is a chosen and a rejected one."""
    return 2 if c.data.style.value == "preference" else 1


def _batch_unit(c: TrainConfig, global_batch: int) -> str:
    if _sides(c) == 1:
        return f"{global_batch} sequences/step"
    return f"{global_batch} pairs/step ({global_batch * 2} sequences)"


def _reference_note(c: TrainConfig, est: MemoryEstimate, work: Workload) -> str:
    """The reference pass's forward beside the training's activations; the larger of the two is
    what the total counts."""
    if not work.reference_batch:
        return ""
    peak = "sets the peak" if est.reference_gib > est.activations_gib else "stays below it"
    return (
        f"; the reference pass before step 1 {peak}: {est.reference_gib:.2f} GiB for its "
        f"{work.reference_batch} x {work.seq_len} tokens, no backward "
        f"({_reference_batch(c)} a forward)"
    )


def objective_lines(plan: Plan) -> list[str]:
    """The objective and, for DPO/IPO, the reference pass that runs before the first step:
    what it scores, its compute beside the training's and its table's size on disk (its memory
    is in the memory/GPU line)."""
    from bigscale.data.preference import REFERENCE_OBJECTIVES

    c, data = plan.cfg, plan.shape.data
    o = c.objective
    if o.name.value == "sft":
        return []
    detail = "Bradley-Terry, one-score head" if o.name.value == "reward" else f"beta {o.beta:g}"
    lines = [f"objective       {o.name.value} ({detail})"]
    if o.name not in REFERENCE_OBJECTIVES:
        return lines
    cost = ""
    if data is None or data.validation_rows is None:
        pairs = "the training and validation pairs"
    else:
        scored = data.rows + data.validation_rows
        pairs = f"the {data.rows:,} training and {data.validation_rows:,} validation pairs"
        # A training step runs forward and backward (about 2 forwards), plus one more forward
        # with activation checkpointing; the pass runs one forward per pair, on every rank.
        per_pair = 4 if c.model.gradient_checkpointing else 3
        trained = plan.shape.max_steps * plan.global_batch
        table = reference_table_bytes(data.rows) + reference_table_bytes(data.validation_rows)
        share = scored / (per_pair * trained)
        amount = f"{share:.1f}x" if share >= 1 else f"{100 * share:.1f}% of"
        cost = (
            f"; about {amount} the training's compute ({scored:,} pairs forwarded once against "
            f"{trained:,} trained, a forward about 1/{per_pair} of a training step); "
            f"{_size(table)} on disk"
        )
    lines.append(
        f"reference       one forward (no backward) over {pairs} before step 1, "
        f"{_reference_batch(c)} at a time{cost}; cached beside the tokenized data, "
        "reused by reruns and resumes; no second model in memory"
    )
    return lines


def _reference_batch(c: TrainConfig) -> str:
    """``4 pairs of trainer.micro_batch_size``: the pass's batch and the key that sets it."""
    from bigscale.data.preference import reference_pairs

    key = (
        "trainer.micro_batch_size"
        if c.objective.reference_batch_size is None
        else ("objective.reference_batch_size")
    )
    return f"{reference_pairs(c)} pairs ({key})"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _split_note(s: StrategyConfig) -> str:
    notes = []
    if s.sequence_parallel_size > 1:
        notes.append(f"activations / {s.sequence_parallel_size} sequence ranks")
    if s.tensor_parallel_size > 1:
        notes.append(f"weights, grads, optimizer / {s.tensor_parallel_size} tensor ranks")
    return "".join(f"; {n}" for n in notes)


def _layout_lines(plan: Plan) -> list[str]:
    layout = layout_of(plan.cfg.strategy, plan.world_size)
    if layout.replica == 1:
        return []
    axis = "sequence" if layout.sp > 1 else "tensor"
    return [
        f"layout          {layout.describe()}: each micro batch is computed by {layout.replica} "
        f"consecutive ranks ({axis} axis, inside a node when launcher.nproc_per_node is a "
        f"multiple of {layout.replica}); the data is shared out over the {layout.dp} "
        "data-parallel ranks"
    ]


def _resume_lines(plan: Plan) -> list[str]:
    c = plan.cfg
    # resume=never refuses here a run directory that holds checkpoints, as the ranks would.
    choice = select_resume_point(plan.run_dir / "checkpoints", c.resume, c.checkpoint.verify)
    point, damaged = choice.point, [f"{p.tag} is damaged: {p.message}" for p in choice.skipped]
    if point is not None:
        where = point.name if c.resume == "auto" else str(point)
        lines = [f"resume          from {where} (resume={c.resume})"]
    elif damaged:
        lines = ["resume          none: no checkpoint verifies, training starts at step 0"]
    else:
        return []
    return lines + [f"                skipped: newer {text}" for text in damaged]


def _experiment_summary(plan: Plan) -> str:
    from bigscale.config.compose import DEFAULT_EXPERIMENT, demo_left_out

    named = demo_left_out(plan.overrides)
    if named is None:
        return plan.cfg.experiment
    return (
        f"none: your run ({named}), so the {DEFAULT_EXPERIMENT} experiment's model, data, "
        "tuning and test set are left out (experiment=demo to keep them)"
    )


def _model_summary(c: TrainConfig) -> str:
    m = c.model
    if m.gguf_file is None:
        return m.name_or_path
    return f"{m.name_or_path} gguf_file={m.gguf_file} (loaded from {model_dir(m)})"


def _speed_summary(c: TrainConfig) -> str:
    m = c.model
    checkpointing = "off"
    if m.gradient_checkpointing:
        checkpointing = "every layer" if m.checkpoint_every == 1 else f"every {m.checkpoint_every}"
    loss = f"chunked, {m.loss_chunk_tokens} tokens" if m.loss_chunk_tokens else "full logits"
    return (
        f"attention {m.attn_implementation.value}, loss {loss}, activation checkpointing "
        f"{checkpointing}, compile {'on' if m.compile else 'off'}"
    )


def _slurm_summary(plan: Plan) -> str:
    lc = plan.cfg.launcher
    parts = [f"{lc.nodes} node(s)"]
    parts += [f"{key} {getattr(lc, key)}" for key in ("partition", "account", "qos", "time")]
    parts = [p for p in parts if not p.endswith(" None")]
    if lc.signal_seconds > 0:
        parts.append(f"USR1 {lc.signal_seconds} s before the time limit")
    parts.append(f"requeues itself up to {lc.max_requeues} time(s)")
    return ", ".join(parts)
