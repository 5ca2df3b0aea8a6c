"""The memory model (daychat.plan.memory) against measured CPU peaks, activation checkpointing, the preflight
check (daychat.plan.preflight and its use in stages/pretrain.py), and the on-demand probe stage."""

import importlib.util
import json

import pytest
import torch
import yaml
from conftest import ROOT

from bench import memory as bench_memory
from daychat.errors import UserError
from daychat.model import GPT, GPTConfig
from daychat.params import parse_section
from daychat.plan.memory import GiB, estimate_memory, largest_fit
from daychat.plan.preflight import available_bytes, check_fits

MEASURED = ROOT / "tests" / "assets" / "memory_measured.json"


# ----------------------------------------------------------------------------------------------------
# The model against measurements


def test_estimate_is_within_15_percent_of_recorded_cpu_peaks():
    """The bench grid's measured peaks (bench/memory.py, 2-core CPU, fp32 eager) against today's model."""
    recorded = json.loads(MEASURED.read_text())
    assert len(recorded) >= 6
    for name, entry in recorded.items():
        est = bench_memory.estimate(entry["config"]).total_bytes
        assert abs(est / entry["measured_bytes"] - 1) <= 0.15, (name, est, entry["measured_bytes"])


def test_estimate_is_within_15_percent_of_a_live_measurement():
    """One fresh-process measurement, so a change in torch or in the training code shows up here."""
    spec = bench_memory.GRID["d2-v8k"]
    measured = bench_memory.measure(spec)["measured_bytes"]
    est = bench_memory.estimate(spec).total_bytes
    assert abs(est / measured - 1) <= 0.15, (est / 2 ** 20, measured / 2 ** 20)


def test_terms_scale_as_they_should():
    cfg = GPTConfig(vocab_size=32768, depth=12)
    one, two = (estimate_memory(cfg, b, 2048) for b in (1, 2))
    # static parts do not grow with the batch; activations and logits double
    for key in ("weights", "grads", "optimizer"):
        assert one.breakdown[key] == two.breakdown[key]
    assert two.breakdown["activations"] == 2 * one.breakdown["activations"]
    assert two.breakdown["logits"] == 2 * one.breakdown["logits"]
    ckpt = estimate_memory(cfg, 2, 2048, activation_checkpointing=True)
    assert ckpt.breakdown["activations"] < two.breakdown["activations"] / 2
    eager = estimate_memory(cfg, 2, 2048, compile=False)
    assert eager.total_bytes > two.total_bytes
    assert "GiB" in two.describe() and two.allocated_bytes < two.total_bytes
    fit = largest_fit(cfg, 2048, 24 * GiB)
    assert estimate_memory(cfg, fit, 2048).total_bytes <= 24 * GiB < estimate_memory(cfg, fit + 1, 2048).total_bytes


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing


def test_checkpointing_gives_the_same_loss_and_gradients(one_thread):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=128, sequence_len=32, depth=3, aspect_ratio=16, head_dim=16, window_pattern="SL",
                       short_window=8)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # non-zero output projections, so every block's gradient is non-trivial
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    idx = torch.randint(0, 128, (2, 32))
    results = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = ckpt
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    model.eval()  # never in eval mode: nothing to recompute there
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx))


# ----------------------------------------------------------------------------------------------------
# Preflight


def test_preflight_names_the_largest_device_batch_that_fits():
    cfg = GPTConfig(vocab_size=32768, depth=20)
    est = check_fits(cfg, 2, 2048, budget_bytes=24 * GiB, margin=0.05)
    assert est.total_bytes <= 0.95 * 24 * GiB
    fit = largest_fit(cfg, 2048, 0.95 * 24 * GiB)
    with pytest.raises(UserError) as e:
        check_fits(cfg, 64, 2048, budget_bytes=24 * GiB, margin=0.05, total_batch=524288)
    message = str(e.value)
    assert "\n" not in message and "exceeds the 22.8 GiB available" in message
    # the largest that fits and also splits total_batch = 2^19 (a power of two here)
    rows = max(r for r in range(1, fit + 1) if 524288 % (r * 2048) == 0)
    assert f"set pretrain.device_batch to {rows} " in message


def test_preflight_falls_back_to_seq_len_then_checkpointing_then_depth():
    def advice(cfg, budget: float, **kw) -> str:
        with pytest.raises(UserError) as e:
            check_fits(cfg, 4, 2048, budget_bytes=budget, margin=0.0, section="sft", **kw)
        return str(e.value)

    cfg = GPTConfig(vocab_size=32768, depth=20)
    one_row, half = estimate_memory(cfg, 1, 2048).total_bytes, estimate_memory(cfg, 1, 1024).total_bytes
    assert "set the longest sft.seq_len to 1024 " in advice(cfg, (one_row + half) / 2)
    # small vocabulary, eager: the layers' activations dominate, and checkpointing them at 2048 needs less
    # than no checkpointing at half the length
    deep = GPTConfig(vocab_size=1024, depth=12)
    ckpt = estimate_memory(deep, 1, 2048, compile=False, activation_checkpointing=True).total_bytes
    assert ckpt < estimate_memory(deep, 1, 1024, compile=False).total_bytes
    assert "set sft.activation_checkpointing: true with sft.device_batch 1" in advice(deep, ckpt * 1.001, compile=False)
    # nothing at this depth fits, even checkpointed: a smaller depth is named
    static = sum(estimate_memory(cfg, 1, 64).breakdown[k] for k in ("weights", "grads", "optimizer"))
    assert "lower sft.depth to" in advice(cfg, static * 0.9)


def test_available_memory_and_the_stage_refuses_an_impossible_config(capsys):
    assert available_bytes(torch.device("cpu"), 0.0) is None
    assert available_bytes(torch.device("cpu"), 2.0) == 2 * GiB
    spec = importlib.util.spec_from_file_location("pretrain_stage", ROOT / "stages" / "pretrain.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    ci = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())["pretrain"]
    config = GPTConfig(vocab_size=512, sequence_len=1024, depth=2, aspect_ratio=32, head_dim=32)
    from daychat.train.schedule import plan_batch

    plan = plan_batch(2048, 2, [512, 1024])
    stage.preflight_memory(parse_section("pretrain", ci), config, plan, torch.device("cpu"), [])  # CPU: skipped
    assert "memory preflight skipped" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^pretrain: estimated peak memory .* exceeds .*pretrain.memory_gib 0.01 GiB"):
        stage.preflight_memory(parse_section("pretrain", {**ci, "memory_gib": 0.01}), config, plan, torch.device("cpu"), [])
    stage.preflight_memory(parse_section("pretrain", {**ci, "memory_gib": 4.0}), config, plan, torch.device("cpu"), [])
    out = capsys.readouterr().out
    assert "fits pretrain.memory_gib 4 GiB" in out and "val bpb" in out and "optimizer step" in out


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stage", ROOT / "stages" / f"{name}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def test_pretrain_refuses_a_core_proxy_that_cannot_fit_beside_the_optimizer_state(capsys):
    """Training fits, but the CORE proxy's longest prompt (scored uncropped) does not fit beside the weights
    and optimizer state: refused before anything is allocated, naming the knob."""
    from daychat.eval.core import Task
    from daychat.train.schedule import plan_batch

    stage = _stage("pretrain")
    ci = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())["pretrain"]
    # a wide model with a small vocabulary: the training micro-batch (1 x 1024) is cheap, the proxy's
    # 20k-token prompt is not
    config = GPTConfig(vocab_size=512, sequence_len=1024, depth=2, aspect_ratio=256, head_dim=64)
    plan = plan_batch(2048, 1, [1024])
    train = estimate_memory(config, 1, 1024, precision="fp32", device="cpu").total_bytes
    long_item = {"query": "word " * 4000, "choices": ["a", "b"], "gold": 0}  # ~20k bytes: far past the context
    tasks = [Task("long", "multiple_choice", 0, " ", 50.0, items=[long_item])]
    p = parse_section("pretrain", {**ci, "device_batch": 1, "total_batch": 2048, "seq_len": [[0.0, 1024]],
                                   "memory_gib": train * 1.2 / GiB, "memory_margin": 0.0, "core_source": "local",
                                   "core_path": "x"})
    with pytest.raises(UserError, match=r"^pretrain: CORE proxy needs .* for its longest sequence .*pretrain.core_source"):
        stage.preflight_memory(p, config, plan, torch.device("cpu"), tasks)
    # with room for it, the proxy gets the largest token batch that fits, and the summary lists every phase
    roomy = parse_section("pretrain", {**ci, "device_batch": 1, "total_batch": 2048, "seq_len": [[0.0, 1024]],
                                       "memory_gib": 8.0, "core_source": "local", "core_path": "x"})
    tokens = stage.preflight_memory(roomy, config, plan, torch.device("cpu"), tasks)
    assert tokens >= 20000
    assert "CORE proxy" in capsys.readouterr().out


def test_eval_stages_size_batches_by_tokens_and_refuse_what_cannot_fit():
    from daychat.plan.memory import model_bytes, scoring_phase
    from daychat.plan.preflight import CPU_SCORING_TOKENS, scoring_batch

    config = GPTConfig(vocab_size=32768, sequence_len=2048, depth=4, aspect_ratio=64, head_dim=64)
    cpu, static = torch.device("cpu"), model_bytes(config)
    kw = dict(card="cpu", static=static, longest=2500, precision="fp32", knob="core_eval.batch_tokens", fix="FIX")
    # a CPU without memory_gib: a fixed batch, nothing checked
    assert scoring_batch("core_eval", "CORE scoring", config, cpu, memory_gib=0, margin=0.05, **kw)[0] == CPU_SCORING_TOKENS
    # automatic: the largest batch under the budget, and one token more would not fit
    budget = 3.0
    tokens, phase = scoring_batch("core_eval", "CORE scoring", config, cpu, memory_gib=budget, margin=0.0, **kw)
    assert phase.total_bytes <= budget * GiB
    bigger = scoring_phase("x", config, tokens + 1, static=static, precision="fp32", device="cpu", scored=tokens + 1)
    assert tokens == 65536 or bigger.total_bytes > budget * GiB
    # a batch set too large names the knob and what would fit
    with pytest.raises(UserError, match=r"^core_eval: CORE scoring with batches of 500,000 tokens .*set core_eval.batch_tokens to [\d,]+ or 0"):
        scoring_batch("core_eval", "CORE scoring", config, cpu, memory_gib=budget, margin=0.0, batch_tokens=500_000, **kw)
    # not even the model's weights and one sequence fit: the phase's own advice
    with pytest.raises(UserError, match=r"needs .* for its longest sequence \(2,500 tokens.*; FIX$"):
        scoring_batch("core_eval", "CORE scoring", config, cpu, memory_gib=0.1, margin=0.0, **kw)


# ----------------------------------------------------------------------------------------------------
# The probe stage


def test_probe_stage_on_the_ci_grid(tmp_path):
    params = yaml.safe_load((ROOT / "workflow" / "recipes" / "ci.yaml").read_text())
    p = params["probe"]
    # a second micro-batch size that the memory model puts over memory_gib: recorded as skipped, not run
    cfg = GPTConfig(vocab_size=p["vocab_size"], sequence_len=p["seq_lens"][0], depth=p["depths"][0],
                    aspect_ratio=p["aspect_ratio"], head_dim=p["head_dim"])
    small = estimate_memory(cfg, 1, p["seq_lens"][0], precision="fp32", device="cpu").total_bytes
    big = estimate_memory(cfg, 256, p["seq_lens"][0], precision="fp32", device="cpu").total_bytes
    p.update(device_batches=[1, 256], memory_gib=(small + big) / 2 / GiB, skip_above=1.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"probe": p}))
    from conftest import run_stage

    result = run_stage("probe", ["--out", "reports/probe.md", "--metrics", "reports/metrics/probe.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "reports/metrics/probe.json").read_text())
    key = f"d{p['depths'][0]}_T{p['seq_lens'][0]}_b1"
    assert metrics["configs"] == 2 and metrics["best/config"] == key
    assert metrics[f"{key}/tok_per_s"] > 0 and metrics[f"{key}/peak_mem_gib"] > 0 and not metrics[f"{key}/oom"]
    assert abs(metrics[f"{key}/estimate_error"]) < 0.5  # tiny: the fixed scratch term is most of it
    assert metrics[f"{key}/tokens_24h"] == pytest.approx(metrics[f"{key}/tok_per_s"] * 86400)
    skipped = key.replace("_b1", "_b256")
    assert metrics[f"{skipped}/oom"] and f"{skipped}/tok_per_s" not in metrics
    table = (tmp_path / "reports/probe.md").read_text()
    assert "| 1 | 32 | 1 |" in table and "skipped (estimate)" in table


# ----------------------------------------------------------------------------------------------------
# Evaluation phases (scoring, letter scoring, generation)

SCORING_MEASURED = ROOT / "tests" / "assets" / "scoring_measured.json"


def test_evaluation_estimates_are_within_10_percent_of_recorded_cpu_peaks():
    """bench/memory.py --scoring's measured peaks (2-core CPU, fp32 eager) against today's memory model:
    CORE scoring, val bpb, letter scoring and generation at vocab 32,768 and rows of 1-2k tokens."""
    from daychat.plan.rehearse import Job, cpu_estimate

    recorded = json.loads(SCORING_MEASURED.read_text())
    assert {"val-4x2048", "letters-32k", "generate-2k"} <= set(recorded)
    for name, entry in recorded.items():
        job = Job(stage="bench", phases=[name], device="cpu", precision="fp32", compile=False, **entry["config"])
        est = cpu_estimate(job)[0].total_bytes
        assert abs(est / entry["measured_bytes"] - 1) <= 0.10, (name, est / 2 ** 20, entry["measured_bytes"] / 2 ** 20)


def test_scoring_memory_is_flat_in_the_number_of_items():
    """Scoring 4x the items of 2,048 tokens at vocab 32,768 under the same token budget peaks at the same
    memory (measured in fresh processes): the budget, not the item count, sets it; and far below the
    full-vocabulary logits that count-based batches of the same items held."""
    from daychat.plan.rehearse import Job, _run

    config = dict(depth=1, aspect_ratio=128, head_dim=64, vocab_size=32768, sequence_len=2048)
    peaks = []
    for items in (4, 16):
        job = Job(stage="test", kind="score", config=config, phases=["p"], tokens=8192, width=2048, items=items,
                  device="cpu", threads=1, precision="fp32", compile=False)
        result = _run(job, timeout_s=600)
        assert "error" not in result, result
        peaks.append(result["p"]["peak_bytes"])
    assert abs(peaks[1] / peaks[0] - 1) < 0.05, [p / 2 ** 20 for p in peaks]
    assert peaks[1] < 0.1 * 3 * 16 * 2048 * 32768 * 4  # what full logits for 16 such rows would take
