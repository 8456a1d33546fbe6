"""Tokenizer, chat template and processor of the demo Qwen2-VL.

The tokenizer is a small byte-level BPE trained with the ``tokenizers`` library on the demo
dataset's text (questions, answers, captions, chat scaffolding). Upper-case letters and digits
are always single tokens, so a code such as ``K7B2`` is read out one character per token.
It carries Qwen2-VL's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|image_pad|>``, ``<|vision_end|>``, ...) and is wrapped as a transformers fast tokenizer.

The processor is a stock :class:`~transformers.Qwen2VLProcessor` (Qwen2VLImageProcessor with
min_pixels = max_pixels = image area, so every image keeps its size and a 28-px cell is one merged
vision token) and is saved next to the model, loadable offline with ``AutoProcessor``.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (content rendered in list order, image placeholders where the images
# are), without the default system turn: kept short so that vision tokens dominate a calibration
# sample, as they do in the paper's VLM inputs. A system message given explicitly is rendered the
# Qwen way.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s?(?<![A-Za-z])[A-Z0-9](?![a-z])|\s?(?<=[A-Z0-9])[A-Z0-9](?![a-z])"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={},
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_processor(tokenizer, image_size: int, patch_size: int = 14, merge_size: int = 2):
    """A stock Qwen2VLProcessor that keeps ``image_size`` x ``image_size`` images unresized."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    from vlmq.models.processor import allow_processors_without_video as allow_processor_without_video

    allow_processor_without_video()
    area = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": area, "longest_edge": area},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def user_prompt(question: str) -> list[dict]:
    """One user turn: the image, then the question (Qwen2-VL's usual layout; what eval and
    calibration feed the model)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
