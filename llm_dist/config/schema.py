"""The run configuration's schema: typed, nested dataclasses with defaults, one comment per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
class RopeScalingConfig:
    """RoPE frequency scaling for long contexts (Hugging Face `rope_scaling` / `rope_parameters`)."""

    type: str = "none"  # none | linear (every frequency / factor) | llama3 (Llama 3.1: low frequencies / factor, smooth band between)
    factor: float = 1.0  # linear, llama3: how much longer the context is than the one trained on
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_position_embeddings / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_position_embeddings / this are kept
    original_max_position_embeddings: int = 8192  # llama3: the context length before the extension


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA) for fine-tuning stages: base weights frozen, only W + (alpha/rank) B A trained."""

    rank: int = 0  # adapter rank r; 0 = LoRA off (full fine-tuning). Needs the stage's init_from (the frozen base)
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter branch's input
    targets: str = "wq,wk,wv,wo"  # comma-separated layers adapted in every block: wq, wk, wv, wo (attention), up, gate, down (dense MLP; gate: swiglu only)


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
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # RoPE frequency scaling (Llama 3.1 style)
    dropout: float = 0.0  # dropout on attention probabilities, residual branches and embeddings
    bias: bool = True  # biases in linear layers and norms
    qkv_bias: bool = False  # biases on the q/k/v projections even when model.bias=false (Qwen2); no effect when bias=true
    tie_embeddings: bool = True  # share the token embedding with the LM head
    attn_impl: str = "sdpa"  # sdpa (F.scaled_dot_product_attention) | manual (explicit softmax reference) | triton (llm_dist/kernels FlashAttention; SDPA where it cannot run)
    norm_impl: str = "torch"  # torch | triton (fused RMSNorm kernel from llm_dist/kernels; needs model.norm=rmsnorm)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std/sqrt(2*n_layer)
    ops: str = "torch"  # torch | scratch (hand-written Linear, Embedding, softmax, cross-entropy, AdamW, clipping)
    score_head: bool = False  # add a scalar head (reward-model score / PPO value) beside the LM head; set by those stages
    attn: AttnConfig = field(default_factory=AttnConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    name: str = "byte"  # byte | gpt2 | path of a tokenizer trained with tools/train_tokenizer.py


@dataclass
class DataConfig:
    """Where the prepared token shards live and how to make them on first use."""

    dir: str = "data/prepared/shakespeare_byte"  # prepared shards + index.json
    source: str = "data/tinyshakespeare/input.txt"  # text/glob/fsspec URL/JSONL prepared into `dir` when it has no index
    text_field: str = "text"  # the field holding the text in JSONL sources / the column in parquet and Arrow ones
    mixture: str = ""  # YAML file of {path, weight[, text_field]} sources drawn in proportion to weight; replaces data.source when set
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
    cpu_threads: int = 0  # CPU runs: torch threads per rank; 0 = auto (usable cores / ranks on this node, or OMP_NUM_THREADS if set)
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
    checksums: bool = True  # record a CRC-32 of every file when saving and check it when loading
    init_from: str = ""  # pretraining: checkpoint, run dir or Hugging Face model folder whose weights, architecture and tokenizer start a fresh run; "" = random init


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
class ChatConfig:
    """How conversations become tokens in SFT, reward/preference data, RL prompts and chat generation."""

    template: str = "project"  # project (<|user|>..<|end|>) | chatml (Qwen <|im_start|>) | llama3 (Llama 3 headers); see docs/chat_formats.md


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
class DPOConfig:
    """DPO and its variants (launch/dpo.py): the policy trained on preference pairs against a frozen reference."""

    init_from: str = ""  # SFT/pretrain checkpoint (or run dir) for the policy and the frozen reference; "" = random init
    data: str = ""  # training JSONL of preference pairs, the rows reward.data reads
    eval_data: str = ""  # held-out JSONL; "" = hold out dpo.eval_fraction of dpo.data
    eval_fraction: float = 0.05  # share of dpo.data held out when dpo.eval_data is ""
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (length-averaged logps) | hinge | simpo (reference-free, length-averaged)
    beta: float = 0.1  # sigmoid/hinge: DPO beta (~0.1); ipo: tau of IPO (~0.1-1); simpo: beta of SimPO (~2)
    label_smoothing: float = 0.0  # sigmoid/simpo: probability a label is flipped (conservative DPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma, subtracted inside the sigmoid
    rpo_alpha: float = 0.0  # weight of the chosen response's per-token NLL added to each pair's loss (RPO); 0 = off
    precompute_ref: bool = False  # reference log-probs in one pass before training, then the reference is freed
    eval_pairs: int = 0  # held-out pairs per evaluation (0 = all)
    eval_examples: int = 0  # held-out prompts decoded greedily per evaluation, exact match against the chosen reply (0 = none)
    eval_batch_size: int = 64  # prompts per generate call in the exact-match evaluation
    max_new_tokens: int = 64  # generation budget of the exact-match evaluation
    answer: str = "exact"  # exact-match compares: exact (whole reply) | gsm8k (the number after ####) | last_number


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
    chunk_size: int = 0  # fused: tokens per chunk; 0 = auto (fp32 chunk logits 1/8 of the full, 64-512 MiB)


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
    chat: ChatConfig = field(default_factory=ChatConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, world_size: int = 1) -> "Config":
        """Check every invariant; raise ConfigError naming the key. Returns self for chaining."""
        from llm_dist.config.validation import validate

        validate(self, world_size)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
