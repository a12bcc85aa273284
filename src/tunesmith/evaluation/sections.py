"""The report's content, built once from the results dict and rendered as Markdown or HTML.

Building the sections apart from rendering keeps report.md and report.html the same report:
a number added here shows in both. Blocks (``blocks``) are plain text, bullet lists, tables
and images (a file name relative to the run directory).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tunesmith.config import REFERENCE_LOSSES
from tunesmith.evaluation.blocks import Bullets, Image, Section, Table, Text, fmt
from tunesmith.evaluation.data_sections import bias_blocks, label_issue_blocks
from tunesmith.evaluation.energy_section import energy_blocks

_NUMBER = re.compile(r"^[-+]?(\d[\d.,e+-]*%?x?|inf|nan)$|^-$|^\[[-+\d., e]+\]$")


def is_number(cell: str) -> bool:
    """Whether a cell reads as a number (or '-' for none): such columns align right."""
    return bool(_NUMBER.match(cell.strip()))


def numeric_columns(table: Table) -> list[bool]:
    return [all(is_number(row[i]) for row in table.rows) and bool(table.rows)
            for i in range(len(table.header))]


def signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def fixed(x: float | None) -> str:
    """A metric in the comparison table: always 4 decimals, as the first report had it."""
    return "-" if x is None else f"{x:.4f}"


def headline_metrics(metrics: dict[str, Any]) -> list[str]:
    """The scalar metrics worth a row in the comparison table, in display order."""
    preferred = ["accuracy", "macro_f1", "exact_match", "bleu", "rouge_l", "token_accuracy",
                 "invalid_rate"]
    keys = [k for k in preferred if k in metrics]
    keys += sorted(k for k, v in metrics.items() if k.startswith("f1_") and isinstance(v, float))
    return keys


def collect_warnings(results: dict[str, Any]) -> list[str]:
    """Everything in the results that should make a reader stop and look."""
    out = list((results.get("training") or {}).get("warnings") or [])
    out += results.get("data_warnings") or []  # dataset bias, suspected wrong labels
    forgetting = results.get("forgetting") or {}
    if forgetting.get("warning"):
        out.append(forgetting["warning"])
    overfitting = results.get("overfitting") or {}
    out += [f"possible overfitting: {r}" for r in overfitting.get("reasons", [])]
    calibration = results.get("calibration") or {}
    if calibration.get("note"):
        out.append(f"calibration: {calibration['note']}")
    for c in (results.get("comparison") or {}).values():
        level = f"{c['confidence']:.0%}"
        if c["ci_high"] < 0:
            out.append(f"{c['metric']}: the tuned model is worse than the base ({level} interval "
                       f"of the change [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}])")
        elif c["ci_low"] <= 0 <= c["ci_high"] and c["difference"] != 0:
            out.append(f"{c['metric']}: the {level} interval of the change includes 0, so this "
                       "test set cannot tell the tuned model from the base on it")
    return out


def _comparison_table(results: dict[str, Any]) -> Table:
    base, tuned = results.get("base"), results["tuned"]
    comparison = results.get("comparison") or {}
    rows = []
    for key in headline_metrics(tuned):
        b = base.get(key) if base else None
        c = comparison.get(key)
        ci = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c else "-"
        rer = c.get("relative_error_reduction") if c else None
        rows.append([key, fixed(b), fixed(tuned[key]),
                     signed(None if b is None else tuned[key] - b),
                     ci, "-" if rer is None else f"{rer:+.1%}",
                     fmt(c["p_not_better"]) if c else "-"])
    level = f"{next(iter(comparison.values()))['confidence']:.0%}" if comparison else "95%"
    return Table(["metric", "base", "tuned", "change", f"{level} CI of change",
                  "relative error reduction", "p(not better)"], rows)


def _comparison_note(results: dict[str, Any]) -> Text | None:
    comparison = results.get("comparison") or {}
    if not comparison:
        return None
    c = next(iter(comparison.values()))
    return Text(f"Change = tuned - base on the same {c['n']} test items. The interval is a paired "
                f"bootstrap ({c['n_resamples']} resamples of the test items, seed {c['seed']}); "
                "relative error reduction = (error_base - error_tuned) / error_base with error = "
                "1 - metric (100 - BLEU); p(not better) = share of resamples where tuned did not "
                "beat base.")


# How test answers were obtained (results["eval_mode"]), as the report says it.
MODE_NAMES = {"score": "scored label log-probabilities", "generate": "generated answers",
              "head": "the classification head's logits"}


def _mode_note(results: dict[str, Any]) -> Text | None:
    modes = results.get("eval_mode") or {}
    used = {k: m for k, m in modes.items() if m}
    if not used:
        return None
    if len(set(used.values())) == 1:
        (mode,) = set(used.values())
        who = " and ".join(used)
        parts = [f"{MODE_NAMES.get(mode, mode)} ({who})"]
    else:
        parts = [f"{MODE_NAMES.get(m, m)} ({k})" for k, m in used.items()]
    text = "Test answers: " + "; ".join(parts) + "."
    if "score" in used.values() or "head" in used.values():
        text += (" Scoring takes the label with the highest probability as the answer, so "
                 "every answer is a label and invalid_rate is 0 by construction.")
    if "generate" in used.values() and results.get("task") == "classification":
        text += (" A generated reply is read as the one label it names; a reply naming none "
                 "or several is invalid and counts as wrong.")
    return Text(text)


def _per_class(results: dict[str, Any]) -> Table | None:
    tuned = results["tuned"].get("per_class")
    if not tuned:
        return None
    base = (results.get("base") or {}).get("per_class") or {}
    rows = []
    for label, t in tuned.items():
        b = base.get(label, {})
        rows.append([label, str(t["support"]), fmt(b.get("precision")), fmt(b.get("recall")),
                     fmt(b.get("f1")), fmt(t["precision"]), fmt(t["recall"]), fmt(t["f1"])])
    return Table(["label", "support", "base precision", "base recall", "base F1",
                  "tuned precision", "tuned recall", "tuned F1"], rows)


def _confusion_blocks(results: dict[str, Any]) -> list:
    blocks: list = []
    plots = results.get("plots") or {}
    for which, c in (results.get("confusion") or {}).items():
        if not c:
            continue
        blocks.append(Text(f"{which.capitalize()} model (rows: expected, columns: predicted)"))
        blocks.append(Table(["expected \\ predicted", *c["columns"]],
                            [[r, *map(str, row)] for r, row in zip(c["rows"], c["matrix"],
                                                                   strict=True)]))
        if plots.get(f"confusion_{which}"):
            blocks.append(Image(f"confusion matrix ({which})", plots[f"confusion_{which}"]))
    return blocks


def _calibration(results: dict[str, Any]) -> list:
    c = results.get("calibration")
    if not c:
        return []
    blocks: list = [
        Text(f"Temperature scaling fitted on {c['n_fit']} validation items: T = "
             f"{fmt(c['temperature'])} (T > 1 softens over-confident answers). ECE uses "
             f"{c['n_bins']} equal-width confidence bins on {c['n_test']} test items."
             + (f" Note: {c['note']}." if c.get("note") else "")),
        Table(["", "ECE", "NLL"], [["before scaling", fmt(c["ece_before"]), fmt(c["nll_before"])],
                                   ["after scaling", fmt(c["ece_after"]), fmt(c["nll_after"])]])]
    plot = (results.get("plots") or {}).get("reliability")
    if plot:
        blocks.append(Image("reliability diagram", plot))
    return blocks


def _forgetting(results: dict[str, Any]) -> list:
    f = results.get("forgetting")
    if not f:
        return []
    verdict = f["warning"] or "no sign of forgetting past the thresholds"
    return [Table(["measure", "base", "tuned", "change", "threshold"], [
        [f"perplexity on general text ({f['n_text_tokens']} tokens)", fmt(f["base_perplexity"]),
         fmt(f["tuned_perplexity"]), f"{fmt(f['perplexity_ratio'])}x",
         f"{fmt(f['max_perplexity_ratio'])}x"],
        [f"mean KL(base || tuned), {f['n_prompts']} general prompts", "0", fmt(f["kl_mean"]),
         fmt(f["kl_mean"]), fmt(f["max_kl"])],
        ["KL at the reply's first token", "0", fmt(f["kl_reply_start"]),
         fmt(f["kl_reply_start"]), "-"]]), Text(f"Verdict: {verdict}.")]


def _overfitting(results: dict[str, Any], max_rows: int = 25) -> list:
    o = results.get("overfitting")
    if not o:
        return []
    points = o["points"]
    if len(points) > max_rows:  # evenly thinned; the last evaluation always shown
        keep = {round(i * (len(points) - 1) / (max_rows - 1)) for i in range(max_rows)}
        points = [p for i, p in enumerate(points) if i in keep]
    verdict = "; ".join(o["reasons"]) if o["reasons"] else "no sign of overfitting"
    return [Text(f"Best checkpoint (kept and evaluated): step {o['best_step']} with validation "
                 f"loss {fmt(o['best_valid_loss'])}; last step {o['last_step']}. Verdict: "
                 f"{verdict}."),
            Table(["step", "train loss (mean since last eval)", "validation loss", "gap"],
                  [[str(p["step"]), fmt(p["train_loss"]), fmt(p["valid_loss"]), fmt(p["gap"])]
                   for p in points])]


def _fairness(results: dict[str, Any]) -> list:
    fr = results.get("fairness")
    if not fr:
        return []
    tuned, base = fr["tuned"], fr.get("base") or {}
    names = tuned["metrics"]
    header = ["group", "items"] + [f"{w} {m}" for m in names for w in ("base", "tuned")]
    rows = []
    for g, n in tuned["counts"].items():
        row = [g + (" (small)" if g in tuned["small_groups"] else ""), str(n)]
        for m in names:
            row += [fmt(base.get("by_group", {}).get(g, {}).get(m)), fmt(tuned["by_group"][g][m])]
        rows.append(row)
    gaps = [f"{m}: largest gap {fmt(tuned['gaps'][m])} between {tuned['best_group'][m]} and "
            f"{tuned['worst_group'][m]} (tuned model)" for m in names]
    return [Text(f"Groups by {fr.get('group_field', 'group')}; groups under "
                 f"{tuned['min_count']} items are marked small."), Table(header, rows),
            Bullets(gaps)]


def _errors(results: dict[str, Any]) -> list:
    errs = results.get("confident_errors")
    if not errs:
        return []
    return [Table(["#", "input", "expected", "predicted", "confidence", "P(expected)"],
                  [[str(e["index"]), e["input"], e["expected"], e["predicted"],
                    fmt(e["confidence"]), fmt(e.get("p_expected"))] for e in errs])]


def _samples(samples: Sequence[dict[str, Any]]) -> list:
    if not samples:
        return []
    return [Table(["input", "expected", "predicted", "reply"],
                  [[s.get("input", ""), s["expected"], s["predicted"], s["reply"][:200]]
                   for s in samples])]


# What the report says about rewards, once: the most common misreading of DPO curves.
REWARDS_NOTE = ("DPO optimises the margin between the chosen and the rejected reward; both "
                "rewards may fall while the margin grows, so a falling chosen reward alone is "
                "not a failure.")
_PAIR_ROWS = (("pair accuracy (chosen reward > rejected)", "pair_accuracy"),
              ("mean reward margin", "reward_margin"), ("mean chosen reward", "reward_chosen"),
              ("mean rejected reward", "reward_rejected"),
              ("likelihood accuracy (chosen more likely per token)", "likelihood_accuracy"),
              ("mean log-prob per token, chosen", "logp_chosen"),
              ("mean log-prob per token, rejected", "logp_rejected"), ("loss", "loss"))


def _preference(results: dict[str, Any]) -> list:
    p = results.get("preference")
    if not p:
        return []
    blocks: list = [
        Text(f"Objective {p['objective']} (beta {fmt(p['beta'])}, SFT weight "
             f"{fmt(p['sft_weight'])}) on {p['pairs']} held-out pairs from the {p['split']} "
             "split." + (" The base model is the reference, so its rewards are 0 by definition "
                         "and it has no pair accuracy; the likelihood accuracy compares both "
                         "models alike." if p["objective"] in REFERENCE_LOSSES else "")),
        Table(["measure", "base", "tuned"], [[name, fmt(p["base"].get(k)),
                                               fmt(p["tuned"].get(k))]
                                              for name, k in _PAIR_ROWS]),
        Text(REWARDS_NOTE)]
    plot = (results.get("plots") or {}).get("rewards")
    if plot:
        blocks.append(Image("preference rewards", plot))
    return blocks


def _privacy(results: dict[str, Any]) -> list:
    p = results.get("privacy")
    if not p:
        return []
    rule = " (auto: min(1e-5, 1/(10 n)), well below 1/n)" if p.get("delta_rule", "").startswith(
        "auto") else ""
    blocks: list = [
        Text(f"Trained with differential privacy (DP-SGD, Opacus): the weights satisfy "
             f"({fmt(p['epsilon'])}, {p['delta']:.2g})-differential privacy for adding or "
             f"removing one training example{rule}, by the {p['accountant'].upper()} "
             "accountant. The guarantee covers the adapter, the merged model and everything "
             "computed from them; the per-step training losses in metrics.jsonl are not "
             "noised."),
        Table(["measure", "value"], [
            ["epsilon spent", fmt(p["epsilon"])], ["delta", f"{p['delta']:.3g}"],
            ["target epsilon", fmt(p.get("target_epsilon"))],
            ["noise multiplier", fmt(p["noise_multiplier"])],
            ["per-example clipping bound (L2)", fmt(p["max_grad_norm"])],
            ["sample rate (Poisson)", fmt(p["sample_rate"])],
            ["expected batch", str(p["expected_batch_size"])],
            ["steps", f"{p['steps']} of {p['planned_steps']} planned"],
            ["training examples", str(p["n_examples"])]])]
    audit = p.get("audit")
    if audit:
        blocks.append(Table(["audit", "with DP", "without DP", "chance"], [
            ["canary exposure, mean (bits)", fmt(audit["dp"]["mean_exposure"]),
             fmt(audit["no_dp"]["mean_exposure"]), fmt(audit["dp"]["chance_exposure"])],
            ["canary exposure, max (bits)", fmt(audit["dp"]["max_exposure"]),
             fmt(audit["no_dp"]["max_exposure"]), "-"],
            ["membership inference AUC (95% CI)", _auc(audit["dp"]), _auc(audit["no_dp"]),
             "0.5"]]))
    return blocks


def _auc(arm: dict[str, Any]) -> str:
    ci = arm.get("membership_auc_ci")  # audits written before the interval have none
    return fmt(arm["membership_auc"]) + (f" ({fmt(ci[0])}-{fmt(ci[1])})" if ci else "")


def _data(results: dict[str, Any]) -> list:
    blocks: list = [Table(["split", "examples"],
                          [[k, str(v)] for k, v in results["data_counts"].items()])]
    lengths = results.get("token_lengths")
    if lengths:
        keys = ["min", "mean", "p50", "p95", "max"]
        blocks.append(Table(["split", *[f"tokens {k}" for k in keys]],
                            [[s, *[fmt(v.get(k)) for k in keys]] for s, v in lengths.items()]))
    plot = (results.get("plots") or {}).get("token_lengths")
    if plot:
        blocks.append(Image("token lengths", plot))
    return blocks


def report_sections(results: dict[str, Any]) -> list[Section]:
    """Every section of the run report, in reading order; empty sections are left out."""
    plots = results.get("plots") or {}
    training: list = [Bullets([f"{k}: {fmt(v)}" for k, v in (results.get("training") or {}
                                                             ).items() if k != "warnings"])]
    named = results.get("training_metrics") or {}
    if named:
        training.append(Table(["metric", "first", "last", "at best step"], [
            [k, fmt(v["first"]), fmt(v["last"]), fmt(v["at_best_step"])]
            for k, v in named.items()]))
    if plots.get("loss_curves"):
        training.append(Image("loss curves", plots["loss_curves"]))
    mode = _mode_note(results)
    test = [mode] if mode else []
    test.append(_comparison_table(results))
    note = _comparison_note(results)
    test += [note] if note else []
    per_class = _per_class(results)
    sections = [
        Section("Warnings", [Bullets(w)] if (w := collect_warnings(results)) else []),
        Section("Data", _data(results) + label_issue_blocks(results.get("label_issues"))
                + bias_blocks(results.get("data_bias"))),
        Section("Hyperparameters", [Table(["name", "value"], [
            [k, fmt(v)] for k, v in results["hyperparameters"].items()])]),
        Section("Training", training),
        Section("Differential privacy", _privacy(results)),
        Section("Preference pairs: base vs tuned", _preference(results)),
        Section("Test set: base vs tuned", test),
        Section("Per-class metrics", [per_class] if per_class else []),
        Section("Confusion matrices", _confusion_blocks(results)),
        Section("Calibration", _calibration(results)),
        Section("Forgetting", _forgetting(results)),
        Section("Overfitting", _overfitting(results)),
        Section("Fairness", _fairness(results)),
        Section("Most confident errors (tuned)", _errors(results)),
        Section("Sample predictions (tuned)", _samples(results.get("samples") or [])),
        Section("Energy and emissions", energy_blocks(results.get("energy"))),
    ]
    return [s for s in sections if s.blocks]
