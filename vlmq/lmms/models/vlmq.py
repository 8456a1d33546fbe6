"""lmms-eval model type ``vlmq``: a local Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision directory,
full precision or with the weights of a quantize run, evaluated on the CPU or one GPU.

Model arguments (``--model_args k=v,...``):

* ``pretrained`` - the local model directory (required unless an already loaded model is passed);
* ``quant_state`` - a finished quantize run's state directory (e.g. ``data/quantize``): the
  model is evaluated with its solved (fake-quantized) weights;
* ``loader`` - ``auto`` (default), ``fp``, ``fake_quant`` or a loader registered with
  :func:`vlmq.lmms.loaders.register_loader` (packed checkpoints plug in there);
* ``dtype`` (``float32``), ``device`` (``cpu``), ``batch_size`` (1), ``max_new_tokens`` (the
  default when a task gives none), ``system_prompt`` (none: the chat template's default).

Prompts: one user turn with the request's images first, then the task's text (the same turn
the demo model was trained on and calibration uses), then the generation prompt. Greedy
decoding unless the task asks for sampling; output is cut at the task's ``until`` strings and
at the chat template's end-of-turn token.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vlmq.lmms.loaders import LoadedModel, load

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "y")


def _flatten_visuals(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out += _flatten_visuals(x)
        return out
    return [v]


class VLMQModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, loader: str = "auto", quant_state: str | None = None,
                 dtype: str = "float32", device: str | None = "cpu", batch_size: int | str = 1,
                 max_new_tokens: int | str = 32, system_prompt: str | None = None, name: str | None = None,
                 loaded: LoadedModel | None = None, max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"vlmq model: unknown model_args {sorted(kwargs)}")
        if loaded is None:
            if not pretrained:
                raise ValueError("vlmq model: pass pretrained=<local model directory>")
            loaded = load(str(pretrained), loader=loader, quant_state=quant_state or None, dtype=dtype,
                          device=device or "cpu")
        self._model = loaded.model
        self.processor = loaded.processor
        self.adapter = loaded.adapter
        self.info = dict(loaded.info)
        self.name = name or self.info.get("run") or self.info.get("loader", "vlmq")
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self._device = next(self._model.parameters()).device
        tok = self.tokenizer
        eos = set()
        for src in (getattr(self._model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if src is not None:
                eos.update(src if isinstance(src, (list, tuple)) else [src])
        vocab = tok.get_vocab()
        eos.update(vocab[t] for t in END_OF_TURN if t in vocab)
        self.eos_token_ids = sorted(int(e) for e in eos)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_loaded(cls, model, processor, adapter=None, info: dict | None = None, **kwargs: Any) -> "VLMQModel":
        """Wrap an already loaded ``(model, processor)`` (no second copy is loaded)."""
        return cls(loaded=LoadedModel(model, processor, adapter, dict(info or {})), **kwargs)

    # ----------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def prompt(self, context: str, n_images: int) -> str:
        """The chat-formatted prompt: images, then the text, in one user turn."""
        content = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": context.replace("<image>", "").strip() if n_images else context})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages = self._apply_system_prompt(messages, self.system_prompt)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = _flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        out = []
        for v in visuals:
            if not hasattr(v, "convert"):
                raise TypeError(f"vlmq model: only image inputs are supported (task {task} gave {type(v).__name__})")
            out.append(v.convert("RGB"))
        return out

    def _encode(self, texts: list[str], images: list, padding_side: str):
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old
        return enc.to(self._device)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation; requests are grouped by generation kwargs and sorted by prompt
        length (results come back in the request order)."""
        order = sorted(range(len(requests)),
                       key=lambda i: (json.dumps(requests[i].args[1], sort_keys=True, default=str),
                                      -len(requests[i].args[0])))
        batches: list[list[int]] = []
        for i in order:
            key = json.dumps(requests[i].args[1], sort_keys=True, default=str)
            if batches and len(batches[-1]) < self.batch_size and \
                    json.dumps(requests[batches[-1][0]].args[1], sort_keys=True, default=str) == key:
                batches[-1].append(i)
            else:
                batches.append([i])
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc=f"generate [{self.name}]", disable=self.rank != 0)
        for batch in batches:
            gen = dict(requests[batch[0]].args[1] or {})
            until = gen.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(gen.pop("max_new_tokens", self.max_new_tokens) or self.max_new_tokens)
            temperature = float(gen.pop("temperature", 0) or 0)
            do_sample = _as_bool(gen.pop("do_sample", False)) and temperature > 0
            kwargs = {"max_new_tokens": max_new, "do_sample": do_sample, "num_beams": int(gen.pop("num_beams", 1) or 1),
                      "eos_token_id": self.eos_token_ids, "pad_token_id": self.pad_token_id}
            if do_sample:
                kwargs["temperature"] = temperature
                if gen.get("top_p") is not None:
                    kwargs["top_p"] = float(gen["top_p"])
            texts, images = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                vis = self._visuals(doc_to_visual, doc_id, task, split)
                images += vis
                texts.append(self.prompt(context, len(vis)))
            enc = self._encode(texts, images, "left")
            ids = self._model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            for i, answer in zip(batch, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                for stop in until:
                    if stop and stop in answer:
                        answer = answer[: answer.index(stop)]
                answer = answer.strip()
                out[i] = answer
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), answer)
            pbar.update(len(batch))
        pbar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the chat prompt, and whether
        greedy decoding would produce exactly those tokens (one request at a time)."""
        res = []
        for req in tqdm(requests, desc=f"loglikelihood [{self.name}]", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = req.args[:6]
            vis = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self.prompt(context, len(vis))
            enc_full = self._encode([prompt + continuation], vis, "right")
            n_prompt = self._encode([prompt], vis, "right")["input_ids"].shape[1]
            ids = enc_full["input_ids"][0]
            n = ids.shape[0] - n_prompt
            if n <= 0:
                res.append((0.0, True))
                continue
            logits = self._model(**enc_full, use_cache=False).logits[0, n_prompt - 1: -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = ids[n_prompt:]
            res.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlmq model: multi-round generation is not supported")
