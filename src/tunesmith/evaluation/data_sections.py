"""The report's data checks: the dataset-bias report per group field and the suspected label
issues, rendered from ``results["data_bias"]`` (``tunesmith.data.bias.BiasReport.to_dict()``)
and ``results["label_issues"]`` (see report.py)."""

from __future__ import annotations

from typing import Any

from tunesmith.evaluation.blocks import Bullets, Table, Text, fmt


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _test(name: str, t: dict[str, Any] | None) -> str | None:
    if not t:
        return None
    rough = " (approximate: an expected count is below 5)" if t["min_expected"] < 5 else ""
    return f"{name}: chi-square {t['statistic']:.2f}, dof {t['dof']}, p {t['p_value']:.3g}{rough}"


def bias_blocks(bias: dict[str, Any] | None) -> list:
    """Per field: a table of groups (count, share, reference, label rates, test examples),
    the chi-square tests, the largest gap and the groups too small; then the warnings."""
    if not bias or not bias.get("fields"):
        return []
    level = f"{bias['confidence']:.0%}"
    blocks: list = [Text(f"Dataset bias of the training split, per group field: {level} Wilson "
                         f"intervals; at least {bias['min_size']} examples give a group a "
                         f"+/-{bias['margin'] * 100:g}-point interval on any rate.")]
    for name, f in bias["fields"].items():
        labels = f.get("labels") or []
        groups = f["groups"]
        has_ref = any(g.get("expected_share") is not None for g in groups.values())
        has_test = any(g.get("test_count") is not None for g in groups.values())
        header = [name, "examples", "share"] + (["reference", "z"] if has_ref else []) + \
            [f"rate of {label!r} [{level} CI]" for label in labels] + \
            (["test examples"] if has_test else [])
        rows = []
        for group, g in groups.items():
            row = [group, str(g["count"]), _pct(g["share"])]
            if has_ref:
                row += [_pct(g.get("expected_share")),
                        "-" if g.get("residual") is None else f"{g['residual']:+.1f}"]
            for label in labels:
                r = (g.get("rates") or {}).get(label)
                row.append("-" if r is None else
                           f"{r['rate']:.1%} [{r['low']:.1%}, {r['high']:.1%}]")
            if has_test:
                row.append(fmt(g.get("test_count")))
            rows.append(row)
        blocks.append(Table(header, rows))
        notes = [t for t in (_test("representation against the reference",
                                   f.get("representation")),
                             _test("group x label independence", f.get("independence"))) if t]
        gap = f.get("largest_gap")
        if gap:
            notes.append(f"largest gap in the rate of {gap['label']!r}: {gap['high_rate']:.1%} "
                         f"({gap['high_group']}) vs {gap['low_rate']:.1%} ({gap['low_group']}), "
                         f"{gap['gap'] * 100:.1f} points")
        notes.append("groups under the minimum size: " + (", ".join(f["small_groups"])
                                                          or "none"))
        if f.get("under_represented"):
            notes.append("under-represented against the reference: "
                         + ", ".join(f["under_represented"]))
        blocks.append(Bullets(notes))
    if bias.get("warnings"):
        blocks.append(Bullets([f"warning: {w}" for w in bias["warnings"]]))
    return blocks


def label_issue_blocks(found: dict[str, Any] | None) -> list:
    """How many labels look wrong, how, what was done, and the most suspicious few."""
    if not found:
        return []
    done = {"report": "listed only; training used the labels as given",
            "drop": "left out of training (each in rejects.jsonl)",
            "relabel": "trained with the suggested label"}[found["action"]]
    blocks: list = [Text(
        f"{found['found']} of {found['examples']} training examples ({found['rate']:.1%}) "
        f"have a label a probe that never saw it finds unlikely: {done}. Probe: "
        f"{found['method']}; out-of-sample accuracy {found['probe_accuracy']:.1%}. Every "
        f"suspect, most suspicious first: {found['file']}.")]
    if found.get("by_pair"):
        blocks.append(Table(["given -> suggested", "examples"],
                            [[k, str(v)] for k, v in found["by_pair"].items()]))
    sample = found.get("sample") or []
    if sample:
        blocks.append(Table(["line", "given", "suggested", "confidence", "text"], [
            [fmt(i["line"]), i["given"], i["suggested"], f"{i['confidence']:.0%}",
             (i.get("text") or "").replace("\n", " ")[:100]] for i in sample]))
    return blocks
