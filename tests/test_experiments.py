"""The Part IV experiments (mla_tutorial.experiments): each runs end to end at a tiny setting through
its command line and writes the JSON the chapters read; parameters are matched; the spectra helpers
measure what they say; bad arguments are refused."""

from __future__ import annotations

import json

import pytest
import torch

from mla_tutorial.experiments import EXPERIMENTS, SETTINGS, common, heads_layers, matched_cache, spectra
from mla_tutorial.experiments.__main__ import main
from mla_tutorial.model import LMConfig, TransformerLM

META = {"experiment", "schema", "date", "torch", "python", "git_commit", "corpus_sha256", "device", "workers", "setting", "wall_s",
        "command", "load_average_start", "load_average_end"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    main(["all", "--setting", "tiny", "--out", str(out), "--quiet", "--note", "test run"])
    return out, {name: json.loads((out / f"{name}.json").read_text()) for name in EXPERIMENTS}


def test_every_experiment_writes_its_results(tiny_results):
    out, results = tiny_results
    for name, r in results.items():
        assert META <= set(r), f"{name} lacks {META - set(r)}"
        assert r["experiment"] == name and r["torch"] == torch.__version__ and r["device"]["type"] == "cpu"
        assert r["setting"]["name"] == "tiny" and r["note"] == "test run" and r["wall_s"] > 0
        assert r["command"].startswith("python -m mla_tutorial.experiments all --setting tiny")

    a = results["matched_cache"]
    labels = ["MHA", "GQA-3", "GQA-2", "MQA", "MLA d_c=4", "MLA d_c=8", "MLA d_c=16", "MLA d_c=32"]
    assert list(a["summary"]["text"]["variants"]) == labels == list(a["summary"]["mqar"]["variants"])
    assert len(a["runs"]) == len(labels) * 2 * len(a["seeds"])
    for r in a["runs"]:
        assert r["cpu_s"] > 0 and r["history"] and set(r["config"]) == set(LMConfig().to_dict())
        if r["task"] == "mqar":
            assert set(r["mqar"]["by_pairs"]) == {"2", "4"} and set(r["mqar"]["by_len"]) == {"16", "32", "48"}
    e = a["summary"]["mqar"]["variants"]["MHA"]["by_pairs"]["2"]
    assert e["min"] <= e["mean"] <= e["max"] and e["n"] == len(a["seeds"])

    # the checkpoints load by path and reproduce the metrics stored with them
    saved = [r for r in a["runs"] if "checkpoint" in r]
    assert {(r["task"], r["label"]) for r in saved} == {(t, lab) for t in ("text", "mqar")
                                                       for lab in ("MHA", "GQA-2", "MLA d_c=16")}
    text_mla = next(r for r in saved if r["task"] == "text" and r["label"].startswith("MLA"))
    model = TransformerLM.from_checkpoint(out / "checkpoints" / "text-mla-dc16.pt")
    corpus = common.make_task("text", SETTINGS["tiny"])
    loss = common.text_val_loss(model, corpus, windows=SETTINGS["tiny"].text_val_windows)
    assert loss == pytest.approx(text_mla["checkpoint"]["metrics_bf16_weights"]["val_loss"], rel=1e-5)

    b = results["heads_layers"]
    assert b["reused_from_matched_cache"] == ["mqar", "text"], "b reuses a's runs of the shared point"
    for task in ("text", "mqar"):
        for group in heads_layers.GROUPS:
            pts = b["summary"][task][group]
            assert [p["x"] for p in pts] == (list(heads_layers.HEADS) if group == "heads" else list(heads_layers.LAYERS))
            params = [p["params"] for p in pts]
            assert max(params) - min(params) < 0.02 * params[0], f"{group}: parameters not matched"
        assert len({p["cache_values_per_token"] for p in b["summary"][task]["heads"]}) == 1
        assert len({p["cache_values_per_token"] for p in b["summary"][task]["layers_fixed_cache"]}) == 1

    c = results["spectra"]
    t = c["tasks"]["text"]
    assert t["checkpoint"] == "text-mha.pt" and t["checkpoint_source"].startswith("recorded")
    assert len(t["trained"]["weights"]) == 2 and len(t["trained"]["weights"][0]["sigma"]) == 24  # min(48, 24)

    d = results["generation"]
    assert d["greedy_tokens_identical"] and d["greedy_equals_recomputation"]
    assert d["cache_bytes_per_token"]["latent"]["fp32"] == d["cache_bytes_per_token"]["latent"]["measured_fp32"]
    assert set(d["tokens_per_s"]) == {"expanded", "latent", "absorbed"}

    # plots draw from the files (the chapters' figures)
    import matplotlib
    matplotlib.use("Agg")
    matched_cache.plot_mqar(a)
    matched_cache.plot_loss_vs_cache(a)
    heads_layers.plot_sweeps(b)
    spectra.plot_spectra(c)


def test_recorded_sizes_match_parameters_and_bracket_the_paper_cache():
    s = SETTINGS["full"]
    for task in ("text", "mqar"):
        vs = dict(matched_cache.variants(task, s))
        params = {lab: common.count_params(cfg) for lab, cfg in vs.items()}
        assert max(params.values()) / min(params.values()) - 1 < 0.01, params
        cache = {lab: cfg.cache_elements_per_token() // cfg.n_layers for lab, cfg in vs.items()}
        d_h = vs["MHA"].d_h
        assert cache["MLA d_c=64"] == 4.5 * d_h == 2 * 2.25 * d_h, "MLA caches what GQA with 2.25 groups would"
        assert cache["GQA-2"] < cache["MLA d_c=64"] < cache["GQA-3"]
    for task in ("text", "mqar"):
        for group, pts in heads_layers.sweeps(task, s).items():
            p = [common.count_params(cfg) for _, cfg in pts]
            assert max(p) / min(p) - 1 < 0.01, (group, p)


def test_match_params_and_its_error():
    base = LMConfig(attention="mla")
    target = common.count_params(LMConfig())
    matched = common.match_params(base, target)
    assert abs(common.count_params(matched) - target) <= 1.5 * base.d_model * base.n_layers
    with pytest.raises(ValueError, match="too many for a budget"):
        common.match_params(base.replace(n_heads=40), target)


def test_a_pool_of_workers_gives_what_one_process_gives():
    s = SETTINGS["tiny"]
    specs = [common.RunSpec("MHA", "mqar", common.base_config("mqar", s), seed) for seed in (0, 1)]
    one = common.run_all(specs, s, workers=1, progress=False)
    two = common.run_all(specs, s, workers=2, progress=False)
    for a, b in zip(one, two):
        assert (a["seed"], a["label"]) == (b["seed"], b["label"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_spectra_helpers_measure_what_they_say():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert spectra.energy_in_top(s, 1) == pytest.approx(16 / 22)
    assert spectra.dims_for_energy(s, 0.9) == 2 and spectra.dims_for_energy(s, 0.95) == 3 and spectra.dims_for_energy(s, 0.5) == 1
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(d_model=24, n_heads=4, head_dim=6, d_ff=16, max_seq_len=16)).eval()
    acts = spectra.kv_activations(model, torch.randint(0, 256, (2, 16)))
    for pre, cached in zip(acts["activations"], acts["cached"]):
        assert pre.shape == cached.shape == (32, 2 * 4 * 6)
        torch.testing.assert_close(pre[:, 24:], cached[:, 24:])                   # values are not rotated
        pk, ck = pre[:, :24].view(32, 4, 6), cached[:, :24].view(32, 4, 6)        # RoPE rotates each key:
        torch.testing.assert_close(pk.norm(dim=-1), ck.norm(dim=-1))             # norms stay
        assert not torch.allclose(pk[16:], ck[16:])
    with pytest.raises(ValueError, match="MHA/GQA/MQA model"):
        spectra.kv_weight_matrices(TransformerLM(LMConfig(attention="mla")))


def test_bad_command_lines_are_refused(capsys):
    for argv in (["flash"], ["spectra", "--workers", "0"], ["spectra", "--device", "tpu"],
                 ["spectra", "--setting", "huge"]):
        with pytest.raises(SystemExit):
            main(argv)
    err = capsys.readouterr().err
    assert "invalid choice: 'flash'" in err and "--workers must be at least 1" in err and "tpu" in err
