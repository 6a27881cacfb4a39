"""Export reads only checkpoints that match their manifest, without executing anything they
contain, and writes Hugging Face's sharded safetensors layout one shard at a time. The choice of
checkpoint is ``select_resume_point``'s, the one a resume makes."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigscale.checkpoint.export import export_checkpoint, find_checkpoint, parse_size, write_weights
from bigscale.checkpoint.select import select_resume_point
from bigscale.errors import CheckpointError
from bigscale.model.tiny import build_char_tokenizer
from tests.malicious import Payload


def seal(tag_dir: Path) -> None:
    """Write the manifest a completed save writes: size and sha256 of every file."""
    files = {
        str(f.relative_to(tag_dir)): {
            "size": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file()
    }
    (tag_dir / "manifest.json").write_text(json.dumps({"tag": tag_dir.name, "files": files}))


def checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(payload)
    (tag / "meta.json").write_text(json.dumps({"step": step}))
    seal(tag)
    (root / "latest").write_text(tag.name)
    return tag


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_1"
    (tag / "hf").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_1")
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=104,
    ).save_pretrained(tag / "hf")
    build_char_tokenizer().save_pretrained(tag / "hf")
    marker = tmp_path / "pwned"
    with (tag / "mp_rank_00_model_states.pt").open("wb") as f:
        pickle.dump({"module": Payload(marker)}, f)
    seal(tag)  # a forged manifest: the checksums pass, the loading must still refuse
    return run, marker


def test_planted_pickle_does_not_execute(tmp_path: Path) -> None:
    run, marker = _plant(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load .*step_1: it holds objects"):
        export_checkpoint(run, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_find_checkpoint_accepts_run_root_or_tag(tmp_path: Path) -> None:
    run, _ = _plant(tmp_path)
    root = run / "checkpoints"
    for source in (run, root, root / "step_1"):
        found = find_checkpoint(source)
        assert (found.root, found.tag, found.notes) == (root, "step_1", [])
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        find_checkpoint(tmp_path / "elsewhere")


def test_a_named_checkpoint_with_flipped_bytes_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    tag = checkpoint(tmp_path / "checkpoints", 8)
    flip(tag / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as info:
        export_checkpoint(tag, tmp_path / "out")
    assert str(info.value) == (
        f"refusing to export {tag}: {tag / 'mp_rank_00_model_states.pt'} does not match its "
        "checksum"
    )
    assert not (tmp_path / "out").exists()
    # Without checksums only the sizes are compared, and a flipped byte keeps the size.
    assert find_checkpoint(tag, sha256=False).tag == tag.name


def test_a_truncated_file_or_no_manifest_is_refused(tmp_path: Path) -> None:
    tag = checkpoint(tmp_path / "checkpoints", 8)
    (tag / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"meta.json is truncated or changed \(2 bytes"):
        find_checkpoint(tag, sha256=False)
    partial = tmp_path / "checkpoints" / ".partial-step_00000016"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(CheckpointError, match="has no manifest.json: its save did not complete"):
        find_checkpoint(partial)


def test_a_run_whose_newest_checkpoint_is_damaged_exports_the_previous_one(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run" / "checkpoints"
    checkpoint(root, 8)
    newest = checkpoint(root, 16)
    flip(newest / "mp_rank_00_model_states.pt")
    found = find_checkpoint(tmp_path / "run")
    assert found.tag == "step_00000008"
    assert found.notes == [
        f"skipped step_00000016, which is damaged: {newest / 'mp_rank_00_model_states.pt'} "
        "does not match its checksum",
        "exporting step_00000008, the newest intact checkpoint",
    ]


def test_a_dangling_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    checkpoint(root, 8)
    (root / "latest").write_text("step_00000024")
    found = find_checkpoint(tmp_path / "run")
    assert found.tag == "step_00000008"
    assert found.notes == [
        f"{root / 'latest'} names step_00000024, which does not exist",
        "exporting step_00000008, the newest intact checkpoint",
    ]
    flip(root / "step_00000008" / "meta.json")
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(tmp_path / "run")
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint to export under {root}: ")
    assert "names step_00000024, which does not exist" in message
    assert "skipped step_00000008, which is damaged" in message


def test_select_resume_point_is_the_rule_resume_uses(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert select_resume_point(root, "auto", verify=True).point is None
    old, new = checkpoint(root, 8), checkpoint(root, 16)
    flip(new / "meta.json")
    choice = select_resume_point(root, "auto", verify=True)
    assert choice.point == old and [p.tag for p in choice.skipped] == [new.name]
    assert select_resume_point(root, "auto", verify=False).point == new  # sizes still match
    assert select_resume_point(root, str(old), verify=True).point == old
    with pytest.raises(CheckpointError, match=f"resume={new}: .*does not match its checksum"):
        select_resume_point(root, str(new), verify=True)
    with pytest.raises(CheckpointError, match="resume=never but .* already holds checkpoints"):
        select_resume_point(root, "never", verify=True)


def test_write_weights_shards_by_size_and_writes_tied_weights_once(tmp_path: Path) -> None:
    embed = torch.arange(12, dtype=torch.float32).view(4, 3)
    weights = {
        "embed.weight": embed,
        "a.weight": torch.ones(100),
        "b.weight": torch.full((100,), 2.0),
        "lm_head.weight": embed,  # tied: the same tensor
        "steps": torch.tensor([7]),  # not floating: keeps its dtype
    }
    shards = write_weights(weights, tmp_path, torch.bfloat16, shard_bytes=250)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert shards == 2  # [embed, a]: 224 bytes, [b, steps]: 208 bytes
    assert set(index["weight_map"]) == {"embed.weight", "a.weight", "b.weight", "steps"}
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert loaded["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed.weight"].float(), embed)
    assert loaded["steps"].dtype == torch.int64
    assert index["metadata"]["total_size"] == 12 * 2 + 200 * 2 + 8


def test_one_shard_is_a_plain_model_safetensors(tmp_path: Path) -> None:
    assert write_weights({"w": torch.zeros(3)}, tmp_path, None, parse_size("2GB")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert parse_size("1MB") == 1_000_000 and parse_size("64KB") == 64_000


def test_an_export_generates_with_the_cache_and_the_templates_end(tmp_path: Path) -> None:
    """Training with gradient checkpointing turns the cache off in the model config; the
    export turns it back on and carries the generation config, whose EOS ids include the chat
    template's end-of-turn token, so a plain ``generate()`` is fast and stops there."""
    from transformers import AutoTokenizer

    from bigscale.checkpoint.export import save_generation_config
    from tests.conftest import build_char_tokenizer
    from tests.exports import assert_generates_with_cache
    from tests.models import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(build_char_tokenizer(tmp_path / "tokenizer"))
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.use_cache = False  # as model.gradient_checkpointing=true leaves it
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    model.config.save_pretrained(tag / "hf")
    save_generation_config(model, tag / "hf")
    tokenizer.save_pretrained(tag / "hf")
    seal(tag)
    (tag.parent / "latest").write_text(tag.name)

    export_checkpoint(tmp_path / "run", tmp_path / "export")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert_generates_with_cache(tmp_path / "export", [tokenizer.eos_token_id, im_end])
    # A checkpoint saved before generation configs were kept gets one derived for it.
    (tag / "hf" / "generation_config.json").unlink()
    (tag / "manifest.json").unlink()
    seal(tag)
    export_checkpoint(tag, tmp_path / "export2")
    assert_generates_with_cache(tmp_path / "export2", [tokenizer.eos_token_id, im_end])
