"""The Trainer: ``__init__`` builds every part, ``fit`` reads like the steps of training."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from bigscale.checkpoint.compat import changes, data_contents, fingerprint
from bigscale.checkpoint.export import HF_SUBDIR, export_checkpoint, save_generation_config
from bigscale.checkpoint.manager import META, CheckpointManager
from bigscale.checkpoint.precheck import Precheck, checkpoint_root
from bigscale.config.compose import to_plain_dict
from bigscale.config.derived import derive
from bigscale.config.schema import FinetuneMethod, ObjectiveName, TrainConfig
from bigscale.config.validate import Hardware, precision_warning, resolve_precision
from bigscale.data.chat import set_chat_template
from bigscale.dist import engine as ds
from bigscale.dist.env import DistEnv
from bigscale.dist.layout import layout_of
from bigscale.dist.watchdog import PROGRESS, StallWatchdog
from bigscale.errors import CheckpointError, DataError
from bigscale.logging import get_logger
from bigscale.metrics.sinks import MetricsLogger, ProgressBar
from bigscale.metrics.throughput import Window, mfu_formula, sync
from bigscale.model.attention import separates_packed_documents
from bigscale.model.load import load_model, load_tokenizer
from bigscale.train import task_eval
from bigscale.train.data_feed import DataFeed
from bigscale.train.early_stop import EarlyStopper, generation_enabled
from bigscale.train.faults import Faults
from bigscale.train.guard import StepGuard
from bigscale.train.harness_eval import HarnessEval
from bigscale.train.metric_fn import load_metric_fn
from bigscale.train.objectives import TRAIN, VALIDATION
from bigscale.train.preemption import StopSignals, requeue_slurm_job, signal_name
from bigscale.train.samples import answer_samples
from bigscale.train.state import TrainState
from bigscale.versions import package_versions

log = get_logger(__name__)


@dataclass
class StepStats:
    loss: float  # averaged over micro batches and ranks
    skipped: bool  # non-finite: the optimizer left the weights alone
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (rewards/...)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, env: DistEnv, run_dir: Path, precheck: Precheck | None = None
    ):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.layout = layout_of(cfg.strategy, env.world_size)
        hardware = Hardware.detect()
        self.precision = resolve_precision(cfg.trainer.precision, hardware)
        if warning := precision_warning(self.precision, hardware):
            log.warning("trainer.precision=bf16: %s", warning)
        torch.manual_seed(cfg.trainer.seed)

        self.tokenizer = load_tokenizer(cfg.model)
        set_chat_template(self.tokenizer, cfg.data)  # before tokenizing: cache keys hash it
        # Data before the model: a broken dataset should fail before minutes of model loading.
        self.data = DataFeed(cfg, env, self.tokenizer, run_dir)
        # Derived as the launcher's plan derived it; before the engine: the lr schedule needs it.
        self.shape = derive(cfg, env.world_size, self.data.stats)
        self._check_ranks_agree_on_steps()
        log.info("steps %s", self.shape.steps_text())
        # What the checkpoints record of the data, so a resume on new contents is refused.
        self.data_contents = data_contents(cfg.data, self.data.data.data_ids)

        ds_config = ds.build_ds_config(cfg, env.world_size, self.precision)
        with ds.partitioned_model_init(ds_config):
            reward = ObjectiveName(cfg.objective.name) is ObjectiveName.reward
            model = load_model(cfg.model, self.precision, self.tokenizer, reward=reward)
        if cfg.data.packing and not separates_packed_documents(model):
            log.warning(
                "data.packing=true: %s does not build its attention mask with transformers' "
                "mask utilities, so packed documents may attend to each other; use "
                "model.attn_implementation=flash_attention_2 or data.packing=false",
                type(model).__name__,
            )
        if cfg.finetune.method == FinetuneMethod.lora:
            from bigscale.model.lora import apply_lora  # peft: imported by LoRA runs only

            model = apply_lora(
                model, cfg.finetune, cfg.trainer.seed, cfg.model.gradient_checkpointing
            )
        self.engine = ds.Engine(model, cfg, ds_config, self.shape.max_steps)
        total, local = self.engine.parameter_counts()
        log.info("model: %s parameters, %s stored on rank 0", f"{total:,}", f"{local:,}")
        self.mfu, mfu_note = mfu_formula(self.engine.module.config, total, cfg.trainer.peak_tflops)
        log.info("%s", mfu_note)
        self.window = Window()
        # Dropout masks differ per rank; data order comes from the sampler's own seed.
        torch.manual_seed(cfg.trainer.seed + env.rank)

        self.state = TrainState()
        self.guard = StepGuard(cfg.trainer.max_bad_steps, cfg.trainer.loss_spike, self.state)
        self.faults = Faults(env.rank)
        self.stop_signals = StopSignals()
        self.stop_requested = False
        self.checkpoints = CheckpointManager(
            checkpoint_root(run_dir), cfg.checkpoint, env, precheck=precheck
        )
        self.early_stop = EarlyStopper(cfg.eval.early_stopping)
        # Before resuming: a reference pass must see the initial weights.
        from bigscale.train.reference import build_objective

        self.objective = build_objective(cfg, self.engine, self.data, env, run_dir, self.precision)
        self.resume()
        if env.is_main:  # what DeepSpeed is given, user JSON merged in: to compare with the plan
            (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
        self.metrics = MetricsLogger(
            run_dir, cfg.logger, to_plain_dict(cfg), env.is_main, resumed_at=self.state.step
        )
        self.task_examples = self._task_examples()
        self.metric_fn = load_metric_fn(cfg.eval.metric_fn)
        self.harness = HarnessEval(cfg, run_dir, env.is_main)

    @property
    def step(self) -> int:
        return self.state.step

    def resume(self) -> None:
        """Continue from the checkpoint ``resume`` selects, refusing one whose model, data or
        batch settings differ unless that is declared intended."""
        point = self.checkpoints.resume_point(self.cfg.resume)
        if point is None:
            return
        saved = json.loads((point / META).read_text()).get("fingerprint", {})
        changed = changes(saved, self._fingerprint())
        if changed and not self.cfg.checkpoint.allow_config_change:
            raise CheckpointError(
                f"refusing to resume from {point}: the run's settings changed ("
                + "; ".join(changed)
                + "). Use a new run_dir, or set checkpoint.allow_config_change=true if intended."
            )
        meta = self.checkpoints.load(point, self.engine, self.state)
        if self.data.stream is not None:
            self.data.stream.check_world_size(meta["world_size"])
        self.early_stop.resume(meta.get("early_stopping"))
        log.info("resumed from %s at step %d (epoch %d)", point, self.step, self.state.epoch)
        for change in self.engine.apply_optim_settings(self.cfg.optim):
            log.info("optimizer setting from the config, not the checkpoint: %s", change)
        if meta["world_size"] != self.env.world_size:
            log.info(
                "the checkpoint was written by %d ranks, this run has %d: the data continues "
                "after sample %d of epoch %d",
                meta["world_size"],
                self.env.world_size,
                self.state.samples_in_epoch,
                self.state.epoch,
            )

    def fit(self) -> dict[str, float]:
        # Armed from here to the final save: loading and tokenizing, which may take long, are done.
        watchdog = StallWatchdog(
            self.run_dir, self.env.rank, self.env.world_size, self.cfg.dist.timeout_minutes
        )
        watchdog.start()
        try:
            return self._fit(watchdog)
        finally:
            watchdog.stop()

    def _fit(self, watchdog: StallWatchdog) -> dict[str, float]:
        summary: dict[str, float] = {}
        if self.step == 0:
            self._report_samples("before")
        if self.task_examples and self.step == 0:
            summary.update(self._report_task_metric("before"))
        self.train_loop()
        if self.stop_requested:
            return self.stop_early()
        summary.update(self._report_final_eval())
        if self.task_examples:
            summary.update(self._report_task_metric("after"))
        self._report_samples("after")
        if self.early_stop.stopped_at is not None:
            summary["early_stopped_at_step"] = float(self.early_stop.stopped_at)
        self.save_checkpoint(force=True)
        watchdog.stop()  # only rank 0 exports, with no collective to wait in
        if self.cfg.export.at_end:
            self.export(self.run_dir / "export")
        self.metrics.log({"step": self.step, **{f"final/{k}": v for k, v in summary.items()}})
        self.metrics.close()
        self._write_report()
        return summary

    def train_loop(self) -> None:
        """Steps until ``max_steps``, logging, evaluating and checkpointing on their cadence."""
        t, max_steps = self.cfg.trainer, self.shape.max_steps
        bar = ProgressBar(max_steps, self.step, self._show_progress())
        batches = self.data.batches(self.state)
        self.window = Window()  # not counting the evaluation before training
        while self.step < max_steps and self.early_stop.stopped_at is None:
            stats = self.train_step(batches)
            row = None
            if self.step % t.log_every == 0 or self.step == max_steps:
                row = self._train_row(stats)
                self.metrics.log(row)
                self.window = Window()
            bar.update(self.step, row)
            if self.stop_requested:
                break
            if self._eval_due() and self._periodic_eval():
                break  # early stopping: the run then ends as usual (final eval, save, export)
            self.save_checkpoint(force=False)
        bar.close()

    def stop_early(self) -> dict[str, float]:
        """A stop signal arrived: checkpoint this step on all ranks, then (rank 0, under Slurm)
        requeue the job so it resumes from here. No final evaluation or export: the run is not
        done."""
        self.save_checkpoint(force=True)
        self.metrics.close()  # before a requeue, which ends this job's processes
        self._write_report()
        if self.env.is_main:
            log.info(
                "stopped at step %d on %s: checkpoint saved; %s",
                self.step,
                signal_name(self.stop_signals.received),
                requeue_slurm_job(self.cfg.launcher.max_requeues),
            )
        return {"stopped_at_step": float(self.step)}

    def _write_report(self) -> None:
        """RUN_DIR/report.html from metrics.jsonl (rank 0; a plotting failure only warns)."""
        if self.env.is_main:
            from bigscale.report.page import write_run_report

            write_run_report(self.run_dir)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepStats:
        """One optimizer step: ``grad_accum`` micro batches, then clip + step (inside DeepSpeed)."""
        self.engine.train()
        accum, w = self.cfg.trainer.grad_accum, self.window
        loss_sum, tokens, all_tokens = 0.0, 0, 0
        sums = torch.zeros(self.objective.width, dtype=torch.float64)
        for _ in range(accum):
            PROGRESS.mark("training", self.step + 1)  # the step being trained
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            out = self.objective.loss(self.engine, batch, TRAIN)
            sums += out.sums
            loss = self.faults.loss(out.loss, self.step + 1)
            self.engine.backward(loss)
            loss_sum += float(loss.detach())  # waits for the device: forward and backward done
            t2 = time.perf_counter()
            if self.engine.step():  # the last micro batch: clip, optimizer, lr schedule
                # Waits once per step, not per micro batch: ZeRO's gradient reduction on its own
                # stream may overlap the next micro batch's forward.
                sync()
            w.data_s += t1 - t0
            w.compute_s += t2 - t1
            w.optimizer_s += time.perf_counter() - t2
            w.add_micro_batch(int(batch["input_ids"].shape[1]))
            if self.layout.counts_data(self.env.rank):  # once per replica, not per slice
                tokens += int(batch["num_tokens"])
                all_tokens += int(batch["input_ids"].numel()) * self.layout.sp
        self.state.step += 1
        PROGRESS.mark("training", self.step)
        # Every rank judges the step on the same numbers (a NaN on one rank is a NaN for all) and
        # learns of a stop signal any rank received, so all stop after the same step.
        total = self._all_reduce_sum(
            torch.cat(
                [
                    torch.tensor(
                        [loss_sum / accum, tokens, float(self.stop_signals.received), all_tokens],
                        dtype=torch.float64,
                    ),
                    sums,
                ]
            )
        )
        mean_loss, step_tokens = float(total[0]) / self.layout.loss_divisor, int(total[1])
        self.stop_requested = bool(total[2] > 0)
        self.state.tokens_seen += step_tokens
        w.end_step(step_tokens, int(total[3]))
        verdict = self.guard.judge(
            self.step, mean_loss, self.engine.grad_norm, self.engine.step_applied
        )
        return StepStats(mean_loss, verdict.skipped, self.objective.metrics(total[4:]))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over the same number of batches on every rank (a forward is a
        collective under ZeRO-3, so ranks must agree on how many)."""
        self.engine.train(False)
        limit = min(self.cfg.trainer.eval_batches, len(self.data.validation))
        total = torch.zeros(2 + self.objective.width, dtype=torch.float64)
        for i, batch in enumerate(self.data.validation):
            if i >= limit:
                break
            PROGRESS.mark("evaluation")
            out = self.objective.loss(self.engine, batch, VALIDATION)
            total[:2] += torch.tensor([float(out.loss), 1.0], dtype=torch.float64)
            total[2:] += out.sums
        self.engine.train(True)
        total = self._all_reduce_sum(total)
        loss = float(total[0] / total[1]) if total[1] else float("nan")
        row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        return {**row, **self.objective.metrics(total[2:], prefix="eval_")}

    def _periodic_eval(self) -> bool:
        """Validation loss (and, with ``eval.during_training``, the generation metrics), logged;
        True when early stopping ends training here."""
        row = self.evaluate()
        if self.cfg.eval.during_training and self.task_examples:
            row.update(self.evaluate_task())
        if self.harness.enabled:
            PROGRESS.mark("harness eval")
            row.update(self.harness.run(self.engine.module, self.tokenizer, self.step))
        self.metrics.log({"step": self.step, **row})
        if not self.early_stop.update(self.step, row):
            return False
        log.info("%s", self.early_stop.reason)
        return True

    def evaluate_task(self) -> dict[str, float]:
        PROGRESS.mark("generation eval")
        generations = task_eval.generate(
            self.engine.module,
            self.tokenizer,
            self.task_examples,
            self.cfg.eval,
            self.env,
            synced=self.engine.zero_stage == 3 and self.env.world_size > 1,
            layout=self.layout,
        )
        values = task_eval.score(
            generations.answers, self.task_examples, self.cfg.eval, self.env, self.metric_fn
        )
        values[task_eval.BUDGET_HITS] = generations.budget_hits
        return values

    def _report_samples(self, when: str) -> None:
        synced = self.engine.zero_stage == 3 and self.env.world_size > 1
        answer_samples(self.engine.module, self.tokenizer, self.cfg.eval, self.env, synced, when)

    def _report_task_metric(self, when: str) -> dict[str, float]:
        values = self.evaluate_task()
        log.info(
            "held-out exact match %s training: %.1f%% (%d of %d answers hit the token budget)",
            when,
            100 * values["exact_match"],
            values[task_eval.BUDGET_HITS],
            len(self.task_examples),
        )
        if len(values) > 2:
            log.info("eval.metric_fn %s training: %s", when, values)
        return {f"{k}_{when}": v for k, v in values.items()}

    def _report_final_eval(self) -> dict[str, float]:
        final = self.evaluate()
        self.metrics.log({"step": self.step, **final})
        log.info(
            "step %d: eval_loss %.4f, perplexity %.2f",
            self.step,
            final["eval_loss"],
            final["eval_ppl"],
        )
        return final

    def export(self, out_dir: Path) -> None:
        """Rank 0 checks the final checkpoint against its manifest and streams it into a Hugging
        Face directory, as ``bigscale export`` does; the other ranks are done (no collective
        follows), so none waits on a long export with a collective timeout running."""
        if self.env.is_main:
            e = self.cfg.export
            found = export_checkpoint(
                self.checkpoints.root,
                out_dir,
                e.max_shard_size,
                e.merge_lora,
                sha256=self.cfg.checkpoint.verify,
            )
            for note in found.notes:
                log.warning("export: %s", note)

    def save_checkpoint(self, force: bool) -> None:
        """The manager decides whether a checkpoint is due; beside DeepSpeed's shards it keeps
        the Hugging Face config and tokenizer, so ``bigscale export`` needs nothing else."""
        PROGRESS.mark("checkpoint save")
        self.checkpoints.save(
            self.step, self.engine, self.state, self._meta, self._write_hf_files, force=force
        )
        PROGRESS.mark("training")

    def _meta(self) -> dict[str, object]:
        return {
            "step": self.step,
            "fingerprint": self._fingerprint(),
            "versions": package_versions(),
            "early_stopping": self.early_stop.state_dict(),
        }

    def _fingerprint(self) -> dict[str, object]:
        return fingerprint(self.cfg, self.env.world_size, self.data_contents)

    def _write_hf_files(self, directory: Path) -> None:
        self.engine.module.config.save_pretrained(directory / HF_SUBDIR)
        save_generation_config(self.engine.module, directory / HF_SUBDIR)
        self.tokenizer.save_pretrained(directory / HF_SUBDIR)
        if self.cfg.finetune.method == FinetuneMethod.lora:
            from bigscale.model.lora import save_adapter_config

            save_adapter_config(self.engine.module, directory / HF_SUBDIR)

    def _train_row(self, stats: StepStats) -> dict[str, float]:
        row: dict[str, float] = {
            "step": self.step,
            "loss": stats.loss,
            "lr": self.engine.lr,
            **self.window.row(self.env.world_size, self.mfu),
            "epoch": self.state.epoch,
            "skipped_steps": self.state.skipped_steps,
            "loss_spikes": self.state.loss_spikes,
            **stats.metrics,
        }
        if self.engine.grad_norm is not None:
            row["grad_norm"] = self.engine.grad_norm
        return row

    def _eval_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        return every > 0 and self.step % every == 0 and self.step < self.shape.max_steps

    def _check_ranks_agree_on_steps(self) -> None:
        """Ranks that derived different step counts would stop at different steps and leave the
        others waiting in a collective: every rank fails instead (same answer on all)."""
        if not (dist.is_initialized() and self.env.world_size > 1):
            return
        steps = self.shape.max_steps
        # NCCL reduces only device tensors; the engine that knows the device comes later.
        device = f"cuda:{self.env.local_rank}" if torch.cuda.is_available() else "cpu"
        bounds = torch.tensor([steps, -steps], dtype=torch.float64, device=device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        if int(bounds[0]) != -int(bounds[1]):
            raise DataError(
                f"the ranks derived from {-int(bounds[1])} to {int(bounds[0])} optimizer steps "
                f"from trainer.epochs: their tokenized training data differs. Is "
                f"data.cache_dir on a filesystem every node mounts (or data.cache_scope=node)?"
            )

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _show_progress(self) -> bool:
        return self.cfg.trainer.progress_bar and self.env.is_main

    def _task_examples(self) -> list[task_eval.Example]:
        if not generation_enabled(self.cfg):
            return []
        examples = task_eval.read_examples(self.cfg.data, self.cfg.eval.max_examples)
        if self.env.is_main:
            log.info("%s", task_eval.describe_budget(self.tokenizer, examples, self.cfg))
        return examples
