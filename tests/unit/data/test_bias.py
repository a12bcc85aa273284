"""The dataset-bias report: figures against hand formulas, planted skews, bad references."""

import json
import math
from collections import Counter
from statistics import NormalDist

import numpy as np
import pytest

from tunesmith.data.bias import (
    Reference,
    bias_report,
    load_reference,
    min_group_size,
    wilson_interval,
)
from tunesmith.errors import DataError
from tunesmith.flows.prepare import inspect_file

TOY = {"g": {"a": Counter(yes=30, no=20), "b": Counter(yes=10, no=40),
             "c": Counter(yes=15, no=15)}}


def labelled(counts: dict[str, tuple[int, int]]) -> dict[str, Counter]:
    """group -> (positive, negative) as label counters."""
    return {g: Counter({"yes": pos, "no": neg}) for g, (pos, neg) in counts.items()}


def test_chi_square_figures_match_the_formulas():
    shares = {"a": 0.4, "b": 0.4, "c": 0.2}
    field = bias_report(TOY, reference={"g": shares}).fields["g"]

    observed = np.array([50, 50, 30.0])
    p = np.array([0.4, 0.4, 0.2])
    n = observed.sum()
    expected = n * p
    statistic = ((observed - expected) ** 2 / expected).sum()
    fit = field.representation
    # with 2 degrees of freedom the chi-square survival function is exp(-x / 2)
    assert fit.dof == 2 and fit.statistic == pytest.approx(statistic)
    assert fit.p_value == pytest.approx(math.exp(-statistic / 2))
    z = (observed - expected) / np.sqrt(n * p * (1 - p))
    assert [field.groups[g].residual for g in "abc"] == pytest.approx(list(z))
    assert field.below_reference == ["a", "b"] and field.under_represented == []

    table = np.array([[20, 30], [40, 10], [15, 15.0]])  # columns: no, yes
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    independence = field.independence
    assert independence.dof == 2 and independence.statistic == pytest.approx(statistic)
    assert independence.p_value == pytest.approx(math.exp(-statistic / 2))
    assert independence.min_expected == pytest.approx(expected.min())
    assert field.largest_gap.gap == pytest.approx(0.4)  # 'no' 80% in b vs 40% in a


def test_a_planted_skew_is_flagged():
    counts = {"g": labelled({"A": (300, 200), "B": (47, 423), "C": (10, 20)})}
    report = bias_report(counts, reference={"g": {"A": 0.4, "B": 0.3, "C": 0.3}},
                         positive_label="yes")
    field = report.fields["g"]
    assert field.under_represented == ["C"] and field.groups["C"].residual < -2
    assert field.representation.p_value < 1e-10
    assert field.labels == ["yes"] and set(field.groups["A"].rates) == {"yes"}
    gap = field.largest_gap
    assert (gap.high_group, gap.low_group) == ("A", "B")
    assert gap.high_rate == pytest.approx(0.6) and gap.low_rate == pytest.approx(0.1)
    assert field.independence.p_value < 1e-10
    text = "\n".join(report.warnings)
    assert "group 'C' is under-represented: 3.0% of the data vs 30.0% in the reference" in text
    assert "label rates differ between groups" in text and "'yes' 60% in 'A'" in text
    json.dumps(report.to_dict())  # serialisable for --json


def test_a_balanced_set_is_not_flagged():
    counts = {"g": labelled({"A": (200, 800), "B": (120, 480), "C": (80, 320)})}
    report = bias_report(counts, reference={"g": {"A": 0.5, "B": 0.3, "C": 0.2}},
                         positive_label="yes")
    field = report.fields["g"]
    assert field.representation.statistic == pytest.approx(0)
    assert field.independence.p_value == pytest.approx(1)
    assert field.under_represented == [] and field.small_groups == []
    assert report.warnings == []


def test_minimum_size_follows_the_normal_approximation():
    def formula(confidence, margin, p):
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        return math.ceil(z * z * p * (1 - p) / margin**2)

    assert min_group_size() == formula(0.95, 0.05, 0.5) == 385
    assert min_group_size(0.9, 0.03, 0.2) == formula(0.9, 0.03, 0.2)
    report = bias_report({"g": labelled({"big": (200, 200), "small": (100, 284)})},
                         margin=0.05)
    assert report.min_size == 385 and report.rate_assumed == 0.5
    assert report.fields["g"].small_groups == ["small"]
    assert any("'small' (384) have fewer than 385 examples" in w for w in report.warnings)


def test_wilson_interval():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    k, n, confidence = 8, 20, 0.9
    z, p = NormalDist().inv_cdf(0.95), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n, confidence) == pytest.approx((centre - half, centre + half))


def test_test_split_coverage():
    counts = {"g": labelled({"A": (300, 200), "B": (200, 300)})}
    report = bias_report(counts, test_counts={"g": {"A": Counter(yes=400), "B": Counter(no=7)}},
                         margin=0.05)
    assert report.fields["g"].thin_test_groups == ["B"]
    assert report.fields["g"].groups["B"].test_count == 7
    assert ("g: group 'B' has only 7 test examples: its metrics will have a CI wider than "
            "+/-5 points") in report.warnings


def test_free_text_and_single_groups_give_no_label_statistics():
    field = bias_report({"g": {"a": Counter({"": 5}), "b": Counter({"": 5})}}).fields["g"]
    assert field.independence is None and field.labels == []
    field = bias_report({"g": {"a": Counter(yes=3, no=4)}}).fields["g"]
    assert field.independence is None and field.groups["a"].share == 1


def test_a_positive_label_the_data_lacks():
    with pytest.raises(DataError, match="positive label 'Yes' is not among the labels "
                       r"\(did you mean 'yes'\?\)"):
        bias_report(TOY, positive_label="Yes")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reference_in_yaml_and_the_one_field_form(tmp_path):
    ref = load_reference(write(tmp_path / "ref.yaml", "a: 0.5\nb: 0.5\n"), ["g"])
    assert ref.shares == {"g": {"a": 0.5, "b": 0.5}} and ref.source == str(tmp_path / "ref.yaml")
    ref = load_reference(write(tmp_path / "ref.json", '{"g": {"a": 0.6, "b": 0.4}}'), ["g", "h"])
    assert ref.shares == {"g": {"a": 0.6, "b": 0.4}}


@pytest.mark.parametrize(("name", "text", "fields", "message"), [
    ("ref.json", '{"g": {"a": 0.5,', ["g"], "not valid JSON"),
    ("ref.yaml", "g: [a, : b\n", ["g"], "not valid YAML"),
    ("ref.json", "[0.5, 0.5]", ["g"], "expected {\"field\""),
    ("ref.json", '{"g": {"a": 0.5, "b": 0.4}}', ["g"], "g: bad_reference: shares sum to 0.9"),
    ("ref.json", '{"g": {"a": 1.2, "b": -0.2}}', ["g"], "cannot be negative; group(s) 'b'"),
    ("ref.json", '{"g": {"a": "half", "b": 0.5}}', ["g"], "must be numbers; not for group(s) 'a'"),
    ("ref.json", '{"sit": {"a": 1}}', ["site"],
     "field 'sit' is not among the group fields (site) (did you mean 'site'?)"),
    ("ref.json", '{"a": 0.5, "b": 0.5}', ["g", "h"], "shares without a field name"),
])
def test_bad_references_name_the_file(tmp_path, name, text, fields, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as err:
        load_reference(path, fields)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_missing_reference_file(tmp_path):
    with pytest.raises(DataError, match="no such reference file"):
        load_reference(tmp_path / "nope.json", ["g"])
    with pytest.raises(DataError, match="cannot read the reference file"):
        load_reference(tmp_path, ["g"])  # a directory


def test_reference_groups_the_data_lacks(tmp_path):
    reference = Reference({"g": {"a": 0.5, "bb": 0.3, "zzz": 0.2}}, str(tmp_path / "ref.json"))
    with pytest.raises(DataError) as err:
        bias_report({"g": labelled({"a": (1, 1), "b": (1, 1)})}, reference=reference)
    text = str(err.value)
    assert str(tmp_path / "ref.json") in text
    assert "'bb' (did you mean 'b'?), 'zzz' of field 'g' that the data lacks" in text


def rows(tmp_path, name="data.jsonl"):
    """60 classification rows: site 'east' (10% of the data) is 5/6 spam, 'west' 10/54."""
    out = [{"text": f"message {i}", "label": "spam" if i < 5 or (i > 5 and i % 5 == 0) else "ham",
            "site": "east" if i < 6 else "west", "lang": "en" if i % 2 else "fr"}
           for i in range(60)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


def test_inspect_with_several_group_fields_and_a_test_file(tmp_path):
    report = inspect_file(rows(tmp_path), group_column=["site", "lang"], positive_label="spam",
                          test_file=rows(tmp_path, "test.jsonl"))
    assert set(report.groups) == {"site=east", "site=west", "lang=en", "lang=fr"}
    assert set(report.bias.fields) == {"site", "lang"}
    assert report.bias.fields["site"].groups["east"].test_count == 6
    assert any("bias by site" in line for line in report.lines())
    assert json.loads(json.dumps(report.to_json()))["bias"]["fields"]["lang"]["examples"] == 60


def test_inspect_names_an_unknown_group_field(tmp_path):
    with pytest.raises(DataError, match=r"no row has the group field 'sites' \(did you mean "
                       r"'site'\?\); the rows have 'label', 'lang', 'site'"):
        inspect_file(rows(tmp_path), group_column="sites")


def test_cli_prints_the_bias_section(cli, tmp_path):
    data = rows(tmp_path)
    ref = write(tmp_path / "ref.json", json.dumps({"east": 0.3, "west": 0.7}))
    code, out, _ = cli("data", "inspect", str(data), "--group-column", "site", "--reference",
                       str(ref), "--positive-label", "spam", "--json", "--no-tokens")
    assert code == 0
    bias = json.loads(out)["bias"]["fields"]["site"]
    assert bias["under_represented"] == ["east"] and bias["groups"]["east"]["count"] == 6
    assert bias["largest_gap"]["high_group"] == "east" and bias["labels"] == ["spam"]
    assert bias["representation"]["dof"] == 1

    # --group-field is the same option (the name the run config's data.group_fields uses)
    code, out, _ = cli("data", "inspect", str(data), "--group-field", "site", "--no-tokens")
    assert code == 0 and "bias by site (60 examples" in out and "warning: site:" in out

    code, _, err = cli("data", "inspect", str(data), "--group-column", "sit", "--no-tokens")
    assert code == 2 and "did you mean 'site'" in err


def test_bias_options_need_a_group_field(tmp_path):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="--positive-label: only for the bias report"):
        inspect_file(rows(tmp_path), positive_label="spam")
