"""The rows' state on the device: EOS cuts, one host transfer per round, per-token values recorded
for the emitted tokens alone and equal to the round's own (qstar_cli.engine.rows)."""

import sys

import pytest
import torch

from qstar_cli.distributions import mixture
from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha, token_diagnostics
from qstar_cli.distributions.sampling import sampling_logprobs
from qstar_cli.engine import rows as rows_module
from qstar_cli.engine import sampler as sampler_module
from qstar_cli.engine.compiled import RoundMath
from qstar_cli.engine.rows import emitted_tokens
from qstar_cli.engine.samples import SampleRequest, StreamStats
from qstar_cli.runfiles.format import PER_TOKEN_FIELDS
from tests.helpers import conversations, make_sampler

EOS = 9
#: What Python can read a tensor's data with; each read of a device tensor waits for the device.
READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")


def test_a_rows_tokens_end_at_its_first_accepted_eos():
    tokens = torch.tensor([[5, EOS, 7], [1, 2, 3], [EOS, 4, 4], [1, 2, EOS], [EOS, EOS, 1]])
    accepted = torch.tensor([2, 1, 0, 1, 2])
    counts_eos = torch.tensor([True, True, False, True, True])
    emitted, stopped = emitted_tokens(tokens, accepted, torch.tensor([EOS, 11]), counts_eos)
    # A replayed row's EOS does not count; one past the accepted drafts was never emitted.
    assert emitted.tolist() == [2, 2, 1, 2, 1]
    assert stopped.tolist() == [True, False, False, False, True]


@pytest.fixture
def reads(monkeypatch):
    """Counts the round's transfers, the finished rows' copies, and every other read of tensor data
    while ``counts["on"]`` (on a GPU each would wait for the device), by whomever (transformers too),
    and every copy of host data to the device by the engine but through :func:`rows.to_device`."""
    counts = {"on": False, "round": 0, "finish copies": 0, "stray": []}
    # On the CPU the alpha solver reads a flag to stop early; elsewhere it does not.
    monkeypatch.setattr(mixture, "EARLY_EXIT_DEVICES", ())
    for module, name, key in ((sampler_module, "to_host", "round"), (rows_module, "copy_to_host", "finish copies")):

        def counted(tensor, _real=getattr(module, name), _key=key):
            counts[_key] += 1
            return _real(tensor)

        monkeypatch.setattr(module, name, counted)
    for name in READS:

        def spy(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if counts["on"] and caller != "qstar_cli.engine.rows":
                counts["stray"].append(f"{_name} in {caller}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    # Host data made into a tensor, or a tensor sent to a device, by the engine but through the rows'
    # to_device (pinned, non-blocking): on a GPU each such copy from pageable memory waits for the stream.
    for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "to"), (torch.Tensor, "cuda")):

        def upload(*args, _real=getattr(owner, name), _name=name, **kwargs):
            frame = sys._getframe(1)
            caller, function = frame.f_globals.get("__name__", ""), frame.f_code.co_name
            sends = _name != "to" or "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
            if counts["on"] and sends and caller.startswith("qstar_cli.") and (caller, function) != ("qstar_cli.engine.rows", "to_device"):
                counts["stray"].append(f"{_name} in {caller}.{function}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, upload)
    return counts


@pytest.mark.parametrize("draft_k", [0, 2, "auto"])
def test_one_device_to_host_transfer_per_round(pair, reads, draft_k):
    sampler = make_sampler(pair, draft_k=draft_k, max_new_tokens=10)
    prompts = [sampler.encode_prompts(c) for c in conversations(9)]
    stats = StreamStats()
    # Refills, finishes, slot moves, and replayed samples beside new ones: a resumed run's rounds.
    requests = [SampleRequest(i, *p, replay_tokens=3 if i % 4 == 1 else None) for i, p in enumerate(prompts)]
    sampler.generate(conversations(1))  # warm: lazy initialisation may read the host once
    reads.update({"on": True, "round": 0, "finish copies": 0})
    results = dict(sampler.stream(requests, slots=3, stats=stats))
    reads["on"] = False
    assert sorted(results) == [i for i in range(9) if i % 4 != 1]
    assert stats.rounds > 4
    assert reads["round"] == stats.rounds, "one transfer per round"
    assert reads["stray"] == []
    assert 0 < reads["finish copies"] < len(results), "a round's finished rows come in one copy"


@pytest.mark.parametrize("draft_k", [0, 2])
def test_recorded_values_are_the_rounds_own(pair, draft_k):
    """Each emitted token's values, recorded on the device and copied once, equal the ones the round
    computes over all its positions (what the previous release brought to the host every round)."""
    sampler = make_sampler(pair, draft_k=draft_k, max_new_tokens=12)
    rounds = []

    def mixture_seen(logp_theta, logp_t, alpha):
        logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
        rounds.append((logp_theta, logp_t, alpha, logp_q))
        return logp_q

    sampler.math = RoundMath(solve_alpha, mixture_seen, token_diagnostics)
    [result] = sampler.generate(conversations(1))
    expected = {name: [] for name in PER_TOKEN_FIELDS[1:]}
    emitted = result.round_tokens or [1] * len(result.token_ids)
    tokens = iter(result.token_ids)
    for (logp_theta, logp_t, alpha, logp_q), count in zip(rounds, emitted, strict=True):
        diagnostics = token_diagnostics(logp_theta, logp_t, logp_q)
        logp_r = sampling_logprobs(logp_q, sampler.sampling)
        for j, token in zip(range(count), tokens):
            for name, value in (("alpha", alpha[j]), ("logp_theta", logp_theta[j, token]), ("logp_t", logp_t[j, token]),
                                ("logp_q", logp_r[j, token]), *((f, diagnostics[f][j]) for f in diagnostics)):  # fmt: skip
                expected[name].append(float(value))
    assert sum(emitted) == len(result.token_ids) > 3
    for name, values in expected.items():
        assert result.per_token[name] == values, name
