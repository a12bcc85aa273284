"""Dataset bias by group: who is in the data against who should be, how the labels fall in
each group, and which groups are too small to say anything about.

Everything is computed from counts (group field -> group -> ``Counter`` of labels, the label
``""`` when the data has none), so the caller streams the rows and this module does the
statistics with ``scipy.stats``. The rules, stated once:

* **Representation.** Each group's count and share. Given a reference (expected shares), a
  chi-square goodness-of-fit test of the counts against ``n x share``. Groups the reference
  does not list or gives share 0 are left out of that test (and named); ``n`` counts the
  rest. A group below its expected share carries its standardised residual
  ``z = (observed - expected) / sqrt(n p (1 - p))`` (the binomial z-score of its count); it
  is flagged as under-represented when ``z < -2``, a shortfall that chance alone gives about
  2% of the time.
* **Label rates** (classification data with 2+ groups and 2+ labels): the rate of each
  label, or of the positive label when one is given, in each group with a Wilson interval at
  ``confidence``; the largest gap between two groups; and a chi-square test of independence
  of group and label on the full groups x labels table, without Yates' correction so a 2x2
  table reads like a larger one. Its p-value is approximate when an expected count is below 5.
* **Minimum size.** ``n_min = ceil(z^2 p (1 - p) / margin^2)`` by the normal approximation,
  with ``p = 0.5``, the worst case, so it holds whatever rate or metric a group turns out to
  have (385 examples for +/-5 points at 95%). Groups with fewer examples are named, and, given
  the test split's counts, so are groups with fewer test examples: their metrics will have a
  wider interval than +/- ``margin``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from tunesmith.errors import DataError, Problem

GroupCounts = Mapping[str, Mapping[str, Counter[str]]]  # field -> group -> label -> count
UNDER_Z = -2.0  # a group's residual below this flags it as under-represented
SUM_TOLERANCE = 1e-3
WORST_CASE_RATE = 0.5
REFERENCE_SHAPE = '{"field": {"group": share, ...}} (or {"group": share, ...} for one field)'


@dataclass(frozen=True)
class Reference:
    """Expected shares per group field and group; ``source`` names the file in errors."""

    shares: Mapping[str, Mapping[str, float]]
    source: str | None = None


@dataclass
class ChiSquare:
    statistic: float
    dof: int
    p_value: float
    min_expected: float  # below 5 the p-value is approximate


@dataclass
class Rate:
    count: int  # examples of the group with the label
    rate: float
    low: float  # Wilson interval at the report's confidence
    high: float


@dataclass
class GroupBias:
    count: int
    share: float
    expected_share: float | None = None  # from the reference
    residual: float | None = None  # standardised residual of the count against the reference
    rates: dict[str, Rate] = field(default_factory=dict)  # label -> rate in this group
    test_count: int | None = None  # examples in the test split


@dataclass
class Gap:
    label: str
    high_group: str
    high_rate: float
    low_group: str
    low_rate: float
    gap: float


@dataclass
class FieldBias:
    """The bias report of one group field."""

    field: str
    examples: int
    groups: dict[str, GroupBias]
    representation: ChiSquare | None = None  # goodness of fit against the reference
    below_reference: list[str] = field(default_factory=list)  # observed share < expected
    under_represented: list[str] = field(default_factory=list)  # residual < UNDER_Z
    not_in_reference: list[str] = field(default_factory=list)  # left out of that test
    labels: list[str] = field(default_factory=list)  # the labels whose rates are given
    largest_gap: Gap | None = None
    independence: ChiSquare | None = None  # group x label
    small_groups: list[str] = field(default_factory=list)  # fewer examples than min_size
    thin_test_groups: list[str] = field(default_factory=list)  # fewer test examples


@dataclass
class BiasReport:
    """Per group field: representation, label rates and the groups too small to evaluate."""

    fields: dict[str, FieldBias]
    confidence: float
    margin: float
    min_size: int  # examples for a +/- margin interval at the worst-case rate
    rate_assumed: float = WORST_CASE_RATE
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self, *, warnings: bool = True) -> list[str]:
        out: list[str] = []
        for f in self.fields.values():
            out += _field_lines(f, self)
        return out + ([f"warning: {w}" for w in self.warnings] if warnings else [])


def min_group_size(confidence: float = 0.95, margin: float = 0.05,
                   rate: float = WORST_CASE_RATE) -> int:
    """Examples needed for a +/- ``margin`` interval at ``rate``: ceil(z^2 p(1-p) / margin^2)."""
    z = stats.norm.ppf(0.5 + confidence / 2)
    return math.ceil(z * z * rate * (1 - rate) / margin**2 - 1e-9)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _representation(report: FieldBias, shares: Mapping[str, float]) -> None:
    tested = [g for g in report.groups if shares.get(g, 0) > 0]
    report.not_in_reference = [g for g in report.groups if g not in tested]
    if len(tested) < 2:
        return
    observed = np.array([report.groups[g].count for g in tested], dtype=float)
    p = np.array([shares[g] for g in tested], dtype=float)
    p /= p.sum()  # shares sum to 1 within SUM_TOLERANCE; chisquare wants equal totals
    n = observed.sum()
    expected = n * p
    result = stats.chisquare(observed, expected)
    report.representation = ChiSquare(float(result.statistic), len(tested) - 1,
                                      float(result.pvalue), float(expected.min()))
    residuals = (observed - expected) / np.sqrt(n * p * (1 - p))
    for g, share, z in zip(tested, p, residuals, strict=True):
        report.groups[g].expected_share, report.groups[g].residual = float(share), float(z)
    below = sorted((float(z), g) for g, z in zip(tested, residuals, strict=True) if z < 0)
    report.below_reference = [g for _, g in below]
    report.under_represented = [g for z, g in below if z < UNDER_Z]


def _label_rates(report: FieldBias, counts: Mapping[str, Counter[str]], labels: list[str],
                 all_labels: list[str], confidence: float) -> None:
    for g, stat in report.groups.items():
        stat.rates = {label: Rate(counts[g][label], counts[g][label] / stat.count,
                                  *wilson_interval(counts[g][label], stat.count, confidence))
                      for label in labels}
    gaps = []
    for label in labels:
        by_rate = sorted(report.groups, key=lambda g: report.groups[g].rates[label].rate)
        low, high = by_rate[0], by_rate[-1]
        lo, hi = report.groups[low].rates[label].rate, report.groups[high].rates[label].rate
        gaps.append(Gap(label, high, hi, low, lo, hi - lo))
    report.labels = labels
    report.largest_gap = max(gaps, key=lambda gap: gap.gap)  # the first label on ties
    table = np.array([[counts[g][label] for label in all_labels] for g in report.groups])
    result = stats.chi2_contingency(table, correction=False)
    report.independence = ChiSquare(float(result.statistic), int(result.dof),
                                    float(result.pvalue), float(result.expected_freq.min()))


def _check_reference(field_name: str, shares: Mapping[str, float], groups: Sequence[str],
                     source: str | None) -> None:
    missing = [g for g in shares if g not in groups]
    if not missing:
        return
    hints = []
    for g in missing:
        close = difflib.get_close_matches(g, groups, n=1)
        hints.append(f"{g!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise DataError(f"the reference names group(s) {', '.join(hints)} of field {field_name!r} "
                    f"that the data lacks; the data has {', '.join(map(repr, groups))}",
                    path=source, field=field_name, code="bad_reference")


def _labels(counts: Mapping[str, Counter[str]], positive_label: str | None) -> list[str]:
    found = sorted({label for c in counts.values() for label in c if c[label]})
    if "" in found:  # some or all examples have no class label: no label statistics
        found = []
    if positive_label is None:
        return found
    if positive_label not in found:
        close = difflib.get_close_matches(positive_label, found, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"positive label {positive_label!r} is not among the labels{hint}; "
                        f"the labels are {', '.join(map(repr, found)) or 'none (no class labels)'}")
    return found


def _field_bias(name: str, counts: Mapping[str, Counter[str]], shares: Mapping[str, float] | None,
                test: Mapping[str, Counter[str]] | None, positive_label: str | None,
                confidence: float, min_size: int) -> FieldBias:
    n = sum(c.total() for c in counts.values())
    order = sorted(counts, key=lambda g: (-counts[g].total(), g))
    report = FieldBias(name, n, {g: GroupBias(counts[g].total(), counts[g].total() / n)
                                 for g in order})
    if shares is not None:
        _representation(report, shares)
    all_labels = _labels(counts, positive_label)
    if len(order) >= 2 and len(all_labels) >= 2:
        labels = [positive_label] if positive_label is not None else all_labels
        _label_rates(report, counts, labels, all_labels, confidence)
    report.small_groups = [g for g in order if counts[g].total() < min_size]
    if test is not None:
        for g in order:
            report.groups[g].test_count = test[g].total() if g in test else 0
        report.thin_test_groups = [g for g in order if report.groups[g].test_count < min_size]
    return report


def bias_report(counts: GroupCounts, *, reference: Reference | Mapping[str, Any] | None = None,
                test_counts: GroupCounts | None = None, positive_label: str | None = None,
                confidence: float = 0.95, margin: float = 0.05) -> BiasReport:
    """The bias report of group counts (field -> group -> Counter of labels); see the module
    docstring for each figure and rule. Raises ``DataError`` when the reference names a group
    the data lacks, or the positive label is not a label of the data."""
    if reference is not None and not isinstance(reference, Reference):
        reference = Reference(reference)
    min_size = min_group_size(confidence, margin)
    report = BiasReport({}, confidence, margin, min_size)
    for name, groups in counts.items():
        if not groups:
            continue
        shares = reference.shares.get(name) if reference is not None else None
        if shares is not None:
            _check_reference(name, shares, list(groups), reference.source)
        test = test_counts.get(name, {}) if test_counts is not None else None
        report.fields[name] = _field_bias(name, groups, shares, test, positive_label,
                                          confidence, min_size)
        report.warnings += _warnings(report.fields[name], report)
    return report


def _warnings(f: FieldBias, r: BiasReport) -> list[str]:
    out = []
    for g in f.under_represented:
        s = f.groups[g]
        out.append(f"{f.field}: group {g!r} is under-represented: {s.share:.1%} of the data vs "
                   f"{s.expected_share:.1%} in the reference (z = {s.residual:.1f})")
    if f.not_in_reference and f.representation is not None:
        out.append(f"{f.field}: group(s) {', '.join(map(repr, f.not_in_reference))} are not in "
                   "the reference (or have share 0) and were left out of its test")
    if f.independence is not None and f.largest_gap is not None \
            and f.independence.p_value < 1 - r.confidence:
        gap = f.largest_gap
        out.append(f"{f.field}: label rates differ between groups (chi-square p = "
                   f"{f.independence.p_value:.2g}): {gap.label!r} {gap.high_rate:.0%} in "
                   f"{gap.high_group!r} vs {gap.low_rate:.0%} in {gap.low_group!r}; the model "
                   "may learn the group as a shortcut")
    if f.small_groups:
        out.append(f"{f.field}: group(s) " + ", ".join(f"{g!r} ({f.groups[g].count})" for g
                                                       in f.small_groups)
                   + f" have fewer than {r.min_size} examples, too few for a +/-"
                   f"{r.margin * 100:g}-point {r.confidence:.0%} interval on their rates")
    for g in f.thin_test_groups:
        k = f.groups[g].test_count
        out.append(f"{f.field}: group {g!r} has " + (f"only {k} test examples" if k else
                                                     "no test examples")
                   + f": its metrics will have a CI wider than +/-{r.margin * 100:g} points")
    return out


def _test_line(name: str, t: ChiSquare) -> str:
    rough = " (approximate: an expected count is below 5)" if t.min_expected < 5 else ""
    return f"  {name}: chi-square {t.statistic:.2f}, dof {t.dof}, p {t.p_value:.3g}{rough}"


def _field_lines(f: FieldBias, r: BiasReport) -> list[str]:
    out = [f"bias by {f.field} ({f.examples} examples, {r.confidence:.0%} Wilson intervals):"]
    for g, s in f.groups.items():
        text = f"  {g}: {s.count} ({s.share:.1%})"
        if s.expected_share is not None:
            text += f", reference {s.expected_share:.1%} (z {s.residual:+.1f})"
        text += "".join(f", {label!r} {x.rate:.1%} [{x.low:.1%}, {x.high:.1%}]"
                        for label, x in s.rates.items())
        if s.test_count is not None:
            text += f", test {s.test_count}"
        out.append(text)
    if f.representation is not None:
        out.append(_test_line("representation vs reference", f.representation))
        if f.below_reference:
            out.append("  below the reference share: " + ", ".join(
                f"{g} (z {f.groups[g].residual:+.1f})" for g in f.below_reference)
                + f"; under-represented (z < {UNDER_Z:g}): "
                + (", ".join(f.under_represented) or "none"))
    if f.largest_gap is not None and f.independence is not None:
        gap = f.largest_gap
        out.append(f"  largest label-rate gap: {gap.label!r} {gap.high_rate:.1%} in "
                   f"{gap.high_group} vs {gap.low_rate:.1%} in {gap.low_group} "
                   f"({gap.gap * 100:.1f} points)")
        out.append(_test_line("group x label independence", f.independence))
    out.append(f"  minimum size for +/-{r.margin * 100:g} points (worst case p = "
               f"{r.rate_assumed:g}): {r.min_size}; below it: "
               + (", ".join(f.small_groups) or "none"))
    return out


# ----------------------------------------------------------------------------- reference


def _read_reference(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError("no such reference file", path=path, code="bad_reference") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the reference file ({err})", path=path,
                        code="bad_reference") from err
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise DataError(f"not valid {kind} ({err}); expected {REFERENCE_SHAPE}", path=path,
                        code="bad_reference") from err


def _is_share(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _share_problems(name: str, shares: Any) -> list[Problem]:
    if not isinstance(shares, dict) or not shares:
        return [Problem("bad_reference", f"expected {{group: share, ...}}, got {shares!r}",
                        field=name)]
    bad = [str(g) for g, s in shares.items() if not _is_share(s) or not math.isfinite(s)]
    if bad:
        return [Problem("bad_reference", "shares must be numbers; not for group(s) "
                        + ", ".join(map(repr, bad)), field=name)]
    problems = []
    negative = [str(g) for g, s in shares.items() if s < 0]
    if negative:
        problems.append(Problem("bad_reference", "shares cannot be negative; group(s) "
                                + ", ".join(map(repr, negative)), field=name))
    total = sum(shares.values())
    if abs(total - 1) > SUM_TOLERANCE:
        problems.append(Problem("bad_reference", f"shares sum to {total:g}, not 1 (within "
                                f"{SUM_TOLERANCE:g})", field=name))
    return problems


def load_reference(path: Path | str, fields: Sequence[str]) -> Reference:
    """Expected group shares from a JSON or YAML file, checked against the group ``fields``.

    The file holds ``{"field": {"group": share, ...}, ...}`` or, with one group field, just
    ``{"group": share, ...}``. Every problem is reported at once, naming the file.
    """
    path = Path(path)
    data = _read_reference(path)
    if not isinstance(data, dict) or not data:
        raise DataError(f"expected {REFERENCE_SHAPE}, got {data!r}", path=path,
                        code="bad_reference")
    if all(_is_share(v) for v in data.values()):
        if len(fields) != 1:
            raise DataError(f"shares without a field name, but there are {len(fields)} group "
                            f"fields ({', '.join(fields)}); name the field: {REFERENCE_SHAPE}",
                            path=path, code="bad_reference")
        data = {fields[0]: data}
    problems = []
    for name, shares in data.items():
        if str(name) not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(Problem("bad_reference", f"field {name!r} is not among the group "
                                    f"fields ({', '.join(fields)}){hint}", field=str(name)))
        else:
            problems += _share_problems(str(name), shares)
    if problems:
        raise DataError(f"{path}: the reference cannot be used; expected {REFERENCE_SHAPE} "
                        "with shares summing to 1", path=path, problems=problems)
    return Reference({str(k): {str(g): float(s) for g, s in v.items()} for k, v in data.items()},
                     str(path))
