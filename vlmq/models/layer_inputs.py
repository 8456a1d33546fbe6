"""Everything needed to run one decoder layer of a VLM's language backbone standalone.

A :class:`LayerInputs` is captured once per calibration batch (by
:meth:`vlmq.models.ModelAdapter.prepare_inputs`) at the entry of decoder layer 0 and then
replayed through every layer: the *static* context (attention mask, rotary position embeddings,
position ids, extra layer kwargs) is the same for all layers of the backbone, only the hidden
states change from layer to layer. It is a plain bag of tensors, so it can be moved between
devices and cached to disk (``save`` / ``load``, safetensors) to replay layer inputs later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_FORMAT = "vlmq.layer_inputs.v1"
_KW_PREFIX = "layer_kwargs."


@dataclass
class LayerInputs:
    """Inputs of one decoder layer, as the model's own forward feeds them (no KV cache).

    Attributes:
        hidden_states: ``[B, T, D]`` input embeddings of the backbone with the image features
            merged in, i.e. exactly what the model feeds to decoder layer 0.
        position_embeddings: ``(cos, sin)``, each ``[B, T, head_dim]``, from the backbone's rotary
            embedding (for Qwen2-VL / Qwen2.5-VL already recomposed from the 3D M-RoPE sections).
        attention_mask: the mask in the form the decoder layer's attention implementation
            expects, always materialised: ``sdpa`` -> bool ``[B, 1, T, T]`` (True = attend);
            ``eager`` -> additive float ``[B, 1, T, T]`` (0 or dtype-min). Causal + padding.
            ``None`` only for attention implementations that take no dense mask (flash).
        position_ids: the position ids the rotary embedding consumed: ``[3, B, T]`` M-RoPE
            (temporal, height, width) ids for Qwen2-VL / Qwen2.5-VL, ``[B, T]`` for 1D RoPE.
            Informational (the layer uses ``position_embeddings``); kept for analysis/replay.
        token_mask: ``[B, T]`` bool, True for real tokens, False for padding. Statistics
            (Hessians, saliency) should only accumulate over ``token_mask`` positions.
        input_ids: ``[B, T]`` token ids (to derive token labels later), or None.
        layer_kwargs: additional keyword tensors the decoder layer is called with (for example
            ``position_ids`` for the Qwen2 backbone of LLaVA-OneVision). Cache-free: no
            ``past_key_values`` / ``use_cache``.
    """

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    token_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    layer_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden_states.shape[1])

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.token_mask.sum())

    def replace(self, **changes: object) -> LayerInputs:
        """A copy with some fields replaced (e.g. ``hidden_states`` of the next layer)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerInputs:
        """Move to ``device``; cast floating-point tensors (hidden states, cos/sin, an additive
        float mask) to ``dtype``. Integer and bool tensors keep their dtype."""

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        cos, sin = self.position_embeddings
        return LayerInputs(
            hidden_states=conv(self.hidden_states),
            position_embeddings=(conv(cos), conv(sin)),
            attention_mask=conv(self.attention_mask),
            position_ids=conv(self.position_ids),
            token_mask=conv(self.token_mask),
            input_ids=conv(self.input_ids),
            layer_kwargs={k: conv(v) for k, v in self.layer_kwargs.items()},
        )

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``name -> tensor`` dict (absent optional fields are left out)."""
        cos, sin = self.position_embeddings
        out: dict[str, torch.Tensor] = {
            "hidden_states": self.hidden_states,
            "cos": cos,
            "sin": sin,
            "token_mask": self.token_mask,
        }
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.input_ids is not None:
            out["input_ids"] = self.input_ids
        for k, v in self.layer_kwargs.items():
            out[_KW_PREFIX + k] = v
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> LayerInputs:
        """Inverse of :meth:`state_dict`."""
        return cls(
            hidden_states=tensors["hidden_states"],
            position_embeddings=(tensors["cos"], tensors["sin"]),
            attention_mask=tensors.get("attention_mask"),
            position_ids=tensors.get("position_ids"),
            token_mask=tensors["token_mask"],
            input_ids=tensors.get("input_ids"),
            layer_kwargs={k[len(_KW_PREFIX):]: v for k, v in tensors.items() if k.startswith(_KW_PREFIX)},
        )

    def save(self, path: str | Path) -> None:
        """Write to a ``.safetensors`` file (tensors made contiguous, moved to CPU)."""
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu").contiguous()
            if v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            tensors[k] = v
        save_file(tensors, str(path), metadata={"format": _FORMAT, "keys": json.dumps(sorted(tensors))})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> LayerInputs:
        """Read a file written by :meth:`save`."""
        return cls.from_state_dict(load_file(str(path), device=str(device)))
