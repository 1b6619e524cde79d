"""Fit the simulator's named acceptance profiles (simulator/data/acceptance_profiles.json).

    python analysis/fit_acceptance_profiles.py

A profile is a mix of context classes, each a Sequoia-style positional model (P(target token = the draft's rank-r
candidate) = p1 * rho^(r-1), times decay^(d-1) at depth d; `simulator.acceptance.MixtureAcceptance`), so it prices
any tree shape, which a tau cannot. Sources:
- the shipped drafts' measured runs (analysis/results/bench_dovetail.json: accept histograms per tree, HumanEval
  and MT-bench, SmolLM2-135M target): maximum likelihood over every tree measured for that draft (two context
  classes when several trees were measured, one when a single tree was);
- published taus of EAGLE-class drafts on LLaMA-2-chat / Vicuna targets, which fix only one number: those profiles
  keep the shape of our own draft's fit and scale its rank-1 probabilities so that the published tree gives the
  published tau (stated in each profile's `source`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dovetail_jax.config import TreeConfig
from simulator.acceptance import (
    PROFILES_FILE,
    MixtureAcceptance,
    PositionalAcceptance,
    fit_mixture,
    fit_positional,
    parse_run,
)

RESULTS = Path(__file__).resolve().parent / "results"
BENCH = RESULTS / "bench_dovetail.json"
# bench configuration name -> (profile stem, description); trees are read from the bench file
DRAFTS = {
    "dgf1": (["dgf1 server 10/7/16", "dgf1 laptop 10/4/7", "dgf1 tree 4/3/6", "dgf1 chain 1/3/4"],
             "the shipped DGF draft (1 layer, V' 8192, checkpoints/smollm2-135m-dgf1-v8192)"),
    "eagle1": (["abl eagle1"], "ablation: EAGLE fc fusion, 1 layer, V' 8192"),
    "dgf2": (["abl dgf2"], "ablation: DGF, 2 layers, V' 8192"),
    "dgf3": (["abl dgf3"], "ablation: DGF, 3 layers, V' 8192"),
    "dgf1-full": (["abl dgf1 full vocab"], "ablation: DGF, 1 layer, full vocabulary"),
}
# published (model, tau, tree, where): tau includes the bonus token
PUBLISHED = {
    "eagle1-llama2-chat-7b-mtbench": {
        "model": "llama2-7b", "tau": 3.62, "tree": (4, 4, 26),
        "description": "EAGLE-1 head on LLaMA2-Chat 7B, MT-bench, greedy: tau 3.62 on EAGLE's static 26-node tree "
                       "(mc_sim_7b_63 in EAGLE's choices.py: depth 5, <= 4 children at the root)",
        "source": "EAGLE, arXiv 2401.15077 (ICML'24); tau per model in SafeAILab/EAGLE issue #9 "
                  "(shared/reference/peers-and-limits.md §0, §1.4)"},
    "eagle1-llama2-chat-13b-mtbench": {
        "model": "llama2-13b", "tau": 3.90, "tree": (4, 4, 26),
        "description": "EAGLE-1 head on LLaMA2-Chat 13B, MT-bench, greedy, EAGLE's 26-node tree: tau 3.90",
        "source": "EAGLE, arXiv 2401.15077; SafeAILab/EAGLE issue #9 (peers-and-limits.md §0)"},
    "eagle2-vicuna-7b-specbench": {
        "model": "llama2-7b", "tau": 4.34, "tree": (10, 5, 60),
        "description": "EAGLE-2 on Vicuna-7B (LLaMA-shaped 7B), Spec-Bench, greedy, A100: tau 4.34 with EAGLE-2's "
                       "60-token tree (depth 5, top-k 10)",
        "source": "hemingkx/Spec-Bench Leaderboard.md (A100 row; peers-and-limits.md §0)"},
}


def _runs(bench: dict[str, Any], configs: list[str], datasets: list[str]) -> list[Any]:
    cfg = {c["name"]: c for c in bench["configs"]}
    runs = []
    for ds in datasets:
        for name in configs:
            r = bench["results"][ds]["configs"][name]
            t = cfg[name]["tree"]
            runs.append(parse_run({"top_k": t["top_k"], "depth": t["depth"], "total_tokens": t["total_tokens"],
                                   "draft_layers": cfg[name]["draft_layers"], "accept_hist": r["accept_hist"],
                                   "tau": r["tau"]}, f"{ds}/{name}"))
    return runs


def _components(acc: Any) -> list[dict[str, Any]]:
    comps = acc.components if isinstance(acc, MixtureAcceptance) else [acc]
    weights = acc.weights if isinstance(acc, MixtureAcceptance) else [1.0]
    return [{"weight": round(w, 5), "p_rank": [round(float(x), 6) for x in c.p], "depth_decay": round(c.decay, 5)}
            for w, c in zip(weights, comps, strict=True)]


def _entry(acc: Any, model: str, description: str, source: str, check: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": model, "description": description, "components": _components(acc), "source": source,
            "check": check}


def _scaled(acc: MixtureAcceptance, x: float) -> MixtureAcceptance:
    """The same shape moved a fraction x of the way to perfect acceptance: each class keeps its rank shape, its
    total acceptance S becomes S + x (1 - S) and its depth decay d becomes d + x (1 - d) (x = 0: unchanged)."""
    comps = []
    for c in acc.components:
        s = float(c.p.sum())
        comps.append(PositionalAcceptance(list(c.p / s * (s + x * (1 - s))), c.decay + x * (1 - c.decay)))
    return MixtureAcceptance(comps, acc.weights)


def _pooled(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Both benchmarks weighted equally: the union of their context classes at half weight each."""
    return [{**c, "weight": round(c["weight"] / 2, 5)} for c in a["components"] + b["components"]]


def _check(acc: Any, runs: list[Any]) -> list[dict[str, Any]]:
    return [{"run": r.raw.get("name", ""), "tree": [r.tree.top_k, r.tree.depth, r.tree.total_tokens],
             "measured_tau": round(r.tau, 4), "profile_tau": round(acc.outcomes(r.tree).tau, 4)} for r in runs]


def fit(out: Path = PROFILES_FILE) -> dict[str, Any]:
    bench = json.loads(BENCH.read_text())
    profiles: dict[str, Any] = {}
    for stem, (configs, desc) in DRAFTS.items():
        for datasets, suffix in ((["humaneval"], "-humaneval"), (["mtbench"], "-mtbench")):
            runs = _runs(bench, configs, datasets)
            for r, (ds, name) in zip(runs, [(d, n) for d in datasets for n in configs], strict=True):
                r.raw["name"] = f"{ds}/{name}"
            multi = len({r.tree for r in runs}) > 1
            acc = fit_mixture(runs) if multi else fit_positional(runs)
            trees = sorted({f"{r.tree.top_k}/{r.tree.depth}/{r.tree.total_tokens}" for r in runs})
            profiles[f"smollm2-{stem}{suffix}"] = _entry(
                acc, "smollm2-135m", f"{desc}; {' + '.join(datasets)}, greedy",
                f"maximum-likelihood fit to the accept histograms of analysis/results/bench_dovetail.json "
                f"({bench['timestamp']}; {' + '.join(datasets)}, 12 prompts each; trees {', '.join(trees)})",
                _check(acc, runs))
        he, mt = profiles[f"smollm2-{stem}-humaneval"], profiles[f"smollm2-{stem}-mtbench"]
        pooled = {"model": "smollm2-135m", "description": f"{desc}; HumanEval and MT-bench weighted equally, greedy",
                  "components": _pooled(he, mt),
                  "source": f"the context classes of smollm2-{stem}-humaneval and smollm2-{stem}-mtbench at half "
                            f"weight each (both fitted to analysis/results/bench_dovetail.json)"}
        acc = MixtureAcceptance([PositionalAcceptance(c["p_rank"], c["depth_decay"]) for c in pooled["components"]],
                                [c["weight"] for c in pooled["components"]])
        runs = _runs(bench, configs, ["humaneval", "mtbench"])
        for r, name in zip(runs, [f"{d}/{n}" for d in ("humaneval", "mtbench") for n in configs], strict=True):
            r.raw["name"] = name
        pooled["check"] = [{**c, "measured_tau": round((c["measured_tau"] + c2["measured_tau"]) / 2, 4),
                            "run": f"mean of {c['run']} and {c2['run']}"}
                           for c, c2 in zip(_check(acc, runs[:len(configs)]), _check(acc, runs[len(configs):]),
                                            strict=True)]
        profiles[f"smollm2-{stem}"] = pooled
    comps = profiles["smollm2-dgf1"]["components"]
    shape = MixtureAcceptance([PositionalAcceptance(c["p_rank"], c["depth_decay"]) for c in comps],
                              [c["weight"] for c in comps])
    for name, pub in PUBLISHED.items():
        tree = TreeConfig(*pub["tree"])
        lo, hi = 0.0, 1.0
        for _ in range(50):  # tau grows with x: bisection
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _scaled(shape, mid).outcomes(tree).tau < pub["tau"] else (lo, mid)
        acc = _scaled(shape, lo)
        profiles[name] = _entry(acc, pub["model"], pub["description"],
                                pub["source"] + "; shape (context classes, rank decay, depth decay) from "
                                "smollm2-dgf1, moved toward perfect acceptance (total and depth decay of each class) "
                                "until the published tree gives the published tau",
                                [{"run": "published", "tree": list(pub["tree"]), "measured_tau": pub["tau"],
                                  "profile_tau": round(acc.outcomes(tree).tau, 4)}])
    data = {"schema": "dovetail.sim.acceptance_profiles/1",
            "about": "Named tree-aware acceptance models (simulator.acceptance.PositionalAcceptance); refit with "
                     "`python analysis/fit_acceptance_profiles.py`.",
            "defaults": {"smollm2-135m": "smollm2-dgf1", "llama2-7b": "eagle1-llama2-chat-7b-mtbench",
                         "llama2-13b": "eagle1-llama2-chat-13b-mtbench"},
            "profiles": profiles}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> int:
    data = fit()
    for name, p in data["profiles"].items():
        errs = ", ".join(f"{c['tree'][0]}/{c['tree'][1]}/{c['tree'][2]} {c['measured_tau']:.2f}->"
                         f"{c['profile_tau']:.2f}" for c in p["check"][:8])
        comps = " + ".join(f"{c['weight']:.2f}x[{', '.join(f'{x:.2f}' for x in c['p_rank'][:3])}; "
                           f"{c['depth_decay']:.2f}]" for c in p["components"])
        print(f"{name:<31} {comps} | tau measured->profile: {errs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
