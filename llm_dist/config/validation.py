"""Every cross-field invariant of a Config, checked in one place before anything is touched; plus the layer
layouts (`layer_kinds`, `moe_layers`) that the model derives from the same fields."""

from __future__ import annotations

import difflib

from llm_dist.config.schema import (ChatConfig, Config, ConfigError, DPOConfig, LossConfig, ModelConfig, PPOConfig,
                                    ProfileConfig, RewardConfig, RLConfig, SFTConfig)


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
    # Signs and choices are checked even with MoE off: a nonsensical value is a mistake either way.
    _positive("model.moe.top_k", e.top_k)
    _positive("model.moe.expert_hidden", e.expert_hidden, allow_zero=True)
    _choice("model.moe.router", e.router, ("softmax", "sigmoid"))
    for key in ("aux_loss_coef", "z_loss_coef", "capacity_factor"):
        _positive(f"model.moe.{key}", getattr(e, key), allow_zero=True)
    _positive("model.moe.every_n_layers", e.every_n_layers)
    _positive("model.moe.first_dense_layers", e.first_dense_layers, allow_zero=True)
    if not e.num_experts:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]")
    if e.first_dense_layers >= m.n_layer:
        raise ConfigError(f"model.moe.first_dense_layers={e.first_dense_layers} leaves no MoE layer "
                          f"(model.n_layer={m.n_layer})")


def _validate_rope_scaling(m: ModelConfig) -> None:
    r = m.rope_scaling
    _choice("model.rope_scaling.type", r.type, ("none", "linear", "llama3"))
    if r.type == "none":
        return
    if m.pos_emb != "rope":
        raise ConfigError(f"model.rope_scaling.type={r.type} needs model.pos_emb=rope, got {m.pos_emb!r}")
    _positive("model.rope_scaling.factor", r.factor)
    if r.type == "llama3":
        _positive("model.rope_scaling.low_freq_factor", r.low_freq_factor)
        _positive("model.rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings)
        if r.high_freq_factor <= r.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed "
                              f"model.rope_scaling.low_freq_factor={r.low_freq_factor} (llama3 scaling)")


def _validate_lora(m: ModelConfig) -> None:
    """model.lora.* invariants. Which stages may use LoRA (fine-tuning, with an init_from) is checked by
    the stages themselves (`llm_dist.stages.setup_chat_model`, `llm_dist.pretrain`)."""
    lo = m.lora
    _positive("model.lora.rank", lo.rank, allow_zero=True)
    if not lo.rank:
        return
    _positive("model.lora.alpha", lo.alpha)
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout: expected a value in [0, 1), got {lo.dropout}")
    names = [t.strip() for t in lo.targets.split(",") if t.strip()]
    if not names:
        raise ConfigError("model.lora.targets: expected at least one of wq, wk, wv, wo, up, gate, down, got ''")
    allowed = ("wq", "wk", "wv", "wo", "up", "gate", "down")  # = llm_dist.model.lora.TARGETS
    for t in names:
        _choice("model.lora.targets", t, allowed)
    if len(set(names)) != len(names):
        raise ConfigError(f"model.lora.targets={lo.targets!r}: a layer is listed twice")
    if "gate" in names and m.mlp != "swiglu":
        raise ConfigError(f"model.lora.targets has 'gate', which only model.mlp=swiglu has (model.mlp={m.mlp!r})")
    if m.moe.num_experts and any(t in ("up", "gate", "down") for t in names):
        raise ConfigError(f"model.lora.targets={lo.targets!r}: adapters on MLP layers are not supported with "
                          "model.moe.num_experts > 0 (the experts are batched tensors, not linear layers)")
    if m.ops != "torch":
        raise ConfigError(f"model.lora needs model.ops=torch (the adapted layers are nn.Linear), got {m.ops!r}")


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
    _validate_rope_scaling(m)
    _choice("model.ops", m.ops, ("torch", "scratch"))
    _validate_attn(m)
    _validate_moe(m)
    _validate_lora(m)

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

    _positive("train.seed", t.seed, allow_zero=True)  # seeds numpy's PCG64 (the data order), which needs >= 0
    _positive("train.max_steps", t.max_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.log_interval", t.log_interval)
    _positive("train.batch_ramp_tokens", t.batch_ramp_tokens, allow_zero=True)
    _positive("train.batch_ramp_start", t.batch_ramp_start, allow_zero=True)
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
    _positive("parallel.cpu_threads", cfg.parallel.cpu_threads, allow_zero=True)
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
    _validate_chat(cfg.chat)
    _validate_rl(cfg.rl)
    _validate_reward(cfg.reward)
    _validate_ppo(cfg.ppo)
    _validate_dpo(cfg.dpo)
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


# The names of llm_dist.sft.chat_format.FORMATS (the config layer does not import the stages; a test keeps
# the two in step).
CHAT_TEMPLATES = ("project", "chatml", "llama3")


def _validate_chat(c: ChatConfig) -> None:
    """chat.* invariants (checked for every stage; the default is valid)."""
    _choice("chat.template", c.template, CHAT_TEMPLATES)


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
    _positive("rl.task_seed", r.task_seed, allow_zero=True)
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


def _validate_dpo(d: DPOConfig) -> None:
    """dpo.* invariants (checked for every stage; the defaults are valid)."""
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"dpo.eval_fraction: expected a value in [0, 1), got {d.eval_fraction}")
    _choice("dpo.loss", d.loss, ("sigmoid", "ipo", "hinge", "simpo"))
    _positive("dpo.beta", d.beta)
    if not 0.0 <= d.label_smoothing < 0.5:  # 0.5 makes chosen and rejected interchangeable: no signal
        raise ConfigError(f"dpo.label_smoothing: expected a value in [0, 0.5), got {d.label_smoothing}")
    if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
        raise ConfigError(f"dpo.label_smoothing={d.label_smoothing} applies to dpo.loss=sigmoid or simpo, "
                          f"not {d.loss}")
    _positive("dpo.simpo_gamma", d.simpo_gamma, allow_zero=True)
    _positive("dpo.rpo_alpha", d.rpo_alpha, allow_zero=True)
    if d.precompute_ref and d.loss == "simpo":
        raise ConfigError("dpo.precompute_ref=true: dpo.loss=simpo uses no reference model")
    _choice("dpo.answer", d.answer, ("exact", "gsm8k", "last_number"))
    _positive("dpo.eval_pairs", d.eval_pairs, allow_zero=True)
    _positive("dpo.eval_examples", d.eval_examples, allow_zero=True)
    _positive("dpo.eval_batch_size", d.eval_batch_size)
    _positive("dpo.max_new_tokens", d.max_new_tokens)
