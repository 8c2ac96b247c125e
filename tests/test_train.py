"""Self-supervised training and ε-calibration on tiny models, with real optimisation."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
from tiny import ARCHS, VOCAB, save_tiny_base, tiny_model
from tiny import batch as tiny_batch

from hf_earlyexit import EarlyExitForCausalLM
from hf_earlyexit.formatting import num
from hf_earlyexit.training.calibrate import CalibrateConfig, run_calibration, save_calibrated
from hf_earlyexit.training.data import (
    Corpus,
    GenerationSpec,
    TopKSampler,
    _left_padding,
    draft_vocabulary,
    generate_corpus,
    read_prompt_file,
)
from hf_earlyexit.training.teacher import CachedTeacher, OnlineTeacher
from hf_earlyexit.training.train import TrainConfig, evaluate_heads, train_heads


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_tiny_base("llama", tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def corpus(base_path):
    model = EarlyExitForCausalLM.from_base(base_path, exit_layers=[1, 2, 3])
    spec = GenerationSpec(num_sequences=48, max_new_tokens=24)
    return generate_corpus(model.backbone, model.tokenizer, spec, "tiny-llama", cache=False)


def fresh(base_path, **kw) -> EarlyExitForCausalLM:
    torch.manual_seed(0)  # heads initialised from scratch / adapters draw from the global generator
    return EarlyExitForCausalLM.from_base(base_path, exit_layers=[1, 2, 3], **kw)


def test_training_raises_agreement_and_lowers_loss(base_path, corpus, tmp_path):
    train, held = corpus.split(0.75)
    model = fresh(base_path, head="paper", head_init="scratch")
    before = evaluate_heads(model, held)
    config = TrainConfig(steps=60, lam=0.5, learning_rate=1e-2, log_every=5, checkpoint_every=30)
    history = train_heads(model, train, config, tmp_path)
    after = evaluate_heads(model, held)
    for b, a in zip(before, after, strict=True):
        assert a["agreement"] > b["agreement"] + 0.2, (b, a)
    first = [r["loss"] for r in history if r["step"] == 5]
    last = [r["loss"] for r in history if r["step"] == 60]
    assert all(lo < hi for lo, hi in zip(last, first, strict=True))
    assert (tmp_path / "train_log.csv").exists() and (tmp_path / "training_curves.png").exists()


def test_resume_continues_exactly(base_path, corpus, tmp_path):
    config = TrainConfig(steps=8, learning_rate=1e-2, checkpoint_every=4, log_every=2)
    whole = fresh(base_path, head="shared", adapter_rank=4)
    train_heads(whole, corpus, config, tmp_path / "whole")
    cut = fresh(base_path, head="shared", adapter_rank=4)
    train_heads(cut, corpus, TrainConfig(steps=4, learning_rate=1e-2, checkpoint_every=4, log_every=2),
                tmp_path / "cut")  # the "interrupted" run: stopped after its step-4 checkpoint
    resumed = fresh(base_path, head="shared", adapter_rank=4)
    train_heads(resumed, corpus, config, tmp_path / "cut", resume=True)
    for (name, a), b in zip(whole.heads.state_dict().items(), resumed.heads.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_lr_schedule_decays_and_resume_replays_it(base_path, corpus, tmp_path, monkeypatch):
    import json
    import shutil

    from hf_earlyexit.training import train as train_module

    config = TrainConfig(steps=8, learning_rate=1e-2, checkpoint_every=4, log_every=2, lr_schedule="cosine",
                         warmup_steps=2)
    save = train_module.save_checkpoint

    def keep_step_4(folder, *args, **kwargs):  # the real save; a copy of its step-4 checkpoint is kept aside
        save(folder, *args, **kwargs)
        if json.loads((folder / train_module.STATE_FILE).read_text())["step"] == 4:
            shutil.copytree(folder, tmp_path / "cut" / folder.name)

    monkeypatch.setattr(train_module, "save_checkpoint", keep_step_4)
    whole = fresh(base_path, head="shared", adapter_rank=4)
    train_heads(whole, corpus, config, tmp_path / "whole")
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    state = json.loads((tmp_path / "whole" / "checkpoint" / train_module.STATE_FILE).read_text())
    assert state["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    at_4 = json.loads((tmp_path / "cut" / "checkpoint" / train_module.STATE_FILE).read_text())
    # warm-up over 2 steps, then half a cosine over 6: after step 4 the rate is 1e-2 * (1 + cos(pi * 2/6)) / 2
    assert at_4["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.75)
    resumed = fresh(base_path, head="shared", adapter_rank=4)
    train_heads(resumed, corpus, config, tmp_path / "cut", resume=True)
    for (name, a), b in zip(whole.heads.state_dict().items(), resumed.heads.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # the schedule depends on the planned steps, so a cosine run does not resume with other steps
    with pytest.raises(ValueError, match="steps: checkpoint 8 vs now 12"):
        train_heads(fresh(base_path, head="shared", adapter_rank=4), corpus,
                    TrainConfig(**{**config.__dict__, "steps": 12}), tmp_path / "cut", resume=True)
    with pytest.raises(ValueError, match="lr_schedule='step' is not one of constant, cosine, linear"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match=r"warmup_steps=8 must lie in \[0, steps=8\)"):
        TrainConfig(steps=8, warmup_steps=8)


def test_resume_with_other_settings_is_refused(base_path, corpus, tmp_path):
    train_heads(fresh(base_path), corpus, TrainConfig(steps=2, checkpoint_every=2), tmp_path)
    with pytest.raises(ValueError, match="lam: checkpoint 0.95 vs now 0.2"):
        train_heads(fresh(base_path), corpus, TrainConfig(steps=4, lam=0.2), tmp_path, resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        train_heads(fresh(base_path), corpus, TrainConfig(steps=4), tmp_path)


def test_bad_prompt_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text("A cat is\n\nMy dog\n")
    assert read_prompt_file(tmp_path / "ok.txt") == ("A cat is", "My dog")


def test_draft_vocabulary_is_the_most_frequent_tokens():
    ids = torch.tensor([[0, 5, 5, 5, 7, 7, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    assert draft_vocabulary(Corpus(ids, mask), 12, 2).tolist() == [5, 7]
    assert draft_vocabulary(Corpus(ids, mask), 12, 2, always=[11]).tolist() == [5, 11]


def test_calibration_sets_thresholds_that_hold_on_held_out_tokens(base_path, corpus, tmp_path, caplog):
    model = fresh(base_path, head="paper", head_init="scratch")
    train_heads(model, corpus, TrainConfig(steps=40, lam=0.5, learning_rate=1e-2), tmp_path / "work")
    model.config.training = {"steps": 40}
    spec = GenerationSpec(prompts=["A cat is", "The capital"], num_sequences=96, max_new_tokens=24, sampling_seed=9)
    calib = generate_corpus(model.backbone, model.tokenizer, spec, "tiny-llama", cache=False)
    config = CalibrateConfig(min_tokens=200, eps_grid=[0.5, 0.8, 0.9, 1.0])
    thresholds, check_rows, cascade = run_calibration(model, config, calib)
    assert thresholds["1"] == [None, None, None]
    assert model.thresholds_for(1.0) == [None, None, None]
    assert model.thresholds_for(0.8) == thresholds["0.8"]
    # an ε off the grid is derived from the stored statistics
    assert model.thresholds_for(0.85) is not None and len(model.thresholds_for(0.85)) == 3
    for row in check_rows:  # on held-out tokens, exited tokens agree at about ε (small data: generous margin)
        if row["threshold"] is not None and row["coverage"] * 2000 > 50 and row["eps"] < 1:
            assert row["agreement"] >= row["eps"] - 0.15, row
    save_calibrated(model, tmp_path / "heads", check_rows, cascade)
    loaded = EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")
    assert loaded.config.thresholds == thresholds
    assert loaded.thresholds_for(0.85) == model.thresholds_for(0.85)
    assert (tmp_path / "heads" / "calibration.png").exists()


def test_calibration_records_the_log_prob_error_where_a_scored_position_would_read_a_head(base_path, corpus,
                                                                                          tmp_path):
    """Per head and calibration token (aligned with its score): the head's log-probability of the next token minus
    the full model's, recorded exactly where the head's top token is the next token (NaN elsewhere and at a
    sequence's last token) — against a by-hand oracle over each sequence alone; the scoring gates derived from them
    survive saving and loading, and a file whose errors do not line up with its scores is refused."""
    from safetensors.torch import load_file, save_file

    model = fresh(base_path)
    train_heads(model, corpus, TrainConfig(steps=30, learning_rate=1e-2), tmp_path / "work")
    config = CalibrateConfig(min_tokens=100, eps_grid=[0.5, 1.0])
    _, check_rows, cascade = run_calibration(model, config, corpus)
    stats = model.calibration_stats
    _, fit = corpus.split(config.check_fraction)
    expected = [[] for _ in model.exit_heads]
    for ids, mask in zip(fit.input_ids, fit.attention_mask, strict=True):
        x = ids[mask.bool()][None]
        with torch.no_grad():
            full = torch.log_softmax(model.get_base_model()(x).logits[0].float(), dim=-1)
            heads = model(x, output_hidden_states=True).exit_logits
        for j, head in enumerate(model.exit_heads):
            log_probs = torch.log_softmax(heads[j][0].float(), dim=-1)
            for pos in range(x.shape[1]):
                token = int(x[0, pos + 1]) if pos + 1 < x.shape[1] else -1
                top = int(head.to_token_ids(log_probs[pos].argmax()))
                expected[j].append(float(log_probs[pos, token] - full[pos, token]) if top == token else math.nan)
    read = 0
    for j in range(len(model.exit_heads)):
        got = stats[f"error.{j}"]
        assert got.shape == stats[f"score.{j}"].shape == (len(expected[j]),)
        want = torch.tensor(expected[j])
        assert torch.equal(got.isnan(), want.isnan()), j
        torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()], atol=2e-4, rtol=0)
        read += int((~got.isnan()).sum())
    assert read > 20  # the heads name the next token often enough for the check to mean something
    gates = model.scoring_gates_for(0.5, 0.1)
    assert gates is not None and len(gates) == 3 and model.scoring_gates_for(0.5, math.inf) is None
    save_calibrated(model, tmp_path / "heads", check_rows, cascade)
    assert EarlyExitForCausalLM.from_pretrained(tmp_path / "heads").scoring_gates_for(0.5, 0.1) == gates
    card = (tmp_path / "heads" / "README.md").read_text()  # the card shows the gates at the default δ
    shown = ["never" if g == math.inf else num(g) for g in gates]
    assert "scoring_delta` =\n0.1 nats" in card and f"| 0.5 | {' | '.join(shown)} |" in card
    broken = load_file(tmp_path / "heads" / "calibration.safetensors")
    broken["error.1"] = broken["error.1"][:-1].contiguous()
    save_file(broken, tmp_path / "heads" / "calibration.safetensors")
    with pytest.raises(ValueError, match=r"error\.1 \(\d+,\) must have the shape of score\.1"):
        EarlyExitForCausalLM.from_pretrained(tmp_path / "heads")


def test_calibration_needs_enough_tokens_and_warns_on_untrained_heads(base_path, corpus, caplog):
    model = fresh(base_path)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"exit@1 has only \d+ .*at least 100000"):
        run_calibration(model, CalibrateConfig(min_tokens=100000), corpus)
    assert "never trained" in caplog.text
    with pytest.raises(ValueError, match="eps=1.5"):
        CalibrateConfig(eps_grid=[0.5, 1.5])
    with pytest.raises(ValueError, match="eps=-0.1"):
        model.thresholds_for(-0.1)


@pytest.mark.parametrize("head", ["paper", "shared"])
def test_cached_teacher_serves_what_the_backbone_computes(base_path, corpus, head):
    model = fresh(base_path, head=head, draft_token_ids=list(range(0, 97, 3)))
    cached = CachedTeacher.build(model, corpus, batch_size=5)  # batches unlike the ones asked for below
    online = OnlineTeacher(model, corpus)
    for rows in (torch.tensor([0, 7, 3]), torch.tensor([len(corpus) - 1]), torch.arange(len(corpus))):
        a, b = cached.batch(rows), online.batch(rows)
        real = b.mask.bool()
        assert torch.equal(a.mask, b.mask) and torch.equal(a.top[real], b.top[real])
        for x, y in zip(a.hidden + a.targets, b.hidden + b.targets, strict=True):
            torch.testing.assert_close(x[real], y[real], rtol=1e-5, atol=1e-6)
        assert a.targets[0] is a.targets[1] is a.targets[2]  # one vocabulary: one target tensor
        torch.testing.assert_close(b.targets[0][real].sum(-1), torch.ones(int(real.sum())))  # draft + OTHER = 1
    # without targets (evaluation) the top token comes through `final_topk`: still the base model's own argmax
    ids, mask = corpus.input_ids, corpus.attention_mask
    bare = OnlineTeacher(model, corpus, with_targets=False).batch(torch.arange(len(corpus)))
    first = ids.shape[1] - bare.mask.shape[1]
    assert bare.targets is None and torch.equal(bare.mask, mask[:, first:])
    with torch.no_grad():
        oracle = model.backbone(ids, attention_mask=mask).logits[:, first:].argmax(-1)
    real = bare.mask.bool()
    assert torch.equal(bare.top[real], oracle[real])
    for x, y in zip(bare.hidden, online.batch(torch.arange(len(corpus))).hidden, strict=True):
        torch.testing.assert_close(x[real], y[real], rtol=1e-5, atol=1e-6)


def test_training_from_the_teacher_cache_equals_running_the_backbone(base_path, corpus, tmp_path, caplog):
    config = dict(steps=12, learning_rate=1e-2, lam=0.3, log_every=4, checkpoint_every=12)
    runs = {}
    for gib in (0.0, 4.0):
        model = fresh(base_path, head="shared", adapter_rank=4, draft_token_ids=list(range(40)))
        with caplog.at_level(logging.INFO, logger="hf_earlyexit.training.teacher"):
            history = train_heads(model, corpus, TrainConfig(teacher_cache_gib=gib, **config), tmp_path / str(gib),
                                  held_out=corpus)
        runs[gib] = (model, history)
    assert "running the backbone every step" in caplog.text and "Caching the backbone's outputs" in caplog.text
    (online, online_log), (cached, cached_log) = runs[0.0], runs[4.0]
    for (name, a), b in zip(online.heads.state_dict().items(), cached.heads.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(online_log, cached_log, strict=True):
        assert a["step"] == b["step"] and a["agreement"] == pytest.approx(b["agreement"], abs=1e-3)
        assert a["held_out_agreement"] == pytest.approx(b["held_out_agreement"], abs=1e-3)
    with pytest.raises(ValueError, match="teacher_cache_gib=-1"):
        TrainConfig(teacher_cache_gib=-1)


@pytest.mark.slow  # two processes that each import torch and transformers: ~1 min on busy cores
def test_accelerate_data_parallel_training_equals_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """Two `accelerate launch` ranks with batch 2 each take the steps one process takes with batch 4: gradients are
    combined over ranks weighted by real tokens (rows differ in length here), and one folder is written."""
    from safetensors.torch import load_file
    from tiny import launch_two_cpu_ranks

    from hf_earlyexit.commands.cli import main

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    base = save_tiny_base("llama", tmp_path / "base")
    common = ["--model", base, "--exit_layers", "1", "2", "--head", "shared", "--adapter_rank", "4",
              "--draft_vocab_size", "40", "--num_sequences", "16", "--max_new_tokens", "12", "--steps", "6",
              "--learning_rate", "1e-2", "--checkpoint_every", "3", "--log_every", "3"]
    assert main(["train", *common, "--output_dir", str(tmp_path / "one"), "--batch_size", "4"]) == 0
    run = launch_two_cpu_ranks("hf_earlyexit", ["train", *common, "--output_dir", str(tmp_path / "two"),
                                                "--batch_size", "2"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one = load_file(tmp_path / "one" / "exit_heads.safetensors")
    two = load_file(tmp_path / "two" / "exit_heads.safetensors")
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)
    up = [name for name in one if name.endswith("adapter.1.weight")]
    assert up and all(one[name].abs().sum() > 0 for name in up)  # zero-initialised: training moved them
    assert not list(tmp_path.glob(".two-*")), "a second rank started writing the folder"


def test_calibration_metric_auto_takes_the_metric_that_lets_most_tokens_exit(base_path, corpus, tmp_path):
    from hf_earlyexit.modeling.configuration_earlyexit import METRICS
    from hf_earlyexit.modeling.exits_earlyexit import fit_thresholds
    from hf_earlyexit.training.calibrate import cascade_table, collect

    model = fresh(base_path, head="paper", head_init="scratch")
    train_heads(model, corpus, TrainConfig(steps=30, lam=0.5, learning_rate=1e-2), tmp_path / "work")
    model.config.training, model.config.eps = {"steps": 30}, 0.6
    config = CalibrateConfig(metric="auto", min_tokens=100, eps_grid=[0.5, 0.6, 1.0], check_fraction=0.5)
    run_calibration(model, config, corpus)
    selection = model.config.calibration["metric_selection"]
    assert selection["eps"] == 0.6 and set(selection["exited"]) == set(METRICS)
    _, fit = corpus.split(0.5)
    for metric in METRICS:  # each metric's share of exiting tokens, measured one metric at a time
        records = collect(model, fit, metric)
        taus = fit_thresholds([r["score"] for r in records], [r["agree"] for r in records], 0.6)
        expected = cascade_table(records, {"0.6": taus})[0]["exited"]
        assert selection["exited"][metric] == pytest.approx(expected), metric
    assert model.config.metric == max(METRICS, key=lambda m: selection["exited"][m])
    assert model.config.calibration["metric"] == model.config.metric
    with pytest.raises(ValueError, match="metric='best'"):
        CalibrateConfig(metric="best")


# -- features on disk and top-k distillation -------------------------------------------------------------------------


def test_feature_store_serves_what_the_backbone_computes_and_resumes(base_path, corpus, tmp_path):
    from hf_earlyexit.training.features import FeatureStore

    model = fresh(base_path, head="shared", adapter_rank=4, draft_token_ids=list(range(0, 97, 3)))
    store = FeatureStore.build(model, corpus, tmp_path / "features", k=5, batch_size=3, shard_rows=10)
    assert store.num_shards == 5 and len(list((tmp_path / "features").glob("shard-*.safetensors"))) == 5
    from hf_earlyexit.training.teacher import DiskTeacher

    disk, online = DiskTeacher(store), OnlineTeacher(model, corpus)
    for rows in (torch.tensor([0, 7, 3]), torch.tensor([9, 10, 47]), torch.arange(len(corpus))):
        a, b = disk.batch(rows), online.batch(rows)
        real = b.mask.bool()
        assert torch.equal(a.mask, b.mask) and torch.equal(a.top[real], b.top[real])
        for x, y in zip(a.hidden, b.hidden, strict=True):
            torch.testing.assert_close(x[real], y[real], rtol=1e-5, atol=1e-6)
        logp = torch.log_softmax(model(*corpus_rows(corpus, rows)).logits.float(), -1)[:, -a.mask.shape[1]:]
        expected_logp, expected_ids = logp.topk(5, dim=-1)
        assert torch.equal(a.targets.ids[real], expected_ids[real])
        # stored fp16; the top k among themselves to fp16 precision, the normaliser to the LM-head screen's bf16
        # rounding where it screens (`lm_topk.final_topk`; exact where it does not)
        got = a.targets.logp[real]
        torch.testing.assert_close(got - got[:, :1], (expected_logp - expected_logp[..., :1])[real], rtol=0,
                                   atol=8e-3)  # two fp16 roundings of values in (-16, 0]
        torch.testing.assert_close(got[:, 0], expected_logp[real][:, 0], rtol=0, atol=0.05)
    # a second build finds every shard and writes nothing; a removed shard is written again, the same
    from safetensors.torch import load_file

    first = load_file(tmp_path / "features" / "shard-00002.safetensors")
    (tmp_path / "features" / "shard-00002.safetensors").unlink()
    FeatureStore.build(model, corpus, tmp_path / "features", k=5, batch_size=7)
    again = load_file(tmp_path / "features" / "shard-00002.safetensors")
    assert sorted(again) == sorted(first)
    for name, tensor in first.items():  # the screen's normaliser may round otherwise in other batch shapes
        if name == "topk_logp":
            torch.testing.assert_close(again[name].float(), tensor.float(), rtol=0, atol=0.05)
        else:
            assert torch.equal(again[name], tensor), name
    with pytest.raises(ValueError, match=r"other data or another model \(differs in \['k'\]\)"):
        FeatureStore.build(model, corpus, tmp_path / "features", k=6)
    order = disk.order(epoch=0, seed=0)
    assert sorted(order.tolist()) == list(range(len(corpus)))
    shards = (order // 10).tolist()
    changes = sum(a != b for a, b in zip(shards, shards[1:], strict=False))
    assert changes == store.num_shards - 1, "an epoch reads one shard at a time"


def corpus_rows(corpus, rows):
    return corpus.input_ids[rows], corpus.attention_mask[rows]


def test_topk_distillation_from_disk_raises_agreement(base_path, corpus, tmp_path):
    from hf_earlyexit.training.features import FeatureStore

    train, held = corpus.split(0.75)
    model = fresh(base_path, head="paper", head_init="scratch")
    store = FeatureStore.build(model, train, tmp_path / "features", k=8, shard_rows=8)
    before = evaluate_heads(model, held)
    config = TrainConfig(steps=60, lam=0.5, learning_rate=1e-2, loss="topk", log_every=20, checkpoint_every=60,
                         head_lr_scale=[1.0, 1.0, 0.5])
    train_heads(model, store, config, tmp_path / "work", held_out=held)
    after = evaluate_heads(model, held)
    for b, a in zip(before, after, strict=True):
        assert a["agreement"] > b["agreement"] + 0.2, (b, a)
    with pytest.raises(ValueError, match="loss='ce' needs a Corpus"):
        train_heads(model, store, TrainConfig(steps=1), tmp_path / "other")
    with pytest.raises(ValueError, match="head_lr_scale has 2 values for 3 exits"):
        train_heads(model, store, TrainConfig(steps=1, loss="topk", head_lr_scale=[1.0, 2.0]), tmp_path / "other")
    with pytest.raises(ValueError, match="head_lr_scale=.*positive"):
        TrainConfig(head_lr_scale=[1.0, 0.0, 1.0])


def test_sparse_loss_maps_tokens_outside_the_draft_vocabulary_to_other(base_path):
    from hf_earlyexit.training.features import SparseTargets
    from hf_earlyexit.training.losses import sparse_head_loss

    model = fresh(base_path, head="shared", adapter_rank=4, draft_token_ids=[3, 5, 8])
    head = model.exit_heads[0]
    assert head.classes_of(torch.tensor([5, 8, 3, 4, 96])).tolist() == [1, 2, 0, 3, 3]
    logits = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)  # (batch, seq, draft + OTHER)
    target = SparseTargets(torch.tensor([[[5, 40], [96, 3]]]), torch.log(torch.tensor([[[0.6, 0.2], [0.5, 0.3]]])))
    loss, entropy = sparse_head_loss(logits, head, target, torch.ones(1, 2), lam=0.0)
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(0.75 * logp[0, 1] + 0.25 * logp[0, 3] + 0.625 * logp[1, 3] + 0.375 * logp[1, 0]) / 2
    torch.testing.assert_close(loss, expected.float())
    # the fused loss's gradient is the log-softmax formula's; the entropy it reports is the head's
    (grad,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, want)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1, keepdim=True).T.float())
    assert sparse_head_loss(logits, head, target, torch.ones(1, 2), lam=0.0, with_entropy=False)[1] is None
    # with an entropy term (lam > 0) the loss is the paper's (1-λ)·CE − λ·H
    mixed, mixed_entropy = sparse_head_loss(logits, head, target, torch.ones(1, 2), lam=0.25)
    torch.testing.assert_close(mixed, (0.75 * expected - 0.25 * mixed_entropy.mean()).float())


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_linear_topk_loss_equals_the_logits_path(arch, monkeypatch):
    """`linear_topk_loss` (the LM head's product and the loss a slice of positions at a time, the input gradient taken
    in the forward pass) against `sparse_head_loss` on the head's whole logits: the same loss and the same gradients
    for every trainable tensor, with left padding, a draft vocabulary (context head) and the full one (shared head),
    through each family's bias or soft-cap; under bf16 autocast within bf16 rounding."""
    from hf_earlyexit.training import losses
    from hf_earlyexit.training.features import SparseTargets

    monkeypatch.setattr(losses, "SLICE_BYTES", 1)  # 16 positions per slice: the 2 x 11 positions take two
    ids, mask = tiny_batch([11, 7], seed=3)
    generator = torch.Generator().manual_seed(5)
    target = SparseTargets(torch.randint(0, VOCAB, (2, 11, 6), generator=generator),
                           torch.randn(2, 11, 6, generator=generator).log_softmax(-1))
    for kind, extra in (("context", {"draft_token_ids": list(range(0, VOCAB, 2))}), ("shared", {})):
        torch.manual_seed(0)
        model = EarlyExitForCausalLM.from_base(tiny_model(arch), exit_layers=[1, 3], head=kind, adapter_rank=4,
                                               **extra)
        for head in model.exit_heads:
            for p in head.parameters():
                p.data.add_(torch.randn_like(p) * 0.1)
        lm_bias = model.backbone.get_output_embeddings().bias  # Phi's LM head has one, initialised to zero
        if lm_bias is not None:
            lm_bias.data.normal_(generator=generator)
        with torch.no_grad():
            states = model(ids, attention_mask=mask, output_hidden_states=True).exit_hidden_states
        for head, hidden in zip(model.exit_heads, states, strict=True):
            params = [p for p in head.parameters() if p.requires_grad]
            for autocast in (False, True):
                results = []
                for path in ("logits", "sliced"):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        if path == "logits":
                            loss = losses.sparse_head_loss(head(hidden, mask), head, target, mask, lam=0.0)[0]
                        else:
                            loss = losses.linear_topk_loss(head, head.features(hidden, mask), target, mask)
                    results.append((loss, torch.autograd.grad(loss, params)))
                (want, want_grads), (got, got_grads) = results
                tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
                torch.testing.assert_close(got, want, **tol)
                for g, w in zip(got_grads, want_grads, strict=True):
                    scale = float(w.abs().max()) or 1.0
                    torch.testing.assert_close(g / scale, w / scale, **tol)
    # the rows' bf16 copy is kept between steps, but not past a change of the LM head (the full-vocabulary head's
    # rows are the LM head's own weight)
    with torch.no_grad():
        model.backbone.get_output_embeddings().weight.normal_(generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = losses.sparse_head_loss(head(hidden, mask), head, target, mask, lam=0.0)[0]
        got = losses.linear_topk_loss(head, head.features(hidden, mask), target, mask)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_text_records_become_passages(tmp_path):
    from hf_earlyexit.training.data import read_text_files

    (tmp_path / "a.jsonl").write_text('{"id": "q1", "question": {"stem": "Why is the sky blue?", "choices": '
                                      '[{"text": "light scatters off air", "label": "A"}]}, "answerKey": "A"}\n\n'
                                      '{"ctx": "A man plays a harmonica.", "label": 2}\n')
    (tmp_path / "b.csv").write_text('"What is 2 + 2?",3,4,5,6,B\n')
    (tmp_path / "c.txt").write_text("Plain text stays one passage.\nEven over lines.")
    assert read_text_files([tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.txt"]) == [
        "Why is the sky blue? light scatters off air", "A man plays a harmonica.", "What is 2 + 2?",
        "Plain text stays one passage.\nEven over lines."]
    (tmp_path / "bad.jsonl").write_text('{"ok": "a b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a JSON record"):
        read_text_files([tmp_path / "bad.jsonl"])
    (tmp_path / "ids.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="holds no prose"):
        read_text_files([tmp_path / "ids.csv"])


def test_train_job_draft_vocabulary_comes_from_its_own_corpus_and_topk_trains_from_features(base_path, tmp_path):
    """The draft vocabulary is built from the corpus the heads train on (the user's text included), and
    `loss="topk"` runs the backbone once into a feature store that a second run reuses."""
    from hf_earlyexit.training.features import MANIFEST
    from hf_earlyexit.training.pipeline import TrainJob, run_train

    text = tmp_path / "zzz.jsonl"
    text.write_text("".join('{"text": "zzz zzz zzz zzz zz z"}\n' for _ in range(40)))  # mostly the letter z
    spec = GenerationSpec(num_sequences=4, max_new_tokens=8)
    config = TrainConfig(steps=4, batch_size=4, loss="topk", topk=6, lam=0.1, log_every=2, checkpoint_every=4)
    job = TrainJob(model=base_path, output_dir=str(tmp_path / "heads"), head="shared", adapter_rank=4,
                   draft_vocab_size=5, text_files=[str(text)], seq_len=16, held_out_fraction=0.2,
                   features_dir=str(tmp_path / "features"))
    model, report = run_train(job, spec, config)
    z = model.tokenizer.convert_tokens_to_ids("z")
    assert z in model.exit_heads[0].token_ids.tolist()
    assert model.config.training["data"]["text_files"] == ["zzz.jsonl"]  # not the trainer's absolute path
    assert (tmp_path / "features" / MANIFEST).exists() and list((tmp_path / "features").glob("shard-*"))
    assert len(report) == 3 and all(0 <= r["agreement"] <= 1 for r in report)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("shard-*")}
    job.output_dir, job.work_dir = str(tmp_path / "again"), str(tmp_path / "again.work")
    job.log_held_out = True  # the log also holds held-out agreement at every logged step; the last is the report's
    _, again = run_train(job, spec, config)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "features").glob("shard-*")}
    with open(tmp_path / "again.work" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 2, 2, 4, 4, 4]
    assert [float(r["held_out_agreement"]) for r in rows[3:]] == pytest.approx([r["agreement"] for r in again])
    job.prompt_file, job.output_dir = str(tmp_path / "missing.txt"), str(tmp_path / "third")
    with pytest.raises(FileNotFoundError):
        run_train(job, spec, config)


def test_cascade_fit_holds_the_whole_rule_at_eps_where_per_head_fits_fall_short():
    """Exit 2 alone agrees at ε on all tokens, but exit 1 takes its easy tokens first: fit per head, the tokens exit 2
    gets agree below ε; fit for the cascade, every exit's share and the whole rule stay at ε or above."""
    from hf_earlyexit.modeling.exits_earlyexit import fit_thresholds
    from hf_earlyexit.training.calibrate import cascade_table

    gen = torch.Generator().manual_seed(0)
    n = 4000
    easy = torch.rand(n, generator=gen) < 0.5
    score1 = torch.where(easy, 0.9, 0.1) + 0.01 * torch.rand(n, generator=gen)  # exit 1 sees which tokens are easy
    agree1 = easy & (torch.rand(n, generator=gen) < 0.95)
    score2 = torch.rand(n, generator=gen)
    agree2 = easy | (torch.rand(n, generator=gen) < score2)  # easy tokens always agree at exit 2
    records = [{"score": score1, "agree": agree1}, {"score": score2, "agree": agree2}]
    eps = 0.9
    for fit, at_least in (("per_head", False), ("cascade", True)):
        taus = fit_thresholds([score1, score2], [agree1, agree2], eps, fit)
        row = cascade_table(records, {f"{eps:g}": taus})[0]
        left_at_2 = (score1 < taus[0]) & (score2 >= taus[1])
        share = float(agree2[left_at_2].double().mean())
        assert (share >= eps - 1e-9) == at_least, (fit, share)
        if fit == "cascade":
            assert row["agreement_exited"] >= eps - 1e-9
    with pytest.raises(ValueError, match="fit='greedy'"):
        fit_thresholds([score1], [agree1], eps, "greedy")


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 5), (0.5, 12), (2.0, 0)])
def test_top_k_sampler_draws_from_hfs_own_tempered_top_k_distribution(temperature, top_k):
    """The oracle is HF's own temperature and top-k warpers + softmax over the same scores."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    torch.manual_seed(3)
    row = torch.randn(1, 24) * 2
    scores = row.expand(40_000, -1).clone()
    expected = row
    expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    expected = torch.softmax(expected, dim=-1)[0]
    out = TopKSampler(temperature, top_k)(None, scores)
    finite = torch.isfinite(out)
    assert finite.sum(dim=-1).eq(1).all() and out[finite].eq(0).all()
    drawn = out.argmax(dim=-1)
    freq = torch.bincount(drawn, minlength=24).double() / drawn.numel()
    assert float((freq - expected.double()).abs().max()) < 0.01, (freq, expected)
    assert freq[expected == 0].sum() == 0  # never a token outside the top k


def test_generated_tokens_come_from_the_base_models_top_k(base_path):
    """Teacher-forced on the unmodified base: every sampled token is among its top k there; top_k=1 is greedy."""
    model = EarlyExitForCausalLM.from_base(base_path, exit_layers=[1])
    base, tokenizer = model.backbone, model.tokenizer
    prompt = "A cat is"
    start = _left_padding(tokenizer)(prompt, return_tensors="pt")["input_ids"].shape[1]
    spec = GenerationSpec(prompts=[prompt], num_sequences=12, max_new_tokens=16, generation_batch_size=5, top_k=3)
    corpus = generate_corpus(base, tokenizer, spec, "tiny-llama", cache=False)
    with torch.no_grad():
        logits = base(input_ids=corpus.input_ids, attention_mask=corpus.attention_mask).logits
    top = logits[:, start - 1:-1].topk(3, dim=-1).indices
    new, kept = corpus.input_ids[:, start:], corpus.attention_mask[:, start:].bool()
    inside = (top == new.unsqueeze(-1)).any(dim=-1)
    assert inside[kept].all() and kept.sum() > 100
    assert not (top[..., 0] == new)[kept].all()  # it samples: not always the top token
    greedy_spec = GenerationSpec(prompts=[prompt], num_sequences=2, max_new_tokens=16, top_k=1)
    greedy = generate_corpus(base, tokenizer, greedy_spec, "tiny-llama", cache=False)
    enc = tokenizer([prompt, prompt], return_tensors="pt")
    with torch.no_grad():
        plain = base.generate(**enc, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    mask = greedy.attention_mask.bool()
    assert torch.equal(greedy.input_ids[mask], plain[mask])


def test_generated_tokens_are_the_same_through_the_lm_heads_screen(base_path):
    """Sampling through the LM head's bfloat16 screen for the top k (forced on, any CPU) draws the same tokens from
    the same seed as sampling from the exact logits: the same top k, the same values to float32 rounding."""
    model = EarlyExitForCausalLM.from_base(base_path, exit_layers=[1])
    spec = GenerationSpec(prompts=["A cat is", "The sea"], num_sequences=6, max_new_tokens=12, generation_batch_size=4,
                          top_k=5)
    made = [generate_corpus(model.backbone, model.tokenizer, spec, "tiny-llama", cache=False, screen=screen)
            for screen in ("off", "bf16")]
    assert torch.equal(made[0].input_ids, made[1].input_ids)
    assert torch.equal(made[0].attention_mask, made[1].attention_mask)


def test_generated_data_cache_is_keyed_by_the_weights_not_only_the_name(tmp_path, monkeypatch):
    """Two bases under one name (other weights) never share cached generations; the same base reuses its own."""
    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    spec = GenerationSpec(num_sequences=2, max_new_tokens=6)
    models = [EarlyExitForCausalLM.from_base(save_tiny_base("llama", tmp_path / f"b{seed}", seed=seed),
                                             exit_layers=[1]) for seed in (0, 1)]
    first = generate_corpus(models[0].backbone, models[0].tokenizer, spec, "same-name")
    other = generate_corpus(models[1].backbone, models[1].tokenizer, spec, "same-name")
    assert len(list((tmp_path / "cache" / "data").glob("generated-*.safetensors"))) == 2
    assert not torch.equal(first.input_ids, other.input_ids)
    again = generate_corpus(models[0].backbone, models[0].tokenizer, spec, "same-name")
    assert torch.equal(again.input_ids, first.input_ids)
    assert len(list((tmp_path / "cache" / "data").glob("generated-*.safetensors"))) == 2
