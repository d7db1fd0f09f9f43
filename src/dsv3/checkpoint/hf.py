"""HF-format checkpoints in and out: config.json plus (sharded) safetensors, as DeepSeek publishes them.

Loading streams tensor by tensor into a model built on the meta device and materialised once in the
target dtype (`to_empty`), so the weights exist in memory once. FP8 weights (float8_e4m3fn with a
float32 `weight_scale_inv` per 128x128 block) are dequantised on the CPU as they are read. Before any
weight is read, every name, shape and dtype is checked against the model from the headers alone:
an unexpected tensor, a missing one or a wrong shape fails with a ValueError naming the tensor.
Tensors holding NaN or Inf are named in a warning as they load (a corrupted export or a diverged run).

transformers' DeepseekV3 has no MTP module, so the checkpoints it writes lack the MTP layer
(model.layers.{num_hidden_layers + k}): those load with the MTP modules freshly initialised and a
warning. DeepSeek's checkpoints store a copy of the embedding and the head with every MTP module;
dsv3 shares them, so on load the copies are compared with the main tensors (a warning if they differ)
and on save they are written out again.

Saving writes the published layout: per-expert tensor names, bf16 (or the requested dtype), the balance
bias in fp32, and with fp8=True the attention / MLP / expert projections as E4M3 + weight_scale_inv
(embedding, head, norms, router gate and eh_proj stay high precision). The directory appears atomically.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv3.checkpoint.names import FP8_WEIGHT, SCALE_SUFFIX, Target, dsv3_to_hf, hf_to_dsv3, mtp_copy_names
from dsv3.checkpoint.safetensors_io import (
    FLOAT_DTYPES,
    INDEX_NAME,
    ShardReader,
    ShardWriter,
    TensorInfo,
    atomic_dir,
    checkpoint_tensors,
    parse_size,
)
from dsv3.config import ModelConfig
from dsv3.fp8.quant import BLOCK, dequantize_blocks, quantize_blocks
from dsv3.model import Gate, Transformer
from dsv3.model.rope import rope_inv_freq

SAVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


# ------------------------------------------------------------------------------------------------ config
def resolve_model_dir(path: str | Path) -> Path:
    """An HF model directory, or a run directory whose model/ is one."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise ValueError(
        f"{p} is neither an HF model directory (config.json) nor a run directory with model/config.json"
    )


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object")
    mt = d.get("model_type")
    if mt is not None and mt not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {mt!r} is not supported (expected one of {MODEL_TYPES})")
    return d


def _fp8_block(d: dict[str, Any]) -> int:
    qc = d.get("quantization_config") or {}
    bs = qc.get("weight_block_size", [BLOCK, BLOCK])
    if not (isinstance(bs, list) and len(bs) == 2 and bs[0] == bs[1] and int(bs[0]) > 0):
        raise ValueError(f"quantization_config.weight_block_size {bs!r}: only square blocks are supported")
    return int(bs[0])


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class LoadPlan:
    """What to read into which parameter, checked against the model before any weight is read."""

    loads: list[tuple[str, TensorInfo, Target]] = field(default_factory=list)
    copies: list[tuple[str, TensorInfo, Target]] = field(default_factory=list)
    mtp_missing: bool = False


def _expected(model: Transformer) -> dict[str, torch.Tensor]:
    sd = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings:
        sd.pop("head.weight", None)
    return sd


def plan_load(tensors: dict[str, TensorInfo], model: Transformer, block: int = BLOCK) -> LoadPlan:
    """Match checkpoint tensors to the model's (shapes from headers); ValueError naming any mismatch."""
    config = model.config
    L = config.num_hidden_layers
    expected = _expected(model)
    plan = LoadPlan()
    rows: dict[str, set[int]] = defaultdict(set)
    covered: set[str] = set()
    for name, info in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            base = name[: -len(SCALE_SUFFIX)]
            if base not in tensors:
                raise ValueError(f"unexpected tensor {name!r}: the checkpoint has no weight {base!r} for it")
            if tensors[base].dtype != "F8_E4M3":
                raise ValueError(f"unexpected tensor {name!r}: {base!r} is {tensors[base].dtype}, not FP8")
            continue
        target = hf_to_dsv3(name, L)
        if config.tie_word_embeddings and target is not None and target.name == "head.weight":
            target = Target("embed.weight", copy=True)  # the head is the embedding: its copies are checked
        if target is None or target.name not in expected:
            raise ValueError(
                f"unexpected tensor {name!r} in {info.file.name}: the model described by config.json has no "
                "parameter for it"
            )
        dest = expected[target.name]
        want = tuple(dest.shape)
        if target.expert is not None:
            if target.expert >= dest.shape[0]:
                raise ValueError(
                    f"unexpected tensor {name!r}: expert {target.expert} >= n_routed_experts={want[0]}"
                )
            want = want[1:]
        if info.shape != want:
            raise ValueError(
                f"tensor {name!r} has shape {list(info.shape)}, expected {list(want)} (dsv3 {target.name})"
            )
        if info.dtype not in FLOAT_DTYPES or info.dtype == "F8_E5M2":
            raise ValueError(f"tensor {name!r} has unsupported dtype {info.dtype}")
        if info.dtype == "F8_E4M3":
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
            nb = tuple(-(-s // block) for s in info.shape)
            if len(info.shape) != 2 or scale.shape != nb:
                raise ValueError(
                    f"tensor {name + SCALE_SUFFIX!r} has shape {list(scale.shape)}, expected {list(nb)}"
                )
        if target.copy:
            plan.copies.append((name, info, target))
            continue
        plan.loads.append((name, info, target))
        if target.expert is None:
            covered.add(target.name)
        else:
            rows[target.name].add(target.expert)
    for n, r in rows.items():
        if len(r) == expected[n].shape[0]:
            covered.add(n)
    missing = [n for n in expected if n not in covered]
    mtp_missing = [n for n in missing if n.startswith("mtp.")]
    if len(mtp_missing) < len(missing) or (
        mtp_missing and any(t.name.startswith("mtp.") for _, _, t in plan.loads)
    ):
        n_experts = config.n_routed_experts or 0
        hf_missing = [
            h for n in missing for h, _ in dsv3_to_hf(n, L, n_experts) if h not in tensors
        ] or missing
        more = f" (and {len(hf_missing) - 1} more)" if len(hf_missing) > 1 else ""
        raise ValueError(f"checkpoint is missing tensor {hf_missing[0]!r}{more}")
    plan.mtp_missing = bool(mtp_missing)
    return plan


# ------------------------------------------------------------------------------------------------ load
def _meta_model(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The model on the meta device in `dtype` (balance biases stay fp32): no memory yet."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype=dtype)
    for mod in model.modules():
        if isinstance(mod, Gate) and mod.e_score_correction_bias is not None:
            mod.e_score_correction_bias = mod.e_score_correction_bias.float()
    return model


def _materialise(model: Transformer, device: torch.device | str) -> None:
    model.to_empty(device=device)  # uninitialised storage, filled by the loader
    model.inv_freq = rope_inv_freq(model.config)[0].to(device)  # non-persistent, fp32
    if model.config.tie_word_embeddings:
        model.head.weight = model.embed.weight


@torch.no_grad()
def _init_fresh(module: nn.Module, std: float) -> None:
    """Transformer.init_weights's rule for a submodule: N(0, std) matrices, ones for norms, zero biases."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


def _read(
    reader: ShardReader, name: str, info: TensorInfo, tensors: dict[str, TensorInfo], block: int
) -> torch.Tensor:
    t = reader.get(name, info)
    if info.dtype == "F8_E4M3":
        scale_name = name + SCALE_SUFFIX
        t = dequantize_blocks(t, reader.get(scale_name, tensors[scale_name]), block=block)
    return t


@torch.no_grad()
def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Transformer:
    """Load an HF DeepSeek-V3/V2-format directory (or a run directory's model/) into a dsv3 Transformer."""
    model_dir = resolve_model_dir(path)
    hf_config = read_hf_config(model_dir)
    config = ModelConfig.from_hf(hf_config)
    block = _fp8_block(hf_config)
    tensors = checkpoint_tensors(model_dir)
    model = _meta_model(config, dtype)
    plan = plan_load(tensors, model, block)
    _materialise(model, device)
    expected = _expected(model)
    by_file: dict[Path, list[tuple[str, TensorInfo, Target]]] = defaultdict(list)
    for item in plan.loads:
        by_file[item[1].file].append(item)
    nonfinite: list[str] = []
    for items in by_file.values():
        with ShardReader() as reader:  # one shard open at a time (plus a scale's shard, rarely)
            for name, info, target in items:
                t = _read(reader, name, info, tensors, block)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    nonfinite.append(f"{name} ({bad} of {t.numel()} values)")
                dest = (
                    expected[target.name] if target.expert is None else expected[target.name][target.expert]
                )
                dest.copy_(t)
    if nonfinite:
        more = len(nonfinite) - 10
        shown = ", ".join(nonfinite[:10]) + (f" and {more} more" if more > 0 else "")
        warnings.warn(
            f"{model_dir} holds non-finite weights (NaN/Inf) in {len(nonfinite)} tensor(s): {shown}; "
            "the model's outputs will not be finite",
            stacklevel=3,  # past the no_grad wrapper, at the caller
        )
    if plan.mtp_missing:
        _init_fresh(model.mtp, config.initializer_range)
        warnings.warn(
            f"{model_dir} has no MTP tensors (model.layers.{config.num_hidden_layers}.*; transformers "
            f"does not write them): the {config.num_nextn_predict_layers} MTP module(s) are "
            "freshly initialised",
            stacklevel=3,  # past the no_grad wrapper, at the caller
        )
    with ShardReader() as reader:
        for name, info, target in plan.copies:
            t = _read(reader, name, info, tensors, block).to(expected[target.name].dtype)
            if not torch.equal(t.to(expected[target.name].device), expected[target.name]):
                warnings.warn(
                    f"{name!r} differs from the main model's {target.name}: dsv3 shares one {target.name} "
                    "between the main model and MTP, and uses the main model's",
                    stacklevel=3,  # past the no_grad wrapper, at the caller
                )
    return model.eval()


# ------------------------------------------------------------------------------------------------ save
def _rope_perm(rope_dim: int) -> torch.Tensor:
    """rotate_half layout -> interleaved layout: new[2i]=old[i], new[2i+1]=old[i+R/2]."""
    idx = torch.arange(rope_dim // 2)
    return torch.stack([idx, idx + rope_dim // 2], dim=1).flatten()


def _to_interleaved(name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Permute the rope rows of wq / wq_b (per head) and wkv_a: interleaved rope gives the same scores."""
    R, Dn = config.qk_rope_head_dim, config.qk_nope_head_dim
    perm = _rope_perm(R).to(w.device)
    if re.search(r"attn\.(wq|wq_b)\.weight$", name):
        v = w.reshape(config.num_attention_heads, Dn + R, -1).clone()
        v[:, Dn:] = v[:, Dn:][:, perm]
        return v.reshape(w.shape)
    if name.endswith("attn.wkv_a.weight"):
        C = config.kv_lora_rank
        return torch.cat([w[:C], w[C:][perm]])
    return w


def _encode(
    hf_name: str, w: torch.Tensor, dtype: torch.dtype, fp8: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor as stored: fp32 balance bias, FP8 + scale_inv projections when fp8, else `dtype`."""
    if hf_name.endswith("e_score_correction_bias"):
        yield hf_name, w.to(device="cpu", dtype=torch.float32, copy=True)
    elif fp8 and FP8_WEIGHT.fullmatch(hf_name):
        q, scale_inv = quantize_blocks(w.to(device="cpu"), what=f"checkpoint tensor {hf_name!r}")
        yield hf_name, q
        yield hf_name + SCALE_SUFFIX, scale_inv
    else:
        yield hf_name, w.to(device="cpu", dtype=dtype, copy=True)


def _export(
    model: Transformer, dtype: torch.dtype, fp8: bool, interleave: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    L, E = config.num_hidden_layers, config.n_routed_experts or 0
    sd = model.state_dict()
    for name, t in sd.items():
        if config.tie_word_embeddings and name == "head.weight":
            continue
        if interleave:
            t = _to_interleaved(name, t, config)
        for hf_name, e in dsv3_to_hf(name, L, E):
            yield from _encode(hf_name, t if e is None else t[e], dtype, fp8)
    for k in range(len(model.mtp)):  # DeepSeek's layout: each MTP module carries the embedding and head
        for hf_name, shared in mtp_copy_names(L, k).items():
            yield from _encode(hf_name, sd[shared], dtype, False)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_save_dtype(dtype: torch.dtype) -> None:
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {[_dtype_name(d) for d in SAVE_DTYPES]}, got {dtype}")


@torch.no_grad()
def save_pretrained(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `model` as an HF DeepSeek-V3 directory (config.json, safetensors shards + index) atomically.

    fp8=True stores attention/MLP/expert projections as float8_e4m3fn with 128x128 `weight_scale_inv`.
    A softmax-scored (V2-style) model is written as model_type deepseek_v2, whose rope layout is always
    interleaved: with rope_interleave=False its rope rows are permuted so that scores are unchanged."""
    if not isinstance(model, Transformer):
        raise ValueError(f"save_pretrained expects a dsv3 Transformer, got {type(model).__name__}")
    _check_save_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    hf_config = model.config.to_hf()
    interleave = hf_config["model_type"] == "deepseek_v2" and not model.config.rope_interleave
    if interleave:
        hf_config["rope_interleave"] = True
    hf_config["torch_dtype"] = _dtype_name(dtype)
    if fp8:
        hf_config["quantization_config"] = dict(FP8_QUANT_CONFIG)
    with atomic_dir(path) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for hf_name, t in _export(model, dtype, fp8, interleave):
            writer.add(hf_name, t)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)


@torch.no_grad()
def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Re-encode an HF checkpoint tensor by tensor (never a whole model in memory): dequantise FP8, cast to
    `dtype`, optionally requantise to FP8 blocks. Names are checked against the config first."""
    _check_save_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    src_dir = resolve_model_dir(src)
    if Path(dst).resolve() == src_dir.resolve():
        raise ValueError("output directory must differ from the input")
    hf_config = read_hf_config(src_dir)
    block = _fp8_block(hf_config)
    tensors = checkpoint_tensors(src_dir)
    plan_load(tensors, _meta_model(ModelConfig.from_hf(hf_config), torch.float32), block)
    hf_config["torch_dtype"] = _dtype_name(dtype)
    hf_config.pop("dtype", None)
    hf_config.pop("quantization_config", None)
    if fp8:
        hf_config["quantization_config"] = dict(FP8_QUANT_CONFIG)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, info in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            by_file[info.file].append(name)
    with atomic_dir(dst) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for names in by_file.values():
            with ShardReader() as reader:
                for name in names:
                    t = _read(reader, name, tensors[name], tensors, block)
                    for out_name, out in _encode(name, t, dtype, fp8):
                        writer.add(out_name, out)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for f in src_dir.iterdir():
            skip = f.name.endswith(".safetensors") or f.name in (INDEX_NAME, "config.json")
            if f.is_file() and not skip:
                (tmp / f.name).write_bytes(f.read_bytes())
    return Path(dst)
