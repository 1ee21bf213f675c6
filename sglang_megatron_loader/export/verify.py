"""Megatron-free reference checks on CPU: the checkpoint, read through this package into the
transformers model of its architecture (Llama, Qwen2, Qwen3), must reproduce recorded Megatron
logits or an independent forward pass over the SGLang-layout (fused) weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_megatron_loader.engine import execute_plan
from sglang_megatron_loader.errors import UnsupportedCheckpointError
from sglang_megatron_loader.export.stream import HfStream

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}


@dataclass(frozen=True)
class PromptCheck:
    prompt: list[int]
    max_abs_diff: float
    argmax_equal: bool


def hf_model(stream: HfStream) -> torch.nn.Module:
    """The transformers model of the checkpoint's architecture, in fp32, holding its weights."""
    from transformers import AutoModelForCausalLM

    config = stream.config.__class__.from_dict(stream.config.to_dict())
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {spec.name: t.float() for spec, t in stream.tensors()}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model


def fused_forward(stream: HfStream, prompt: list[int]) -> torch.Tensor:
    """Last-position logits from a plain-torch Llama over SGLang's fused TP=1 parameters (with
    the qkv bias of Qwen2 and the per-head q/k norms of Qwen3 when the model has them)."""
    d, p = stream.dims, _fused_params(stream)
    x = p["model.embed_tokens.weight"][torch.tensor(prompt)]
    n, qd, kvd = len(prompt), d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    cos, sin = _rope(n, d.head_dim, stream.config.rope_parameters)
    mask = torch.full((n, n), float("-inf")).triu(1)
    eps = stream.config.rms_norm_eps
    for i in range(d.num_layers):
        pre = f"model.layers.{i}."
        h = _rms(x, p[pre + "input_layernorm.weight"], eps)
        qkv = h @ p[pre + "self_attn.qkv_proj.weight"].T + p.get(pre + "self_attn.qkv_proj.bias", 0)
        q, k, v = qkv.split([qd, kvd, kvd], dim=-1)
        q, k = q.view(n, d.num_heads, -1), k.view(n, d.num_kv_heads, -1)
        if pre + "self_attn.q_norm.weight" in p:
            q = _rms(q, p[pre + "self_attn.q_norm.weight"], eps)
            k = _rms(k, p[pre + "self_attn.k_norm.weight"], eps)
        q = _rot(q, cos, sin).transpose(0, 1)
        k = _rot(k, cos, sin).transpose(0, 1)
        v = v.view(n, d.num_kv_heads, -1).transpose(0, 1)
        rep = d.num_heads // d.num_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / d.head_dim**0.5 + mask, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(n, qd) @ p[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, p[pre + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ p[pre + "mlp.gate_up_proj.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
    x = _rms(x, p["model.norm.weight"], eps)
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])
    return (x[-1] @ head.T)[: d.vocab_size]


def _fused_params(stream: HfStream) -> dict[str, torch.Tensor]:
    out = {p.name: torch.zeros(p.shape, dtype=torch.float32) for p in stream.plan.params}
    execute_plan(stream.ckpt, stream.plan, lambda p: out[p.name], progress=False)
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(n: int, dim: int, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if params.get("rope_type") == "llama3":
        inv = _llama3_scaling(inv, params)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def _llama3_scaling(inv: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama-3.x frequency scaling as Megatron's ``RotaryEmbedding._apply_scaling`` writes it:
    long wavelengths divided by the factor, short ones kept, a smooth blend in between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen < context / high, inv, blended)


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def verify(
    stream: HfStream, reference: Path | None = None, prompts: list[list[int]] | None = None
) -> tuple[list[PromptCheck], float]:
    """Compare transformers' last-position logits with the reference; returns checks and tol."""
    if stream.dims.num_experts:
        raise UnsupportedCheckpointError(
            f"{stream.ckpt.source}: verify does not cover mixture-of-experts models yet; export "
            "it (sglang-megatron export) and load the folder with transformers' from_pretrained"
        )
    recorded = None
    if reference is not None:
        recorded = torch.load(reference, weights_only=True)
        prompts = [list(p) for p in recorded["prompts"]]
    if not prompts:
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, stream.dims.vocab_size, (n,), generator=gen).tolist()
            for n in (5, 9, 13)
        ]
    model = hf_model(stream)
    ckpt_dtype = stream.ckpt.tensors["embedding.word_embeddings.weight"].dtype
    tol = TOLERANCE[ckpt_dtype] if recorded is not None else 1e-4
    checks = []
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            got = model(torch.tensor([prompt])).logits[0, -1, : stream.dims.vocab_size]
            if recorded is not None:
                want = recorded["last_logits"][i].float()[: stream.dims.vocab_size]
            else:
                want = fused_forward(stream, prompt)
        diff = float((got - want).abs().max())
        checks.append(PromptCheck(prompt, diff, int(got.argmax()) == int(want.argmax())))
    return checks, tol
