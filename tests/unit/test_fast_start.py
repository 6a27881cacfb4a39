"""A faster start (issue #17): a resume's checksums are checked while the rank starts up, with
the same answers and errors as checking them in place, and a rank imports only what it uses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigscale.checkpoint.manager import CheckpointManager
from bigscale.checkpoint.precheck import start_precheck
from bigscale.config.compose import compose_config
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def _checkpoint(root: Path, tag: str, contents: bytes = b"weights") -> Path:
    """A checkpoint directory whose manifest records ``b"weights"``: other ``contents`` of the
    same size are a damage only the checksum finds."""
    directory = root / tag
    directory.mkdir(parents=True)
    (directory / "state.pt").write_bytes(contents)
    files = {"state.pt": {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}
    (directory / "manifest.json").write_text(json.dumps({"tag": tag, "files": files}))
    return directory


def _manager(root: Path, precheck: bool, resume: str = "auto") -> CheckpointManager:
    cfg = compose_config([]).checkpoint
    assert cfg.verify  # checksums are on by default: what the precheck overlaps
    early = start_precheck(root, resume, cfg.verify, (0, 1)) if precheck else None
    return CheckpointManager(root, cfg, DistEnv(), precheck=early)


@pytest.mark.parametrize("precheck", [False, True])
def test_a_damaged_newest_checkpoint_is_passed_over_with_or_without_the_precheck(
    tmp_path: Path, precheck: bool, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, "step_00000016")
    damaged = _checkpoint(root, "step_00000024", contents=b"weightz")
    manager = _manager(root, precheck)
    assert manager.resume_point("auto") == root / "step_00000016"
    assert f"{damaged / 'state.pt'} does not match its checksum" in caplog.text


@pytest.mark.parametrize("precheck", [False, True])
def test_a_named_damaged_checkpoint_is_refused_with_the_same_error(
    tmp_path: Path, precheck: bool
) -> None:
    damaged = _checkpoint(tmp_path / "checkpoints", "step_00000024", contents=b"weightz")
    manager = _manager(tmp_path / "checkpoints", precheck, resume=str(damaged))
    message = f"resume={damaged}: {damaged / 'state.pt'} does not match its checksum"
    with pytest.raises(CheckpointError) as err:
        manager.resume_point(str(damaged))
    assert str(err.value) == message


def test_the_precheck_answers_only_for_what_it_checked_and_only_once(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    older = _checkpoint(root, "step_00000016")
    newest = _checkpoint(root, "step_00000024", contents=b"weightz")
    early = start_precheck(root, "auto", True, (0, 1))
    assert early is not None and early.directory == newest
    assert early.answer_for(older, True, (0, 1)) == (False, None)
    assert early.answer_for(newest, False, (0, 1)) == (False, None)  # sizes only: not asked
    assert early.answer_for(newest, True, (1, 2)) == (False, None)  # another share
    checked, problem = early.answer_for(newest, True, (0, 1))
    assert checked and problem == f"{newest / 'state.pt'} does not match its checksum"
    # Files may change after the answer was taken: a second question reads them again.
    assert early.answer_for(newest, True, (0, 1)) == (False, None)
    assert start_precheck(root, "never", True, (0, 1)) is None
    assert start_precheck(tmp_path / "none", "auto", True, (0, 1)) is None


def _last_line_printed(code: str) -> str:
    """What ``code`` prints last, run in a fresh interpreter: imports are per process. A lone
    process, whatever launched pytest (no torchrun rank variables)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split("\n")[-2]


def test_the_rank_entry_imports_neither_peft_nor_mlflow() -> None:
    """What ``python -m bigscale.train`` imports before its first step, for a full fine-tune
    without MLflow logging: DeepSpeed (whose autotuner would import MLflow) and the trainer."""
    code = (
        "import sys, bigscale.train.run, bigscale.train.trainer, deepspeed;"
        "import deepspeed.autotuning.autotuner as a;"
        "print(sorted(m for m in ('peft', 'mlflow') if m in sys.modules), a.has_mlflow)"
    )
    assert _last_line_printed(code) == "[] False"


def test_zero_stages_check_for_muon_without_loading_the_compiler() -> None:
    """Every ZeRO stage imports DeepSpeed's Muon module for an isinstance check; in a bigscale
    process that import no longer loads TorchInductor, and Muon's kernels still run (compiled on
    their first call)."""
    code = (
        "import sys, bigscale, torch;"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam;"
        "loaded = 'torch._inductor.compile_fx' in sys.modules;"
        "from deepspeed.runtime.zero.muon.original_muon import zeropower_via_newtonschulz5 as ns;"
        "g = torch.randn(8, 4);"
        "print(loaded, ns(g, 5).shape == g.shape, ns.__name__)"
    )
    assert _last_line_printed(code) == "False True zeropower_via_newtonschulz5"


def test_ranks_join_the_group_without_deepspeeds_shared_memory_op() -> None:
    """DeepSpeed's CPU backend would build (C++, on a new machine) and load its shared-memory
    all-reduce in every rank; a rank of bigscale joins its group without it."""
    code = (
        "from bigscale.dist.env import DistEnv;"
        "from bigscale.dist.engine import init_distributed;"
        "init_distributed(DistEnv.from_environ());"
        "from deepspeed.comm import comm;"
        "print(comm.cdb.shm_comm_op is None, comm.cdb.is_initialized())"
    )
    assert _last_line_printed(code) == "True True"


def test_the_launcher_quiets_transformers_and_datasets_without_importing_them() -> None:
    """`bigscale train` seldom needs either library; quieting them must not import them (2 s of
    every launch), and a process that does import them gets them quiet."""
    code = (
        "import sys; from bigscale.quiet import quiet_third_party; quiet_third_party();"
        "before = sorted(m for m in ('transformers', 'datasets') if m in sys.modules);"
        "import transformers, datasets;"
        "t = transformers.utils.logging;"
        "print(before, t.get_verbosity(), t.is_progress_bar_enabled(),"
        " datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled())"
    )
    assert _last_line_printed(code) == "[] 40 False 40 False"
