"""Per-token segment / modality labels derived from the chat template (VLMQ paper, Eq. 9).

Every supported model (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision-Qwen2) uses the Qwen2 tokenizer
and a ChatML chat template::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>Describe it.<|im_end|>\\n
    <|im_start|>assistant\\nA cat.<|im_end|>\\n

Labelling rule (applied per sequence, left to right):

1. A *turn* starts at a turn-start token (``<|im_start|>``) and runs up to (excluding) the next
   turn-start token or the end of the sequence, so the role word, the newline, ``<|im_end|>``
   and the newline after it all belong to the turn they close.
2. The turn's role (the token(s) right after ``<|im_start|>``) gives the segment of all its
   tokens: ``system`` -> ``"system"``, ``user`` -> ``"instruction"``, ``assistant`` ->
   ``"answer"``; any other role (e.g. ``tool``) -> ``"instruction"``.
3. Tokens before the first turn start (text without a chat template) -> ``"instruction"``.
4. Vision placeholder tokens (``<|image_pad|>`` / ``<|video_pad|>`` for Qwen, ``<image>`` /
   ``<video>`` for LLaVA-OneVision) -> segment ``"image"``, modality ``"vision"``. They are
   exactly the positions the model overwrites with vision-tower features. Everything else
   (including ``<|vision_start|>``/``<|vision_end|>``) has modality ``"text"``.
5. Padding positions (``attention_mask == 0``, when a mask is given) get code ``-1`` for both.

Codes are small integers (``int8``) indexing :data:`SEGMENT_NAMES` / :data:`MODALITY_NAMES`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

SEGMENT_NAMES: tuple[str, ...] = ("system", "image", "instruction", "answer")
MODALITY_NAMES: tuple[str, ...] = ("text", "vision")
PAD_CODE = -1

SYSTEM, IMAGE, INSTRUCTION, ANSWER = range(4)
TEXT, VISION = range(2)

#: Role word of a ChatML turn -> segment code.
ROLE_SEGMENTS: dict[str, int] = {"system": SYSTEM, "user": INSTRUCTION, "assistant": ANSWER}

# Fixed ids of the Qwen2 tokenizer shared by all supported models (used when only a config is
# available): "<|im_start|>" and the single-token role words "system", "user", "assistant".
QWEN2_IM_START_ID = 151644
QWEN2_ROLE_IDS: dict[tuple[int, ...], int] = {(8948,): SYSTEM, (872,): INSTRUCTION, (77091,): ANSWER}

_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<image>", "<video>")


@dataclass(frozen=True)
class ChatTokens:
    """The token ids the labelling rule needs.

    Attributes:
        turn_start_id: id of the turn-start token (``<|im_start|>``); None disables turn
            detection (everything but vision tokens is then ``"instruction"``).
        role_ids: token-id sequence of a role word -> segment code.
        vision_ids: ids of the vision placeholder tokens.
    """

    turn_start_id: int | None
    role_ids: Mapping[tuple[int, ...], int] = field(default_factory=dict)
    vision_ids: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: Any) -> ChatTokens:
        """Qwen2-tokenizer defaults plus the config's image/video token ids."""
        return cls(QWEN2_IM_START_ID, dict(QWEN2_ROLE_IDS), frozenset(_config_vision_ids(config)))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, extra_vision_ids: tuple[int, ...] = ()) -> ChatTokens:
        """Look the markers up in a (fast or slow) tokenizer's vocabulary."""
        unk = getattr(tokenizer, "unk_token_id", None)

        def tid(token: str) -> int | None:
            i = tokenizer.convert_tokens_to_ids(token)
            return None if i is None or i == unk else int(i)

        role_ids: dict[tuple[int, ...], int] = {}
        for role, seg in ROLE_SEGMENTS.items():
            ids = tuple(int(i) for i in tokenizer.encode(role, add_special_tokens=False))
            if ids and unk not in ids:
                role_ids[ids] = seg
        vision = {i for i in map(tid, _VISION_TOKENS) if i is not None} | set(extra_vision_ids)
        return cls(tid("<|im_start|>"), role_ids, frozenset(vision))


def _config_vision_ids(config: Any) -> set[int]:
    ids = set()
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(config, attr, None)
        if value is not None:
            ids.add(int(value))
    return ids


def chat_tokens(source: Any) -> ChatTokens:
    """Build :class:`ChatTokens` from a processor, a tokenizer, a model config or a model."""
    if isinstance(source, ChatTokens):
        return source
    if hasattr(source, "config") and hasattr(source.config, "model_type") and not hasattr(source, "tokenizer"):
        source = source.config  # a model
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is not None:  # a processor
        extra = tuple(
            int(v) for v in (getattr(source, "image_token_id", None), getattr(source, "video_token_id", None))
            if v is not None
        )
        return ChatTokens.from_tokenizer(tokenizer, extra)
    if hasattr(source, "convert_tokens_to_ids"):  # a tokenizer
        return ChatTokens.from_tokenizer(source)
    if hasattr(source, "model_type"):  # a config
        return ChatTokens.from_config(source)
    raise TypeError(f"cannot derive chat-template token ids from {type(source).__name__}")


@dataclass
class TokenLabels:
    """Per-token labels; unpacks as ``segment, modality = labels``.

    Attributes:
        segment: ``[B, T]`` int8 codes into :attr:`segment_names` (-1 = padding).
        modality: ``[B, T]`` int8 codes into :attr:`modality_names` (-1 = padding).
    """

    segment: torch.Tensor
    modality: torch.Tensor
    segment_names: tuple[str, ...] = SEGMENT_NAMES
    modality_names: tuple[str, ...] = MODALITY_NAMES

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.segment
        yield self.modality

    def segment_mask(self, name: str) -> torch.Tensor:
        """Bool ``[B, T]`` mask of the tokens in segment ``name``."""
        return self.segment == self.segment_names.index(name)

    def modality_mask(self, name: str) -> torch.Tensor:
        """Bool ``[B, T]`` mask of the tokens of modality ``name``."""
        return self.modality == self.modality_names.index(name)


def token_labels(
    input_ids: torch.Tensor, source: Any, attention_mask: torch.Tensor | None = None
) -> TokenLabels:
    """Label every token with its segment and modality (see the module docstring for the rule).

    Args:
        input_ids: ``[B, T]`` or ``[T]`` token ids.
        source: a processor, tokenizer, model config, model, or :class:`ChatTokens`.
        attention_mask: optional ``[B, T]`` padding mask; padding gets code -1.
    """
    spec = chat_tokens(source)
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    ids_cpu = ids.detach().to("cpu", torch.long)
    B, T = ids_cpu.shape
    segment = torch.full((B, T), INSTRUCTION, dtype=torch.int8)
    roles = sorted(spec.role_ids.items(), key=lambda kv: -len(kv[0]))  # longest match first

    if spec.turn_start_id is not None:
        for b in range(B):
            row = ids_cpu[b].tolist()
            starts = [t for t, tok in enumerate(row) if tok == spec.turn_start_id]
            for k, start in enumerate(starts):
                end = starts[k + 1] if k + 1 < len(starts) else T
                seg = INSTRUCTION
                for role, code in roles:
                    if tuple(row[start + 1 : start + 1 + len(role)]) == role:
                        seg = code
                        break
                segment[b, start:end] = seg

    vision = torch.isin(ids_cpu, torch.tensor(sorted(spec.vision_ids), dtype=torch.long))
    segment[vision] = IMAGE
    modality = vision.to(torch.int8)
    if attention_mask is not None:
        pad = attention_mask.detach().to("cpu").reshape(B, T) == 0
        segment[pad] = PAD_CODE
        modality[pad] = PAD_CODE
    if squeeze:
        segment, modality = segment[0], modality[0]
    return TokenLabels(segment.to(input_ids.device), modality.to(input_ids.device))
