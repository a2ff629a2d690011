"""``python -m embclf.report PATH --compare KEY`` and the gain over the random-init encoder on hand-made run dirs
(tests/report_fixtures.py): the paired differences, their 95 % t-interval, the sign agreement and the detectable
difference equal a hand computation; pairs match on seed and on every setting but KEY (and what KEY implies)."""
from __future__ import annotations

import csv
import math
import statistics

import pytest

from embclf.report import cli
from embclf.report import comparisons as cmp
from report_fixtures import resolved_config, write_run

# t_{0.975, 2} in closed form (Student t with 2 degrees of freedom: t_p = (2p - 1) sqrt(2 / (4 p (1 - p))))
T2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))


def unit(root, name, model, seed, psnr, acc, dotlist=(), preset=None):
    """An autoencode run and a classify run on it, with the given test PSNR (dB) and test accuracy."""
    cfg = resolved_config(model, 8, seed, "autoencode", list(dotlist))
    ae = write_run(root / name / "autoencode", cfg, "autoencode",
                   {"test_mse": 10 ** (-psnr / 10), "test_psnr": psnr, "n_train": 270, "n_val": 30, "n_test": 100})
    ccfg = resolved_config(model, 8, seed, "classify", list(dotlist))
    write_run(root / name / "classify", ccfg, "classify",
              {"encoder_run": str(ae.resolve()), "head": "mlp", "test_accuracy": acc, "val_accuracy": acc,
               "final_test_accuracy": acc})
    if preset:
        for d in ("autoencode", "classify"):
            (root / name / d / ".hydra").mkdir()
            (root / name / d / ".hydra" / "hydra.yaml").write_text(
                f"hydra:\n  runtime:\n    choices:\n      experiment: {preset}\n")


TRAINED = {"acc": [0.40, 0.43, 0.45], "psnr": [20.0, 20.5, 20.2]}
RANDOM = {"acc": [0.33, 0.35, 0.34], "psnr": [12.0, 12.1, 12.3]}


def hand(a, b):
    d = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = T2 * sd / math.sqrt(len(d))
    return mean, mean - half, mean + half, half


@pytest.fixture()
def sweep(tmp_path):
    for seed in range(3):
        unit(tmp_path, f"ae-e3-s{seed}", "ae", seed, TRAINED["psnr"][seed], TRAINED["acc"][seed],
             ["autoencode.epochs=3"])
        unit(tmp_path, f"ae-e0-s{seed}", "ae", seed, RANDOM["psnr"][seed], RANDOM["acc"][seed],
             ["autoencode.epochs=0"])
    # a VAE trained only (no random-init row): no pair
    unit(tmp_path, "vae-e3-s0", "vae", 0, 19.0, 0.41, ["autoencode.epochs=3"])
    # seed 5 trained but no random-init seed 5: not a pair
    unit(tmp_path, "ae-e3-s5", "ae", 5, 30.0, 0.9, ["autoencode.epochs=3"])
    return tmp_path


def test_t_table_matches_closed_form():
    assert cmp.t975(2)[0] == pytest.approx(T2, abs=1e-6)
    assert cmp.T975[1] == pytest.approx(T2, abs=1e-3)
    assert cmp.T975[0] == pytest.approx(math.tan(math.pi * (0.975 - 0.5)), abs=1e-3)  # Cauchy: df = 1


def test_gain_over_random_init_equals_hand_computation(sweep, capsys):
    assert cli.main([str(sweep), "--no-figures"]) == 0
    rows = list(csv.DictReader((sweep / "comparisons.csv").open()))
    assert len(rows) == 1
    r = rows[0]
    assert (r["configuration"], r["value"], r["baseline"], r["n_pairs"], r["seeds"]) == ("ae-z8", "3", "0", "3", "0,1,2")
    for short, key in (("acc", "acc"), ("psnr", "psnr")):
        mean, lo, hi, half = hand(TRAINED[key], RANDOM[key])
        assert float(r[f"mean_diff_{short}"]) == pytest.approx(mean, abs=1e-9)
        assert float(r[f"ci_low_{short}"]) == pytest.approx(lo, abs=1e-6)
        assert float(r[f"ci_high_{short}"]) == pytest.approx(hi, abs=1e-6)
        assert float(r[f"detectable_{short}"]) == pytest.approx(half, abs=1e-6)
        assert r[f"agree_{short}"] == "3/3"
    assert r["interval"] == "scipy.stats.t"
    md = (sweep / "report.md").read_text()
    assert "## Gain over the random-init encoder" in md
    mean, lo, hi, _ = hand(TRAINED["acc"], RANDOM["acc"])
    assert f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" in md
    assert "Gain over the random-init encoder" in capsys.readouterr().out


def test_compare_experiment_pairs_on_model_and_seed(tmp_path):
    # improved = plain + a supervised term: model.ce_weight follows the preset, so it is not a pairing key
    accs = {"quick": [0.30, 0.32, 0.31], "improved": [0.36, 0.35, 0.40]}
    for seed in range(3):
        for preset, dl in (("quick", []), ("improved", ["model.ce_weight=10.0"])):
            unit(tmp_path, f"{preset}-s{seed}", "ae", seed, 18.0 + seed, accs[preset][seed], dl, preset=preset)
    assert cli.main([str(tmp_path), "--no-figures", "--compare", "experiment"]) == 0
    rows = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    assert [(r["configuration"], r["value"], r["baseline"], r["n_pairs"]) for r in rows] == [
        ("ae-z8", "improved", "quick", "3")]
    mean, lo, hi, _ = hand(accs["improved"], accs["quick"])
    assert float(rows[0]["mean_diff_acc"]) == pytest.approx(mean)
    assert float(rows[0]["ci_low_acc"]) == pytest.approx(lo, abs=1e-6)
    assert float(rows[0]["mean_diff_psnr"]) == 0.0 and rows[0]["ci_low_psnr"] == "0.0"
    assert "## Comparisons" in (tmp_path / "report.md").read_text()


def test_unknown_key_exits_2_and_writes_nothing(sweep, capsys):
    assert cli.main([str(sweep), "--no-figures", "--compare", "model.input_noize"]) == 2
    err = capsys.readouterr().err
    assert "model.input_noize" in err and "autoencode.epochs" in err
    assert not (sweep / "report.md").exists() and not (sweep / "comparisons.csv").exists()


def test_one_pair_has_no_interval():
    st = cmp.paired_stats([0.1])
    assert st["mean"] == 0.1 and st["agree"] == 1 and st["ci_low"] is None and st["detectable"] is None
    assert cmp.paired_stats([0.2, -0.1, 0.2])["agree"] == 2


def test_runs_differing_in_a_second_setting_never_pair(tmp_path):
    # epochs=0 only for the AE, epochs=3 only for the VAE: model.name follows the epochs here, but differs
    for seed in range(2):
        unit(tmp_path, f"ae-e0-s{seed}", "ae", seed, 12.0, 0.3, ["autoencode.epochs=0"])
        unit(tmp_path, f"vae-e3-s{seed}", "vae", seed, 19.0, 0.4, ["autoencode.epochs=3"])
    assert cli.main([str(tmp_path), "--no-figures", "--compare", "autoencode.epochs"]) == 0
    assert not (tmp_path / "comparisons.csv").exists()
    assert "No configuration has two values with a seed in common." in (tmp_path / "report.md").read_text()


def test_compare_model_name_drops_what_the_model_group_implies(tmp_path):
    for seed in range(2):
        unit(tmp_path, f"ae-s{seed}", "ae", seed, 18.0, 0.30 + seed / 100)
        unit(tmp_path, f"vae-s{seed}", "vae", seed, 17.0, 0.35)
    assert cli.main([str(tmp_path), "--no-figures", "--compare", "model.name"]) == 0
    rows = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    assert [(r["configuration"], r["value"], r["baseline"], r["n_pairs"]) for r in rows] == [("z8", "vae", "ae", "2")]
    assert float(rows[0]["mean_diff_acc"]) == pytest.approx(0.045) and float(rows[0]["mean_diff_psnr"]) == -1.0
