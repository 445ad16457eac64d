"""sparsa frontier: sweep files, the cost model, Pareto sets, JSONL resume after a kill, the report in a real browser, Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsa.errors import InputError
from sparsa.frontier import Config, ResultStore, load_sweep, parse_sweep
from sparsa.frontier.costmodel import LinearCost, ModelCost, predict
from sparsa.frontier.pareto import dominates, pareto_indices

TINY_SWEEP = """
[eval]
seq_len = 64
perplexity_tokens = 256
[calibration]
samples = 2
seq_len = 32
[speed]
prefill_tokens = 256
decode_context = 256
[axes]
weights = [{method = "magnitude", sparsity = 0.5}, {method = "wanda", pattern = "2:4"}]
activations = [{method = "teal", sparsity = 0.5}]
attention = [{method = "streaming", sink_blocks = 1, local_blocks = 1, block_size = 16, min_len = 32}]
"""


# -- Pareto --------------------------------------------------------------------------------------

def test_pareto_on_hand_made_points():
    # (speedup, perplexity): higher speedup and lower perplexity are better
    points = [
        (1.0, 10.0),   # 0 dense: best perplexity -> on
        (1.2, 12.0),   # 1 on
        (1.2, 12.0),   # 2 exact tie of 1 -> on too
        (1.1, 12.5),   # 3 dominated by 1
        (1.5, 30.0),   # 4 fastest -> on
        (1.5, 31.0),   # 5 same speed, worse -> off
        (1.0, 10.5),   # 6 same speed as dense, worse -> off
        (0.9, 9.0),    # 7 slower but most accurate -> on
        (1.2, 15.0),   # 8 dominated
        (1.2, 15.0),   # 9 dominated duplicate -> off as well
        (float("nan"), 1.0),  # 10 not finite -> never on, never dominates
    ]
    assert pareto_indices(points) == [7, 0, 1, 2, 4]
    assert dominates(points[1], points[3]) and not dominates(points[1], points[2]) and not dominates(points[2], points[1])
    # task scores: higher is better on both axes
    assert pareto_indices([(1.0, 0.5), (2.0, 0.4), (2.0, 0.6), (0.5, 0.6)], higher_y=True) == [2]
    assert pareto_indices([]) == []


def test_a_measured_speedup_within_noise_of_dense_is_not_on_the_front():
    from sparsa.frontier.report import frontier_rows

    def record(id_, ppl, prefill, bounds=None):
        speed = {"kind": "measured", "prefill_speedup": prefill, "decode_speedup": 1.0}
        if bounds:
            speed["prefill_speedup_range"] = bounds
        return {"id": id_, "status": "ok", "perplexity": ppl, "speed": speed}

    rows = frontier_rows([record("dense", 10.0, 1.0), record("noisy", 12.0, 1.05, [0.95, 1.2]),
                          record("faster", 13.0, 1.04, [1.02, 1.06]), record("predicted", 14.0, 1.5)])
    front = {r.id: r.on_prefill_front for r in rows}
    assert front == {"dense": True, "noisy": False, "faster": True, "predicted": True}
    assert rows[1].prefill == 1.05  # the table keeps the median


# -- sweep files ----------------------------------------------------------------------------------

def test_default_sweep_and_stable_ids():
    sweep = load_sweep()
    ids = [c.id for c in sweep.configs]
    assert ids[0] == "dense" and len(ids) == len(set(ids)) and 10 <= len(ids) <= 16
    kinds = {(c.weights is not None, c.attention is not None, c.activations is not None) for c in sweep.configs}
    assert (True, False, True) in kinds and (True, True, True) in kinds  # combinations
    for c in sweep.configs:
        assert Config.from_dict(json.loads(json.dumps(c.to_dict()))).id == c.id
    assert "weights=wanda@2:4" in ids and "activations=cats@0.5" in ids


@pytest.mark.parametrize("text, words", [
    ("[evl]\nseq_len = 1", ["[evl]", "sections are"]),
    ("[eval]\nseq_lenn = 1", ["seq_lenn", "[eval]", "seq_len"]),
    ("[axes]\nweights = [{method = 'wandaa'}]", ["weights[0]", "wandaa", "choose one of"]),
    ("[axes]\nweights = [{method = 'wanda', sparsity = 1.5}]", ["weights[0]", "sparsity"]),
    ("[axes]\nattention = [{method = 'streaming', width = 3}]", ["attention[0]", "width", "it takes"]),
    ("[axes]\nactivations = [{sparsity = 0.5}]", ["activations[0]", "method"]),
    ("[speed]\nmode = 'fast'", ["fast", "auto, predicted, measured"]),
    ("[sweep]\ndense = false", ["no configurations"]),
    ("[speed]\ncuda_graph = 1", ["cuda_graph", "true or false"]),
    ("[sweep]\ndense = 'yes'", ["[sweep] dense", "true or false"]),
    ("[axes]\nweights = []", ["only the dense model", "[axes]"]),
    ("[eval]\nseq_len = 1024\nperplexity_tokens = 256", ["perplexity_tokens", "seq_len"]),
    ("[eval]\ntext = 'no-such-file.txt'", ["no-such-file.txt", "does not exist"]),
    ("[axes]\nattention = [{method = 'streaming', sink_blocks = 'x'}]", ["attention[0]", "sink_blocks", "whole number"]),
])
def test_sweep_errors_are_one_line_naming_the_key(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_an_nm_pattern_keeps_its_exact_sparsity():
    (config,) = [c for c in parse_sweep({"axes": {"weights": [{"method": "wanda", "pattern": "3:7"}]}}).configs if not c.is_dense]
    from sparsa.prune.config import PruneConfig

    assert config.weights.sparsity == 1 - 3 / 7  # pruning checks it against the pattern to 1e-9
    PruneConfig(method="wanda", sparsity=config.weights.sparsity, pattern="3:7")


def test_axes_expand_and_cross():
    sweep = parse_sweep({"sweep": {"cross": True}, "axes": {
        "weights": [{"method": ["magnitude", "wanda"], "pattern": "2:4"}], "activations": [{"method": "cats", "sparsity": [0.4, 0.5]}]}})
    assert len(sweep.configs) == 3 * 3  # (none + 2) x (none + 2)
    assert "weights=wanda@2:4 + activations=cats@0.4" in [c.id for c in sweep.configs]


# -- cost model ------------------------------------------------------------------------------------

def _cost(is24=False, act=False):
    linears = [LinearCost(f"model.layers.0.{n}", 1000, is24, act) for n in ("q", "down")] + [LinearCost("lm_head", 2000)]
    return ModelCost(linears, layers=1, heads=2, kv_heads=1, head_dim=4)


def test_cost_model_reads_the_stored_measurements(tmp_path):
    (tmp_path / "linear24.json").write_text(json.dumps({"summary": {"by_tokens": {"1": {"ours_geomean": 1.5}, "4096": {"ours_geomean": 2.0}}}}))
    (tmp_path / "activation_speed.json").write_text(json.dumps({"rows": [
        {"layer": "a", "sparsity": 0.25, "ours_speedup": 1.2}, {"layer": "a", "sparsity": 0.5, "ours_speedup": 1.6},
        {"layer": "b", "sparsity": 0.5, "ours_speedup": 2.5}]}))
    dense = _cost()
    p = predict(dense, _cost(is24=True), prefill_tokens=4096, decode_context=16, directory=tmp_path)
    attn = dense.attention_flops(4096) / (2 * 4096)
    assert p.prefill_speedup == pytest.approx((4000 + attn) / (2000 / 2.0 + 2000 + attn))
    kv = dense.kv_elements(16)
    assert p.decode_speedup == pytest.approx((4000 + kv) / (2000 / 1.5 + 2000 + kv))
    assert p.sources == ["linear24.json"] and p.to_dict()["kind"] == "predicted"
    # 45% activation sparsity: the nearest level is 50%, geometric mean over layers; decode only
    q = predict(dense, _cost(act=True), prefill_tokens=64, decode_context=16, activation_sparsity=0.45, directory=tmp_path)
    assert q.prefill_speedup == 1.0
    assert q.decode_speedup == pytest.approx((4000 + kv) / (2000 / math.sqrt(1.6 * 2.5) + 2000 + kv))
    assert any("nearest measured level 0.5" in n for n in q.notes)


def test_cost_model_without_measurements_predicts_one_and_says_so(tmp_path):
    p = predict(_cost(), _cost(is24=True, act=True), prefill_tokens=4096, decode_context=64, activation_sparsity=0.5,
                attention={"method": "vertical_slash", "phase": "prefill", "min_len": 1024, "density": 0.3}, directory=tmp_path)
    assert p.prefill_speedup == 1.0 and p.decode_speedup == 1.0 and p.sources == []
    notes = " ".join(p.notes)
    assert "linear24.json missing" in notes and "activation_speed.json missing" in notes and "attention_speed.json missing" in notes


def test_cost_model_on_the_projects_stored_files():
    from sparsa.frontier.costmodel import measurements_dir

    if not (measurements_dir() / "linear24.json").is_file():
        pytest.skip("benchmarks/results/linear24.json is not in this checkout")
    p = predict(_cost(), _cost(is24=True), prefill_tokens=2048, decode_context=2048)
    assert p.prefill_speedup > 1.0 and p.decode_speedup > 1.0 and "linear24.json" in p.sources


# -- the sweep: JSONL, kill, resume, errors, CLI --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sweep_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "tiny.toml"
    path.write_text(TINY_SWEEP)
    return path


@pytest.fixture(scope="module")
def local_run(tiny_dir, tiny_sweep_file, tmp_path_factory):
    """The tiny sweep run in a subprocess that kills itself after two configurations, then resumed through the CLI."""
    from sparsa.cli import main

    out = tmp_path_factory.mktemp("frontier")
    code = ("import sys; from sparsa.frontier import frontier; "
            "frontier(sys.argv[1], sys.argv[2], out=sys.argv[3], progress=False, print_table=False)")
    env = {**os.environ, "SPARSA_FRONTIER_STOP_AFTER": "2", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(tiny_sweep_file), str(out)], env=env,
                            capture_output=True, text=True, timeout=240)
    header, first = ResultStore(out / "results.jsonl").read()
    status = main(["frontier", str(tiny_dir), "--config", str(tiny_sweep_file), "--out", str(out), "--all"])
    return {"out": out, "killed": killed, "first": first, "header": header, "status": status}


def test_killed_sweep_resumes_and_records_every_configuration_once(local_run, tiny_sweep_file):
    killed = local_run["killed"]
    assert killed.returncode == 75, killed.stderr[-2000:]
    assert local_run["header"]["kind"] == "sparsa-frontier" and len(local_run["first"]) == 2
    header, records = ResultStore(local_run["out"] / "results.jsonl").read()
    ids = [r["id"] for r in records]
    expected = [c.id for c in load_sweep(tiny_sweep_file).configs]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert ids[:2] == [r["id"] for r in local_run["first"]]  # the first two were kept, not rerun
    assert local_run["status"] == 0 and all(r["status"] == "ok" for r in records)
    by = {r["id"]: r for r in records}
    assert by["weights=wanda@2:4"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["activations=teal@0.5"]["activation_sparsity"] > 0.2
    assert 0 < by["attention=streaming(block_size=16,local_blocks=1,sink_blocks=1)@32"]["attention_density"] < 1
    for r in records:  # no GPU here: speed is predicted, never measured
        assert r["speed"]["kind"] == "predicted" and math.isfinite(r["perplexity"])
    assert by["weights=wanda@2:4"]["speed"]["prefill_speedup"] > 1.0
    assert (local_run["out"] / "frontier.png").stat().st_size > 10_000
    html = (local_run["out"] / "report.html").read_text()
    assert "data:image/png;base64," in html and "PREDICTED" in html and "wanda 2:4" in html


def test_resume_refuses_other_settings_and_a_torn_line_is_skipped(local_run, tiny_dir, tiny_sweep_file, tmp_path):
    from sparsa.frontier import run_sweep

    out = tmp_path / "copy"
    shutil.copytree(local_run["out"], out)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"id": "half a lin')  # a kill in the middle of a write
    sweep = load_sweep(tiny_sweep_file)
    records = run_sweep(sweep, str(tiny_dir), out, progress=False)  # nothing left to do
    assert len(records) == len(sweep.configs)
    ResultStore(out / "results.jsonl").append({"id": "x", "status": "ok"})
    assert ResultStore(out / "results.jsonl").read()[1][-1]["id"] == "x"  # appended on a new line
    with pytest.raises(InputError, match="perplexity_tokens"):
        run_sweep(load_sweep(tiny_sweep_file, perplexity_tokens=128), str(tiny_dir), out, progress=False)


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(tiny_dir, tmp_path, monkeypatch):
    from sparsa.frontier import run_sweep, sweep as sweep_module

    real = sweep_module._apply

    def flaky(lm, config, settings):
        if config.activations is not None:
            raise RuntimeError("kernel exploded\nsecond line")
        return real(lm, config, settings)

    monkeypatch.setattr(sweep_module, "_apply", flaky)
    sweep = parse_sweep({"eval": {"seq_len": 64, "perplexity_tokens": 128}, "calibration": {"samples": 2, "seq_len": 32},
                         "axes": {"activations": [{"method": "teal", "sparsity": 0.5}]}})
    records = run_sweep(sweep, str(tiny_dir), tmp_path, progress=False)
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[1]["error"]["type"] == "RuntimeError" and records[1]["error"]["message"] == "kernel exploded"
    again = run_sweep(sweep, str(tiny_dir), tmp_path, progress=False)  # errors count as done
    assert len(ResultStore(tmp_path / "results.jsonl").read()[1]) == 2 and len(again) == 2


def test_measured_speed_needs_a_gpu(tiny_dir, tmp_path):
    from sparsa.frontier import run_sweep

    with pytest.raises(InputError, match="CUDA"):
        run_sweep(parse_sweep({"speed": {"mode": "measured"}, "axes": {"weights": [{"method": "magnitude"}]}}), str(tiny_dir), tmp_path, progress=False)


# -- the report in a real browser -----------------------------------------------------------------

def _records():
    rows = [("dense", 1.0, 1.0, 18.2), ("weights=wanda@2:4", 1.25, 1.3, 150.0), ("weights=magnitude@0.5", 1.0, 1.0, 300.0),
            ("activations=cats@0.5", 1.0, 1.4, 23.0), ("weights=wanda@2:4 + activations=cats@0.5", 1.25, 1.45, 170.0)]
    out = [{"id": i, "label": i.replace("weights=", "").replace("activations=", ""), "status": "ok", "perplexity": p,
            "speed": {"kind": "predicted", "prefill_speedup": a, "decode_speedup": b, "sources": ["linear24.json"], "notes": []}}
           for i, a, b, p in rows]
    out.append({"id": "attention=x", "label": "broken", "status": "error", "error": {"type": "ValueError", "message": "no"}})
    return out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    import matplotlib.image as mpimg

    from sparsa.frontier import write_report
    from sparsa.frontier.report import FRONTIER_COLOUR

    rows, png, html = write_report(_records(), tmp_path, model_name="hand-made", print_table=False)
    assert {r.id for r in rows if r.frontier} == {"dense", "activations=cats@0.5", "weights=wanda@2:4 + activations=cats@0.5", "weights=wanda@2:4"}
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,900", html.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = mpimg.imread(str(shot))[..., :3]  # floats in [0, 1]
    plot_area = pixels[100:700]  # below the title and notes, where the image sits
    non_white = (plot_area < 0.9).any(axis=-1).mean()
    assert non_white > 0.02, f"only {non_white:.1%} of the plot area is drawn"
    red = tuple(int(FRONTIER_COLOUR[i:i + 2], 16) / 255 for i in (1, 3, 5))
    close = (abs(plot_area - red) < 0.06).all(axis=-1).sum()
    assert close > 200, f"the frontier line's colour appears in {close} pixels only: the plot did not render"


# -- Ray -------------------------------------------------------------------------------------------

def test_ray_gives_the_same_results_as_local(local_run, tiny_dir, tiny_sweep_file, tmp_path):
    ray = pytest.importorskip("ray")
    from sparsa.frontier import run_sweep

    sweep = load_sweep(tiny_sweep_file)
    sweep = type(sweep)(sweep.settings, tuple(c for c in sweep.configs if c.attention is None), sweep.source)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        records = run_sweep(sweep, str(tiny_dir), tmp_path, ray="local", progress=False)
    finally:
        ray.shutdown()
    local = {r["id"]: r for r in ResultStore(local_run["out"] / "results.jsonl").read()[1]}
    assert [r["id"] for r in records] == [c.id for c in sweep.configs]
    for r in records:
        assert r["status"] == "ok", r.get("error")
        assert r["perplexity"] == pytest.approx(local[r["id"]]["perplexity"], rel=1e-4)
        assert r["speed"]["prefill_speedup"] == pytest.approx(local[r["id"]]["speed"]["prefill_speedup"], rel=1e-9)


@pytest.mark.parametrize("method, phase, graphed", [("quest", "decode", True), ("streaming", "both", True),
                                                     ("vertical_slash", "prefill", True), (None, None, True),
                                                     ("host_only", "decode", False)])
def test_decode_steps_are_graph_timed_where_the_pattern_chooses_on_the_device(monkeypatch, method, phase, graphed):
    """Quest (page bounds kept on the device) and streaming (slots by position) choose their slots of a static KV
    cache on the device and are replayed; prefill-only patterns decode densely either way. A decode pattern that
    could not choose on the device (here a stand-in) would run dense in a graph: it is timed with a dynamic cache."""
    from types import SimpleNamespace

    from sparsa.attention import make_pattern
    from sparsa.frontier import sweep, timing
    from sparsa.frontier.config import Settings

    seen = []
    monkeypatch.setattr(timing, "measure", lambda dense, model, settings, no_graph=None: seen.append(no_graph) or {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    attention = None
    if method == "host_only":
        attention = {"method": method, "min_len": 1024, "phase": phase, "graph_decode": False}
    elif method is not None:
        pattern = make_pattern(method)
        assert pattern.phase == phase
        attention = {"method": method, "min_len": 1024, "phase": phase, "graph_decode": pattern.decodes_in_graph}
    sweep._measured_speed(SimpleNamespace(model=None), None, Settings(), False, None, attention)
    assert (seen[0] is None) == graphed
    if not graphed:
        assert "dynamic KV cache" in seen[0]


@pytest.mark.parametrize("captures", [(True, True), (True, False)])
def test_measured_decode_is_graph_timed_only_when_both_steps_capture(monkeypatch, captures):
    """The headline decode ratio compares like with like: graph against graph, else eager against eager."""
    from sparsa.frontier import timing
    from sparsa.frontier.config import Settings

    dense, model = object(), object()
    # per model: prefill ms, eager tok/s, graph tok/s (the configuration 2x faster in the graph, 1.25x eagerly)
    speeds = {id(dense): (10.0, 40.0, 100.0), id(model): (8.0, 50.0, 200.0)}
    made = iter(captures)

    def graph_decoder(m, ctx, steps):
        return (m, None) if next(made) else (None, "RuntimeError: capture failed")

    monkeypatch.setattr(timing, "_inputs", lambda m, settings: (None, None))
    monkeypatch.setattr(timing, "_graph_decoder", graph_decoder)
    monkeypatch.setattr(timing, "_one_round", lambda m, s, ids, ctx, g: (*speeds[id(m)][:2], None if g is None else speeds[id(m)][2]))
    out = timing.measure(dense, model, Settings())
    assert out["prefill_speedup"] == 1.25 and out["decode_eager_speedup"] == 1.25
    if all(captures):
        assert out["decode_mode"] == "graph" and out["decode_speedup"] == 2.0 and out["decode_tok_s"] == 200.0
    else:
        assert out["decode_mode"] == "eager" and out["decode_speedup"] == 1.25 and "capture failed" in out["decode_graph_error"]
        assert "decode_graph_speedup" not in out
