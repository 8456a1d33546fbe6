"""Demo tokenizer/processor/model: offline round trips, vision-token share, evaluation helpers."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from vlmq.demo.data import CAPTION_INSTRUCTIONS, SceneSpec, make_calib_rows, make_eval_rows, make_train_rows
from vlmq.demo.tokenizer import make_processor, train_tokenizer, user_prompt

SPEC = SceneSpec()
IMAGE = SPEC.grid * SPEC.cell


def _rows(d: dict) -> list[dict]:
    out = [dict(zip(d, v)) for v in zip(*d.values())]
    for r in out:
        r["image"] = r["image"]["bytes"]
    return out


@pytest.fixture(scope="module")
def data():
    return {"train": _rows(make_train_rows(60, 0, SPEC)), "calib": _rows(make_calib_rows(20, 0, SPEC)),
            "eval": _rows(make_eval_rows(2, 0, SPEC, set()))}


@pytest.fixture(scope="module")
def processor(data, tmp_path_factory):
    texts = [t for r in data["train"] for t in r["question"] + r["answer"]]
    texts += [r["answer"] for r in data["calib"]] + list(CAPTION_INSTRUCTIONS) + ["user\n", "assistant\n"]
    return make_processor(train_tokenizer(texts, 512), IMAGE)


@pytest.fixture(scope="module")
def tiny_model(processor):
    from transformers import Qwen2VLForConditionalGeneration

    from vlmq.demo.model import build_config

    torch.manual_seed(0)
    cfg = build_config(processor.tokenizer, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                       mrope_section=[8, 12, 12], vision_depth=1, vision_embed_dim=32, vision_heads=2)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def _img(r: dict) -> Image.Image:
    return Image.open(io.BytesIO(r["image"])).convert("RGB")


def test_processor_round_trip_offline(processor, data, tmp_path, monkeypatch):
    from vlmq.models.processor import load_processor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2VLProcessor"
    assert "Qwen2VLImageProcessor" in type(loaded.image_processor).__name__
    r = data["eval"][0]
    text = loaded.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
    assert text == processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    a = processor(text=[text], images=[_img(r)], return_tensors="pt")
    b = loaded(text=[text], images=[_img(r)], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["image_grid_thw"].tolist() == [[1, IMAGE // 14, IMAGE // 14]]
    assert loaded.tokenizer.decode(loaded.tokenizer("K7B2")["input_ids"]) == "K7B2"
    pieces = [t.lstrip("Ġ") for t in loaded.tokenizer.tokenize("the text K7B2")]
    assert [t for t in pieces if t][-4:] == list("K7B2")  # one token per code character


def test_vision_token_fraction_of_calib_sample(processor, data):
    fractions = []
    for r in data["calib"]:
        text = processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text + r["answer"] + "<|im_end|>"], images=[_img(r)], return_tensors="pt")["input_ids"][0]
        fractions.append(float((ids == processor.image_token_id).float().mean()))
    assert sorted(fractions)[len(fractions) // 2] >= 0.70
    assert min(fractions) >= 0.68


def test_encoder_matches_chat_template(processor, data):
    from vlmq.demo.model import ConversationEncoder

    enc = ConversationEncoder(processor.tokenizer, SPEC.grid ** 2)
    r = data["eval"][0]
    e = enc.encode([(r["question"], r["answer"])])
    text = processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text + r["answer"] + "<|im_end|>\n"], images=[_img(r)], return_tensors="pt")["input_ids"][0]
    assert e.ids == ids.tolist()
    n_ans = len(processor.tokenizer(r["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
    assert sum(x != -100 for x in e.labels) == n_ans
    first = e.answer_starts[0]
    assert e.labels[first] != -100 and e.labels[first - 1] == -100  # the first answer token
    two = enc.encode([(r["question"], r["answer"]), ("What does the text say?", "AB3")])
    assert len(two.answer_starts) == 2
    assert two.ids[two.answer_starts[1]: two.answer_starts[1] + 3] == processor.tokenizer("AB3", add_special_tokens=False)["input_ids"]
    assert two.ids.count(processor.image_token_id) == SPEC.grid ** 2  # the image only in the first turn
    from vlmq.demo.data import answer_latents
    from vlmq.demo.render import Scene

    mcq = [r for r in data["eval"] if r["skill"] == "mcq"][0]
    e = enc.encode([("What does the text say?", "AB3"), (mcq["question"], mcq["answer"])])
    _, at = answer_latents(Scene.from_dict(__import__("json").loads(mcq["scene"])), mcq["question"], mcq["answer"])
    pos = enc.question_token_at(mcq["question"], at, e.answer_starts[1])
    option_text = mcq["question"][at:].split(" ")[0]
    assert processor.tokenizer.decode([e.ids[pos]]).strip() == option_text[: len(processor.tokenizer.decode([e.ids[pos]]).strip())]
    assert processor.tokenizer.decode(e.ids[pos - 2: pos]).strip() == f"{mcq['answer']}."  # "C." just before


def test_option_tokens_and_spread_count_targets(processor, data):
    import json

    from vlmq.demo.data import attention_targets, counted_objects, option_spans
    from vlmq.demo.model import ConversationEncoder
    from vlmq.demo.render import Scene

    enc = ConversationEncoder(processor.tokenizer, SPEC.grid ** 2)
    for r in [r for r in data["eval"] if r["skill"] == "mcq"][:5]:
        e = enc.encode([("What does the text say?", "AB3"), (r["question"], r["answer"])])
        spans = option_spans(r["question"])
        assert [l for l, _, _ in spans] == [0, 1, 2, 3]
        for _, c0, c1 in spans:
            toks = enc.question_tokens_in(r["question"], c0, c1, e.answer_starts[1])
            assert processor.tokenizer.decode([e.ids[t] for t in toks]).strip() == r["question"][c0:c1].strip()
    assert option_spans("How many shapes are there?") == []
    for r in [r for r in data["eval"] if r["skill"] == "count"][:10]:
        scene = Scene.from_dict(json.loads(r["scene"]))
        (h0, h1), = attention_targets(scene, r["question"], r["answer"], "objects")
        assert h0 == h1 and h0[-1] == -1 and len(h0) == int(r["answer"]) + 1
        assert len(counted_objects(scene, r["question"])) == int(r["answer"])
        assert attention_targets(scene, r["question"], r["answer"]) == [([-1], [-1])]


def test_spread_attention_loss_is_cross_entropy_from_even_targets():
    from vlmq.demo.model import _attention_loss

    torch.manual_seed(0)
    ids = torch.tensor([[5, 7, 7, 7, 8, 1, 2]])  # 7 = image token, 8 = vision end
    attn = torch.softmax(torch.randn(1, 2, 7, 7, dtype=torch.float64), -1)
    q = [(0, 6, ([0, 2, -1], [1]))]
    got = _attention_loss(attn, ids, q, 7, 8, spread=True)
    want = (-(attn[0, 0, 6, [1, 3, 4]].log().mean()) - attn[0, 1, 6, 2].log()) / 2
    assert torch.allclose(got, want, atol=1e-5)
    got_mass = _attention_loss(attn, ids, q, 7, 8)
    assert torch.allclose(got_mass, (-(attn[0, 0, 6, [1, 3, 4]].sum().log()) - attn[0, 1, 6, 2].log()) / 2, atol=1e-5)


def test_segment_nll_matches_entry_by_entry_loop():
    """One gather + segment sums == the per-segment loop of -log(mass) / mean -log, values and
    gradients, float64, on fresh random attention with repeated and overlapping entries."""
    from vlmq.demo.model import _segment_nll

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 2, 9, 9, dtype=torch.float64, generator=g, requires_grad=True)
    segs = [[(int(torch.randint(3, (1,), generator=g)), h, int(torch.randint(9, (1,), generator=g)),
              int(torch.randint(9, (1,), generator=g))) for _ in range(1 + k % 3)] for k in range(7) for h in (0, 1)]
    ent = [(b, h, p, t, j) for j, es in enumerate(segs) for b, h, p, t in es]
    for spread in (False, True):
        attn = torch.softmax(logits, -1)
        got = _segment_nll(attn, *map(list, zip(*ent)), spread=spread)
        (gg,) = torch.autograd.grad(got, logits)
        attn = torch.softmax(logits, -1)
        terms = []
        for es in segs:
            vals = torch.stack([attn[b, h, p, t] for b, h, p, t in es])
            terms.append(-torch.log(vals + 1e-6).mean() if spread else -torch.log(vals.sum() + 1e-6))
        want = torch.stack(terms).mean()
        (gw,) = torch.autograd.grad(want, logits)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        assert torch.allclose(gg, gw, rtol=1e-10, atol=1e-12)


def test_route_tokens_are_the_named_words(processor, data):
    """The tokens the routing supervision points at decode to the word(s) the question names."""
    from vlmq.demo.data import question_key_spans
    from vlmq.demo.model import ConversationEncoder

    enc = ConversationEncoder(processor.tokenizer, SPEC.grid ** 2)
    n = 0
    for r in data["eval"]:
        e = enc.encode([("What does the text say?", "AB3"), (r["question"], r["answer"])])
        for c0, c1 in question_key_spans(r["question"]):
            toks = enc.question_tokens_in(r["question"], c0, c1, e.answer_starts[1])
            word = processor.tokenizer.decode([e.ids[t] for t in toks]).strip()
            assert r["question"][c0:c1] in word and len(word) <= c1 - c0 + 2, (r["question"], word)
            n += 1
    assert n >= 8


def test_tiny_model_save_load_equal_logits(tiny_model, processor, data, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    r = data["eval"][1]
    text = processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_img(r)], return_tensors="pt")
    with torch.no_grad():
        before = tiny_model(**inputs).logits
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        after = loaded(**inputs).logits
    assert torch.equal(before, after)


def test_train_steps_and_evaluation_helpers(tiny_model, processor, data):
    import copy

    from vlmq.demo import evaluate as ev
    from vlmq.demo.model import TrainConfig, decoder_linears, train

    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, min_lr_frac=0.1, weight_decay=0.0, max_turns=3,
                      aux_weight=0.5, aux_layer=1, qk_init_std=0.05, grad_clip=1.0, seed=0, log_every=1,
                      attn_weight=1.0, attn_layer=0, vision_warmup_steps=2, latent_weight=1.0)
    lines = []
    rec = train(model, processor, data["train"], cfg, SPEC.grid, log=lines.append)
    assert rec["final"]["loss"] > 0
    assert any(l.startswith("vision warm-up 2/2") for l in lines)
    attn = [float(l.split(" attn ")[1].split()[0]) for l in lines if l.startswith("step ")]
    assert attn and all(a > 0 for a in attn)  # the attention supervision ran
    latent = [float(l.split(" latent ")[1].split()[0]) for l in lines if l.startswith("step ")]
    assert latent and all(x > 0 for x in latent)  # and the answer-latent probes
    assert model.config._attn_implementation == "sdpa"  # saved as a plain model
    # the value probes, the option attention and the spread count targets
    cfg2 = TrainConfig(**{**cfg.__dict__, "latent_weight": 0.0, "vision_warmup_steps": 0, "count_target": "objects",
                          "value_weight": 1.0, "option_weight": 1.0})
    lines2 = []
    train(copy.deepcopy(tiny_model), processor, data["train"], cfg2, SPEC.grid, log=lines2.append)
    steps2 = [l for l in lines2 if l.startswith("step ")]
    assert steps2 and all(float(l.split(" value ")[1].split()[0]) > 0 for l in steps2)
    assert all(float(l.split(" option ")[1].split()[0]) >= 0 for l in steps2)
    # the routing of the named words to the answer position (heads of the layer before attn_layer)
    cfg3 = TrainConfig(**{**cfg.__dict__, "latent_weight": 0.0, "attn_layer": 1, "route_weight": 1.0})
    lines3 = []
    train(copy.deepcopy(tiny_model), processor, data["train"], cfg3, SPEC.grid, log=lines3.append)
    steps3 = [l for l in lines3 if l.startswith("step ")]
    assert steps3 and all(float(l.split(" route ")[1].split()[0]) > 0 for l in steps3)
    with pytest.raises(ValueError, match="attn_layer"):
        train(copy.deepcopy(tiny_model), processor, data["train"], TrainConfig(**{**cfg3.__dict__, "attn_layer": 0}),
              SPEC.grid)
    rows = data["eval"][:4]
    preds = ev.greedy_answers(model, processor, rows, batch_size=2, max_new_tokens=3)
    assert len(preds) == 4 and all(isinstance(p, str) for p in preds)
    acc = ev.exact_match([r["answer"] for r in rows], rows)
    assert acc["overall"]["acc"] == 1.0
    lp = ev.answer_logprobs(model, processor, rows, batch_size=3)
    nll, kl = ev.nll_kl(lp, lp)
    assert all(x > 0 for x in nll) and all(abs(x) < 1e-6 for x in kl)
    q = ev.apply_rtn(model, 2, 128)
    ql, ml = decoder_linears(q), decoder_linears(model)
    assert all(not torch.equal(ql[k].weight, ml[k].weight) for k in ql)
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert torch.equal(q.model.visual.merger.mlp[0].weight, model.model.visual.merger.mlp[0].weight)
    _, kl_q = ev.nll_kl(ev.answer_logprobs(q, processor, rows, batch_size=4), lp)
    assert ev.mean(kl_q) > 0


def test_training_is_deterministic_for_a_seed(tiny_model, processor, data):
    """Same seed -> bit-identical weights (the build's weights hash); another seed -> different weights."""
    import copy

    from vlmq.demo.model import TrainConfig, set_determinism, train

    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, min_lr_frac=0.1, weight_decay=0.0, max_turns=3,
                      aux_weight=0.5, aux_layer=1, qk_init_std=0.05, grad_clip=1.0, seed=0, log_every=1,
                      attn_weight=1.0, attn_layer=1, vision_warmup_steps=1, latent_weight=0.0, route_weight=1.0)

    def weights(c):
        set_determinism(c.seed, threads)  # as stages.demo_model does before building the model
        m = copy.deepcopy(tiny_model)
        train(m, processor, data["train"], c, SPEC.grid, log=lambda _: None)
        return m.state_dict()

    threads, fill = torch.get_num_threads(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        a, b = weights(cfg), weights(cfg)
        other = weights(TrainConfig(**{**cfg.__dict__, "seed": 1}))
    finally:  # the flags are process-wide: leave them as the other tests expect
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.set_num_threads(threads)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a)
