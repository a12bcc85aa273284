"""Label issues: how well tunesmith finds flipped labels, against cleanlab's usual text recipe,
and how long the bias + label-issue analysis of 5,000 examples takes.

    .venv/bin/python bench/label_issues.py [--seeds 0 1 2] [--out label_issues.json]
    .venv/bin/python bench/label_issues.py --smoke --model DIR   # tiny sizes, any model

1. Recovery. The SMS spam data (examples/sms_spam/sms_spam.tsv, 4,459 messages) with
   ``--fraction`` (5%) of its labels flipped at random (``data.label_issues.flip_labels``, one
   seed per repeat). Two feature sets feed the same k-fold probe and cleanlab
   (``data.label_issues.find_issues``):
   - ``tunesmith``: the bundled model's middle-block hidden states, mean-pooled
     (``flows.label_issues.find_in_records``, what ``tunesmith data label-issues`` runs);
   - ``tfidf``: TF-IDF of word 1-2-grams and character 2-5-grams (scikit-learn), the
     model-free features cleanlab's text examples start from.
   Precision and recall are of the flagged rows against the flipped ones. The texts are
   embedded once (features do not depend on the labels); the timing below covers a whole call.
2. Time. ``--timing-examples`` (5,000) labelled rows with a group field, written as JSONL:
   the SMS messages (group: their length band) followed by German-credit descriptions from
   examples/german_credit (group: the applicant's sex) until the count is reached. Timed from
   the call to the end: ``flows.prepare.inspect_file`` with the bias report on the group field,
   then ``flows.label_issues.label_issues_file`` (loads the model, embeds, probes, writes the
   suspects), each in this process as the CLI runs them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMS = ROOT / "examples" / "sms_spam" / "sms_spam.tsv"
CREDIT = ROOT / "examples" / "german_credit" / "german_credit.jsonl"


def sms_rows() -> list[dict]:
    lines = SMS.read_text(encoding="utf-8").splitlines()[1:]
    return [{"text": t, "label": label} for label, t in (x.split("\t", 1) for x in lines)]


def band(text: str) -> str:
    n = len(text)
    return "short (<40 chars)" if n < 40 else "medium (40-99)" if n < 100 else "long (100+)"


def tfidf_features(texts: list[str]) -> np.ndarray:
    from scipy.sparse import hstack
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2,
                            sublinear_tf=True).fit_transform(texts)
    # the probe standardises dense features; 300 SVD components keep nearly all the signal
    dims = min(300, min(words.shape[0], words.shape[1] + chars.shape[1]) - 1)
    return TruncatedSVD(dims, random_state=0).fit_transform(hstack([words, chars]).tocsr())


def recovery(rows: list[dict], model_ref: str, seeds: list[int], fraction: float) -> dict:
    from tunesmith.data.label_issues import find_issues, flip_labels, flip_recovery
    from tunesmith.models.embed import embed_texts
    from tunesmith.models.load import load
    from tunesmith.models.resolve import default_home, resolve_model

    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    model, tokenizer = load(resolve_model(model_ref, home=default_home()))
    unique = list(dict.fromkeys(texts))
    started = time.perf_counter()
    pooled = embed_texts(model, tokenizer, unique)
    embed_s = time.perf_counter() - started
    where = {t: k for k, t in enumerate(unique)}
    features = {"tunesmith": pooled[[where[t] for t in texts]]}
    started = time.perf_counter()
    features["tfidf"] = tfidf_features(texts)
    tfidf_s = time.perf_counter() - started
    out: dict = {"examples": len(rows), "unique_texts": len(unique), "fraction": fraction,
                 "features_seconds": {"tunesmith": round(embed_s, 1),
                                      "tfidf": round(tfidf_s, 1)}, "runs": []}
    for seed in seeds:
        noisy, flipped = flip_labels(labels, fraction, seed=seed)
        for name, x in features.items():
            started = time.perf_counter()
            report = find_issues(x, noisy, seed=seed)
            p, r = flip_recovery([i.index for i in report.issues], flipped)
            out["runs"].append({"seed": seed, "features": name, "flipped": len(flipped),
                                "found": len(report.issues), "precision": round(p, 3),
                                "recall": round(r, 3),
                                "probe_accuracy": round(report.probe_accuracy, 4),
                                "probe_seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(out["runs"][-1]), flush=True)
    for name in features:
        runs = [x for x in out["runs"] if x["features"] == name]
        out[name] = {k: round(float(np.mean([x[k] for x in runs])), 3)
                     for k in ("precision", "recall")}
        out[name]["min_precision"] = min(x["precision"] for x in runs)
        out[name]["min_recall"] = min(x["recall"] for x in runs)
    return out


def timing_rows(n: int) -> list[dict]:
    rows = [{**r, "group": band(r["text"])} for r in sms_rows()][:n]
    if len(rows) < n and CREDIT.is_file():
        for line in CREDIT.read_text(encoding="utf-8").splitlines()[: n - len(rows)]:
            r = json.loads(line)
            rows.append({"text": r["text"], "label": r["label"], "group": r["sex"]})
    return rows


def timed_analysis(rows: list[dict], model_ref: str, workdir: Path) -> dict:
    from tunesmith.flows.label_issues import label_issues_file
    from tunesmith.flows.prepare import inspect_file

    path = workdir / "timing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    started = time.perf_counter()
    report = inspect_file(path, group_column="group")
    bias_s = time.perf_counter() - started
    found = label_issues_file(path, model=model_ref)
    total = time.perf_counter() - started
    return {"examples": len(rows), "unique_texts": len({r["text"] for r in rows}),
            "groups": len(report.bias.fields["group"].groups) if report.bias else 0,
            "suspects": len(found.report.issues), "bias_seconds": round(bias_s, 2),
            "label_issue_seconds": round(total - bias_s, 1), "total_seconds": round(total, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--timing-examples", type=int, default=5000)
    parser.add_argument("--smoke", action="store_true", help="300 rows, one seed, 300 timed")
    parser.add_argument("--timing-only", action="store_true", help="skip the recovery part")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = sms_rows()
    if args.smoke:
        rows, args.seeds, args.timing_examples = rows[:300], args.seeds[:1], 300
    result = {} if args.timing_only else {
        "recovery": recovery(rows, args.model, args.seeds, args.fraction)}
    with tempfile.TemporaryDirectory() as tmp:
        result["timing"] = timed_analysis(timing_rows(args.timing_examples), args.model,
                                          Path(tmp))
    rec, t = result.get("recovery"), result["timing"]
    for name in ("tunesmith", "tfidf") if rec else ():
        print(f"{name}: precision {rec[name]['precision']:.3f} (min {rec[name]['min_precision']}),"
              f" recall {rec[name]['recall']:.3f} (min {rec[name]['min_recall']}) over seeds "
              f"{args.seeds}")
    print(f"bias + label issues of {t['examples']} examples: {t['total_seconds']} s "
          f"(bias {t['bias_seconds']} s), peak RSS {t['peak_rss_mb']} MB")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
