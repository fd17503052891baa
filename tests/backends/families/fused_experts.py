"""A MoE checkpoint rewritten into transformers 5's fused expert layout, for the MoE family tests.

``save_pretrained`` writes the hub's per-expert tensors (``mlp.experts.E.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.E.w1.weight``...), while transformers 5 holds each
layer's experts as two 3-D parameters, which a checkpoint may store as they are:
``mlp.experts.gate_up_proj`` ``[experts, 2 x inner, hidden]`` (every expert's gate rows,
then its up rows) and ``mlp.experts.down_proj`` ``[experts, hidden, inner]``, the router
as ``mlp.gate.weight``.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch

_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
#: Each projection's per-expert names (Qwen3-MoE's, Mixtral's).
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


def write_fused_experts(source: Path, target: Path) -> Path:
    """Copy the checkpoint at ``source`` to ``target`` with its experts stacked as transformers 5's
    3-D tensors and Mixtral's router renamed. Returns ``target``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for name, tensor in load_file(source / "model.safetensors").items():
        match = _EXPERT.match(name)
        if match is None:
            fused[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
        else:
            layer, expert, projection = match.groups()
            experts[layer][projection][int(expert)] = tensor
    for layer, projections in experts.items():
        gate, up, down = ([projections[name] for name in names if name in projections][0] for names in (_GATE, _UP, _DOWN))
        fused[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([gate[e], up[e]]) for e in sorted(gate)])
        fused[f"{layer}.mlp.experts.down_proj"] = torch.stack([down[e] for e in sorted(down)])
    save_file(fused, target / "model.safetensors", metadata={"format": "pt"})
    return target
