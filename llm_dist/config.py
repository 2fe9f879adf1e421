"""Typed, nested run configuration: dataclasses with defaults, loaded from YAML, overridden on the CLI.

Precedence (later wins): dataclass defaults < `model.preset` < YAML file (`--config path`) < dotted
`key=value` arguments. Every value is checked against its field's type; unknown keys name the closest
valid one. `Config.validate(world_size)` checks every invariant in one place and raises `ConfigError`
with a one-line message *before* any process group, file or directory is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key, the value and what was expected."""


@dataclass
class AttnConfig:
    """Which keys each query may see: full causal, a sliding window, attention sinks, per-layer patterns."""

    window: int = 0  # sliding window: a query sees itself and the window-1 keys before it; 0 = full causal attention
    sinks: int = 0  # the first `sinks` positions stay visible to every query (StreamingLLM); needs window > 0
    pattern: str = ""  # per-layer kinds cycled over the layers, e.g. "local,local,global"; "" = all local if window else all global


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (num_experts = 0: every layer is a dense MLP)."""

    num_experts: int = 0  # routed experts per MoE layer; 0 = no MoE
    top_k: int = 2  # experts per token
    expert_hidden: int = 0  # inner width of each expert; 0 = the dense MLP's (model.mlp_hidden rule)
    router: str = "softmax"  # softmax | sigmoid (scores before top-k; the chosen gates are renormalised to sum to 1)
    aux_loss_coef: float = 0.01  # switch load-balancing loss weight: coef * E * sum_e f_e * P_e
    z_loss_coef: float = 0.001  # router z-loss weight: coef * mean(logsumexp(router logits)^2)
    capacity_factor: float = 0.0  # expert capacity = ceil(factor * tokens * top_k / E), overflow dropped; 0 = dropless
    shared_expert: bool = False  # add one always-on dense expert (DeepSeek-style) beside the routed ones
    every_n_layers: int = 1  # MoE in every n-th layer after the dense prefix (1 = all of them)
    first_dense_layers: int = 0  # the first n layers stay dense


@dataclass
class ModelConfig:
    """Decoder-only transformer shape and architecture choices."""

    preset: str = ""  # named preset applied under the explicit keys (see llm_dist/model/presets.py); "" = none
    vocab_size: int = 0  # 0 = take it from the tokenizer; always padded up to a multiple of `vocab_multiple`
    vocab_multiple: int = 64  # pad the embedding/LM head to a multiple of this (faster matmuls)
    block_size: int = 128  # context length in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads for GQA/MQA; 0 = n_head (plain multi-head attention)
    n_embd: int = 128  # residual stream width
    mlp: str = "gelu"  # gelu | swiglu
    mlp_hidden: int = 0  # MLP inner width; 0 = 4*n_embd (gelu) or 8/3*n_embd rounded to mlp_multiple (swiglu)
    mlp_multiple: int = 256  # round the SwiGLU inner width up to a multiple of this
    norm: str = "layernorm"  # layernorm | rmsnorm | none
    norm_position: str = "pre"  # pre | post
    norm_eps: float = 1e-5  # epsilon inside LayerNorm/RMSNorm
    pos_emb: str = "learned"  # learned | sinusoidal | rope | none
    rope_theta: float = 10000.0  # RoPE base frequency
    dropout: float = 0.0  # dropout on attention probabilities, residual branches and embeddings
    bias: bool = True  # biases in linear layers and norms
    tie_embeddings: bool = True  # share the token embedding with the LM head
    attn_impl: str = "sdpa"  # sdpa (F.scaled_dot_product_attention) | manual (explicit softmax reference) | triton (llm_dist/kernels FlashAttention; SDPA where it cannot run)
    norm_impl: str = "torch"  # torch | triton (fused RMSNorm kernel from llm_dist/kernels; needs model.norm=rmsnorm)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std/sqrt(2*n_layer)
    ops: str = "torch"  # torch | scratch (hand-written Linear, Embedding, softmax, cross-entropy, AdamW, clipping)
    score_head: bool = False  # add a scalar head (reward-model score / PPO value) beside the LM head; set by those stages
    attn: AttnConfig = field(default_factory=AttnConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    name: str = "byte"  # byte | gpt2 | path of a tokenizer trained with tools/train_tokenizer.py


@dataclass
class DataConfig:
    """Where the prepared token shards live and how to make them on first use."""

    dir: str = "data/prepared/shakespeare_byte"  # prepared shards + index.json
    source: str = "data/tinyshakespeare/input.txt"  # text/glob/fsspec URL/JSONL prepared into `dir` when it has no index
    text_field: str = "text"  # the field holding the text in JSONL sources
    val_fraction: float = 0.1  # fraction of the source held out for validation
    shuffle: bool = True  # shuffle training samples (per epoch, seeded)
    num_proc: int = 1  # processes for on-the-fly preparation


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine/linear/wsd)
    weight_decay: float = 0.1  # decoupled weight decay for >=2-D weights (embeddings, matmuls); none on biases/norms
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    fused: str = "auto"  # auto (fused on CUDA) | true | false
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 100  # linear warm-up steps from 0 to the peak
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying to min lr


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = 1337  # base seed; each rank derives its own from it
    max_steps: int = 2000  # optimizer steps
    batch_size: int = 32  # global batch in sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 16  # sequences per rank per forward/backward
    batch_ramp_tokens: int = 0  # ramp the global batch linearly over this many tokens; 0 = no ramp
    batch_ramp_start: int = 0  # global batch (sequences) at the start of the ramp
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    dtype: str = "auto"  # auto (bf16 on CUDA if supported, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CPU)
    detect_anomaly: bool = False  # autograd anomaly detection + a finite-loss check every step (slow; debug)
    nonfinite: str = "skip"  # NaN/Inf loss or gradients: skip (drop the update, count it) | halt
    max_skipped_steps: int = 5  # nonfinite=skip: halt after this many non-finite steps in a row
    log_interval: int = 10  # log every N steps


@dataclass
class ParallelConfig:
    """How ranks share the work."""

    strategy: str = "auto"  # auto (ddp with >1 rank, else single) | single | ddp | fsdp | hsdp
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    ddp_bucket_mb: int = 25  # DDP gradient bucket size in MiB
    hsdp_replicas: int = 0  # hsdp: replica groups (mesh dim 0); 0 = number of nodes (world / ranks per node)
    reshard_after_forward: bool = True  # fsdp: free gathered params after forward (less memory, one more all-gather)
    reduce_dtype: str = "fp32"  # fsdp: dtype of the gradient reduce-scatter (fp32 | bf16)
    cpu_offload: bool = False  # fsdp: keep sharded params, grads and optimizer state in CPU memory
    ac: str = "none"  # activation checkpointing: none | full (every block) | selective
    ac_selective: str = "op"  # selective: op (save matmul/attention outputs, recompute the rest) | layer
    ac_every: int = 2  # selective=layer: checkpoint every k-th block


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    dir: str = ""  # where checkpoints go: a path or fsspec URL (s3://...); "" = <out_dir>/checkpoints
    interval: int = 0  # save every N steps (0 = only at the end)
    async_save: bool = False  # write in the background (dcp.async_save); training blocks only to stage to CPU
    keep_last_k: int = 3  # complete checkpoints to keep (the newest); 0 = keep all
    resume: str = "auto"  # auto (newest complete checkpoint in out_dir, if any) | never | path of a checkpoint


@dataclass
class LoggingConfig:
    """Where progress goes."""

    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "llm_dist"  # wandb project name
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    peak_tflops: float = 0.0  # per-device peak TFLOP/s for MFU; 0 = look it up from the GPU's name (none on CPU)


@dataclass
class EvalConfig:
    """Validation and samples during training."""

    interval: int = 500  # validation loss every N steps (and at the end); 0 = only at the end
    steps: int = 20  # validation batches (global batch each) per evaluation
    sample_interval: int = 0  # print a sample every N steps; 0 = only at the end
    sample_tokens: int = 300  # tokens per sample
    sample_prompt: str = "\n"  # prompt for the samples
    temperature: float = 0.8  # sampling temperature
    top_k: int = 200  # sample only from the k most likely tokens; 0 = all
    mc_data: str = ""  # multiple-choice JSONL (HellaSwag ctx/endings/label or context/endings/label) scored at each evaluation; "" = none
    mc_examples: int = 0  # score only the first N examples of eval.mc_data; 0 = all
    mc_batch_size: int = 32  # rows (one per ending) per forward pass in the multiple-choice evaluation


@dataclass
class ProfileConfig:
    """torch.profiler over a window of training steps (see docs/eval.md, "Profiling")."""

    enabled: bool = False  # profile the step window below
    wait: int = 5  # steps run unprofiled first (start-up, compilation)
    warmup: int = 2  # steps profiled but discarded (the profiler's own warm-up)
    active: int = 3  # steps recorded into the trace
    trace: str = "tensorboard"  # tensorboard (tensorboard_trace_handler dir) | chrome (one trace JSON per rank)
    record_shapes: bool = False  # record input shapes of every op (larger trace)
    profile_memory: bool = False  # track tensor allocations per op
    with_stack: bool = False  # record Python stacks (needed for flame graphs; slow)
    sort_by: str = "auto"  # top-kernels table order: auto (self device time on CUDA, self CPU time on CPU) or a key_averages key
    row_limit: int = 20  # rows of the top-kernels table
    memory_snapshot: bool = False  # CUDA only: record allocator history over the window, dump memory_snapshot_rank<r>.pickle


@dataclass
class SFTConfig:
    """Supervised fine-tuning (launch/sft.py): chat-formatted examples, loss on response tokens only."""

    data: str = ""  # training JSONL: {"prompt","response"}, {"messages":[{"role","content"}...]} or {"question","answer"} rows
    eval_data: str = ""  # held-out JSONL; "" = hold out sft.eval_fraction of sft.data
    eval_fraction: float = 0.05  # share of sft.data held out when sft.eval_data is ""
    init_from: str = ""  # checkpoint (or run dir) whose weights start the run; "" = random init
    pack: bool = True  # pack several examples per sequence, attention confined to each example
    curriculum: str = "none"  # none (seeded shuffle each epoch) | length (short first) | difficulty (sft.difficulty_field ascending)
    difficulty_field: str = "difficulty"  # the numeric row field sft.curriculum=difficulty sorts by
    answer: str = "exact"  # exact-match eval compares: exact (whole response) | gsm8k (the number after ####) | last_number
    eval_examples: int = 64  # held-out examples decoded greedily per exact-match evaluation (0 = none)
    eval_batch_size: int = 16  # prompts per batched generate call during evaluation
    max_new_tokens: int = 64  # generation budget of the exact-match evaluation


@dataclass
class RLConfig:
    """GRPO (launch/grpo.py): G sampled completions per prompt, rewarded by a task; train.batch_size = prompts x G."""

    task: str = "addition"  # addition | reverse | gsm8k (llm_dist/rl/tasks)
    task_level: int = 3  # synthetic tasks: digits (addition) / max letters - 1 (reverse)
    task_seed: int = 0  # synthetic tasks: which problems are drawn
    data_dir: str = "data/gsm8k"  # gsm8k: folder with train.jsonl / test.jsonl
    init_from: str = ""  # SFT/pretrain checkpoint (or run dir) for the policy and the reference; "" = random init
    group_size: int = 8  # G: completions per prompt
    max_new_tokens: int = 16  # completion budget (also Dr. GRPO's constant normaliser)
    temperature: float = 1.0  # rollout sampling temperature (> 0)
    top_k: int = 0  # rollout top-k; 0 = off
    top_p: float = 1.0  # rollout nucleus; 1.0 = off
    rollout_batch_size: int = 0  # samples per generate call; 0 = the rank's whole share (must divide it)
    scale_rewards: str = "group"  # advantage scale: group (group std) | batch (batch std) | none (Dr. GRPO)
    epsilon_low: float = 0.2  # ratio clip below: 1 - epsilon_low
    epsilon_high: float = 0.2  # ratio clip above: 1 + epsilon_high (DAPO: 0.28)
    beta: float = 0.0  # k3 KL-to-reference coefficient; 0 = no reference model is loaded
    loss_agg: str = "grpo"  # grpo (per-sequence mean) | dr_grpo (sum / (N * max_new_tokens)) | dapo (token mean)
    num_iterations: int = 1  # optimizer steps per rollout (old log-probs from rollout time when > 1)
    eval_examples: int = 128  # held-out problems decoded greedily per evaluation (0 = none)
    eval_batch_size: int = 64  # prompts per generate call in the evaluation
    reward_model: str = ""  # reward-model checkpoint (or run dir) that scores completions; "" = the task's reward


@dataclass
class RewardConfig:
    """Reward model (launch/reward.py): a scalar head read at the last token, trained on preference pairs."""

    data: str = ""  # training JSONL: {"prompt","chosen","rejected"[,"margin"]} or HH transcripts {"chosen","rejected"}
    eval_data: str = ""  # held-out JSONL; "" = hold out reward.eval_fraction of reward.data
    eval_fraction: float = 0.05  # share of reward.data held out when reward.eval_data is ""
    init_from: str = ""  # backbone checkpoint (SFT/pretrain, or its run dir); "" = random init
    loss: str = "bradley_terry"  # bradley_terry: -log sigmoid(r_c - r_r - m) | hinge: max(0, m - (r_c - r_r))
    margin: float = 0.0  # m for rows without a "margin" field (0 = plain Bradley-Terry)
    center_coef: float = 0.0  # weight of the centring term (r_c + r_r)^2 per pair: keeps rewards near 0
    eval_pairs: int = 0  # held-out pairs per evaluation (0 = all)


@dataclass
class PPOConfig:
    """PPO (launch/ppo.py): policy + value head; tasks and sampling from rl.*; train.batch_size = samples per rollout."""

    kl_coef: float = 0.05  # per-token KL penalty coefficient in the reward (initial value when adaptive)
    kl_estimator: str = "k1"  # k1: logp - ref | k3: exp(ref - logp) - (ref - logp) - 1
    adaptive_kl: bool = False  # adapt kl_coef towards ppo.kl_target (Ziegler et al. 2019)
    kl_target: float = 1.0  # adaptive controller: target KL per sequence (nats)
    kl_horizon: int = 10000  # adaptive controller: horizon in samples
    gamma: float = 1.0  # discount of GAE
    lam: float = 0.95  # lambda of GAE
    whiten_advantages: bool = True  # normalise advantages over the whole rollout (all ranks) to mean 0, std 1
    cliprange: float = 0.2  # policy ratio clip: [1 - c, 1 + c]
    cliprange_value: float = 0.2  # value clip around the rollout-time value; 0 = no value clipping
    vf_coef: float = 0.1  # weight of the value loss
    epochs: int = 4  # passes over each rollout
    num_minibatches: int = 1  # optimizer steps per pass (each rank's share of a rollout splits into them)


@dataclass
class LossConfig:
    """How the language-model loss is computed from the final hidden states."""

    impl: str = "torch"  # torch (logits, then F.cross_entropy) | fused (chunked linear + cross-entropy: the (tokens x vocab) logits never exist at once)
    chunk_size: int = 0  # fused: tokens per chunk; 0 = auto (a chunk's logits about the size of the hidden states)


@dataclass
class Config:
    """A whole run."""

    out_dir: str = "runs/default"  # run directory: checkpoints, metrics.jsonl, config.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, world_size: int = 1) -> "Config":
        """Check every invariant; raise ConfigError naming the key. Returns self for chaining."""
        validate(self, world_size)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value to the field's type (strings from the CLI are parsed here)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the leaf types above are used in Config
        raise TypeError(f"unsupported config field type {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(valid)})")


def apply_dict(obj: Any, data: dict, prefix: str = "") -> None:
    """Merge a nested dict into a dataclass instance in place, type-checking every leaf."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            apply_dict(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, tp, key))


def apply_override(cfg: Config, arg: str) -> None:
    """Apply one dotted `key=value` override, e.g. `optim.lr=3e-4` or `model.n_layer=6`."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected key=value, e.g. train.max_steps=100")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    obj: Any = cfg
    for i, name in enumerate(parts):
        fields = _fields(type(obj))
        sub = ".".join(parts[: i + 1])
        if name not in fields:
            raise _unknown_key(sub, name, list(fields))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(fields[name]):
                raise ConfigError(f"override {arg!r}: {sub} is a section; set one of its keys, e.g. {sub}.{next(iter(_fields(fields[name])))}=...")
            setattr(obj, name, _coerce(raw, fields[name], sub))
        else:
            if not dataclasses.is_dataclass(fields[name]):
                raise ConfigError(f"override {arg!r}: {sub} is a value, not a section")
            obj = getattr(obj, name)


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults (or `base`) < model preset < YAML < overrides. Does not validate (call `.validate`)."""
    from llm_dist.model.presets import get_preset  # local: config must import without the model package

    cfg = base if base is not None else Config()
    data = _read_yaml(path) if path else {}
    overrides = list(overrides or [])
    # The preset is applied first so that explicit keys (YAML or CLI) always win over it.
    preset = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("model.preset=")), None)
    if preset is None:
        preset = (data.get("model") or {}).get("preset") if isinstance(data.get("model"), dict) else None
    if preset:
        try:
            apply_dict(cfg.model, get_preset(str(preset)), "model.")
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    try:
        apply_dict(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def parse_args(argv: list[str] | None = None, default_config: str | None = None) -> Config:
    """`[--config PATH] [key=value ...]` -> Config (not yet validated). `--help` prints the keys."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = default_config
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config: expected a path after it")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--"):
            raise ConfigError(f"unknown option {a!r}; expected --config PATH or key=value overrides")
        else:
            rest.append(a)
        i += 1
    return load_config(path, rest)


def _section_paths(cls: type, prefix: str = "") -> dict[str, str]:
    """Dataclass name -> dotted config path of every (nested) section below `cls`."""
    out: dict[str, str] = {}
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out[tp.__name__] = prefix + name
            out.update(_section_paths(tp, prefix + name + "."))
    return out


def help_text() -> str:
    """Every key with its default and comment, read from this file's dataclasses."""
    src = Path(__file__).read_text().splitlines()
    lines = ["usage: [--config PATH] [section.key=value ...]", ""]
    section = ""
    paths = _section_paths(Config)  # "MoEConfig" -> "model.moe": nested sections print their dotted path
    for line in src:
        s = line.strip()
        if s.startswith("class ") and s.endswith("Config:") and s != "class Config:":
            section = paths.get(s[6:-1], s[6:-7].lower())  # "class ModelConfig:" -> "model"
        elif section and ":" in s and "=" in s and "#" in s and not s.startswith(("def", "#", "raise", "if")):
            name = s.split(":", 1)[0]
            lines.append(f"  {section}.{name} = {s.split('=', 1)[1].split('#')[0].strip():<12} # {s.split('#', 1)[1].strip()}")
        elif s.startswith("class Config"):
            section = ""
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ validation

def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}{hint}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} number, got {value}")


def layer_kinds(m: ModelConfig) -> list[str]:
    """'local' (sliding window) or 'global' (full causal) for every layer, from model.attn.pattern."""
    if not m.attn.pattern:
        return ["local" if m.attn.window else "global"] * m.n_layer
    kinds = [k.strip() for k in m.attn.pattern.split(",")]
    return [kinds[i % len(kinds)] for i in range(m.n_layer)]


def moe_layers(m: ModelConfig) -> list[bool]:
    """Which layers hold an MoE feed-forward: after `first_dense_layers`, every `every_n_layers`-th one."""
    e = m.moe
    return [e.num_experts > 0 and i >= e.first_dense_layers and (i - e.first_dense_layers) % e.every_n_layers == 0
            for i in range(m.n_layer)]


def _validate_attn(m: ModelConfig) -> None:
    a = m.attn
    _positive("model.attn.window", a.window, allow_zero=True)
    _positive("model.attn.sinks", a.sinks, allow_zero=True)
    if a.sinks and not a.window:
        raise ConfigError(f"model.attn.sinks={a.sinks} needs a sliding window (model.attn.window > 0)")
    if a.pattern:
        for kind in a.pattern.split(","):
            _choice("model.attn.pattern", kind.strip(), ("local", "global"))
        if "local" in a.pattern and not a.window:
            raise ConfigError(f"model.attn.pattern={a.pattern!r} has local layers but model.attn.window=0")


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    _positive("model.moe.num_experts", e.num_experts, allow_zero=True)
    if not e.num_experts:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]")
    _positive("model.moe.expert_hidden", e.expert_hidden, allow_zero=True)
    _choice("model.moe.router", e.router, ("softmax", "sigmoid"))
    for key in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
        _positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
    _positive("model.moe.every_n_layers", e.every_n_layers)
    _positive("model.moe.first_dense_layers", e.first_dense_layers, allow_zero=True)
    if e.first_dense_layers >= m.n_layer:
        raise ConfigError(f"model.moe.first_dense_layers={e.first_dense_layers} leaves no MoE layer "
                          f"(model.n_layer={m.n_layer})")


def validate(cfg: Config, world_size: int = 1) -> None:
    """All cross-field invariants in one place. Raises ConfigError (one line) on the first problem."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_multiple", "mlp_multiple"):
        _positive(f"model.{key}", getattr(m, key))
    for key in ("vocab_size", "n_kv_head", "mlp_hidden"):
        _positive(f"model.{key}", getattr(m, key), allow_zero=True)
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise ConfigError(f"model.n_head={m.n_head} must be divisible by model.n_kv_head={kv} (query heads per KV head)")
    if m.pos_emb == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError(f"model.pos_emb=rope needs an even head dimension, got n_embd/n_head={m.n_embd // m.n_head}")
    _choice("model.mlp", m.mlp, ("gelu", "swiglu"))
    _choice("model.norm", m.norm, ("layernorm", "rmsnorm", "none"))
    _choice("model.norm_position", m.norm_position, ("pre", "post"))
    _choice("model.pos_emb", m.pos_emb, ("learned", "sinusoidal", "rope", "none"))
    _choice("model.attn_impl", m.attn_impl, ("sdpa", "manual", "triton"))
    _choice("model.norm_impl", m.norm_impl, ("torch", "triton"))
    if m.norm_impl == "triton" and m.norm != "rmsnorm":
        raise ConfigError(f"model.norm_impl=triton is the fused RMSNorm and needs model.norm=rmsnorm, got {m.norm!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: expected a value in [0, 1), got {m.dropout}")
    _positive("model.init_std", m.init_std)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    _choice("model.ops", m.ops, ("torch", "scratch"))
    _validate_attn(m)
    _validate_moe(m)

    if not cfg.tokenizer.name:
        raise ConfigError("tokenizer.name: expected 'byte', 'gpt2' or a tokenizer file path, got ''")
    if not cfg.data.dir:
        raise ConfigError("data.dir: expected the directory of prepared shards, got ''")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a value in (0, 1), got {cfg.data.val_fraction}")
    _positive("data.num_proc", cfg.data.num_proc)

    _positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {o.min_lr_ratio}")
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}: expected a value in [0, 1), got {getattr(o, key)}")
    _positive("optim.eps", o.eps)
    _choice("optim.fused", o.fused, ("auto", "true", "false"))
    _choice("optim.schedule", o.schedule, ("cosine", "linear", "constant", "wsd"))
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    if not 0.0 <= o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction: expected a value in [0, 1], got {o.decay_fraction}")

    _positive("train.max_steps", t.max_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.log_interval", t.log_interval)
    _positive("train.batch_ramp_tokens", t.batch_ramp_tokens, allow_zero=True)
    _choice("train.dtype", t.dtype, ("auto", "fp32", "bf16", "fp16"))
    _choice("train.compile_mode", t.compile_mode, ("default", "reduce-overhead", "max-autotune"))
    step = world_size * t.micro_batch_size
    if t.batch_size % step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by world_size*train.micro_batch_size="
            f"{world_size}*{t.micro_batch_size}={step}")
    if t.batch_ramp_tokens:
        if not 0 < t.batch_ramp_start <= t.batch_size or t.batch_ramp_start % step:
            raise ConfigError(
                f"train.batch_ramp_start={t.batch_ramp_start} must be in (0, train.batch_size] and divisible by "
                f"world_size*train.micro_batch_size={step}")

    p = cfg.parallel
    _choice("parallel.strategy", p.strategy, ("auto", "single", "ddp", "fsdp", "hsdp"))
    _choice("parallel.reduce_dtype", p.reduce_dtype, ("fp32", "bf16"))
    _choice("parallel.ac", p.ac, ("none", "full", "selective"))
    _choice("parallel.ac_selective", p.ac_selective, ("op", "layer"))
    _positive("parallel.ac_every", p.ac_every)
    _positive("parallel.hsdp_replicas", p.hsdp_replicas, allow_zero=True)
    if p.strategy == "hsdp" and p.hsdp_replicas and world_size % p.hsdp_replicas:
        raise ConfigError(f"parallel.hsdp_replicas={p.hsdp_replicas} must divide the world size {world_size}")
    if p.cpu_offload and p.strategy not in ("fsdp", "hsdp"):
        raise ConfigError(f"parallel.cpu_offload needs parallel.strategy=fsdp or hsdp, got {p.strategy!r}")
    if t.dtype == "fp16" and p.strategy in ("fsdp", "hsdp"):
        raise ConfigError("train.dtype=fp16 is not supported with fsdp/hsdp (no sharded grad scaler); use bf16")
    _choice("parallel.backend", cfg.parallel.backend, ("auto", "nccl", "gloo"))
    _choice("parallel.device", cfg.parallel.device, ("auto", "cpu", "cuda"))
    if cfg.parallel.strategy == "single" and world_size > 1:
        raise ConfigError(f"parallel.strategy=single cannot run with world_size={world_size}; use ddp")
    _positive("parallel.ddp_bucket_mb", cfg.parallel.ddp_bucket_mb)

    _choice("train.nonfinite", t.nonfinite, ("skip", "halt"))
    _positive("train.max_skipped_steps", t.max_skipped_steps)
    _positive("checkpoint.interval", cfg.checkpoint.interval, allow_zero=True)
    _positive("checkpoint.keep_last_k", cfg.checkpoint.keep_last_k, allow_zero=True)
    if not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume: expected 'auto', 'never' or a checkpoint path, got ''")
    _choice("logging.wandb", cfg.logging.wandb, ("disabled", "offline", "online"))

    _positive("eval.interval", cfg.eval.interval, allow_zero=True)
    _positive("eval.steps", cfg.eval.steps)
    _positive("eval.sample_interval", cfg.eval.sample_interval, allow_zero=True)
    _positive("eval.sample_tokens", cfg.eval.sample_tokens, allow_zero=True)
    _positive("eval.temperature", cfg.eval.temperature, allow_zero=True)
    _positive("eval.top_k", cfg.eval.top_k, allow_zero=True)
    _positive("eval.mc_examples", cfg.eval.mc_examples, allow_zero=True)
    _positive("eval.mc_batch_size", cfg.eval.mc_batch_size)
    _positive("logging.peak_tflops", cfg.logging.peak_tflops, allow_zero=True)
    _validate_profile(cfg.profile)
    if not cfg.out_dir:
        raise ConfigError("out_dir: expected a run directory, got ''")
    _validate_sft(cfg.sft)
    _validate_rl(cfg.rl)
    _validate_reward(cfg.reward)
    _validate_ppo(cfg.ppo)
    _validate_loss(cfg.loss, m)


_PROFILE_SORT_KEYS = ("auto", "self_cpu_time_total", "cpu_time_total", "self_device_time_total", "device_time_total",
                      "self_cpu_memory_usage", "self_device_memory_usage", "count")


def _validate_profile(p: ProfileConfig) -> None:
    """profile.* invariants (the defaults are valid whether or not profiling is on)."""
    _positive("profile.wait", p.wait, allow_zero=True)
    _positive("profile.warmup", p.warmup, allow_zero=True)
    _positive("profile.active", p.active)
    _positive("profile.row_limit", p.row_limit)
    _choice("profile.trace", p.trace, ("tensorboard", "chrome"))
    _choice("profile.sort_by", p.sort_by, _PROFILE_SORT_KEYS)


def _validate_loss(loss: LossConfig, m: ModelConfig) -> None:
    """loss.* invariants."""
    _choice("loss.impl", loss.impl, ("torch", "fused"))
    _positive("loss.chunk_size", loss.chunk_size, allow_zero=True)
    if loss.impl == "fused" and m.ops == "scratch":
        raise ConfigError("loss.impl=fused needs model.ops=torch (the scratch model uses its hand-written cross-entropy)")


def _validate_sft(s: SFTConfig) -> None:
    """sft.* invariants (checked for every stage; the defaults are valid)."""
    if not 0.0 <= s.eval_fraction < 1.0:
        raise ConfigError(f"sft.eval_fraction: expected a value in [0, 1), got {s.eval_fraction}")
    _choice("sft.curriculum", s.curriculum, ("none", "length", "difficulty"))
    _choice("sft.answer", s.answer, ("exact", "gsm8k", "last_number"))
    _positive("sft.eval_examples", s.eval_examples, allow_zero=True)
    _positive("sft.eval_batch_size", s.eval_batch_size)
    _positive("sft.max_new_tokens", s.max_new_tokens)
    if s.curriculum == "difficulty" and not s.difficulty_field:
        raise ConfigError("sft.curriculum=difficulty needs sft.difficulty_field (the row field to sort by)")


def _validate_rl(r: RLConfig) -> None:
    """rl.* invariants (checked for every stage; the defaults are valid). How train.batch_size splits into
    groups is checked by the GRPO stage itself (`llm_dist.rl.stage.check_batch`): other stages' batches need not."""
    _choice("rl.task", r.task, ("addition", "reverse", "gsm8k"))
    _positive("rl.task_level", r.task_level)
    for key in ("group_size", "max_new_tokens", "num_iterations", "eval_batch_size"):
        _positive(f"rl.{key}", getattr(r, key))
    for key in ("top_k", "rollout_batch_size", "eval_examples", "beta"):
        _positive(f"rl.{key}", getattr(r, key), allow_zero=True)
    _positive("rl.temperature", r.temperature)
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError(f"rl.top_p: expected a value in (0, 1], got {r.top_p}")
    if not 0.0 <= r.epsilon_low < 1.0:
        raise ConfigError(f"rl.epsilon_low: expected a value in [0, 1), got {r.epsilon_low}")
    _positive("rl.epsilon_high", r.epsilon_high, allow_zero=True)
    _choice("rl.scale_rewards", r.scale_rewards, ("group", "batch", "none"))
    _choice("rl.loss_agg", r.loss_agg, ("grpo", "dr_grpo", "dapo"))
    if r.beta > 0 and not r.init_from:
        raise ConfigError("rl.beta > 0 needs rl.init_from (the reference model is the initial checkpoint)")


def _validate_reward(r: RewardConfig) -> None:
    """reward.* invariants (checked for every stage; the defaults are valid)."""
    if not 0.0 <= r.eval_fraction < 1.0:
        raise ConfigError(f"reward.eval_fraction: expected a value in [0, 1), got {r.eval_fraction}")
    _choice("reward.loss", r.loss, ("bradley_terry", "hinge"))
    _positive("reward.margin", r.margin, allow_zero=True)
    _positive("reward.center_coef", r.center_coef, allow_zero=True)
    _positive("reward.eval_pairs", r.eval_pairs, allow_zero=True)


def _validate_ppo(p: PPOConfig) -> None:
    """ppo.* invariants (checked for every stage; the defaults are valid). How train.batch_size splits into
    minibatches is checked by the PPO stage (`llm_dist.rl.ppo_stage.check_batch`)."""
    _positive("ppo.kl_coef", p.kl_coef, allow_zero=True)
    _choice("ppo.kl_estimator", p.kl_estimator, ("k1", "k3"))
    _positive("ppo.kl_target", p.kl_target)
    _positive("ppo.kl_horizon", p.kl_horizon)
    for key in ("gamma", "lam"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"ppo.{key}: expected a value in [0, 1], got {getattr(p, key)}")
    if not 0.0 < p.cliprange < 1.0:
        raise ConfigError(f"ppo.cliprange: expected a value in (0, 1), got {p.cliprange}")
    _positive("ppo.cliprange_value", p.cliprange_value, allow_zero=True)
    _positive("ppo.vf_coef", p.vf_coef, allow_zero=True)
    _positive("ppo.epochs", p.epochs)
    _positive("ppo.num_minibatches", p.num_minibatches)
