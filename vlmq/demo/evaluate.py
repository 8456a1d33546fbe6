"""Evaluation of a (possibly quantized) VLM on the demo visual-QA ``eval`` split.

Reusable by the pipeline's evaluate stage:

* :func:`greedy_answers` / :func:`exact_match` - greedy decoding and exact-match accuracy per skill;
* :func:`answer_logprobs` - teacher-forced log-probabilities at the reference answer's tokens
  (answer tokens plus the closing ``<|im_end|>``), one ``[n_tokens, vocab]`` tensor per question;
* :func:`nll_kl` - per-question mean answer-token NLL and mean KL(reference || model) of the
  answer-token distributions; :func:`paired_se` - standard error of a paired mean difference;
* :func:`apply_rtn` - round-to-nearest fake quantization of every language-backbone decoder linear.

Rows are dicts with ``image`` (PIL image or PNG bytes), ``question``, ``answer``, ``skill``.
Prompts are built with the processor's chat template (one user turn: image, then question).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence

import torch

from vlmq.demo.tokenizer import user_prompt


def _image(x):
    from PIL import Image

    if isinstance(x, (bytes, bytearray)):
        return Image.open(io.BytesIO(x)).convert("RGB")
    if isinstance(x, dict) and "bytes" in x:
        return Image.open(io.BytesIO(x["bytes"])).convert("RGB")
    return x.convert("RGB")


def load_demo_model(model_dir: str):
    """(model, processor) from a saved directory, float32, eval mode, offline."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlmq.models.processor import load_processor

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    return model, load_processor(model_dir)


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(user_prompt(question), add_generation_prompt=True, tokenize=False)


def normalize(s: str) -> str:
    return " ".join(s.strip().split()).lower()


@torch.no_grad()
def greedy_answers(model, processor, rows: Sequence[dict], batch_size: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy (``do_sample=False``) answers, decoded without special tokens."""
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    preds: list[str] = []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s: s + batch_size]
            inputs = processor(text=[prompt_text(processor, r["question"]) for r in chunk],
                               images=[_image(r["image"]) for r in chunk], padding=True, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
            new = out[:, inputs["input_ids"].shape[1]:]
            preds += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return preds


def exact_match(preds: Sequence[str], rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Exact match (whitespace/case-normalised) per skill and ``overall``: {skill: {acc, n, correct}}."""
    by: dict[str, list[int]] = {}
    for p, r in zip(preds, rows):
        ok = int(normalize(p) == normalize(r["answer"]))
        by.setdefault(r["skill"], []).append(ok)
        by.setdefault("overall", []).append(ok)
    return {k: {"acc": sum(v) / len(v), "n": len(v), "correct": sum(v)} for k, v in sorted(by.items())}


def correct_vector(preds: Sequence[str], rows: Sequence[dict]) -> list[int]:
    return [int(normalize(p) == normalize(r["answer"])) for p, r in zip(preds, rows)]


@torch.no_grad()
def answer_logprobs(model, processor, rows: Sequence[dict], batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced ``(log_probs [n, vocab], target_ids [n])`` at each question's answer tokens.

    The sequence is prompt + reference answer + ``<|im_end|>``; the n positions are the answer's
    tokens and the closing ``<|im_end|>`` (what greedy decoding has to produce).
    """
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "right"
    end = "<|im_end|>"
    out_list: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s: s + batch_size]
            texts = [prompt_text(processor, r["question"]) + r["answer"] + end for r in chunk]
            inputs = processor(text=texts, images=[_image(r["image"]) for r in chunk], padding=True, return_tensors="pt")
            logits = model(**inputs, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            lengths = inputs["attention_mask"].sum(1).tolist()
            for b, r in enumerate(chunk):
                n = len(tok(r["answer"] + end, add_special_tokens=False)["input_ids"])
                L = int(lengths[b])
                targets = inputs["input_ids"][b, L - n: L]
                out_list.append((logp[b, L - n - 1: L - 1].clone(), targets.clone()))
    finally:
        tok.padding_side = old_side
    return out_list


def nll_kl(lp: Sequence[tuple[torch.Tensor, torch.Tensor]],
           ref: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[list[float], list[float] | None]:
    """Per-question mean answer-token NLL of ``lp``; mean KL(ref || lp) per question if ``ref``."""
    nll = [float(-l.gather(1, t[:, None]).mean()) for l, t in lp]
    if ref is None:
        return nll, None
    kl = []
    for (l, _), (r, _) in zip(lp, ref):
        kl.append(float((r.exp() * (r - l)).sum(-1).mean()))
    return nll, kl


def teacher_forced_correct(lp: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """1 where the argmax at every answer position is the reference token (greedy would match)."""
    return [int(bool((l.argmax(-1) == t).all())) for l, t in lp]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean of the paired differences ``b - a``."""
    d = [y - x for x, y in zip(a, b)]
    m = mean(d)
    var = sum((x - m) ** 2 for x in d) / max(1, len(d) - 1)
    return math.sqrt(var / len(d))


def apply_rtn(model, bits: int, group_size: int = 128, sym: bool = False):
    """A deep copy of ``model`` with every decoder linear fake-quantized by RTN (others stay FP)."""
    from vlmq.demo.model import decoder_linears
    from vlmq.quant import fake_quant_rtn

    q = copy.deepcopy(model)
    with torch.no_grad():
        for lin in decoder_linears(q).values():
            lin.weight.copy_(fake_quant_rtn(lin.weight.data, bits, group_size, sym=sym))
    return q


def evaluate(model, processor, rows: Sequence[dict], ref_lp=None, batch_size: int = 32) -> dict:
    """Exact match per skill, answer NLL and (if ``ref_lp``) KL vs the reference, per question too."""
    preds = greedy_answers(model, processor, rows, batch_size)
    lp = answer_logprobs(model, processor, rows, batch_size)
    nll, kl = nll_kl(lp, ref_lp)
    return {"accuracy": exact_match(preds, rows), "preds": preds, "correct": correct_vector(preds, rows),
            "tf_correct": teacher_forced_correct(lp), "nll": nll, "kl": kl, "logprobs": lp}
