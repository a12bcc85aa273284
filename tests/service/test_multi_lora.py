"""Several LoRA fine-tunes of one base served from one copy of the base (``service.lora``):
each answers exactly as its own model does, alone or concurrently with the others and the
base; the cache counts the base once and each adapter on its own; deleting a fine-tune
unloads its adapter.

The fine-tunes are finished runs made here (an adapter with random nonzero weights, its
merged model, the run's config.yaml) and registered as succeeded jobs of a service run
in-process, without a worker: training is tested elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from tests.helpers import SYSTEM
from tunesmith.data.encode import encode_prompt
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.models.load import load
from tunesmith.service import ServiceSettings, Store, create_app, create_key
from tunesmith.service.inference import ModelCache, model_bytes
from tunesmith.service.lora import base_key, lora_source
from tunesmith.service.tables import Job

PROMPTS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
           for text in ("I love it", "Broke after a day", "Fine, I guess")]
MAX_TOKENS = 8
GREEDY = GenerationParams(max_new_tokens=MAX_TOKENS)


def make_lora_run(run_dir: Path, base_dir: Path, seed: int, *, method: str = "lora") -> None:
    """A finished run of ``base_dir``: adapter/ (r=4, every linear layer, random nonzero
    weights), merged/ and config.yaml; ``method="full"`` leaves no adapter, as full
    fine-tuning does."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(base_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:  # B starts at zero; nonzero B makes the adapter count
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    if method == "lora":
        peft.save_pretrained(run_dir / "adapter")
    merged = peft.merge_and_unload()
    merged.save_pretrained(run_dir / "merged")
    tokenizer.save_pretrained(run_dir / "merged")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "name": run_dir.name, "output_dir": str(run_dir), "model": {"base": str(base_dir)},
        "data": {"train_file": str(run_dir / "train.jsonl")},
        "train": {"method": method, "lora": {"r": 4, "alpha": 8}}}))


def register(settings: ServiceSettings, job_id: str, name: str) -> None:
    """A succeeded job of org acme whose fine-tuned model is ``name``."""
    store = Store(settings.url)
    with store.begin() as s:
        s.add(Job(id=job_id, org="acme", model="tiny", base_ref="tiny",
                  training_file="file-x", seed=0, hyperparameters={}, status="succeeded",
                  output_model=name, finished_at=1))
    store.close()


def expected(model: object, tokenizer: object) -> list[str]:
    """Each prompt's greedy reply from ``model`` by the one generation path."""
    return [r.text for r in generate(model, tokenizer,
                                     [encode_prompt(tokenizer, m) for m in PROMPTS], GREEDY,
                                     batch_size=1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
         ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi-lora")
    found = {}
    for job_id, seed, method in (("ftjob-a", 1, "lora"), ("ftjob-b", 2, "lora"),
                                 ("ftjob-full", 3, "full")):
        make_lora_run(root / "runs" / job_id, tiny_model_dir, seed, method=method)
        found[job_id] = root / "runs" / job_id
    return found


@pytest.fixture(scope="module")
def answers(runs: dict[str, Path], tiny_model_dir: Path) -> dict[str, list[str]]:
    """What each model answers served alone: the base, each adapter on a base of its own
    (PEFT, unmerged), the full fine-tune's merged model."""
    from peft import PeftModel

    out = {"tiny": expected(*load(tiny_model_dir))}
    for job_id in ("ftjob-a", "ftjob-b"):
        model, tokenizer = load(tiny_model_dir)
        alone = PeftModel.from_pretrained(model, str(runs[job_id] / "adapter")).eval()
        out[job_id] = expected(alone, tokenizer)
        # the merged model, served before adapters were shared, answers the same here
        assert expected(*load(runs[job_id] / "merged")) == out[job_id]
    out["ftjob-full"] = expected(*load(runs["ftjob-full"] / "merged"))
    assert len({tuple(v) for v in out.values()}) == 4, "the adapters must change the answers"
    return out


@pytest.fixture
def service(tmp_path: Path, runs: dict[str, Path], tiny_model_dir: Path, test_home: Path
            ) -> Iterator[tuple[TestClient, ServiceSettings, dict[str, str]]]:
    import shutil

    settings = ServiceSettings(data_dir=tmp_path / "svc", home=test_home,
                               base_models={"tiny": str(tiny_model_dir)})
    app = create_app(settings, worker=False)
    names = {}
    for job_id, run_dir in runs.items():
        shutil.copytree(run_dir, settings.runs_dir / job_id)
        names[job_id] = f"ft:tiny:acme:{job_id[6:]}:{job_id[-8:]}"
        register(settings, job_id, names[job_id])
    key, _ = create_key(Store(settings.url), "acme")
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, settings, names


def ask(client: TestClient, model: str, messages: list[dict], *, stream: bool = False) -> str:
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": stream}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()["choices"][0]["message"]["content"]
    import json

    chunks = [json.loads(line[6:]) for line in resp.text.splitlines()
              if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])


def cache_of(client: TestClient) -> ModelCache:
    return client.app.state.service.cache


def test_fine_tunes_share_one_base_and_answer_as_alone(service, answers, tiny_model_dir: Path
                                                       ) -> None:
    client, _, names = service
    for job_id in ("ftjob-a", "ftjob-b", "tiny", "ftjob-a"):
        model = names.get(job_id, job_id)
        assert [ask(client, model, m) for m in PROMPTS] == answers[job_id], job_id

    cache = cache_of(client)
    key = base_key(tiny_model_dir)
    assert cache.names() == [names["ftjob-b"], names["ftjob-a"], key]  # the base most recent
    base_bytes = model_bytes(load(tiny_model_dir)[0])
    adapter = sum(p.numel() * 4 for n, p in _adapter_tensors(client, names["ftjob-a"]))
    assert adapter > 0 and cache.used == base_bytes + 2 * adapter  # not 3 x the base
    # the fine-tunes saved the base's tokenizer: one copy serves all three
    assert cache.cached(names["ftjob-a"])[1] is cache.cached(key)[1]

    # a full fine-tune has no adapter: it is loaded whole, as before
    assert [ask(client, names["ftjob-full"], m) for m in PROMPTS] == answers["ftjob-full"]
    assert cache.used == 2 * base_bytes + 2 * adapter


def _adapter_tensors(client: TestClient, name: str) -> list[tuple[str, torch.Tensor]]:
    from tunesmith.service.lora import adapter_name

    served, _ = cache_of(client).cached(name)
    tag = f".{adapter_name(name)}."
    return [(n, p) for n, p in served.base.model.named_parameters() if tag in n]


def test_concurrent_requests_each_get_their_own_adapter(service, answers) -> None:
    client, _, names = service
    jobs = [(job_id, i, stream) for job_id in ("ftjob-a", "tiny", "ftjob-b")
            for i in range(len(PROMPTS)) for stream in (False, True)]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(k: int, job_id: str, i: int, stream: bool) -> None:
        try:
            got[k] = ask(client, names.get(job_id, job_id), PROMPTS[i], stream=stream)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert {k: got[k] for k in range(len(jobs))} == \
        {k: answers[job_id][i] for k, (job_id, i, _) in enumerate(jobs)}


def test_a_served_adapter_keeps_only_the_last_logits_of_its_prefix_pass(service, answers
                                                                         ) -> None:
    """Generation over a set runs the prompts' shared prefix once for its KV cache; through
    a served adapter, as through a plain model, the vocabulary head runs at one position."""
    from tests.helpers import decoder_passes

    client, _, names = service
    ask(client, names["ftjob-a"], PROMPTS[0])
    served, tokenizer = cache_of(client).cached(names["ftjob-a"])
    prompts = [encode_prompt(tokenizer, m) for m in PROMPTS]
    head = served.base.model.get_output_embeddings()
    with decoder_passes(head) as seen:
        replies = generate(served, tokenizer, prompts, GREEDY, batch_size=3)
    assert [r.text for r in replies] == answers["ftjob-a"]
    assert seen and all(shape[1] == 1 for shape in seen)


def test_the_adapter_alone_is_exact_without_the_generation_lock(service, answers) -> None:
    """The base's own lock makes the switch exact even for callers that bypass the service's
    one-generation-at-a-time lock: raw ``generate`` calls from threads, all at once."""
    client, _, names = service
    views = {job_id: client_model(client, names.get(job_id, job_id))
             for job_id in ("ftjob-a", "ftjob-b", "tiny")}
    tokenizer = views["tiny"][1]
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[0])])
    want = {}
    for job_id, (model, _) in views.items():
        out = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        want[job_id] = out[0].tolist()
    assert len({tuple(v) for v in want.values()}) == 3
    got: list[tuple[str, list[int]]] = []

    def worker(job_id: str) -> None:
        with torch.no_grad():
            out = views[job_id][0].generate(input_ids=ids, max_new_tokens=MAX_TOKENS,
                                            do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
        got.append((job_id, out[0].tolist()))

    threads = [threading.Thread(target=worker, args=(job_id,))
               for _ in range(4) for job_id in views]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(got) == len(threads) and all(out == want[job_id] for job_id, out in got)


def client_model(client: TestClient, model: str) -> tuple[object, object]:
    ask(client, model, PROMPTS[0])  # loads it
    loaded = cache_of(client).cached(model) if model.startswith("ft:") else None
    if loaded is not None:
        return loaded
    key = next(k for k in cache_of(client).names() if k.startswith("base:"))
    return cache_of(client).cached(key)


def test_deleting_a_fine_tune_unloads_its_adapter(service, answers, tiny_model_dir: Path
                                                  ) -> None:
    client, _, names = service
    for job_id in ("ftjob-a", "ftjob-b"):
        ask(client, names[job_id], PROMPTS[0])
    cache = cache_of(client)
    served, _ = cache.cached(names["ftjob-a"])
    with_both = cache.used
    resp = client.delete(f"/v1/models/{names['ftjob-a']}")
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    assert names["ftjob-a"] not in cache.names()
    assert len(served.base.adapters) == 1  # ftjob-b's alone
    assert model_bytes(served.base.model) == cache.used < with_both
    assert [ask(client, names["ftjob-b"], m) for m in PROMPTS] == answers["ftjob-b"]
    assert [ask(client, "tiny", m) for m in PROMPTS] == answers["tiny"]
    assert client.post("/v1/chat/completions", json={
        "model": names["ftjob-a"], "messages": PROMPTS[0]}).status_code == 404
    # the last adapter's deletion gives the plain base back
    client.delete(f"/v1/models/{names['ftjob-b']}")
    assert served.base.adapters == [] and cache.names() == [base_key(tiny_model_dir)]
    assert [ask(client, "tiny", m) for m in PROMPTS] == answers["tiny"]


def test_eviction_unloads_adapters_first_and_answers_stay_exact(
        runs: dict[str, Path], answers, tiny_model_dir: Path, test_home: Path) -> None:
    base_model, tokenizer = load(tiny_model_dir)
    base_bytes = model_bytes(base_model)
    sources = {j: lora_source(runs[j], home=test_home) for j in ("ftjob-a", "ftjob-b")}
    assert all(sources.values())
    from safetensors.torch import load_file

    adapter = sum(t.numel() * 4 for t in load_file(
        runs["ftjob-a"] / "adapter" / "adapter_model.safetensors").values())
    # room for the base and one adapter, not two
    cache = ModelCache(budget_bytes=base_bytes + adapter * 3 // 2)

    def get(job_id: str) -> tuple[object, object]:
        return cache.get_adapter(job_id, sources[job_id], lambda: load(tiny_model_dir))

    a, tok = get("ftjob-a")
    assert expected(a, tok) == answers["ftjob-a"]
    b, _ = get("ftjob-b")  # ftjob-a is evicted: unloaded from the base, which stays
    assert cache.names() == ["ftjob-b", base_key(tiny_model_dir)]
    assert len(b.base.adapters) == 1 and cache.used == model_bytes(b.base.model)
    # a request that got ftjob-a before its eviction still answers with it, and the
    # adapter it attaches for the while is gone again after
    assert expected(a, tok) == answers["ftjob-a"]
    assert len(b.base.adapters) == 1
    assert expected(b, tok) == answers["ftjob-b"]
    base, _ = cache.get_base(base_key(tiny_model_dir), lambda: pytest.fail("loaded twice"))
    assert expected(base, tok) == answers["tiny"]


def test_what_cannot_share_a_base_is_served_whole(runs: dict[str, Path], tmp_path: Path,
                                                   test_home: Path) -> None:
    import shutil

    assert lora_source(runs["ftjob-full"], home=test_home) is None  # no adapter
    gone = tmp_path / "gone"
    shutil.copytree(runs["ftjob-a"], gone)
    cfg = yaml.safe_load((gone / "config.yaml").read_text())
    cfg["model"]["base"] = str(tmp_path / "deleted-base")
    (gone / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert lora_source(gone, home=test_home) is None  # its base is gone
