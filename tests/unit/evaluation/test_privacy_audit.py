import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import review_rows, train_tiny
from tunesmith.data.encode import IGNORE_INDEX, encode_chat
from tunesmith.errors import DataError
from tunesmith.evaluation.privacy_audit import (
    audit_model,
    canary_exposures,
    canary_training_rows,
    candidate_secrets,
    chance_exposure,
    example_losses,
    exposure,
    exposure_rank,
    make_canaries,
    membership_auc,
    membership_auc_interval,
    secret_log_perplexities,
    summarize_exposures,
)

# ----------------------------------------------------------------------------- exposure


def test_a_canary_more_likely_than_every_candidate_has_the_ceiling_exposure():
    assert exposure(0.5, [1.0, 2.0, 3.0]) == pytest.approx(2.0)  # log2(3 + 1)
    assert exposure(0.0, list(range(1, 200))) == pytest.approx(math.log2(200))


def test_a_canary_less_likely_than_every_candidate_has_no_exposure():
    assert exposure(9.0, [1.0, 2.0, 3.0]) == pytest.approx(0.0)


def test_exposure_in_the_middle():
    # 3 of 7 candidates are more likely: rank 4 of 8, so 3 - 2 = 1 bit
    assert exposure_rank(2.5, [0, 1, 2, 3, 4, 5, 6]) == 4
    assert exposure(2.5, [0, 1, 2, 3, 4, 5, 6]) == pytest.approx(1.0)


def test_ties_count_half():
    # one lower, two equal: rank 1 + 1 + 0.5 * 2 = 3
    assert exposure_rank(1.0, [0.5, 1.0, 1.0, 2.0]) == 3
    assert exposure(1.0, [0.5, 1.0, 1.0, 2.0]) == pytest.approx(math.log2(5) - math.log2(3))


def test_exposure_needs_candidates():
    with pytest.raises(DataError, match="candidate"):
        exposure(1.0, [])


def test_chance_exposure_is_the_mean_over_uniform_ranks():
    m = 3
    explicit = sum(math.log2(m + 1) - math.log2(r) for r in range(1, m + 2)) / (m + 1)
    assert chance_exposure(m) == pytest.approx(explicit)
    assert chance_exposure(10_000) == pytest.approx(math.log2(math.e), abs=0.05)
    with pytest.raises(DataError):
        chance_exposure(0)


def test_a_canary_like_the_candidates_has_chance_exposure():
    rng = np.random.default_rng(0)
    m, trials = 100, 2000
    scores = rng.normal(size=(trials, m + 1))
    exposures = [exposure(row[0], row[1:]) for row in scores]
    # an exposure of a uniform rank is ~ exponential with sd log2(e): standard error ~0.03
    assert np.mean(exposures) == pytest.approx(chance_exposure(m), abs=0.12)


# ----------------------------------------------------------------------------- membership


def test_membership_auc_of_identical_distributions_is_chance():
    rng = np.random.default_rng(1)
    assert membership_auc(rng.normal(size=5000), rng.normal(size=5000)) == pytest.approx(
        0.5, abs=0.03)


def test_members_with_lower_losses_are_found():
    assert membership_auc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0
    assert membership_auc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0


def test_membership_auc_of_a_gaussian_shift_matches_the_closed_form():
    # non-member losses ~ N(d, 1), member losses ~ N(0, 1): AUC = P(X_n > X_m) = Phi(d / sqrt 2)
    rng = np.random.default_rng(2)
    d = 1.0
    expected = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))
    auc = membership_auc(rng.normal(size=4000), rng.normal(d, size=4000))
    assert auc == pytest.approx(expected, abs=0.02)


def test_membership_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    # AUC of N(0,1) members against N(0.5,1) non-members is Phi(0.5 / sqrt 2)
    truth = 0.5 * (1 + math.erf(0.5 / 2))
    rng = np.random.default_rng(4)
    covered, widths = 0, []
    for trial in range(60):
        members, nonmembers = rng.normal(size=200), rng.normal(0.5, size=200)
        low, high = membership_auc_interval(members, nonmembers, n_resamples=400, seed=trial)
        assert low <= membership_auc(members, nonmembers) <= high
        covered += low <= truth <= high
        widths.append(high - low)
    assert 51 <= covered <= 60  # 95% of 60 trials is 57; binomial sd 1.7
    # the normal approximation of the AUC's standard error at n = 200 + 200 is about 0.028
    assert 0.08 < float(np.mean(widths)) < 0.14


def test_membership_auc_interval_narrows_with_more_examples():
    rng = np.random.default_rng(5)
    small = membership_auc_interval(rng.normal(size=100), rng.normal(size=100), seed=0)
    large = membership_auc_interval(rng.normal(size=2500), rng.normal(size=2500), seed=0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 3
    assert large[0] < 0.5 < large[1]


def test_membership_auc_needs_both_sets():
    with pytest.raises(DataError, match="members and non-members"):
        membership_auc([], [1.0])


# ----------------------------------------------------------------------------- canaries


def test_canaries_are_deterministic_distinct_and_well_formed():
    canaries = make_canaries(20, digits=8, seed=3)
    assert canaries == make_canaries(20, digits=8, seed=3)
    assert [c.secret for c in canaries] != [c.secret for c in make_canaries(20, digits=8, seed=4)]
    assert len({c.secret for c in canaries}) == 20
    assert len({c.name for c in canaries}) == 20
    assert all(re.fullmatch(r"\d( \d){7}", c.secret) for c in canaries)
    for c in canaries:
        user, assistant = c.messages
        assert user["role"] == "user" and c.name in user["content"]
        assert assistant["role"] == "assistant" and c.secret in assistant["content"]
        assert c.secret not in user["content"]


def test_a_canary_takes_another_secret_in_the_same_sentence():
    canary = make_canaries(1, digits=4, seed=0)[0]
    other = "1 2 3 4" if canary.secret != "1 2 3 4" else "4 3 2 1"
    swapped = canary.with_secret(other)
    assert swapped[0] == canary.messages[0]
    assert swapped[1]["content"] == canary.messages[1]["content"].replace(canary.secret, other)


def test_too_many_canaries_for_the_digits():
    with pytest.raises(DataError, match="distinct"):
        make_canaries(11, digits=1, seed=0)


def test_candidates_exclude_the_canaries():
    canaries = make_canaries(5, digits=2, seed=0)
    secrets = {c.secret for c in canaries}
    # 100 two-digit secrets exist: the 95 candidates are exactly the others
    candidates = candidate_secrets(95, digits=2, seed=0, exclude=secrets)
    assert len(set(candidates)) == 95 and not secrets & set(candidates)
    assert all(re.fullmatch(r"\d \d", s) for s in candidates)
    assert candidates == candidate_secrets(95, digits=2, seed=0, exclude=secrets)
    with pytest.raises(DataError, match="distinct"):
        candidate_secrets(96, digits=2, seed=0, exclude=secrets)


def test_training_rows_repeat_each_canary():
    canaries = make_canaries(3, seed=0)
    rows = canary_training_rows(canaries, repeats=4)
    assert len(rows) == 12
    assert [r["messages"] for r in rows[:4]] == [canaries[0].messages] * 4
    assert sum(canaries[2].secret in r["messages"][1]["content"] for r in rows) == 4


def test_summary_of_exposures():
    rows = [{"exposure": 1.0, "chance": 1.4, "ceiling": 5.0},
            {"exposure": 4.0, "chance": 1.4, "ceiling": 5.0}]
    assert summarize_exposures(rows) == {"mean_exposure": 2.5, "max_exposure": 4.0,
                                         "chance_exposure": 1.4, "ceiling": 5.0,
                                         "n_canaries": 2}


# ----------------------------------------------------------------------------- on a model


def direct_answer_log_prob(model, tokenizer, messages) -> tuple[float, int]:
    """Summed log-probability of the assistant tokens from the full logits, one example."""
    enc = encode_chat(tokenizer, messages)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0]
    logp = F.log_softmax(logits.float(), -1)[:-1]
    targets = torch.tensor(enc.labels[1:])
    mask = targets != IGNORE_INDEX
    picked = logp[mask].gather(1, targets[mask][:, None])
    return float(picked.sum()), int(mask.sum())


def test_secret_scores_match_a_direct_computation(tiny_model, tokenizer):
    canary = make_canaries(1, seed=0)[0]
    secrets = [canary.secret, *candidate_secrets(4, digits=8, seed=1, exclude={canary.secret})]
    scores = secret_log_perplexities(tiny_model, tokenizer, canary, secrets, batch_size=2)
    direct = [-direct_answer_log_prob(tiny_model, tokenizer, canary.with_secret(s))[0]
              for s in secrets]
    assert scores == pytest.approx(direct, abs=1e-4)
    assert len(set(scores)) == len(scores)


def test_example_losses_match_a_direct_computation(tiny_model, tokenizer):
    # rows of different lengths, so the batches are padded
    conversations = [r["messages"] for r in review_rows(3)]
    conversations[1] = [*conversations[1][:2],
                        {"role": "assistant", "content": "bad, and a long answer about why"}]
    losses = example_losses(tiny_model, tokenizer, conversations, batch_size=2)
    expected = []
    for messages in conversations:
        total, n = direct_answer_log_prob(tiny_model, tokenizer, messages)
        expected.append(-total / n)
    assert losses == pytest.approx(expected, abs=1e-4)


def test_example_losses_need_conversations_with_answers(tiny_model, tokenizer):
    with pytest.raises(DataError, match="no conversations"):
        example_losses(tiny_model, tokenizer, [])
    quiet = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello",
                                                  "weight": 0}]
    with pytest.raises(DataError, match="no assistant tokens"):
        example_losses(tiny_model, tokenizer, [quiet])


N_CANDIDATES = 100


@pytest.fixture(scope="module")
def memorised(tiny_model_dir, tokenizer):
    """The tiny model fully fine-tuned on the first of three canaries alone, and the canaries."""
    from tunesmith.models.load import load_model

    canaries = make_canaries(3, digits=8, seed=5)
    model = load_model(tiny_model_dir).eval()
    # 30 AdamW steps at lr 1e-2 on one 8-digit canary drive its answer loss to ~0.05 nats
    train_tiny(model, tokenizer, [encode_chat(tokenizer, canaries[0].messages)], steps=30,
               lr=1e-2, batch_size=1)
    return model, canaries


def test_a_memorised_canary_is_exposed_and_the_others_are_not(memorised, tokenizer):
    model, canaries = memorised
    ceiling = math.log2(N_CANDIDATES + 1)
    # the second canary, never trained on, is the control: same sentence, same candidates
    results = canary_exposures(model, tokenizer, canaries[:2], n_candidates=N_CANDIDATES, seed=6)
    assert [r["name"] for r in results] == [canaries[0].name, canaries[1].name]
    assert all(r["n_candidates"] == N_CANDIDATES for r in results)
    assert results[0]["exposure"] > ceiling - 1
    assert results[0]["rank"] == 1 and results[0]["exposure"] == pytest.approx(ceiling)
    assert results[1]["exposure"] < 4
    assert results[0]["chance"] == pytest.approx(chance_exposure(N_CANDIDATES))


def test_audit_of_the_memorised_model(memorised, tokenizer):
    model, canaries = memorised
    result = audit_model(model, tokenizer, canaries=canaries[:2], members=[canaries[0].messages],
                         nonmembers=[canaries[1].messages, canaries[2].messages],
                         n_candidates=20, seed=7, batch_size=32)
    assert result.membership_auc == 1.0
    assert (result.n_members, result.n_nonmembers, result.n_candidates) == (1, 2, 20)
    assert result.max_exposure == pytest.approx(math.log2(21))
    assert result.mean_exposure == pytest.approx(
        (result.canaries[0]["exposure"] + result.canaries[1]["exposure"]) / 2)
    assert result.chance_exposure == pytest.approx(chance_exposure(20))
    assert json.loads(json.dumps(result.to_dict()))["membership_auc"] == 1.0

