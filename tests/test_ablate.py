"""The ablation harness (workflow/ablate.py): statistics, run planning, the report, and one real queue run."""

import json
import math

import pytest
import yaml
from conftest import ROOT

from workflow import ablate


def test_mean_and_t_interval():
    mean, half = ablate.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(ablate.mean_ci([5.0])[1])
    assert ablate.mean_ci([2.0] * 40)[1] == 0.0


def test_spearman_and_ranks():
    assert ablate.ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]
    assert ablate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ablate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ablate.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(ablate.spearman([1, 2], [1, 2]))


def test_verdicts():
    assert ablate.verdict(0.02, 0.01) == "baseline better"
    assert ablate.verdict(-0.02, 0.01) == "variant better"
    assert ablate.verdict(0.005, 0.01) == "within noise"
    assert ablate.verdict(0.02, float("nan")) == "one seed"


CFG = {
    "recipe": "ci", "metric": "val_bpb", "seeds": [0, 1],
    "scales": {"a": {"flops": 2e9, "overrides": {"pretrain.depth": 1, "pretrain.total_batch": 1024,
                                                   "pretrain.device_batch": 1, "pretrain.seq_len": [[0.0, 512]]}},
               "b": {"flops": 8e9, "overrides": {"pretrain.depth": 2, "pretrain.total_batch": 1024,
                                                   "pretrain.device_batch": 1, "pretrain.seq_len": [[0.0, 512]]}}},
    "proxy": {"scale": "a", "factor": 4, "seeds": [0]},
    "variants": [{"name": "base"}, {"name": "rope-10k", "overrides": {"pretrain.rope_base": 10000.0}}],
}


def test_runs_are_planned_at_whole_steps_of_a_fixed_budget_and_named_by_what_they_train():
    params = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    runs = ablate.plan_runs(CFG, params, "code1")
    assert len(runs) == 2 * 2 * 2 + 2 * 1  # scales x variants x seeds, + the proxy's long runs
    assert len({r["name"] for r in runs}) == len(runs)
    for scale in ("a", "b"):
        short = [r for r in runs if r["scale"] == scale and r["budget"] == "short"]
        assert len({r["tokens"] for r in short}) == 1 and short[0]["tokens"] % 1024 == 0  # every variant alike
    long_ = [r for r in runs if r["budget"] == "long"]
    short_a = next(r for r in runs if r["scale"] == "a" and r["budget"] == "short")
    assert {r["seed"] for r in long_} == {0} and long_[0]["tokens"] == pytest.approx(4 * short_a["tokens"], rel=0.05)
    r = next(r for r in runs if r["variant"] == "rope-10k")
    assert r["overrides"]["pretrain.rope_base"] == 10000.0 and r["overrides"]["pretrain.horizon"] == "tokens"
    again = ablate.plan_runs(CFG, params, "code2")  # other code: other names, so nothing stale is reused
    assert not {x["name"] for x in runs} & {x["name"] for x in again}


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**CFG, "variants": [{"name": "a.b"}]}))
    with pytest.raises(SystemExit, match="variant names must be"):
        ablate.load_config(bad)
    bad.write_text(yaml.safe_dump({**CFG, "proxy": {"scale": "z"}}))
    with pytest.raises(SystemExit, match="proxy.scale 'z'"):
        ablate.load_config(bad)
    assert ablate.load_config(ROOT / "workflow" / "ablate.yaml")["variants"][0]["name"] == "default"


def test_report_and_plot_from_results(tmp_path):
    results = []
    for scale, budget, seeds in (("a", "short", [0, 1]), ("b", "short", [0, 1]), ("a", "long", [0])):
        for variant, shift in (("base", 0.0), ("rope-10k", 0.05)):
            for seed in seeds:
                results.append({"name": f"{scale}-{budget}-{variant}-{seed}", "scale": scale, "budget": budget,
                                "variant": variant, "seed": seed, "flops": 1e9, "tokens": 2048,
                                "metrics": {"val_bpb": 2.0 + shift + 0.001 * seed, "wall_s": 1.0}})
    summary = ablate.summarise(CFG, results)
    row = summary["a/short"][1]
    assert row["delta"] == pytest.approx(0.05) and row["verdict"] == "baseline better"  # same seed: paired
    proxy = ablate.proxy_check(CFG, summary)
    assert proxy["n"] == 2 and proxy["best_short"] == proxy["best_long"] == "base"
    md, png = tmp_path / "ablate.md", tmp_path / "ablate" / "ablate.png"
    ablate.plot(CFG, summary, proxy, png)
    ablate.write_report(CFG, summary, proxy, results, {"results": tmp_path / "r.json", "about": {"x": "y"}}, md, png)
    text = md.read_text()
    assert "| rope-10k |" in text and "+0.0500" in text and "baseline better" in text and "Spearman" in text
    assert "![paired differences" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rope-10k | baseline better | baseline better | the default measured better at every scale |" in text
    assert png.stat().st_size < 300_000


@pytest.mark.slow
def test_a_tiny_ablation_runs_through_the_dvc_queue(tmp_path):
    """The whole harness: the ci recipe's data stages, 2 variants x 2 seeds + one proxy run, queued as DVC
    experiments and run by one queue worker, then the report."""
    cfg = {**CFG, "scales": {"a": CFG["scales"]["a"]}, "title": "test",
           "base": {"pretrain.eval_every": 0, "pretrain.eval_tokens": 1024, "pretrain.core_source": "",
                    "pretrain.save_every": 0, "pretrain.ema_halflife_tokens": 0, "pretrain.save_optimizer": False}}
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump(cfg))
    report = tmp_path / "reports" / "ablate.md"
    ablate.main(["--config", str(config), "--workspace", str(tmp_path / "runs" / "ablate"), "--report", str(report),
                 "--poll", "2"])
    results = json.loads((tmp_path / "reports" / "ablate" / "results.json").read_text())
    assert len(results) == 2 * 2 + 2 and all(r["metrics"]["val_bpb"] > 0 for r in results)
    assert len({r["metrics"]["val_bpb"] for r in results if r["budget"] == "short"}) == 4  # seeds and variants differ
    text = report.read_text()
    assert "| rope-10k |" in text and "Spearman" in text
    # a second call reuses every finished run: nothing is queued again
    ablate.main(["--config", str(config), "--workspace", str(tmp_path / "runs" / "ablate"), "--report", str(report),
                 "--poll", "2"])
    assert json.loads((tmp_path / "reports" / "ablate" / "results.json").read_text()) == results
