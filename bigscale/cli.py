"""``bigscale train | plan | export | eval | chat | generate | report``: the one command for a
run and what comes after it."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from bigscale.errors import BigscaleError

if TYPE_CHECKING:
    from bigscale.launch.plan import Plan

USAGE = """bigscale train [-m] [overrides...]   compose, validate, print the plan, run
bigscale plan [overrides...]         the same plan, without training
bigscale export RUN_DIR|CHECKPOINT --out DIR [--merge-lora]
                                     a Hugging Face model directory (safetensors), or
                                     a LoRA run's adapter (merged into the base with
                                     --merge-lora)
bigscale eval TARGET --tasks T1,T2 [--include-path DIR]
                                     lm-evaluation-harness tasks (by name, or local YAML)
bigscale chat TARGET                 talk to the model in the terminal
bigscale generate TARGET --prompts FILE --out FILE
                                     answers for a jsonl of prompts or conversations
bigscale report RUN_DIR [RUN_DIR ...] [--out DIR]
                                     PNGs and one HTML page of the runs' curves
TARGET: a run directory, a checkpoint directory or an export

Overrides are Hydra's: model=qwen2_5_0_5b strategy=zero3 trainer.max_steps=500
-m/--multirun sweeps comma lists: bigscale train -m optim.lr=1e-4,3e-4"""

# Commands after training, each in its own module of bigscale.commands (with a ``main(args)``).
COMMANDS = {"eval": "evaluate", "chat": "chat", "generate": "generate", "report": "report"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    from bigscale.quiet import quiet_third_party

    quiet_third_party()
    try:
        if command == "train":
            return _train(rest)
        if command == "plan":
            return _plan(rest)
        if command == "export":
            return _export(rest)
        if command in COMMANDS:
            from importlib import import_module

            return import_module(f"bigscale.commands.{COMMANDS[command]}").main(rest)
    except BigscaleError as exc:
        from bigscale.config.redact import redact_text

        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _train(args: list[str]) -> int:
    from bigscale.launch import preflight
    from bigscale.launch.local import own_run_dir
    from bigscale.launch.sweep import plan_jobs

    multirun, overrides = _split_multirun(args)
    plans = plan_jobs(overrides, multirun)
    for plan in plans:
        _warn(preflight.check(plan, submitting=True))
    with ExitStack() as leases:
        for plan in plans:  # before anything is written: a run dir in use is refused untouched
            leases.enter_context(own_run_dir(plan))
        return _prepare_and_launch(plans, multirun)


def _prepare_and_launch(plans: list[Plan], multirun: bool) -> int:
    from bigscale.config.redact import redact_text
    from bigscale.config.schema import LauncherKind
    from bigscale.launch import slurm
    from bigscale.launch.local import launch, prepare
    from bigscale.launch.plan import render

    for plan in plans:
        prepare(plan)
    for i, plan in enumerate(plans):
        header = f"job {i + 1}/{len(plans)}\n" if multirun else ""
        print(header + redact_text(render(plan, with_memory=False)), flush=True)
        if plan.kind is LauncherKind.slurm:
            slurm.submit(plan)  # queued, not waited for; an error raises
            continue
        code = launch(plan, isolated=len(plans) > 1)
        if code == BigscaleError.exit_code:
            return code  # a user error: the rank has printed its one "error: ..." line
        if code != 0:
            print(
                f"error: run failed with exit code {code}; see {plan.run_dir}/train.log",
                file=sys.stderr,
            )
            return code
    return 0


def _plan(args: list[str]) -> int:
    from bigscale.config.redact import redact_text
    from bigscale.config.schema import LauncherKind
    from bigscale.launch import preflight, slurm
    from bigscale.launch.plan import render, with_data_stats
    from bigscale.launch.sweep import plan_jobs

    multirun, overrides = _split_multirun(args)
    for plan in plan_jobs(overrides, multirun):
        _warn(preflight.check(plan, submitting=False))
        preflight.check_data(plan.cfg)
        print(redact_text(render(with_data_stats(plan))))
        if plan.kind is LauncherKind.slurm:
            print(f"\n# {slurm.script_path(plan)}, as `bigscale train` writes and submits it:")
            print(slurm.render_script(plan), end="")
    return 0


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _split_multirun(args: list[str]) -> tuple[bool, list[str]]:
    """(whether ``-m``/``--multirun`` leads the arguments, the Hydra overrides)."""
    multirun = bool(args) and args[0] in ("-m", "--multirun")
    return multirun, args[1:] if multirun else args


def _export(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigscale export")
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)"
    )
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA checkpoint: the base model with the adapter merged in, not the adapter alone",
    )
    parser.add_argument(
        "--skip-checksums",
        action="store_true",
        help="check the checkpoint's file sizes against its manifest, not their sha256 (faster "
        "for a large model; a changed byte then goes unnoticed)",
    )
    ns = parser.parse_args(args)
    from bigscale.checkpoint.export import export_checkpoint

    # Refusals (a damaged checkpoint, none to export) are CheckpointErrors: main prints them.
    found = export_checkpoint(
        ns.source, ns.out, ns.max_shard_size, ns.merge_lora, sha256=not ns.skip_checksums
    )
    for note in found.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"exported {found.directory} to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
