"""The planner (cards, scaling rule, loss fits, depth choice, memory fit, recipe) and the sweep's report part."""

import dataclasses
import json
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from daychat.model.accounting import PEAK_BF16_TFLOPS
from daychat.params import SECTIONS, parse_section, read_params
from daychat.plan.cards import CARDS, GIB, get_card
from daychat.plan.memory import estimate_memory
from daychat.plan.planner import PlanInputs, _config, batch_for_compute, load_probe, make_plan
from daychat.plan.projection import SweepPoint, size_for_compute, write_report
from daychat.plan.scaling import ScalingRule, fit_loss_curve

ROOT = Path(__file__).resolve().parents[1]
RTX4090 = get_card("rtx4090")


@pytest.fixture(scope="module")
def plan_4090():
    return make_plan(PlanInputs(RTX4090, hours=24.0))


def test_cards_take_bf16_peaks_from_accounting():
    assert RTX4090.bf16_flops == 165.2e12 and RTX4090.fp8_tflops == pytest.approx(330.3)
    assert get_card("h100").bf16_flops == 989e12 and get_card("rtx3090").fp8_tflops is None
    table = dict(PEAK_BF16_TFLOPS)
    for card in CARDS.values():  # one table: every card resolves through accounting's
        assert card.bf16_flops / 1e12 in table.values()
    with pytest.raises(KeyError, match="known: rtx3090"):
        get_card("gtx480")


def test_scaling_rule_is_anchored_on_nanochat_fit():
    rule = ScalingRule()
    assert rule.params(1e19) == pytest.approx(3.8e8) and rule.tokens(1e19) == pytest.approx(3.8e9)
    assert rule.k_params == pytest.approx(3.8e8 / 10 ** 9.5)
    assert rule.params(4e19) / rule.params(1e19) == pytest.approx(2.0)  # C^0.5
    assert rule.tokens(1e17) / rule.params(1e17) == pytest.approx(10.0)  # constant ratio with a = b


def test_fits_recover_known_exponents():
    c = np.logspace(11, 14, 6)
    power = fit_loss_curve(c, 4.0 * c ** -0.08, "power", n_boot=50)
    assert power.alpha == pytest.approx(0.08, rel=1e-6) and power.A == pytest.approx(4.0, rel=1e-6)
    noisy = 1.5 + 30.0 * c ** -0.12 * np.exp(np.random.default_rng(0).normal(0, 0.003, c.size))
    sat = fit_loss_curve(c, noisy, "saturating", n_boot=200)
    assert sat.alpha == pytest.approx(0.12, abs=0.03) and sat.E == pytest.approx(1.5, abs=0.15)
    lo, hi = sat.band([1e19])
    truth = 1.5 + 30.0 * 1e19 ** -0.12
    assert lo[0] <= truth <= hi[0] and hi[0] - lo[0] > 0
    exact = fit_loss_curve(c, 1.5 + 30.0 * c ** -0.12, "saturating", n_boot=50)
    assert exact.alpha == pytest.approx(0.12, abs=0.005)
    with pytest.raises(ValueError, match="needs >= 4"):
        fit_loss_curve(c[:3], noisy[:3], "saturating")


def test_batch_rule_gives_2_19_near_1e19():
    assert batch_for_compute(1e19) == 2 ** 19 and batch_for_compute(5e18) == 2 ** 19
    assert batch_for_compute(1e12) == 2048  # the ci recipe's batch at ci scale


def test_4090_plan_is_compute_optimal_fits_and_validates(plan_4090):
    c = plan_4090.chosen
    assert 12 <= c.depth <= 20 and c.fits
    feasible = [x for x in plan_4090.candidates if x.fits]
    assert c.distance == min(x.distance for x in feasible)
    for x in feasible:  # nothing planned exceeds memory (re-estimated independently)
        est = estimate_memory(_config(plan_4090.inputs, x.depth, x.max_seq_len), x.device_batch, x.max_seq_len)
        assert est.total_bytes == x.memory_bytes <= 0.9 * 24 * GIB
        assert x.total_batch % (x.device_batch * x.max_seq_len) == 0
    assert not all(x.fits for x in plan_4090.candidates)  # the big depths really are refused
    pretrain = parse_section("pretrain", plan_4090.pretrain_section())
    assert pretrain.budget_h == pytest.approx(20.4) and pretrain.horizon == "time"
    assert make_plan(PlanInputs(RTX4090, hours=24.0)).summary() == plan_4090.summary()  # deterministic


def test_more_budget_never_plans_a_smaller_model():
    depths = [make_plan(PlanInputs(RTX4090, hours=h, depths=tuple(range(4, 25)))).chosen.depth
              for h in (1, 6, 24, 96)]
    assert depths == sorted(depths) and depths[0] < depths[-1]


def test_a_12gb_card_gets_a_smaller_micro_batch_or_context():
    small = dataclasses.replace(RTX4090, key="rtx4090-12", memory_gib=12.0)
    for depth in (12, 16):
        big = make_plan(PlanInputs(RTX4090, depths=(depth,))).chosen
        little = make_plan(PlanInputs(small, depths=(depth,))).chosen
        assert (little.device_batch, little.max_seq_len) < (big.device_batch, big.max_seq_len)
        assert little.memory_bytes <= 0.9 * 12 * GIB
    tiny = dataclasses.replace(RTX4090, memory_gib=1.0)
    with pytest.raises(ValueError, match="no depth"):
        make_plan(PlanInputs(tiny, depths=(20,)))


def test_probe_measurements_replace_the_assumption():
    probe = load_probe({"rows": [{"depth": 16, "seq_len": s, "mfu": 0.30} for s in (512, 1024, 2048)]}, "probe.json")
    measured = make_plan(PlanInputs(RTX4090, probe=probe, depths=(16,))).chosen
    assumed = make_plan(PlanInputs(RTX4090, depths=(16,))).chosen
    assert all(p.mfu_measured and p.mfu == 0.30 for p in measured.phases)
    assert measured.tokens == pytest.approx(assumed.tokens * 0.30 / 0.45)
    # the probe stage's flat metrics: the best micro-batch per (depth, seq_len); OOM rows carry no MFU
    flat = load_probe({"device": "NVIDIA GeForce RTX 4090", "d12_T512_b4/mfu": 0.41, "d12_T512_b8/mfu": 0.5,
                       "d12_T512_b16/oom": True, "d12_T2048_b4/tok_per_s": 40000.0, "best/tok_per_s": 9.0},
                      peak_flops=RTX4090.bf16_flops)
    assert flat.mfu[(12, 512)] == 0.5 and 0.2 < flat.mfu[(12, 2048)] < 0.6 and len(flat.mfu) == 2


def test_cli_writes_a_valid_recipe_and_report(tmp_path):
    from daychat.plan.__main__ import main

    recipe, report, metrics = tmp_path / "r.yaml", tmp_path / "plan.md", tmp_path / "plan.json"
    main(["--card", "rtx4090", "--hours", "12", "--params", str(ROOT / "params.yaml"), "--out-recipe", str(recipe),
          "--report", str(report), "--metrics", str(metrics)])
    raw = read_params(recipe)
    root = read_params(ROOT / "params.yaml")
    assert set(raw) == set(root)
    for name in raw:
        parse_section(name, raw[name])
        if name != "pretrain":
            assert raw[name] == root[name]
    summary = json.loads(metrics.read_text())
    assert raw["pretrain"]["depth"] == summary["depth"] and raw["pretrain"]["budget_h"] == pytest.approx(10.2)
    assert raw["pretrain"]["matrix_lr"] == root["pretrain"]["matrix_lr"]  # unplanned keys kept
    text = recipe.read_text()
    schema = text.splitlines()[0].removeprefix("# yaml-language-server: $schema=")  # from the recipe's folder
    assert (recipe.parent / schema).resolve() == (ROOT / "workflow" / "schemas" / "params.schema.json").resolve()
    assert "45% MFU assumed" in text and "# power of two nearest DeepSeek" in text
    assert f"**depth {summary['depth']}**" in report.read_text()


def test_committed_recipe_is_the_current_plan(plan_4090):
    path = ROOT / "workflow" / "recipes" / "rtx4090-24h.yaml"
    planned = plan_4090.pretrain_section()
    committed = yaml.safe_load(path.read_text())["pretrain"]
    stale = {k: (committed.get(k), v) for k, v in planned.items() if committed.get(k) != v}
    assert not stale, f"{path.name} is stale (committed, planned): {stale}; rerun `python -m daychat.plan " \
                      "--card rtx4090 --hours 24 --out-recipe workflow/recipes/rtx4090-24h.yaml --report reports/plan.md`"
    assert set(yaml.safe_load(path.read_text())) >= set(SECTIONS)


def test_sweep_sizes_points_by_the_rule():
    rule = ScalingRule()
    sizes = [size_for_compute(c, rule, 4096, 32, 32, 512, depths=range(1, 13)) for c in (5e11, 4e12, 1e14)]
    assert [d for d, _ in sizes] == sorted(d for d, _ in sizes) and sizes[0][0] < sizes[-1][0]
    from workflow.sweep import sweep_overrides

    ov = sweep_overrides(2e12, 4096, 32, 32, 512, rule)
    assert ov["tokens"] % ov["total_batch"] == 0
    demo = yaml.safe_load((ROOT / "workflow" / "recipes" / "demo.yaml").read_text())["pretrain"]
    parse_section("pretrain", {**demo, **ov})


def test_projection_report_from_synthetic_points(tmp_path):
    rng = np.random.default_rng(1)
    points = [SweepPoint(f"p{i}", i + 1, 10 ** 5 * (i + 1), 10 ** 6, c, float(3.0 * c ** -0.05 * math.exp(rng.normal(0, 0.01))))
              for i, c in enumerate([5e11, 1e12, 2e12, 4e12, 8e12])]
    proj = write_report(points, 5e18, tmp_path / "scaling.md", tmp_path / "scaling.png",
                        {"recipe": "demo", "target": "a test"}, n_boot=100)
    mid, lo, hi = proj.at_target("power")
    assert proj.fits["power"].alpha == pytest.approx(0.05, abs=0.02) and lo <= mid <= hi
    assert "saturating" in proj.fits
    md = (tmp_path / "scaling.md").read_text()
    assert "weak projection" in md and "![val_bpb vs compute](scaling.png)" in md and f"{mid:.3f}" in md
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_section_lists_every_card():
    from daychat.params import PlanParams

    assert set(typing.get_args(typing.get_type_hints(PlanParams)["card"])) == set(CARDS)


def test_plan_stage_runs_on_the_ci_recipe(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    cmd = [sys.executable, str(ROOT / "stages" / "plan.py"), "--recipe", "reports/plan/recipe.yaml",
           "--report", "reports/plan.md", "--metrics", "reports/metrics/plan.json"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "reports" / "metrics" / "plan.json").read_text())
    assert 2 <= summary["depth"] <= 8 and summary["pretrain_hours"] == pytest.approx(0.85)
    recipe = read_params(tmp_path / "reports" / "plan" / "recipe.yaml")
    assert recipe["pretrain"]["depth"] == summary["depth"] and recipe["tokenizer"]["vocab_size"] == 512
    assert "**depth" in (tmp_path / "reports" / "plan.md").read_text()
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text().replace("hours: 1.0", "hours: 1.0\n  probe: nope.json"))
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "nope.json (plan.probe) not found" in result.stderr
