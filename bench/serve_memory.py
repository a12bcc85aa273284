"""Serving many LoRA fine-tunes of one base: one shared base against a merged copy each.

    .venv/bin/python bench/serve_memory.py [--adapters 10] [--out serve_memory.json]
    .venv/bin/python bench/serve_memory.py --smoke --model DIR   # tiny model, 3 adapters

Makes ``--adapters`` finished LoRA runs of the bundled SmolLM2-135M-Instruct (r=8, alpha 16,
every linear layer, random nonzero weights: memory does not care what they learned), each an
``adapter/``, a ``merged/`` model (fp32) and its ``config.yaml``, as a service job leaves them.
Then four arms, each in a process of its own so the figures are its own (``--smoke`` runs them
in this process, to check the code, not to measure):

- ``shared`` with 1 and with N fine-tunes: the service's chat model cache
  (``service.inference.ModelCache.get_adapter``, what the chat API calls for a LoRA
  fine-tune): one base, each fine-tune's adapter attached to it;
- ``merged`` with 1 and with N fine-tunes (the peer, the old way): each fine-tune's merged
  model loaded whole (``ModelCache.get`` with ``load_for_chat(run_dir)``).

Each arm loads its fine-tunes and answers one short greedy chat request with each (4 new
tokens), so the adapters' forward path runs too. Reported per arm: the cache's counted bytes,
the process's resident memory (VmRSS, after ``gc.collect``) growth from just before loading
(torch, transformers and peft imported) to after the replies, the peak RSS over that same
starting point (loading passes through more than it keeps), and the seconds to load.
Ratios: N fine-tunes over 1, for each way, and shared over merged at N.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from procmem import peak_mb, rss_mb  # noqa: E402

BASE = "smollm2-135m-instruct"
LORA = {"r": 8, "alpha": 16}
PROMPT = [{"role": "user", "content": "Is this spam: you won a free cruise, reply YES"}]
NEW_TOKENS = 4


def make_runs(base_dir: Path, n: int, root: Path) -> list[Path]:
    """``n`` finished LoRA runs of ``base_dir`` under ``root``: adapter, merged, config."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.load import load

    runs = []
    for i in range(n):
        run_dir = root / f"ftjob-{i:02d}"
        model, tokenizer = load(base_dir)
        peft = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: make each adapter count
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        peft.save_pretrained(run_dir / "adapter")
        merged = peft.merge_and_unload()
        merged.save_pretrained(run_dir / "merged")
        tokenizer.save_pretrained(run_dir / "merged")
        (run_dir / "config.yaml").write_text(yaml.safe_dump({
            "name": run_dir.name, "output_dir": str(run_dir), "model": {"base": str(base_dir)},
            "data": {"train_file": str(run_dir / "train.jsonl")},
            "train": {"method": "lora", "lora": LORA}}))
        runs.append(run_dir)
        del model, peft, merged
        gc.collect()
        print(f"made {run_dir.name}", flush=True)
    return runs


def arm(way: str, base_dir: Path, runs: list[Path]) -> dict:
    """Load ``runs`` the ``way`` way and answer one request each; what it cost."""
    import peft  # noqa: F401 - imported before the baseline, as a server has it
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from tunesmith.data.encode import encode_prompt
    from tunesmith.flows.chat import load_for_chat
    from tunesmith.models.generation import GenerationParams, generate
    from tunesmith.service.inference import ModelCache
    from tunesmith.service.lora import lora_source

    home = Path(tempfile.gettempdir())  # every reference here is a directory
    gc.collect()
    before = rss_mb()
    cache = ModelCache(budget_bytes=1 << 50)
    started = time.perf_counter()
    loaded = []
    for run_dir in runs:
        name = f"ft:{run_dir.name}"
        if way == "shared":
            source = lora_source(run_dir, home=home)
            if source is None:
                sys.exit(f"{run_dir}: cannot be served as an adapter")
            loaded.append(cache.get_adapter(name, source, lambda: load_for_chat(
                str(base_dir), home=home)))
        else:
            loaded.append(cache.get(name, lambda r=run_dir: load_for_chat(str(r), home=home)))
    load_s = time.perf_counter() - started
    params = GenerationParams(max_new_tokens=NEW_TOKENS)
    replies = [generate(model, tok, [encode_prompt(tok, PROMPT)], params, batch_size=1)[0].text
               for model, tok in loaded]
    gc.collect()
    after = rss_mb()
    return {"way": way, "fine_tunes": len(runs), "cache_mb": cache.used / 2**20,
            "rss_growth_mb": after - before, "peak_rss_growth_mb": peak_mb() - before,
            "rss_mb": after, "load_seconds": load_s, "replies": replies}


def run_arm(way: str, base_dir: Path, runs: list[Path]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arm", way, "--base", str(base_dir),
                          *map(str, runs)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"arm {way} x{len(runs)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=None, help="fine-tunes (smoke: 3)")
    parser.add_argument("--model", default=BASE, help="the base model (name or directory)")
    parser.add_argument("--smoke", action="store_true", help="--model DIR, 3 adapters")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the runs are made (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    parser.add_argument("--arm", choices=("shared", "merged"), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("runs", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # one arm, in its own process
        print(json.dumps(arm(args.arm, args.base, args.runs)))
        return

    import torch

    from tunesmith.models.resolve import default_home, resolve_model

    if args.smoke and args.model == BASE:
        parser.error("--smoke needs --model DIR (a tiny model)")
    n = args.adapters or (3 if args.smoke else 10)
    base_dir = resolve_model(args.model, home=default_home())
    with tempfile.TemporaryDirectory(prefix="serve-memory-", dir=args.workdir) as tmp:
        started = time.perf_counter()
        runs = make_runs(base_dir, n, Path(tmp))
        made_s = time.perf_counter() - started
        # each arm in a fresh process, so RSS is its own; the smoke run (figures meaningless)
        # runs them here, saving four interpreter starts
        measure = arm if args.smoke else run_arm
        results = {f"{way}_{k}": measure(way, base_dir, runs[:k])
                   for way in ("shared", "merged") for k in (1, n)}
    s1, sn, m1, mn = (results[k] for k in ("shared_1", f"shared_{n}", "merged_1", f"merged_{n}"))
    ratios = {
        "shared_rss_n_over_1": sn["rss_growth_mb"] / s1["rss_growth_mb"],
        "shared_cache_n_over_1": sn["cache_mb"] / s1["cache_mb"],
        "merged_rss_n_over_1": mn["rss_growth_mb"] / m1["rss_growth_mb"],
        "merged_cache_n_over_1": mn["cache_mb"] / m1["cache_mb"],
        "shared_over_merged_rss_at_n": sn["rss_growth_mb"] / mn["rss_growth_mb"],
    }
    same = sum(a == b for a, b in zip(sn["replies"], mn["replies"], strict=True))
    result = {"model": args.model, "smoke": args.smoke, "adapters": n, "lora": LORA,
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "make_runs_seconds": made_s, "arms": results, "ratios": ratios,
              "same_replies_shared_vs_merged": same}
    print(f"{n} LoRA fine-tunes of {args.model} (r={LORA['r']}, all linear)")
    print("| way | fine-tunes | cache MB | RSS growth MB | peak RSS growth MB | load s |")
    for r in results.values():
        print(f"| {r['way']} | {r['fine_tunes']} | {r['cache_mb']:.1f} | "
              f"{r['rss_growth_mb']:.1f} | {r['peak_rss_growth_mb']:.1f} | "
              f"{r['load_seconds']:.1f} |")
    print(f"shared: {n} / 1 = {ratios['shared_rss_n_over_1']:.2f}x RSS growth, "
          f"{ratios['shared_cache_n_over_1']:.2f}x cache bytes")
    print(f"merged: {n} / 1 = {ratios['merged_rss_n_over_1']:.2f}x RSS growth, "
          f"{ratios['merged_cache_n_over_1']:.2f}x cache bytes")
    print(f"shared / merged at {n}: {ratios['shared_over_merged_rss_at_n']:.2f}x RSS growth; "
          f"same replies {same} of {n}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
