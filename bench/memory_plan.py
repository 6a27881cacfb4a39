"""The plan's memory estimate against measurement.

1. Any machine: the activation estimate (``bigscale/launch/memory.py``) against what a real
   transformers Llama keeps for backward in one forward (``saved_tensors_hooks``), for several
   shapes, with no, full and every-2nd-layer gradient checkpointing, and with the chunked loss.
2. A GPU only: ``bigscale plan``'s per-GPU estimate for a Llama-3.2-1B-shaped model (random
   weights), bf16, sequence 2048, packed, against ``peak_mem_gib`` (``torch.cuda
   .max_memory_allocated``) of a short ``bigscale train`` run with the same overrides, for zero2
   and zero3 on 1 GPU, and zero2 with the chunked loss. Without a GPU it says so and measures
   nothing.

    .venv/bin/python bench/memory_plan.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.config.schema import Precision
from bigscale.launch.memory import ModelShape, Workload, activations, saved_activation_bytes
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.model.load import select_checkpointed_layers
from bigscale.model.shapes import LLAMA_3_2_1B

MIB = 2**20
CPU_SHAPES = [  # (hidden, intermediate, layers, vocab, seq)
    (256, 688, 4, 1000, 256),
    (512, 1376, 4, 8000, 512),
    (1024, 2752, 2, 32000, 512),
]


def activation_rows() -> None:
    print("activations kept for backward, fp32, micro batch 2: measured vs estimated")
    for hidden, inter, layers, vocab, seq in CPU_SHAPES:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            attn_implementation="sdpa",
        )
        # (checkpoint every N-th layer, 0: none; loss chunk tokens, 0: the model's own loss)
        for every, chunk in ((0, 0), (1, 0), (2, 0), (0, 256)):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).train()
            if every:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                select_checkpointed_layers(model, every)
            if chunk:
                install_chunked_loss(model, chunk)
            ids = torch.randint(0, vocab, (2, seq))
            measured = saved_activation_bytes(model, input_ids=ids, labels=ids, use_cache=False)
            shape = ModelShape.from_config(config, sum(p.numel() for p in model.parameters()))
            work = Workload(
                2,
                seq,
                checkpointing=every > 0,
                checkpoint_every=max(every, 1),
                loss_chunk_tokens=chunk,
            )
            est = activations(shape, work, Precision.fp32).stored
            label = (
                f"chunked loss {chunk}"
                if chunk
                else {0: "none", 1: "every layer", 2: "every 2nd"}[every]
            )
            print(
                f"  h={hidden} i={inter} L={layers} V={vocab} s={seq} {label:16}: "
                f"measured {measured / MIB:7.1f} MiB, estimated {est / MIB:7.1f} MiB, "
                f"ratio {est / measured:.3f}"
            )


def gpu_rows() -> None:
    if not torch.cuda.is_available():
        print("GPU: none here; the plan vs measured peak memory rows stay open")
        return
    from bigscale.model.tiny import build_char_tokenizer

    work = Path(tempfile.mkdtemp(prefix="memory_plan-"))
    model_dir = work / "llama-1b-shape"
    LlamaForCausalLM(LlamaConfig(**LLAMA_3_2_1B)).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(4000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 80}))
            f.write("\n")
    # (name, strategy, extra overrides)
    for name, strategy, extra in (
        ("zero2", "zero2", []),
        ("zero3", "zero3", []),
        ("zero2-chunked-loss", "zero2", ["model.loss_chunk_tokens=1024"]),
    ):
        common = [
            "experiment=none",
            f"model.name_or_path={model_dir}",
            "model.create_if_missing=null",
            "data=text_files",
            f"data.path={corpus}",
            "data.max_length=2048",
            "data.packing=true",
            f"strategy={strategy}",
            "trainer.precision=bf16",
            "trainer.micro_batch_size=4",
            "trainer.max_steps=8",
            "trainer.log_every=1",
            "trainer.eval_every=0",
            "optim.warmup_steps=1",
            "launcher.nproc_per_node=1",
            "export.at_end=false",
            "logger=disabled",
            f"run_dir={work / name}",
            *extra,
        ]
        plan = subprocess.run(
            [sys.executable, "-m", "bigscale.cli", "plan", *common],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        estimate = next(line for line in plan.splitlines() if line.startswith("memory/GPU"))
        subprocess.run([sys.executable, "-m", "bigscale.cli", "train", *common], check=True)
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
        peak = max(r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r)
        planned = float(estimate.split()[1])
        print(f"{name}: {estimate}")
        print(f"{name}: measured peak {peak:.2f} GiB, plan / measured {planned / peak:.3f}")


if __name__ == "__main__":
    activation_rows()
    gpu_rows()
