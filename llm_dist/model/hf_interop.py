"""Hugging Face interop: load GPT-2 / Llama / Mistral / Qwen2 weights from a local HF folder, export to one.

    from llm_dist.model.hf_interop import load_hf, save_hf
    model = load_hf("path/to/gpt2")            # config.json + model.safetensors (or sharded + index)
    save_hf(model, "out/my-model")             # a folder `transformers.AutoModelForCausalLM` loads

Needs only `safetensors` and the JSON config: no `transformers`, no hub access, no pickle (`.bin`
checkpoints are refused). Architectures and their llm_dist equivalents:

    gpt2     learned positions, pre-LayerNorm, GELU (tanh), biases, tied head. Its Conv1D weights are stored
             (in, out): transposed here; c_attn holds q, k, v side by side and is split.
    llama    RoPE, RMSNorm, SwiGLU, GQA, no biases.
    mistral  llama + a sliding window (`sliding_window` <-> model.attn.window; null or >= the context is
             full attention, exported as llama).
    qwen2    llama + biases on the q/k/v projections only (model.qkv_bias); Qwen2.5 included.

RoPE scaling (`rope_scaling` / `rope_parameters`): default, linear and llama3 (Llama 3.1 / 3.2) map to
model.rope_scaling; any other rope_type is refused, as are MoE models, head_dim != hidden/heads, per-layer
sliding windows (Qwen2 use_sliding_window) and biases llm_dist has no place for (Llama attention_bias).

RoPE layout: Hugging Face's Llama rotates the two *halves* of each head (x[i], x[i + D/2]), llm_dist
rotates consecutive *pairs* (x[2i], x[2i+1]), as Meta's original code does. The two are the same
attention once the rows of the q and k projections are permuted within each head, which is what
`_hf_to_pairs` / `_pairs_to_hf` do (the inverse of the permutation in HF's convert_llama_weights_to_hf).
The vocabulary is padded up to model.vocab_multiple on load (zero rows) and cut back on export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm_dist.config import AttnConfig, ModelConfig, RopeScalingConfig
from llm_dist.model.transformer import Transformer, build_model

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")


class HFFormatError(ValueError):
    """A folder or config that cannot be converted; the message names the file/key and the value."""


# ---------------------------------------------------------------------------------------------- reading


def read_hf_config(path: str | Path) -> dict:
    """config.json of an HF model folder."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise HFFormatError(f"{p}: not found (expected a Hugging Face model folder)")
    return json.loads(p.read_text())


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    folder = Path(path)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{index}: no 'weight_map' mapping")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_file(folder / shard))
        return out
    if (folder / "pytorch_model.bin").is_file():
        raise HFFormatError(f"{folder}: only pickle weights (pytorch_model.bin); convert them to safetensors "
                            "first (loading pickles can run arbitrary code)")
    raise HFFormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _rope(hf: dict) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "linear":
        return theta, RopeScalingConfig(type="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return theta, RopeScalingConfig(
                type="llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise HFFormatError(f"config.json: rope_type 'llama3' needs {e.args[0]!r} in rope_scaling") from None
    raise HFFormatError(f"config.json: rope_type={kind!r} is not supported (supported: default, linear, llama3)")


def _refuse_unsupported(hf: dict, kind: str) -> None:
    """One HFFormatError naming the first config.json feature llm_dist cannot reproduce exactly."""
    moe = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if hf.get(k)]
    if moe:
        raise HFFormatError(f"config.json: {moe[0]}={hf[moe[0]]}: Mixture-of-Experts checkpoints are not supported "
                            f"(supported: dense {', '.join(SUPPORTED)})")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // H):
        raise HFFormatError(f"config.json: head_dim={hf['head_dim']} != hidden_size/num_attention_heads={C // H} "
                            "(llm_dist heads are n_embd/n_head wide)")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise HFFormatError(f"config.json: attention_bias=true is not supported for {kind} (llm_dist has no bias "
                            "on the output projection alone; qwen2-style q/k/v biases are)")
    if hf.get("mlp_bias"):
        raise HFFormatError("config.json: mlp_bias=true is not supported (llm_dist's SwiGLU has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"config.json: hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise HFFormatError("config.json: use_sliding_window=true is not supported for qwen2 (its window applies "
                            "to some layers only); supported: full attention")
    types = set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if types:
        raise HFFormatError(f"config.json: layer_types {sorted(types)} are not supported (full/sliding attention only)")


def model_config_from_hf(hf: dict, vocab_multiple: int = 64) -> ModelConfig:
    """The llm_dist ModelConfig equivalent to an HF config.json (gpt2 / llama / mistral / qwen2)."""
    kind = hf.get("model_type")
    try:
        return _model_config_from_hf(hf, kind, vocab_multiple)
    except KeyError as e:
        raise HFFormatError(f"config.json: missing key {e.args[0]!r} (needed for model_type={kind!r})") from None


def _model_config_from_hf(hf: dict, kind: str | None, vocab_multiple: int) -> ModelConfig:
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFFormatError(f"config.json: activation_function={act!r}; only the tanh GELU of GPT-2 is supported")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise HFFormatError(f"config.json: {key}=true is not supported (plain GPT-2 attention only)")
        if hf.get("scale_attn_weights") is False:
            raise HFFormatError("config.json: scale_attn_weights=false is not supported (scores are divided by sqrt(d))")
        return ModelConfig(
            vocab_size=hf["vocab_size"], vocab_multiple=vocab_multiple, block_size=hf["n_positions"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], mlp="gelu",
            mlp_hidden=hf.get("n_inner") or 0, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            pos_emb="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if kind in ("llama", "mistral", "qwen2"):
        _refuse_unsupported(hf, kind)
        C, H = hf["hidden_size"], hf["num_attention_heads"]
        block = hf["max_position_embeddings"]
        # A window as long as the context (or none) is full attention: no windowed layers, no streaming.
        window = (hf.get("sliding_window") or 0) if kind == "mistral" else 0
        window = 0 if window >= block else window
        theta, scaling = _rope(hf)
        return ModelConfig(
            vocab_size=hf["vocab_size"], vocab_multiple=vocab_multiple, block_size=block,
            n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
            mlp="swiglu", mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            pos_emb="rope", rope_theta=theta, rope_scaling=scaling, bias=False, qkv_bias=kind == "qwen2",
            tie_embeddings=hf.get("tie_word_embeddings", False), attn=AttnConfig(window=window),
        )
    raise HFFormatError(f"config.json: model_type={kind!r} is not supported; expected one of {', '.join(SUPPORTED)}")


def _hf_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from HF's half-split RoPE layout to llm_dist's interleaved pairs.
    w: (n_heads*D, C), or a bias (n_heads*D,)."""
    D = w.shape[0] // n_heads
    out = w.reshape(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(n_heads * D, -1)
    return out.reshape(w.shape)


def _pairs_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `_hf_to_pairs`."""
    D = w.shape[0] // n_heads
    out = w.reshape(n_heads, D // 2, 2, -1).transpose(1, 2).reshape(n_heads * D, -1)
    return out.reshape(w.shape)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def _take(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise HFFormatError(f"weights: missing tensor {key!r}")
    return sd.pop(key)


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], hf: dict, cfg: ModelConfig, padded_vocab: int) -> dict:
    """HF tensors -> llm_dist state-dict keys (see transformer.py's docstring for the names)."""
    sd = dict(hf_sd)
    out: dict[str, torch.Tensor] = {}
    if hf["model_type"] == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        C = cfg.n_embd
        out["tok_emb.weight"] = _pad_rows(_take(sd, "wte.weight"), padded_vocab)
        out["pos_emb.weight"] = _take(sd, "wpe.weight")
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            qkv_w, qkv_b = _take(sd, h + "attn.c_attn.weight"), _take(sd, h + "attn.c_attn.bias")  # (C, 3C), (3C,)
            for j, name in enumerate(("wq", "wk", "wv")):
                out[f"{b}attn.{name}.weight"] = qkv_w[:, j * C : (j + 1) * C].t()
                out[f"{b}attn.{name}.bias"] = qkv_b[j * C : (j + 1) * C]
            out[b + "attn.wo.weight"] = _take(sd, h + "attn.c_proj.weight").t()
            out[b + "attn.wo.bias"] = _take(sd, h + "attn.c_proj.bias")
            out[b + "mlp.up.weight"] = _take(sd, h + "mlp.c_fc.weight").t()
            out[b + "mlp.up.bias"] = _take(sd, h + "mlp.c_fc.bias")
            out[b + "mlp.down.weight"] = _take(sd, h + "mlp.c_proj.weight").t()
            out[b + "mlp.down.bias"] = _take(sd, h + "mlp.c_proj.bias")
            for src, dst in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[f"{b}{dst}.weight"] = _take(sd, f"{h}{src}.weight")
                out[f"{b}{dst}.bias"] = _take(sd, f"{h}{src}.bias")
        out["norm_f.weight"], out["norm_f.bias"] = _take(sd, "ln_f.weight"), _take(sd, "ln_f.bias")
        head = sd.pop("lm_head.weight", None)
    else:  # llama / mistral / qwen2
        H, Hkv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        out["tok_emb.weight"] = _pad_rows(_take(sd, "model.embed_tokens.weight"), padded_vocab)
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[b + "attn.wq.weight"] = _hf_to_pairs(_take(sd, h + "self_attn.q_proj.weight"), H)
            out[b + "attn.wk.weight"] = _hf_to_pairs(_take(sd, h + "self_attn.k_proj.weight"), Hkv)
            out[b + "attn.wv.weight"] = _take(sd, h + "self_attn.v_proj.weight")
            if cfg.qkv_bias:  # qwen2: the q/k biases are rows of the projection, so they are permuted the same way
                out[b + "attn.wq.bias"] = _hf_to_pairs(_take(sd, h + "self_attn.q_proj.bias"), H)
                out[b + "attn.wk.bias"] = _hf_to_pairs(_take(sd, h + "self_attn.k_proj.bias"), Hkv)
                out[b + "attn.wv.bias"] = _take(sd, h + "self_attn.v_proj.bias")
            out[b + "attn.wo.weight"] = _take(sd, h + "self_attn.o_proj.weight")
            for name in ("gate", "up", "down"):
                out[f"{b}mlp.{name}.weight"] = _take(sd, f"{h}mlp.{name}_proj.weight")
            out[b + "attn_norm.weight"] = _take(sd, h + "input_layernorm.weight")
            out[b + "mlp_norm.weight"] = _take(sd, h + "post_attention_layernorm.weight")
        out["norm_f.weight"] = _take(sd, "model.norm.weight")
        head = sd.pop("lm_head.weight", None)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    elif head is None:
        raise HFFormatError("weights: missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    else:
        out["lm_head.weight"] = _pad_rows(head, padded_vocab)
    leftover = [k for k in sd if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))]
    if leftover:
        raise HFFormatError(f"weights: unexpected tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    return out


def load_hf(path: str | Path, device: torch.device | str = "cpu", vocab_multiple: int = 64) -> Transformer:
    """An llm_dist Transformer holding the weights of the HF folder `path` (eval mode, float32)."""
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, vocab_multiple)
    model = build_model(cfg, device)
    sd = state_dict_from_hf(read_hf_weights(path), hf, cfg, model.padded_vocab_size)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing


def hf_architecture(cfg: ModelConfig) -> str:
    """'gpt2', 'llama', 'mistral' or 'qwen2': the HF architecture that expresses this config exactly, else an error."""
    def no(reason: str) -> HFFormatError:
        return HFFormatError(f"model cannot be exported to Hugging Face format: {reason}")

    if cfg.moe.num_experts:
        raise no(f"model.moe.num_experts={cfg.moe.num_experts} (MoE layers have no GPT-2/Llama equivalent)")
    if cfg.norm_position != "pre":
        raise no("model.norm_position=post")
    gpt2 = (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias) == ("learned", "layernorm", "gelu", True)
    llama = (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False)
    if gpt2:
        if cfg.n_kv_head not in (0, cfg.n_head):
            raise no(f"model.n_kv_head={cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
        if cfg.attn.window:
            raise no("model.attn.window with GPT-2 layout")
        if cfg.rope_scaling.type != "none":
            raise no("model.rope_scaling with GPT-2 layout (learned positions)")
        return "gpt2"
    if llama:
        a = cfg.attn
        if a.sinks or (a.pattern and len({k.strip() for k in a.pattern.split(",")}) > 1):
            raise no("model.attn.sinks / mixed local-global patterns have no Llama/Mistral equivalent")
        if cfg.qkv_bias:
            if a.window:
                raise no("model.qkv_bias with model.attn.window (Qwen2's window covers only some layers)")
            return "qwen2"
        return "mistral" if a.window else "llama"
    raise no(f"pos_emb={cfg.pos_emb}, norm={cfg.norm}, mlp={cfg.mlp}, bias={cfg.bias} is neither GPT-2 "
             "(learned, layernorm, gelu, bias) nor Llama (rope, rmsnorm, swiglu, no bias)")


def hf_config(cfg: ModelConfig) -> dict:
    """config.json contents for `transformers` for an exportable config."""
    arch = hf_architecture(cfg)
    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.mlp_hidden or None, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": "float32",
        }
    from llm_dist.model.layers import mlp_hidden_size

    r = cfg.rope_scaling
    rope = {"rope_type": "default" if r.type == "none" else r.type, "rope_theta": cfg.rope_theta}
    if r.type != "none":
        rope["factor"] = r.factor
    if r.type == "llama3":
        rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                    original_max_position_embeddings=r.original_max_position_embeddings)
    class_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    out = {
        "architectures": [class_name], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }
    if r.type != "none":  # transformers 4.x reads the scaling from here (5.x from rope_parameters)
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch == "mistral":
        out["sliding_window"] = cfg.attn.window
    if arch == "qwen2":  # q/k/v biases are implied by the architecture
        del out["attention_bias"], out["mlp_bias"]
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                   layer_types=["full_attention"] * cfg.n_layer)
    return out


def state_dict_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """llm_dist tensors -> HF names and layouts (vocabulary padding cut off; tied head left out)."""
    cfg, V = model.cfg, model.vocab_size
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if hf_architecture(cfg) == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"][:V]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            out[h + "attn.c_attn.weight"] = torch.cat([sd[f"{b}attn.{n}.weight"] for n in ("wq", "wk", "wv")]).t()
            out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{n}.bias"] for n in ("wq", "wk", "wv")])
            out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = sd[b + "attn.wo.weight"].t(), sd[b + "attn.wo.bias"]
            out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = sd[b + "mlp.up.weight"].t(), sd[b + "mlp.up.bias"]
            out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = sd[b + "mlp.down.weight"].t(), sd[b + "mlp.down.bias"]
            for dst, src in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[f"{h}{dst}.weight"], out[f"{h}{dst}.bias"] = sd[f"{b}{src}.weight"], sd[f"{b}{src}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
    else:
        H, Hkv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"][:V]
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            out[h + "self_attn.q_proj.weight"] = _pairs_to_hf(sd[b + "attn.wq.weight"], H)
            out[h + "self_attn.k_proj.weight"] = _pairs_to_hf(sd[b + "attn.wk.weight"], Hkv)
            out[h + "self_attn.v_proj.weight"] = sd[b + "attn.wv.weight"]
            if cfg.qkv_bias:
                out[h + "self_attn.q_proj.bias"] = _pairs_to_hf(sd[b + "attn.wq.bias"], H)
                out[h + "self_attn.k_proj.bias"] = _pairs_to_hf(sd[b + "attn.wk.bias"], Hkv)
                out[h + "self_attn.v_proj.bias"] = sd[b + "attn.wv.bias"]
            out[h + "self_attn.o_proj.weight"] = sd[b + "attn.wo.weight"]
            for name in ("gate", "up", "down"):
                out[f"{h}mlp.{name}_proj.weight"] = sd[f"{b}mlp.{name}.weight"]
            out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[b + "mlp_norm.weight"]
        out["model.norm.weight"] = sd["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.contiguous().clone() for k, v in out.items()}  # safetensors refuses shared/strided storage


def save_hf(model: Transformer, path: str | Path, max_shard_bytes: int = 0,
            dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + model.safetensors (or shards + index when over `max_shard_bytes` > 0) to `path`,
    the weights cast to `dtype` (config.json's "dtype" says which)."""
    folder = Path(path)
    config = hf_config(model.cfg)
    tensors = {k: v.to(dtype) for k, v in state_dict_to_hf(model).items()}
    config["dtype"] = str(dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
