"""The plan of a run: everything ``bigscale train`` will do, computed without training.

``bigscale plan`` prints it; ``bigscale train`` prints it and then carries it out, so what a
user reviews is exactly what runs."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bigscale.config.redact import redact_text
from bigscale.config.schema import Precision, TrainConfig
from bigscale.config.validate import Hardware, resolve_nproc, resolve_precision, validate
from bigscale.launch.memory import MemoryEstimate, count_parameters, estimate
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
    nproc: int
    precision: Precision
    hardware: Hardware

    @property
    def world_size(self) -> int:
        return self.nproc

    @property
    def global_batch(self) -> int:
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum * self.world_size

    @property
    def rank_overrides(self) -> list[str]:
        """What every rank composes: the user's overrides plus the fixed run directory."""
        kept = [o for o in self.overrides if not o.lstrip("+~").startswith("run_dir=")]
        return [*kept, override("run_dir", self.run_dir)]

    @property
    def in_process(self) -> bool:
        return self.nproc == 1

    def command(self) -> list[str]:
        if self.in_process:
            return [sys.executable, "-m", "bigscale.train", *self.rank_overrides]
        port = self.cfg.launcher.master_port
        rendezvous = (
            ["--standalone"]
            if port == 0
            else ["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        )
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            "--nproc_per_node",
            str(self.nproc),
            "-m",
            "bigscale.train",
            *self.rank_overrides,
        ]


def make_plan(cfg: TrainConfig, overrides: list[str], hw: Hardware | None = None) -> Plan:
    """Validate for the world size this launch will have and fix the run directory."""
    hw = hw or Hardware.detect()
    nproc = resolve_nproc(cfg.launcher.nproc_per_node, hw)
    validate(cfg, nproc, hw)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg.run_dir = str(run_dir.resolve())
    return Plan(
        cfg=cfg,
        overrides=list(overrides),
        run_dir=run_dir.resolve(),
        nproc=nproc,
        precision=resolve_precision(cfg.trainer.precision, hw),
        hardware=hw,
    )


def memory_estimate(plan: Plan) -> MemoryEstimate | str:
    m = plan.cfg.model
    try:
        params = count_parameters(m.name_or_path, m.revision, m.trust_remote_code)
    except (OSError, ValueError) as exc:
        if m.create_if_missing is not None:
            return "model is created on first use"
        return f"unknown (model config not readable: {str(exc).splitlines()[0]})"
    return estimate(params, plan.cfg.strategy, plan.precision, plan.world_size)


def render(plan: Plan, with_memory: bool = True) -> str:
    c = plan.cfg
    t = c.trainer
    device = f"{plan.hardware.cuda_devices} GPU(s)" if plan.hardware.cuda_devices else "CPU"
    lines = [
        f"run directory   {plan.run_dir}",
        f"model           {c.model.name_or_path}",
        f"data            {c.data.path} (style={c.data.style.value}, max_length="
        f"{c.data.max_length}, packing={c.data.packing})",
        f"strategy        {c.strategy.name} (ZeRO stage {c.strategy.zero_stage}, offload "
        f"optimizer={c.strategy.offload_optimizer}, params={c.strategy.offload_params})",
        f"precision       {plan.precision.value} on {device}",
        f"ranks           {plan.world_size} ({'in-process' if plan.in_process else 'torchrun'})",
        f"batch           {t.micro_batch_size} micro x {t.grad_accum} accum x "
        f"{plan.world_size} ranks = {plan.global_batch} sequences/step, at most "
        f"{plan.global_batch * c.data.max_length:,} tokens/step",
        f"steps           {t.max_steps} (lr {c.optim.lr:g}, {c.optim.schedule.value}, "
        f"warmup {c.optim.warmup_steps})",
        f"W&B             {c.logger.mode.value} (project {c.logger.project})",
    ]
    latest = plan.run_dir / "checkpoints" / "latest"
    if c.resume == "auto" and latest.is_file():
        lines.append(f"resume          from {latest.read_text().strip()} (resume=auto)")
    elif c.resume not in ("auto", "never"):
        lines.append(f"resume          from {c.resume}")
    if with_memory:
        mem = memory_estimate(plan)
        if isinstance(mem, MemoryEstimate):
            lines.append(
                f"memory/GPU      {mem.total_gib:.2f} GiB model states for {mem.params / 1e6:.1f}M "
                f"params (weights {mem.weights_gib:.2f}, grads {mem.grads_gib:.2f}, optimizer "
                f"{mem.optimizer_gib:.2f}); activations not included"
            )
        else:
            lines.append(f"memory/GPU      {mem}")
    lines.append(f"command         {redact_text(shlex.join(plan.command()))}")
    return "\n".join(lines)
