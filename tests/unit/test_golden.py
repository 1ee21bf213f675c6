"""Golden copies: committed checkpoints written by older megatron-core releases (0.14 to 0.19)
and by a newer torch than the venv's (``torch_2.15``: DCP metadata torch 2.14 cannot unpickle).

Each copy (``tests/fixtures/golden/{mcore,torch}_<version>/<variant>/``, see its README) is read by
package without megatron, planned and loaded at serving TP1 and for both ranks of TP2, and a
plain-torch Llama forward over the loaded parameters (TP2: each rank's heads and ffn columns,
partial sums added, vocab-parallel logits concatenated, as SGLang computes) must reproduce the
logits Megatron's own ``GPTModel`` forward recorded when the copy was written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sglang_megatron_loader.checkpoint import MegatronCheckpoint
from sglang_megatron_loader.cli import main as cli
from sglang_megatron_loader.engine import execute_plan
from sglang_megatron_loader.export.stream import HfStream
from sglang_megatron_loader.inspect_ckpt import writer_version
from sglang_megatron_loader.models.llama import LLAMA
from sglang_megatron_loader.models.rules import Tp
from sglang_megatron_loader.planner import plan_rank

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden"
COPIES = sorted(
    p.parent
    for pattern in ("mcore_*", "torch_*")
    for p in GOLDEN.glob(f"{pattern}/*/latest_checkpointed_iteration.txt")
)
# Megatron's forward ran in the checkpoint dtype; ours runs in fp32 over the same weights.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}


@dataclass(frozen=True)
class Layout:
    """What each release writes, as observed in the golden copies."""

    metadata_json_fields: int
    common_pt: bool
    files_per_rank: int
    mcore_globals: tuple[bytes, ...]  # megatron classes pickled into .metadata
    writer: str  # what ``inspect`` names as the writer


FORMATS = {
    "0.14": Layout(4, True, 2, (b"MCoreSavePlan",), "megatron-core <= 0.14"),
    "0.15": Layout(4, True, 2, (b"MCoreMetadata", b"MCoreSavePlan"), "megatron-core 0.15"),
    "0.16": Layout(4, True, 2, (), "megatron-core 0.16 to 0.18"),
    "0.18": Layout(4, True, 1, (), "megatron-core 0.16 to 0.18"),
    "0.19": Layout(2, False, 1, (), "megatron-core >= 0.19"),
    # megatron-core 0.19.2 under torch 2.15: TensorProperties pickles a sixth value, strides
    "torch 2.15": Layout(
        2,
        False,
        1,
        (),
        "megatron-core >= 0.19 (common state inside the DCP), DCP metadata of torch >= 2.15",
    ),
}


def _id(root: Path) -> str:
    return f"{root.parent.name}/{root.name}"


def _release(root: Path) -> str:
    """``FORMATS`` key: the megatron-core release, or ``torch X.Y`` for a newer-torch copy."""
    kind, version = root.parent.name.split("_", 1)
    release = ".".join(version.split(".")[:2])
    return release if kind == "mcore" else f"{kind} {release}"


def _reference(root: Path) -> dict:
    return torch.load(f"{root}.reference.pt", weights_only=True)


def test_every_release_has_a_golden_copy_and_layouts_are_covered() -> None:
    assert {_release(r) for r in COPIES} == set(FORMATS)
    names = {r.name for r in COPIES}
    assert any("tp2" in n for n in names) and any("pp2" in n for n in names)
    assert any(n.startswith("bf16") for n in names) and any(n.startswith("fp32") for n in names)
    # megatron-core releases + torch 2.15 ~3.1 MB, Megatron-Bridge saves with their source HF
    # models ~2.5 MB: the whole golden tree stays small enough to commit
    size = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    assert size < 6_500_000, size


@pytest.mark.parametrize("root", COPIES, ids=_id)
def test_reader_parses_each_release_layout(root: Path) -> None:
    want = FORMATS[_release(root)]
    iter_dir = root / "iter_0000010"
    meta_json = json.loads((iter_dir / "metadata.json").read_text())
    assert len(meta_json) == want.metadata_json_fields
    assert (iter_dir / "common.pt").is_file() == want.common_pt
    raw = (iter_dir / ".metadata").read_bytes()
    for name in (b"MCoreMetadata", b"MCoreSavePlan"):
        assert (name in raw) == (name in want.mcore_globals), name
    ref = _reference(root)
    with MegatronCheckpoint(root) as ckpt:
        ranks = ckpt.args.tensor_model_parallel_size * ckpt.args.pipeline_model_parallel_size
        assert len(list(iter_dir.glob("*.distcp"))) == ranks * want.files_per_rank
        assert ckpt.location.format == "torch_dist" and ckpt.common["iteration"] == 10
        assert want.writer in writer_version(ckpt)
        assert ckpt.args.num_layers == 2 and ckpt.args.num_query_groups == 2
        kind, version = root.parent.name.split("_", 1)
        recorded = ref["megatron_core_version" if kind == "mcore" else "torch_version"]
        assert recorded.startswith(version), (recorded, version)
        model = [k for k in ckpt.tensors if not LLAMA.is_ignored(k)]
        assert len(model) == 9  # embedding, 6 stacked layer tensors, final norm, output layer


def test_every_release_and_layout_reads_to_the_same_weights() -> None:
    """All copies were made from one seed: whatever release and layout saved them, the tensors
    read (HF names, TP1) are bit-identical per dtype, and so are Megatron's recorded logits."""
    first: dict[torch.dtype, tuple[Path, dict[str, torch.Tensor], dict]] = {}
    for root in COPIES:
        with MegatronCheckpoint(root) as ckpt:
            tensors = {spec.name: t.clone() for spec, t in HfStream(ckpt).tensors()}
        ref, dtype = _reference(root), tensors["model.norm.weight"].dtype
        base, base_tensors, base_ref = first.setdefault(dtype, (root, tensors, ref))
        assert tensors.keys() == base_tensors.keys()
        for name, t in tensors.items():
            assert torch.equal(t, base_tensors[name]), (_id(root), _id(base), name)
        for a, b in zip(ref["last_logits"], base_ref["last_logits"], strict=True):
            assert torch.equal(a, b), (_id(root), _id(base))
    assert set(first) == {torch.float32, torch.bfloat16}


def _load(root: Path, tp: int) -> tuple[HfStream, list[dict[str, torch.Tensor]], dict]:
    """Plan and execute every rank of ``tp`` into fp32 tensors; also bytes read per rank."""
    ckpt = MegatronCheckpoint(root)
    stream = HfStream(ckpt)
    shards, stats = [], {"read": [], "planned": []}
    for r in range(tp):
        plan = plan_rank(LLAMA, stream.dims, ckpt.tensors, Tp(r, tp))
        out = {p.name: torch.full(p.shape, float("nan")) for p in plan.params}
        report = execute_plan(ckpt, plan, lambda p, o=out: o[p.name], progress=False)
        stats["read"].append(report.bytes_read)
        stats["planned"].append(plan.bytes_to_read(ckpt.tensors))
        assert not any(t.isnan().any() for t in out.values())
        shards.append(out)
    ckpt.close()
    return stream, shards, stats


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Non-interleaved RoPE over the full head dim; ``x`` is ``[seq, heads, head_dim]``."""
    n, dim = x.shape[0], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv).repeat(1, 2)[:, None]
    a, b = x.chunk(2, dim=-1)
    return x * ang.cos() + torch.cat([-b, a], dim=-1) * ang.sin()


def _attention(h: torch.Tensor, p: dict, pre: str, heads: int, hd: int, base: float):
    """One rank's attention output before the all-reduce (its heads, its o_proj columns)."""
    n = h.shape[0]
    qkv = h @ p[pre + "self_attn.qkv_proj.weight"].T
    kv = (qkv.shape[1] // hd - heads) // 2
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    q = _rotate(q.view(n, heads, hd), base).transpose(0, 1)
    k = _rotate(k.view(n, kv, hd), base).transpose(0, 1).repeat_interleave(heads // kv, 0)
    v = v.view(n, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, 0)
    mask = torch.full((n, n), float("-inf")).triu(1)
    att = torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + mask, dim=-1) @ v
    return att.transpose(0, 1).reshape(n, heads * hd) @ p[pre + "self_attn.o_proj.weight"].T


def tp_forward(stream: HfStream, shards: list[dict[str, torch.Tensor]], prompt: list[int]):
    """Last-position logits computed the way TP ranks do: partial sums over ``shards``."""
    d, args = stream.dims, stream.ckpt.args
    eps, base, heads = args.norm_epsilon, float(args.rotary_base), d.num_heads // len(shards)
    x = torch.cat([s["model.embed_tokens.weight"] for s in shards])[torch.tensor(prompt)]
    for i in range(d.num_layers):
        pre = f"model.layers.{i}."
        h = _rms(x, shards[0][pre + "input_layernorm.weight"], eps)
        x = x + sum(_attention(h, s, pre, heads, d.head_dim, base) for s in shards)
        h = _rms(x, shards[0][pre + "post_attention_layernorm.weight"], eps)
        for s in shards:
            gate, up = (h @ s[pre + "mlp.gate_up_proj.weight"].T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ s[pre + "mlp.down_proj.weight"].T
    x = _rms(x[-1], shards[0]["model.norm.weight"], eps)
    head = "model.embed_tokens.weight" if d.tied_embeddings else "lm_head.weight"
    return torch.cat([x @ s[head].T for s in shards])[: d.vocab_size]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("root", COPIES, ids=_id)
def test_loaded_weights_reproduce_megatron_logits(root: Path, tp: int) -> None:
    ref = _reference(root)
    stream, shards, stats = _load(root, tp)
    assert stats["read"] == stats["planned"]  # each rank reads exactly its plan, nothing more
    dtype = stream.ckpt.tensors["embedding.word_embeddings.weight"].dtype
    vocab = ref["variant"]["vocab_size"]
    assert stream.dims.vocab_size == vocab and stream.dims.padded_vocab_size == 256
    worst = 0.0
    for prompt, want in zip(ref["prompts"], ref["last_logits"], strict=True):
        got = tp_forward(stream, shards, prompt)
        worst = max(worst, (got - want[:vocab].float()).abs().max().item())
        assert int(got.argmax()) == int(want[:vocab].argmax())
    assert worst < TOLERANCE[dtype], worst
    print(f"{_id(root)} TP{tp}: max |logit diff| vs Megatron {worst:.3g}, bytes {stats['read']}")


@pytest.mark.parametrize("root", COPIES, ids=_id)
def test_verify_cli_passes_against_recorded_megatron_logits(root: Path, capsys) -> None:
    assert cli(["verify", str(root), "--reference", f"{root}.reference.pt"]) == 0
    assert "FAIL" not in capsys.readouterr().out
