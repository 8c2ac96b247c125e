"""The `hf-earlyexit` command line."""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import distribution

import pytest
from tiny import save_tiny_base

from hf_earlyexit.commands.cli import COMMANDS, main


def test_console_script_help():
    # where pip put it for this install (venv, system or user scheme), whether or not that folder is on PATH
    [script] = [f for f in distribution("hf-earlyexit").files if f.name == "hf-earlyexit"]
    exe = script.locate()
    assert exe.is_file(), f"the console script is installed by `pip install`: {exe}"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    # every subcommand but `tasks` (which only converts benchmark files) runs a model
    assert ("--data_dir" if command == "tasks" else "--model") in capsys.readouterr().out


def test_info_prints_exits_and_costs(tmp_path, capsys):
    base = save_tiny_base("gpt_neox", tmp_path / "base")
    assert main(["info", "--model", base, "--exit_layers", "1", "3", "--head", "shared", "--adapter_rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox, 4 layers" in out and "after layers [1, 3]" in out and "head shared" in out
    assert "exit@1" in out and "exit@3" in out and "full" in out


def test_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--head", "mlp"])
    assert "invalid choice: 'mlp'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def calibrated_folder(tmp_path_factory):
    """A tiny heads folder with thresholds for ε=0.5 (at each head's median confidence) and its tokenizer."""
    from test_decoding import save_median_heads

    return save_median_heads(tmp_path_factory.mktemp("cli"))[1]


def test_generate_prints_text_colours_and_exit_summary(calibrated_folder, capsys):
    assert main(["generate", "hello world", "--model", calibrated_folder, "--dtype", "float32", "--eps", "0.5",
                 "--max_new_tokens", "10", "--colour"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello world")
    assert "\033[" in out and "exit@1" in out and "tok/s" in out and "decoder-layer work" in out


def test_generate_needs_a_prompt(calibrated_folder, capsys):
    assert main(["generate", "--model", calibrated_folder, "--dtype", "float32"]) == 2  # a user error: one line
    assert "give a prompt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give a prompt"):
        main(["generate", "--model", calibrated_folder, "--dtype", "float32", "--debug"])


def test_bench_writes_json_and_plot(calibrated_folder, tmp_path, capsys):
    import json

    out_dir = tmp_path / "bench"
    assert main(["bench", "--model", calibrated_folder, "--dtype", "float32", "--eps_grid", "0.5", "1.0",
                 "--num_prompts", "2", "--batch_size", "2", "--max_new_tokens", "6", "--batch_exit", "row", "step",
                 "--output_dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "bench.json").read_text())
    assert (out_dir / "bench.png").stat().st_size > 0
    rows = {r["label"]: r for r in report["sets"]["varied"]["rows"]}
    for rule in ("row", "step"):
        assert rows[f"early exit ε=1 ({rule} rule)"]["agreement"] == 1.0  # ε = 1 is plain decoding
        assert rows[f"early exit ε=1 ({rule} rule)"]["identical_sequences"] == 2
        assert rows[f"early exit ε=0.5 ({rule} rule)"]["batch_exit"] == rule
    forced = rows["all at exit@1"]
    assert forced["exit_fractions"][0] > 0.5 and forced["layers_fraction"] < 1.0
    assert "| plain |" in capsys.readouterr().out


def test_bench_dssd_against_peers(calibrated_folder, tmp_path):
    import json

    out_dir = tmp_path / "bench"
    assert main(["bench", "--model", calibrated_folder, "--dtype", "float32", "--mode", "dssd", "--dssd_eps_grid",
                 "0.5", "--layerskip_drafts", "2", "--prompt_lookup_tokens", "3", "--num_prompts", "2",
                 "--max_new_tokens", "8", "--oracle_mix", "1:1:0", "1:0.5:1", "--output_dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "bench.json").read_text())
    assert set(report["sets"]) == {"varied", "repetitive"}
    for part in report["sets"].values():
        rows = {r["family"]: r for r in part["rows"]}
        families = {"plain", "dssd", "dssd_lookup", "early_exit", "hf_early_exit", "prompt_lookup", "layerskip",
                    "oracle_dssd"}
        assert families <= set(rows)
        for family in ("dssd", "dssd_lookup", "layerskip", "hf_early_exit", "prompt_lookup", "oracle_dssd"):
            assert rows[family]["identical_sequences"] == 2, family  # lossless methods reproduce plain greedy
        assert rows["dssd"]["drafted"] > 0 and 0 <= rows["dssd"]["acceptance_rate"] <= 1
        oracles = [r for r in part["rows"] if r["family"] == "oracle_dssd"]
        assert len(oracles) == 3 and all(r["acceptance_rate"] == 1.0 for r in oracles)  # the oracle is always kept
        best = max(r["tokens_per_s"] for r in oracles)
        assert rows["dssd"]["vs_ceiling"] == pytest.approx(rows["dssd"]["tokens_per_s"] / best)
        # imperfect oracles stay lossless, never count as the ceiling, and keep what their rates say
        mixed = {(r["share"], r["right"]): r for r in part["rows"] if r["family"] == "oracle_mix"}
        assert set(mixed) == {(1.0, 0.0), (0.5, 1.0)}
        assert all(r["identical_sequences"] == 2 for r in mixed.values())
        wrong, half = mixed[1.0, 0.0], mixed[0.5, 1.0]
        assert wrong["drafted"] > 0 and wrong["acceptance_rate"] == 0.0  # every draft is a wrong token
        assert half["acceptance_rate"] == 1.0 and 0 < half["drafted"] < oracles[0]["drafted"]


@pytest.mark.parametrize("spec, message", [
    ("4:0.5", "must read EXIT:DRAFTED:KEPT"), ("4:x:0.9", "must read EXIT:DRAFTED:KEPT"),
    ("4:1:1:1", "must read EXIT:DRAFTED:KEPT"), ("5:1:1", "exit 5 is not an exit"),
    ("4:0:1", "DRAFTED must lie in (0, 1]"), ("4:1:1.5", "KEPT in [0, 1]"),
])
def test_oracle_mix_spec_errors_name_the_entry(spec, message):
    from hf_earlyexit.evaluation.bench import parse_oracle_mix

    assert parse_oracle_mix("8:0.75:0.9", [4, 8]) == (1, 0.75, 0.9)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_oracle_mix(spec, [4, 8])
    assert repr(spec) in str(err.value)


def test_bench_vocab_study(calibrated_folder, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("HF_EARLYEXIT_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "vocab"
    assert main(["bench", "--model", calibrated_folder, "--dtype", "float32", "--mode", "vocab", "--vocab_sizes",
                 "8", "40", "97", "--vocab_sequences", "4", "--num_prompts", "2", "--max_new_tokens", "6",
                 "--output_dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "vocab.json").read_text())
    coverage = [r["coverage"] for r in report["rows"]]
    assert coverage == sorted(coverage) and coverage[-1] == 1.0  # the whole vocabulary covers every token
    assert all(r["head_ms"] > 0 for r in report["rows"]) and report["layer_ms"] > 0
    assert "draft vocabulary study" in capsys.readouterr().out


def test_demo_decodes_every_way_and_dssd_matches_plain(calibrated_folder, tmp_path, capsys):
    import json

    out_dir = tmp_path / "demo"
    assert main(["demo", "--model", calibrated_folder, "--dtype", "float32", "--eps", "0.5", "--dssd_eps", "0.5",
                 "--prompt", "hello world", "the cat", "--max_new_tokens", "8", "--output_dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "demo.json").read_text())
    assert (out_dir / "demo.png").stat().st_size > 0
    plain, early, dssd, lookup = report["rows"]
    assert plain["identical"] == "2/2" and plain["agreement"] == 1.0
    assert dssd["identical"] == lookup["identical"] == "2/2"  # lossless: the plain model's tokens (fp32)
    assert 0.0 <= float(dssd["accepted/drafted"]) <= 1.0
    assert report["dssd_divergences"] == []
    for name in ("early exit ε=0.5", "DSSD ε=0.5", "DSSD ε=0.5 + lookup"):
        fractions = report["exit_fractions"][name]
        assert len(fractions) == 4 and abs(sum(fractions) - 1.0) < 1e-9
    out = capsys.readouterr().out
    assert "\033[" in out and "tok/s" in out and "exit@1" in out


def test_demo_explains_where_a_sequence_departs_from_plain(calibrated_folder):
    """A sequence that swaps plain's token at position 3 for the model's least likely one is reported there, with the
    full model's logit gap between the two tokens (the demo prints this for bf16 DSSD rows that are not identical)."""
    import torch

    from hf_earlyexit import load
    from hf_earlyexit.commands.demo import DemoRun, find_divergences

    model, tokenizer = load(calibrated_folder, dtype=torch.float32)
    encoded = [tokenizer("hello world", return_tensors="pt"), tokenizer("the cat", return_tensors="pt")]
    with torch.inference_mode():
        plain = [model.generate(**e, max_new_tokens=6, do_sample=False, mode="plain")[:, e["input_ids"].shape[1]:]
                 for e in encoded]
        prefix = torch.cat([encoded[1]["input_ids"], plain[1][:, :3]], dim=1)
        logits = model.get_base_model()(input_ids=prefix).logits[0, -1]
        found = find_divergences(model, tokenizer, encoded, DemoRun("plain", sequences=plain),
                             DemoRun("DSSD", sequences=[plain[0], torch.cat(
                                 [plain[1][:, :3], logits.argmin().view(1, 1), plain[1][:, 4:]], dim=1)]))
    assert len(found) == 1  # prompt 1 is identical
    d = found[0]
    assert (d["mode"], d["prompt"], d["position"]) == ("DSSD", 1, 3)
    assert d["plain"] == tokenizer.decode([int(plain[1][0, 3])])
    assert d["dssd"] == tokenizer.decode([int(logits.argmin())])
    assert d["logit_gap"] == pytest.approx(float(logits.max() - logits.min()), rel=1e-5)
    assert 0 < d["resolution"] < d["logit_gap"]


def test_demo_refuses_uncalibrated_heads(tmp_path, capsys):
    base = save_tiny_base("llama", tmp_path / "base")
    assert main(["demo", "--model", base, "--dtype", "float32", "--output_dir", str(tmp_path / "demo")]) == 2
    assert "no calibrated thresholds" in capsys.readouterr().err


def test_generate_dssd_with_lookup_matches_plain(calibrated_folder, capsys):
    args = ["generate", "a b a b a", "--model", calibrated_folder, "--dtype", "float32", "--max_new_tokens", "10"]
    assert main([*args, "--mode", "plain"]) == 0
    plain_text = capsys.readouterr().out.split("\n\n")[0]
    assert main([*args, "--mode", "dssd", "--eps", "0.5", "--lookup", "2", "--colour"]) == 0
    out = capsys.readouterr().out
    assert "drafted" in out and "tok/s" in out
    assert main([*args, "--mode", "dssd", "--eps", "0.5", "--lookup", "2"]) == 0
    assert capsys.readouterr().out.split("\n\n")[0] == plain_text  # lossless


def test_agreement_reports_the_log_prob_error_where_scored_positions_would_leave(calibrated_folder, tmp_path):
    """`hf-earlyexit agreement` on a text file, against a by-hand oracle over each window alone: per ε, the positions
    that leave at the first exit whose breaking-ties score reaches τ with the text's next token as that head's top
    token, and there the head's log-probability of that token minus the full model's."""
    import json

    import torch

    from hf_earlyexit.loading import load

    model, tokenizer = load(calibrated_folder, dtype="float32")
    prompt = tokenizer("the capital of france is", return_tensors="pt")
    with torch.no_grad():  # the model's own greedy text: its next tokens are ones the heads can agree with
        written = model.generate(**prompt, mode="plain", max_new_tokens=90, do_sample=False, eos_token_id=None)
    text = tokenizer.decode(written[0], skip_special_tokens=True)
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "agreement.json"
    assert main(["agreement", "--model", calibrated_folder, "--dtype", "float32", "--text_file",
                 str(tmp_path / "text.txt"), "--eps", "0.5", "--seq_len", "32", "--output", str(out)]) == 0
    [row] = json.loads(out.read_text())["text"]["rule"]
    ids = tokenizer(text)["input_ids"]
    taus = model.thresholds_for(0.5)
    errors = []
    for start in range(0, len(ids), 32):
        window = torch.tensor([ids[start: start + 32]])
        with torch.no_grad():
            full = torch.log_softmax(model.get_base_model()(window).logits[0].float(), dim=-1)
            heads = [h[0].float() for h in model(window, output_hidden_states=True).exit_logits]
        for pos in range(window.shape[1] - 1):
            token = int(window[0, pos + 1])
            for tau, logits in zip(taus, heads, strict=True):
                top2 = torch.softmax(logits[pos], dim=-1).topk(2)
                if float(top2.values[0] - top2.values[1]) >= tau:
                    if int(top2.indices[0]) == token:
                        errors.append(float(torch.log_softmax(logits[pos], -1)[token] - full[pos, token]))
                    break
    assert errors and row["scored_exits"] == len(errors)
    assert row["log_prob_error"] == pytest.approx(sum(errors) / len(errors), abs=1e-4)
    assert row["log_prob_abs_error"] == pytest.approx(sum(map(abs, errors)) / len(errors), abs=1e-4)
