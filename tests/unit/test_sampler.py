"""Per-request sampling on plain tensors: greedy, seeds, top-k/top-p, penalties, min_tokens."""

from __future__ import annotations

import torch

from deployments.engine.request import SamplingParams, Sequence
from deployments.engine.sampler import Sampler

EOS = 3


def make(request_id: str, **params: object) -> Sequence:
    return Sequence(request_id, [1, 2], SamplingParams(**params))  # type: ignore[arg-type]


def test_each_row_keeps_its_own_settings() -> None:
    sampler = Sampler({EOS})
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 1.0, 0.0]])
    greedy, top1 = make("g", temperature=0.0), make("k", temperature=1.0, top_k=1)
    assert sampler(logits, [greedy, top1]) == [1, 1]


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits = torch.zeros(1, 50)

    def draw(seed: int) -> list[int]:
        sampler, s = Sampler({EOS}), make("s", temperature=1.0, seed=seed)
        sampler.add(s)
        return [sampler(logits, [s])[0] for _ in range(20)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_top_p_keeps_only_the_nucleus() -> None:
    sampler = Sampler({EOS})
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.05, 0.05]]))
    s = make("p", temperature=1.0, top_p=0.6, seed=0)
    sampler.add(s)
    assert {sampler(logits, [s])[0] for _ in range(50)} == {0}


def test_min_tokens_masks_eos() -> None:
    sampler = Sampler({EOS})
    logits = torch.tensor([[0.0, 0.0, 0.0, 9.0]])
    assert sampler(logits, [make("m", temperature=0.0, min_tokens=1)]) == [0]
    assert sampler(logits, [make("n", temperature=0.0)]) == [EOS]
    # one greedy batch: only the row still short of its min_tokens has EOS masked
    rows = torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 1.0, 0.0, 9.0], [0.0, 1.0, 0.0, 9.0]])
    done = make("d", temperature=0.0, min_tokens=1)
    done.append_token(2)
    assert sampler(rows, [make("m2", temperature=0.0, min_tokens=2), make("n2", temperature=0.0), done]) == [0, EOS, EOS]


def test_penalties_push_away_from_seen_tokens() -> None:
    sampler = Sampler({EOS})
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]])
    s = make("r", temperature=0.0, presence_penalty=1.0)
    s.append_token(1)
    assert sampler(logits, [s]) == [2]
    rep = make("rep", temperature=0.0, repetition_penalty=2.0)  # prompt [1, 2]: both halved
    assert sampler(torch.tensor([[0.0, 2.0, 1.9, 1.5]]), [rep]) == [3]


def test_an_extreme_repetition_penalty_keeps_sampling_finite() -> None:
    """Found by schemathesis: repetition_penalty=5e-324 (valid: > 0) overflowed the row to inf and
    multinomial failed the whole engine step."""
    import torch

    from deployments.engine.request import SamplingParams, Sequence
    from deployments.engine.sampler import Sampler

    params = SamplingParams(max_tokens=4, temperature=1.98, top_p=0.22, repetition_penalty=5e-324, seed=1)
    seq = Sequence("r", [1, 2, 3], params)
    token = Sampler(eos_token_ids=[0])(torch.tensor([[0.5, 2.0, 3.0, -1.0, 0.1]]), [seq])
    assert token[0] in range(5)
