"""The small language model (mla_tutorial.model), its trainer (train) and its data (data).

Cached decoding equals full recomputation for every attention kind and MLA cache mode; a batch of
prompts of different lengths gives what each prompt gives alone; checkpoints round-trip and resume
exactly; MQAR's answers are right by construction; and bad input gets a clear error."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch

from mla_tutorial import KVCache, MultiHeadAttention, MultiHeadLatentAttention
from mla_tutorial.data import CORPUS_PATH, IGNORE_INDEX, MQAR, TextCorpus, decode, encode
from mla_tutorial.mla import MLA_MODES
from mla_tutorial.model import LMConfig, TransformerLM
from mla_tutorial.train import TrainConfig, evaluate, load_checkpoint, lr_at, save_checkpoint, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = LMConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=4, head_dim=6, d_ff=32, max_seq_len=32,
                 kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6)
KINDS = {"mha": SMALL, "gqa": SMALL.replace(attention="gqa", n_kv_heads=2), "mqa": SMALL.replace(attention="mqa"),
         "mla": SMALL.replace(attention="mla"), "mla-qlora": SMALL.replace(attention="mla", q_lora_rank=8)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(KINDS[kind]).eval()


# --- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_blocks_use_the_package_attention_modules_and_count_their_cache(kind):
    model = make(kind)
    cls = MultiHeadLatentAttention if kind.startswith("mla") else MultiHeadAttention
    assert all(type(a) is cls for a in model.attention_modules)
    c = model.config
    modes = MLA_MODES if c.attention == "mla" else (None,)
    for mode in modes:
        caches = model.new_caches(2, 16, mode=mode)
        assert len(caches) == c.n_layers and all(isinstance(k, KVCache) for k in caches)
        measured = sum(k.bytes_per_token for k in caches)          # from the real fp32 buffers
        assert model.cache_bytes_per_token(mode=mode) == measured
        if mode in (None,):
            assert measured == c.n_layers * 2 * c.kv_heads * c.d_h * 4
        elif mode == "expanded":
            assert measured == c.n_layers * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4
        else:
            assert measured == c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert model.cache_bytes_per_token(torch.bfloat16, modes[-1]) * 2 == model.cache_bytes_per_token(mode=modes[-1])
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(embeddings=False) == model.num_parameters() - 2 * c.vocab_size * c.d_model


@pytest.mark.parametrize("kind", KINDS)
def test_cached_forward_equals_full_forward(kind):
    model = make(kind)
    idx = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        for mode in (MLA_MODES if kind.startswith("mla") else (None,)):
            caches = model.new_caches(2, 13, mode=mode)
            steps = [model(idx[:, :5], caches)] + [model(idx[:, t:t + 1], caches) for t in range(5, 13)]
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_recomputation(kind):
    model = make(kind)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]]
    reference = model.generate(prompts, 10, use_cache=False)
    for mode in (MLA_MODES if kind.startswith("mla") else (None,)):
        assert model.generate(prompts, 10, mode=mode) == reference
    assert all(len(r) == 10 for r in reference)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_mixed_length_batch_equals_each_prompt_alone(kind):
    model = make(kind)
    prompts = [[3], [5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    alone = [model.generate([p], 8)[0] for p in prompts]
    for mode in (MLA_MODES if kind == "mla" else (None,)):
        assert model.generate(prompts, 8, mode=mode) == alone
    # logits too, not only argmaxes: a left-padded prompt's last logits equal the prompt's alone
    longest = max(map(len, prompts))
    idx = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, longest - len(p):], mask[b, longest - len(p):] = torch.tensor(p), True
    with torch.no_grad():
        batched = model(idx, key_mask=mask)[:, -1]
        for b, p in enumerate(prompts):
            torch.testing.assert_close(batched[b], model(torch.tensor([p]))[0, -1], rtol=1e-4, atol=1e-4)


def test_stop_token_and_length_limit():
    model = make("mha")
    prompt = [[1, 2, 3]]
    free = model.generate(prompt, 12)[0]
    stop = free[4]
    first = free.index(stop)
    stopped = model.generate(prompt, 12, stop_token=stop)[0]
    assert stopped == free[:first + 1], "a sequence ends right after its stop token, which it keeps"
    batch = model.generate([[1, 2, 3], [20, 21]], 12, stop_token=stop)
    assert batch[0] == stopped and len(batch[1]) <= 12
    assert len(model.generate(prompt, 29)[0]) == 29  # up to the context: 3 + 29 = 32


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make("mla")
    p = [[1, 2, 3]]
    a = model.generate(p, 10, sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(p, 10, sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = model.generate(p, 10)
    assert model.generate(p, 10, sample=True, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    hot = model.generate(p * 4, 10, sample=True, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in hot}) > 1, "sampling at a high temperature should vary between sequences"


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        LMConfig(attention="flash")
    with pytest.raises(ValueError, match="must divide the heads.*choose one of \\[1, 2, 3, 6\\]"):
        LMConfig(attention="gqa", n_kv_heads=4)
    with pytest.raises(ValueError, match="needs n_kv_heads"):
        LMConfig(attention="gqa")
    with pytest.raises(ValueError, match="use attention='gqa'"):
        LMConfig(attention="mqa", n_kv_heads=2)
    with pytest.raises(ValueError, match="leave n_kv_heads unset"):
        LMConfig(attention="mla", n_kv_heads=2)
    with pytest.raises(ValueError, match="must be even"):
        LMConfig(attention="mla", qk_rope_head_dim=3)
    with pytest.raises(ValueError, match="unknown MLA mode"):
        LMConfig(attention="mla", mla_mode="compressed")
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        LMConfig(d_model=100, n_heads=6)
    with pytest.raises(TypeError, match="needs an LMConfig"):
        TransformerLM({"attention": "mha"})


def test_bad_generation_arguments_are_refused_before_any_work():
    model = make("mla")
    cases = [
        (dict(prompts=[list(range(33))], max_new_tokens=1), ValueError, "longer than the model's context"),
        (dict(prompts=[[1] * 30], max_new_tokens=5), ValueError, "ask for at most 2 new tokens"),
        (dict(prompts=[[1]], max_new_tokens=3, sample=True, temperature=0.0), ValueError, "temperature > 0"),
        (dict(prompts=[[1]], max_new_tokens=3, sample=True, temperature=-1.0), ValueError, "temperature > 0"),
        (dict(prompts=[[1]], max_new_tokens=3, top_k=0), ValueError, "top_k must be a positive int"),
        (dict(prompts=[[1]], max_new_tokens=3, mode="compressed"), ValueError, "unknown MLA mode"),
        (dict(prompts=[[]], max_new_tokens=3), ValueError, "prompt 0 is empty"),
        (dict(prompts=[[1, 99]], max_new_tokens=3), ValueError, "outside \\[0, 40\\)"),
        (dict(prompts=[1, 2, 3], max_new_tokens=3), TypeError, "wrap a single prompt"),
        (dict(prompts=[[1]], max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
        (dict(prompts=[[1]], max_new_tokens=3, stop_token=40), ValueError, "stop_token"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            model.generate(**kwargs)
    with pytest.raises(ValueError, match="cache modes apply to MLA only"):
        make("gqa").generate([[1]], 3, mode="absorbed")


def test_bad_forward_input_is_refused():
    model = make("mha")
    with pytest.raises(ValueError, match="exceed the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="lie in \\[0, 40\\)"):
        model(torch.full((1, 4), 40))
    with pytest.raises(ValueError, match="one per layer"):
        model(torch.zeros(1, 4, dtype=torch.long), model.new_caches(1, 8)[:1])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.new_caches(1, 64)


# --- training and checkpoints -----------------------------------------------------------------
def test_learning_rate_schedule():
    c = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-4)
    lrs = [lr_at(s, c) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the cosine decays monotonically"


def test_training_learns_mqar_and_resumes_exactly(tmp_path):
    task = MQAR(num_pairs=(2, 4), seq_len=(16, 32), num_keys=8, num_values=8, easy_steps=4)
    cfg = SMALL.replace(vocab_size=task.vocab_size)
    tc = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=1, eval_batch_size=16)
    straight = TransformerLM(cfg)
    history = train(straight, task, tc, progress=False)
    assert [h["step"] for h in history] == [4, 8, 12]
    assert history[-1]["val_loss"] < history[0]["val_loss"], "the loss should fall"
    path = tmp_path / "run.pt"
    half = TransformerLM(cfg)
    train(half, task, tc, progress=False, checkpoint=path, stop_after=6)
    assert load_checkpoint(path)["step"] == 6
    resumed = TransformerLM(cfg)
    history2 = train(resumed, task, tc, progress=False, resume=path)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [h["step"] for h in history2] == [4, 8, 12]
    with pytest.raises(ValueError, match="another TrainConfig"):
        train(TransformerLM(cfg), task, tc.replace(lr=1e-3), progress=False, resume=path)
    # init=False fine-tunes the weights a model has instead of starting again
    before = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, task, tc.replace(steps=2, warmup_steps=1, eval_every=2), progress=False, init=False)
    moved = [k for k, v in straight.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all((straight.state_dict()[k] - before[k]).abs().max() < 0.2 for k in moved), \
        "fine-tuning moves the trained weights a little; it does not re-initialise them"


def test_checkpoint_round_trip_and_another_config_is_refused(tmp_path):
    model = make("mla")
    idx = torch.randint(0, 40, (2, 9))
    path = save_checkpoint(tmp_path / "m.pt", model, step=3)
    again = TransformerLM.from_checkpoint(path).eval()
    assert again.config == model.config
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="another model config.*kv_lora_rank"):
        load_checkpoint(path, TransformerLM(KINDS["mla"].replace(kv_lora_rank=8)))
    small = save_checkpoint(tmp_path / "bf16.pt", model, dtype=torch.bfloat16)
    assert small.stat().st_size < 0.7 * path.stat().st_size
    rounded = TransformerLM.from_checkpoint(small)
    assert rounded.embed.weight.dtype == torch.float32
    torch.testing.assert_close(rounded.embed.weight, model.embed.weight.to(torch.bfloat16).float(), rtol=0, atol=0)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_bf16_autocast_path_runs_on_the_cpu(kind):
    # the GPU path trains under autocast; on a CPU amp=True runs the same code in bf16
    task = MQAR(num_pairs=2, seq_len=16, num_keys=8, num_values=8)
    model = TransformerLM(KINDS[kind].replace(vocab_size=task.vocab_size))
    history = train(model, task, TrainConfig(steps=3, batch_size=4, eval_every=3, eval_batches=1, eval_batch_size=4,
                                             amp=True), device="cpu", progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["val_loss"]))
    assert model.embed.weight.dtype == torch.float32, "autocast keeps the weights in fp32"


def test_bad_training_input_is_refused():
    for kwargs in (dict(steps=0), dict(lr=0.0), dict(min_lr_ratio=2.0), dict(grad_clip=0.0), dict(warmup_steps=-1)):
        with pytest.raises(ValueError):
            TrainConfig(**kwargs)
    task = MQAR(num_pairs=2, seq_len=16, num_keys=30, num_values=30)
    with pytest.raises(ValueError, match="does not fit the model's"):
        train(TransformerLM(SMALL), task, TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="longer than the model's context"):
        train(TransformerLM(SMALL.replace(vocab_size=256)), TextCorpus(seq_len=64), TrainConfig(steps=1),
              progress=False)


# --- data ----------------------------------------------------------------------------------------
def test_mqar_answers_are_correct_by_construction():
    task = MQAR(num_pairs=(2, 4, 8), seq_len=(32, 64), num_keys=16, num_values=16)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = task.batch("train", 16, g)
        for seq, tgt in zip(x.tolist(), y.tolist()):
            scored = [t for t, v in enumerate(tgt) if v != IGNORE_INDEX]
            N = len(scored)
            assert N in (2, 4, 8) and 4 * N <= len(seq)
            keys, values = seq[0:2 * N:2], seq[1:2 * N:2]
            assert len(set(keys)) == N and len(set(values)) == N
            assert all(k < 16 for k in keys) and all(16 <= v < 32 for v in values)
            answer = dict(zip(keys, values))
            for t in scored:
                assert t >= 2 * N and seq[t] in answer, "only queried keys in the query section are scored"
                assert tgt[t] == answer[seq[t]] == seq[t + 1], "the target is the key's value, which follows it"
            assert sorted(seq[t] for t in scored) == sorted(keys), "every key is asked once"
            assert all(tok >= 32 for t, tok in enumerate(seq) if t >= 2 * N and t not in scored
                       and t - 1 not in scored), "the rest of the query section is filler"
    a = task.batch("val", 4, torch.Generator().manual_seed(5), num_pairs=8, seq_len=64)
    b = task.batch("val", 4, torch.Generator().manual_seed(5), num_pairs=8, seq_len=64)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and a[0].shape == (4, 64)


def test_mqar_curriculum_and_bad_sizes():
    task = MQAR(num_pairs=(2, 8), seq_len=(16, 64), num_keys=16, num_values=16, easy_steps=5)
    g = torch.Generator().manual_seed(0)
    x, y = task.batch("train", 8, g, step=4)
    assert x.shape[1] == 16 and ((y != IGNORE_INDEX).sum(1) == 2).all(), "easy steps: fewest pairs, shortest length"
    lengths = {task.batch("train", 8, g, step=5)[0].shape[1] for _ in range(20)}
    assert lengths == {16, 64}
    with pytest.raises(ValueError, match="too short for 16 pairs"):
        MQAR(num_pairs=16, seq_len=32)
    with pytest.raises(ValueError, match="distinct keys"):
        MQAR(num_pairs=8, seq_len=64, num_keys=4)
    with pytest.raises(ValueError, match="unknown split"):
        task.batch("test", 2)
    with pytest.raises(ValueError, match="too short for 8 pairs"):
        task.batch("val", 2, num_pairs=8, seq_len=16)


def test_text_corpus_is_the_frozen_snapshot_with_disjoint_splits():
    raw = CORPUS_PATH.read_bytes()
    manifest = json.loads(CORPUS_PATH.with_suffix(".json").read_text())
    assert hashlib.sha256(raw).hexdigest() == manifest["sha256"] and len(raw) == manifest["bytes"]
    corpus = TextCorpus(seq_len=64)
    assert corpus.sha256 == manifest["sha256"]
    train_blocks, val_blocks = corpus.splits["train"], corpus.splits["val"]
    assert len(val_blocks) == len(raw) // 2048 // 10 and corpus.num_bytes("train") > 8 * corpus.num_bytes("val")
    x, y = corpus.batch("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the next bytes"
    assert decode(x[0]).encode("utf-8", errors="replace") and encode("é") == [195, 169]
    vx, vy = corpus.val_windows()
    assert vx.shape[1] == 64 and torch.equal(vx[:, 1:], vy[:, :-1])
    blocks = {bytes(b.tolist()) for b in val_blocks}
    assert not blocks & {bytes(b.tolist()) for b in train_blocks}


def test_corpus_build_is_deterministic(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, listing = mod.build()
    second, _ = mod.build()
    assert first == second and len(listing) >= 10
    assert all(f"<!-- {d['path']} -->" in first.decode() for d in listing)
