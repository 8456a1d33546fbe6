"""The demo model: a tiny but genuine ``Qwen2VLForConditionalGeneration`` and its training.

Architecture: the stock transformers Qwen2-VL (ViT vision tower with 2-D RoPE, 2x2 patch merger,
decoder with M-RoPE, separate q/k/v/o and gate/up/down projections), only small. Training adds
auxiliary heads that are discarded afterwards (the saved checkpoint is plain Qwen2-VL):

* on the merger output (one vector per 28-px cell): colour / shape / size / character in the cell;
* on the LM hidden state after ``aux_layer`` decoder layers at every image token: the same plus the
  cell's row and column; at ``<|vision_end|>``: the number of shapes in total, per colour, per shape.

These dense per-token targets let a model this small learn to ground answers in image tokens
within a CPU budget (answer-only cross-entropy alone stays at question-only guessing).
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmq.demo.data import (LATENTS, LETTERS, answer_latents, attention_targets, option_spans,
                            question_key_spans)
from vlmq.demo.render import CODE_ALPHABET, COLORS, SHAPES, SIZES, Scene

MAX_COUNT = 7  # count classes 0..6


def build_config(tokenizer, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                 mrope_section: Sequence[int], vision_depth: int, vision_embed_dim: int, vision_heads: int,
                 max_positions: int = 1024, rope_theta: float = 10000.0):
    """A Qwen2VLConfig for the demo tokenizer (token ids taken from it)."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    text_config = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": list(mrope_section)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size,
                         num_heads=vision_heads, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text_config, vision_config=vision_config,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        tie_word_embeddings=False)
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]
    return cfg


def decoder_linears(model) -> dict[str, nn.Linear]:
    """The language backbone's decoder linears (q/k/v/o, gate/up/down of every layer) by name."""
    out: dict[str, nn.Linear] = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                out[f"model.language_model.layers.{i}.{part}.{n}"] = getattr(getattr(layer, part), n)
    return out


class AuxHeads(nn.Module):
    """Training-only probes on the merger output and an intermediate LM hidden state."""

    def __init__(self, hidden: int, grid: int):
        super().__init__()
        n_char = 1 + len(CODE_ALPHABET)
        self.sizes = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES), "char": n_char}
        self.vis = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in self.sizes.items()})
        lm_sizes = dict(self.sizes, row=grid, col=grid)
        self.lm = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in lm_sizes.items()})
        self.latent = nn.ModuleDict({k: nn.Linear(hidden, n or grid) for k, n in LATENTS.items()})
        self.n_counts = 1 + len(COLORS) + len(SHAPES)
        self.count = nn.Linear(hidden, self.n_counts * MAX_COUNT)


class ValueHeads(nn.Module):
    """Training-only linear probes on the value vectors of the two supervised heads.

    ``pos[h]``: the (row, column) of an image token, regressed (standardised) from head ``h``'s
    value vector in decoder layer ``attn_layer``, so that what the head fetches from a cell says
    where the cell is and a position answer is a linear read-out of the two fetched values;
    ``letter[h]``: the option letter of a multiple-choice option's text token, from head ``h``'s
    value vector in layer ``attn_layer + 1``.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.pos = nn.ModuleList(nn.Linear(head_dim, 2) for _ in range(2))
        self.letter = nn.ModuleList(nn.Linear(head_dim, 4) for _ in range(2))


def scene_targets(scene: Scene) -> dict[str, torch.Tensor]:
    """Per-cell classes and count classes of one scene."""
    cells = scene.cell_labels()
    g = scene.grid
    t = {k: torch.tensor([c[k] for c in cells]) for k in ("color", "shape", "size", "char")}
    t["row"] = torch.arange(g * g) // g
    t["col"] = torch.arange(g * g) % g
    counts = [len(scene.objects)] + [sum(o.color == c for o in scene.objects) for c in COLORS] + \
             [sum(o.shape == s for o in scene.objects) for s in SHAPES]
    t["counts"] = torch.tensor(counts).clamp(max=MAX_COUNT - 1)
    return t


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    answer_starts: list[int]  # index of every turn's first answer token


class ConversationEncoder:
    """Token ids + labels of (multi-turn) conversations about one image, the chat template's way.

    Turn 1: ``<|im_start|>user\\n{q}<|vision_start|><|image_pad|>*n<|vision_end|><|im_end|>\\n``
    ``<|im_start|>assistant\\n{a}<|im_end|>\\n``; later turns repeat the user/assistant pattern
    without the image. Labels cover answer tokens and the closing ``<|im_end|>`` only.
    """

    def __init__(self, tokenizer, n_image_tokens: int):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.image = self._enc("<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>")
        self.user = self._enc("<|im_start|>user\n")
        self.to_assistant = self._enc("<|im_end|>\n<|im_start|>assistant\n")
        self.im_end = self._enc("<|im_end|>")
        self.newline = self._enc("\n")

    def _enc(self, s: str) -> list[int]:
        if s not in self.cache:
            self.cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self.cache[s]

    def _question_offsets(self, question: str, answer_start: int) -> tuple[int, list[tuple[int, int]]]:
        """Sequence position of the first token of ``question`` (the turn whose answer starts at
        ``answer_start``) and the character span of each of its tokens."""
        offsets = self.tok(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return answer_start - len(self.to_assistant) - len(offsets), offsets

    def question_token_at(self, question: str, char: int, answer_start: int) -> int:
        """Sequence position of the question token covering character ``char`` of ``question``
        (the turn whose answer starts at ``answer_start``)."""
        q_start, offsets = self._question_offsets(question, answer_start)
        for t, (a, b) in enumerate(offsets):
            if a <= char < b:
                return q_start + t
        raise ValueError(f"character {char} of {question!r} is in no token")

    def question_tokens_in(self, question: str, c0: int, c1: int, answer_start: int) -> list[int]:
        """Sequence positions of the question tokens overlapping characters ``[c0, c1)`` of
        ``question`` (the turn whose answer starts at ``answer_start``)."""
        q_start, offsets = self._question_offsets(question, answer_start)
        out = [q_start + t for t, (a, b) in enumerate(offsets) if a < c1 and b > c0 and question[a:b].strip()]
        if not out:
            raise ValueError(f"characters {c0}:{c1} of {question!r} are in no token")
        return out

    def encode(self, turns: Sequence[tuple[str, str]]) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        for k, (q, a) in enumerate(turns):
            head = self.user + (self.image if k == 0 else []) + self._enc(q) + self.to_assistant
            ans = self._enc(a) + self.im_end
            starts.append(len(ids) + len(head))
            ids += head + ans + self.newline
            labels += [-100] * len(head) + ans + [-100] * len(self.newline)
        return Encoded(ids, labels, starts)


def pad_batch(encs: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels, attention_mask)`` of encoded sequences."""
    L = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), L), pad_id)
    lab = torch.full((len(encs), L), -100)
    att = torch.zeros((len(encs), L), dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        lab[b, : len(e.labels)] = torch.tensor(e.labels)
        att[b, : len(e.ids)] = 1
    return ids, lab, att


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode would NaN-fill every fresh allocation (a large share of CPU time here);
    # the values are always overwritten, so skip it.
    torch.utils.deterministic.fill_uninitialized_memory = False


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    min_lr_frac: float
    weight_decay: float
    max_turns: int
    aux_weight: float
    aux_layer: int
    qk_init_std: float
    grad_clip: float
    seed: int
    log_every: int
    curriculum_steps: int = 0
    save_every: int = 0
    attn_weight: float = 0.0
    attn_layer: int = 2
    vision_warmup_steps: int = 0
    latent_weight: float = 0.0
    latent_start: int = 0
    count_target: str = "vision_end"
    value_weight: float = 0.0
    option_weight: float = 0.0
    route_weight: float = 0.0


def train(model, processor, rows: list[dict], cfg: TrainConfig, grid: int,
          log: Callable[[str], None] = print, holdout: list[dict] | None = None,
          checkpoint: Callable[[int], None] | None = None) -> dict:
    """Train ``model`` in place on train rows (one image, lists of questions per row).

    Curriculum: during the first ``cfg.curriculum_steps`` steps a batch is drawn only from images
    with at most k shapes, k growing linearly from 1 to the maximum; afterwards, epochs of random
    permutations. Every sequence holds up to ``max_turns`` questions about its image (a multi-turn
    chat, the image in the first user turn), in random order, so each skill comes first equally often.
    ``checkpoint(step)`` is called every ``cfg.save_every`` steps (monitoring only).
    """
    from PIL import Image

    tok = processor.tokenizer
    n_img_tok = grid * grid
    enc = ConversationEncoder(tok, n_img_tok)
    hidden = model.config.text_config.hidden_size
    aux = AuxHeads(hidden, grid)
    img_id = model.config.image_token_id
    vend_id = model.config.vision_end_token_id
    pad_id = tok.pad_token_id

    if cfg.route_weight > 0 and cfg.attn_layer < 1:
        raise ValueError("route_weight supervises the layer before attn_layer: attn_layer must be >= 1")
    need_attn = cfg.attn_weight > 0 or cfg.latent_weight > 0 or cfg.option_weight > 0 or cfg.route_weight > 0
    if need_attn:  # attention probabilities are needed (training only; saved as sdpa)
        model.set_attn_implementation("eager")
    if cfg.qk_init_std > 0:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * cfg.qk_init_std)

    params = list(model.parameters()) + list(aux.parameters())
    layers = model.model.language_model.layers
    head_dim = hidden // model.config.text_config.num_attention_heads
    vheads, v_out, v_hooks = None, {}, []
    if cfg.value_weight > 0:  # built only when used: the default build's RNG stream is unchanged
        vheads = ValueHeads(head_dim)
        params += list(vheads.parameters())
        for li in (cfg.attn_layer, cfg.attn_layer + 1):
            v_hooks.append(layers[li].self_attn.v_proj.register_forward_hook(
                lambda m, i, o, li=li: v_out.__setitem__(li, o)))
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)
    merger_out: dict[str, torch.Tensor] = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: merger_out.__setitem__("x", o))
    rng = random.Random(f"train/{cfg.seed}")
    order: list[int] = []
    model.train()
    t0 = time.time()
    hist: dict[str, float] = {}
    stats = {"loss": 0.0, "aux": 0.0, "acc": 0.0, "n": 0}

    def batch_of(idx: list[int], count_target: str = "vision_end"):
        images, encs, tgts, attn_q, latent_q, option_q = [], [], [], [], [], []
        letter_q, pick_q = [], []  # (row, token, letter) of option text; (row, query, tokens) of the right option
        route_q = []  # (row, query, tokens): the first answer token's query and the words the question names
        for i in idx:
            r = rows[i]
            images.append(Image.open(io.BytesIO(r["image"])).convert("RGB"))
            turns = list(zip(r["question"], r["answer"]))
            rng.shuffle(turns)
            turns = turns[: cfg.max_turns]
            e = enc.encode(turns)
            encs.append(e)
            scene = Scene.from_dict(json.loads(r["scene"]))
            tgts.append(scene_targets(scene))
            b = len(encs) - 1
            for (q, a), start in zip(turns, e.answer_starts):
                for k, cells in enumerate(attention_targets(scene, q, a, count_target) or []):
                    # logits at position start+k-1 predict answer token k
                    attn_q.append((b, start + k - 1, cells))
                if cfg.route_weight > 0 and (spans := question_key_spans(q)):
                    route_q.append((b, start - 1, [t for c0, c1 in spans for t in enc.question_tokens_in(q, c0, c1, start)]))
                if cfg.latent_weight > 0:
                    lat, opt_at = answer_latents(scene, q, a)
                    if lat:
                        latent_q.append((b, start - 1, lat))
                    if opt_at is not None:  # where the letter of the correct option can be read off
                        option_q.append((b, start - 1, enc.question_token_at(q, opt_at, start)))
                if cfg.value_weight > 0 or cfg.option_weight > 0:
                    for letter, c0, c1 in option_spans(q):
                        toks = enc.question_tokens_in(q, c0, c1, start)
                        if cfg.value_weight > 0:
                            letter_q += [(b, t, letter) for t in toks]
                        if cfg.option_weight > 0 and a == LETTERS[letter]:
                            pick_q.append((b, start - 1, toks))
        ids, lab, att = pad_batch(encs, pad_id)
        pix = processor.image_processor(images=images, return_tensors="pt")
        t = {k: torch.stack([x[k] for x in tgts]) for k in tgts[0]}
        return (ids, lab, att, pix["pixel_values"], pix["image_grid_thw"], t,
                (attn_q, latent_q, option_q, letter_q, pick_q, route_q))

    if cfg.vision_warmup_steps:
        _vision_warmup(model, processor, aux, rows, cfg, n_img_tok, rng, log)
    n_obj = [len(json.loads(r["scene"])["objects"]) for r in rows]
    max_obj = max(n_obj)
    for step in range(cfg.steps):
        if step < cfg.curriculum_steps:
            k = 1 + (max_obj * step) // cfg.curriculum_steps
            pool = [i for i, n in enumerate(n_obj) if n <= k]
            idx = rng.sample(pool, min(cfg.batch_size, len(pool)))
        else:
            if len(order) < cfg.batch_size:
                perm = list(range(len(rows)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        late = step >= cfg.latent_start  # the supervision of what answers are computed from is on
        count_target = cfg.count_target if late else "vision_end"
        ids, lab, att, pix, thw, tg, (attn_q, latent_q, option_q, letter_q, pick_q, route_q) = batch_of(idx, count_target)
        lr = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        for gr in opt.param_groups:
            gr["lr"] = lr
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix, image_grid_thw=thw,
                    mm_token_type_ids=(ids == img_id).long(), output_hidden_states=True,
                    output_attentions=need_attn, use_cache=False)
        logits = out.logits[:, :-1]
        tgt = lab[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        # auxiliary losses
        B = ids.shape[0]
        # The probes see layer-normalised features: probing raw activations lets the auxiliary
        # losses inflate their scale (merger outputs ~100x the text embeddings), which drowns
        # the image information in the residual stream and leaves the answers image-blind.
        vis_raw = merger_out["x"].reshape(B, n_img_tok, hidden)
        vis = F.layer_norm(vis_raw, (hidden,))
        aux_loss = sum(F.cross_entropy(aux.vis[k](vis).flatten(0, 1), tg[k].flatten()) for k in aux.vis)
        h = out.hidden_states[cfg.aux_layer]
        img_mask = ids == img_id
        hi = F.layer_norm(h[img_mask].reshape(B, n_img_tok, hidden), (hidden,))
        aux_loss = aux_loss + sum(F.cross_entropy(aux.lm[k](hi).flatten(0, 1), tg[k].flatten()) for k in aux.lm)
        hv = F.layer_norm(h[ids == vend_id], (hidden,))
        cnt = aux.count(hv).reshape(B, aux.n_counts, MAX_COUNT)
        aux_loss = aux_loss + F.cross_entropy(cnt.flatten(0, 1), tg["counts"].flatten()) * 3
        # Keep image embeddings on the text-embedding scale (RMS <= 0.1 per dimension): left free,
        # the merger output grows ~100x (probes at image tokens favour a loud, unmixed input),
        # drowning the question tokens in the residual stream and stalling the answer loss.
        scale_penalty = 10.0 * F.relu(vis_raw.pow(2).mean() - 1e-2)
        loss = ce + cfg.aux_weight * aux_loss + scale_penalty
        if cfg.attn_weight > 0 and attn_q:
            attn_loss = _attention_loss(out.attentions[cfg.attn_layer], ids, attn_q, img_id, vend_id,
                                        spread=count_target == "objects")
            loss = loss + cfg.attn_weight * attn_loss
            stats["attn"] = stats.get("attn", 0.0) + attn_loss.item()
        if cfg.latent_weight > 0 and latent_q and late:
            # what the answer is computed from, readable after the supervised attention layer
            hq = out.hidden_states[cfg.attn_layer + 1]
            terms = [F.cross_entropy(aux.latent[k](F.layer_norm(hq[b, p], (hidden,)))[None], torch.tensor([v]))
                     for b, p, lat in latent_q for k, v in lat.items()]
            lat_loss = torch.stack(terms).mean()
            if option_q:  # multiple choice: the next layer's heads 0/1 look at the correct option's text
                att2 = out.attentions[cfg.attn_layer + 1]
                ent = [(b, h, p, t, 2 * j + h) for j, (b, p, t) in enumerate(option_q) for h in (0, 1)]
                lat_loss = lat_loss + _segment_nll(att2, *map(list, zip(*ent)))
            loss = loss + cfg.latent_weight * lat_loss
            stats["latent"] = stats.get("latent", 0.0) + lat_loss.item()
        if vheads is not None and late:
            # where a cell is, readable from what heads 0/1 of attn_layer fetch from it
            v = v_out[cfg.attn_layer][img_mask].reshape(B, n_img_tok, -1)
            rc = torch.stack([tg["row"], tg["col"]], -1).float()
            rc = (rc - (grid - 1) / 2) / (((grid ** 2 - 1) / 12) ** 0.5)  # standardised
            v_loss = sum(F.mse_loss(vheads.pos[h](v[..., h * head_dim:(h + 1) * head_dim]), rc) for h in (0, 1))
            if letter_q:  # the option letter, readable from what heads 0/1 of the next layer fetch
                v2 = v_out[cfg.attn_layer + 1]
                vb = v2[torch.tensor([b for b, _, _ in letter_q]), torch.tensor([t for _, t, _ in letter_q])]
                let = torch.tensor([x for _, _, x in letter_q])
                v_loss = v_loss + sum(F.cross_entropy(vheads.letter[h](vb[:, h * head_dim:(h + 1) * head_dim]), let)
                                      for h in (0, 1))
            loss = loss + cfg.value_weight * v_loss
            stats["value"] = stats.get("value", 0.0) + v_loss.item()
        if cfg.option_weight > 0 and pick_q and late:
            # multiple choice: heads 0/1 of the next layer look at the right option's text
            att2 = out.attentions[cfg.attn_layer + 1]
            ent = [(b, h, p, t, 2 * j + h) for j, (b, p, toks) in enumerate(pick_q) for h in (0, 1) for t in toks]
            o_loss = _segment_nll(att2, *map(list, zip(*ent)))
            loss = loss + cfg.option_weight * o_loss
            stats["option"] = stats.get("option", 0.0) + o_loss.item()
        if cfg.route_weight > 0 and route_q:
            # what the question names reaches the answer position: heads 0/1 of the layer before
            # attn_layer look at those words, so that attn_layer's query there knows what to find
            ent = [(b, h, p, t, 2 * j + h) for j, (b, p, toks) in enumerate(route_q) for h in (0, 1) for t in toks]
            r_loss = _segment_nll(out.attentions[cfg.attn_layer - 1], *map(list, zip(*ent)))
            loss = loss + cfg.route_weight * r_loss
            stats["route"] = stats.get("route", 0.0) + r_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            m = tgt != -100
            acc = (logits.argmax(-1)[m] == tgt[m]).float().mean().item()
        stats["loss"] += ce.item()
        stats["aux"] += aux_loss.item()
        stats["acc"] += acc
        stats["n"] += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = stats["n"]
            msg = (f"step {step + 1}/{cfg.steps} lr {lr:.2e} ce {stats['loss'] / n:.4f} aux {stats['aux'] / n:.3f} "
                   f"attn {stats.get('attn', 0.0) / n:.3f} latent {stats.get('latent', 0.0) / n:.3f} "
                   f"tok_acc {stats['acc'] / n:.4f} elapsed {time.time() - t0:.0f}s")
            if cfg.route_weight > 0:
                msg = msg.replace(" tok_acc", f" route {stats.get('route', 0.0) / n:.3f} tok_acc")
            if vheads is not None or cfg.option_weight > 0:
                msg = msg.replace(" tok_acc", f" value {stats.get('value', 0.0) / n:.3f} "
                                              f"option {stats.get('option', 0.0) / n:.3f} tok_acc")
            if holdout is not None:
                msg += f" | holdout {holdout_accuracy(model, processor, holdout, enc):s}"
                model.train()
            log(msg)
            hist = {k: stats[k] / n for k in ("loss", "aux", "acc")}
            stats = {"loss": 0.0, "aux": 0.0, "acc": 0.0, "n": 0}
        if checkpoint is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            model.eval()
            checkpoint(step + 1)
            model.train()
    hook.remove()
    for hk in v_hooks:
        hk.remove()
    if need_attn:
        model.set_attn_implementation("sdpa")
    model.eval()
    return {"final": hist, "seconds": time.time() - t0}


def _vision_warmup(model, processor, aux: AuxHeads, rows: list[dict], cfg: TrainConfig, n_img_tok: int,
                   rng: random.Random, log: Callable[[str], None]) -> None:
    """Train the vision tower + merger alone on the per-cell probes (cheap: no decoder pass).

    The decoder then starts from image tokens that already say what is in their cell, which is
    what lets answer grounding start within the CPU budget.
    """
    from PIL import Image

    visual = model.model.visual
    params = list(visual.parameters()) + list(aux.vis.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr * 0.5, betas=(0.9, 0.98), weight_decay=0.0)
    hidden = model.config.text_config.hidden_size
    t0 = time.time()
    for step in range(cfg.vision_warmup_steps):
        batch = rng.sample(rows, cfg.batch_size)
        pix = processor.image_processor(images=[Image.open(io.BytesIO(r["image"])).convert("RGB") for r in batch],
                                        return_tensors="pt")
        out = visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
        x = getattr(out, "pooler_output", out).reshape(len(batch), n_img_tok, hidden)
        tg = [scene_targets(Scene.from_dict(json.loads(r["scene"]))) for r in batch]
        loss = sum(F.cross_entropy(aux.vis[k](F.layer_norm(x, (hidden,))).flatten(0, 1),
                                   torch.stack([t[k] for t in tg]).flatten()) for k in aux.vis)
        loss = loss + 10.0 * F.relu(x.pow(2).mean() - 1e-2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vision_warmup_steps:
            log(f"vision warm-up {step + 1}/{cfg.vision_warmup_steps} probe loss {loss.item():.4f} "
                f"elapsed {time.time() - t0:.0f}s")


def _attention_loss(attn: torch.Tensor, ids: torch.Tensor, queries: list, img_id: int, vend_id: int,
                    spread: bool = False) -> torch.Tensor:
    """-log(attention mass on the target tokens) of heads 0 and 1 at the supervised positions;
    with ``spread``, the cross-entropy from the even distribution over the targets instead
    (-mean log of each target's attention), so that the mass is shared equally.

    ``attn``: [B, heads, L, L] probabilities of one layer; ``queries``: (batch row, query
    position, (cells_head0, cells_head1)) with cells indexing the row's image tokens, -1 meaning
    its ``<|vision_end|>`` token.
    """
    bi, hi, pi, ti, seg = [], [], [], [], []
    img_pos: dict[int, torch.Tensor] = {}
    vend: dict[int, int] = {}
    n_seg = 0
    for b, p, cells in queries:
        if b not in img_pos:
            img_pos[b] = (ids[b] == img_id).nonzero().flatten()
            vend[b] = int((ids[b] == vend_id).nonzero().flatten()[0])
        for h, cs in enumerate(cells):
            ti += [vend[b] if c < 0 else int(img_pos[b][c]) for c in cs]
            bi += [b] * len(cs)
            hi += [h] * len(cs)
            pi += [p] * len(cs)
            seg += [n_seg] * len(cs)
            n_seg += 1
    return _segment_nll(attn, bi, hi, pi, ti, seg, spread)


def _segment_nll(attn: torch.Tensor, bi: list[int], hi: list[int], pi: list[int], ti: list[int],
                 seg: list[int], spread: bool = False) -> torch.Tensor:
    """Mean over segments of -log(attention mass a segment's entries put on its targets), or with
    ``spread`` of the mean -log attention of each target. One gather of all
    ``attn[b, h, p, t]`` entries: indexing them one by one makes autograd build a full-size zero
    gradient per entry (most of a training step's time)."""
    a = attn[torch.tensor(bi), torch.tensor(hi), torch.tensor(pi), torch.tensor(ti)]
    s = torch.tensor(seg)
    n = int(s[-1]) + 1
    if spread:
        per = torch.zeros(n, dtype=a.dtype).index_add(0, s, -torch.log(a + 1e-6))
        return (per / torch.bincount(s, minlength=n).to(a.dtype)).mean()
    mass = torch.zeros(n, dtype=a.dtype).index_add(0, s, a)
    return -torch.log(mass + 1e-6).mean()


@torch.no_grad()
def holdout_accuracy(model, processor, rows: list[dict], enc: ConversationEncoder) -> str:
    """Teacher-forced exact match (all answer tokens right) per skill on single-question rows."""
    from PIL import Image

    model.eval()
    res: dict[str, list[int]] = {}
    for s in range(0, len(rows), 32):
        chunk = rows[s: s + 32]
        encs = [enc.encode([(r["question"], r["answer"])]) for r in chunk]
        ids, lab, att = pad_batch(encs, processor.tokenizer.pad_token_id)
        pix = processor.image_processor(images=[Image.open(io.BytesIO(r["image"])).convert("RGB") for r in chunk],
                                        return_tensors="pt")
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix["pixel_values"],
                    image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=(ids == model.config.image_token_id).long(),
                    use_cache=False)
        pred = out.logits[:, :-1].argmax(-1)
        tgt = lab[:, 1:]
        for b, r in enumerate(chunk):
            m = tgt[b] != -100
            res.setdefault(r["skill"], []).append(int(bool((pred[b][m] == tgt[b][m]).all())))
    return " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(res.items()))
