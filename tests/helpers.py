"""Helpers shared by test modules (fixtures live in ``conftest.py``)."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from qstar_cli.cli import app
from qstar_cli.distributions.mixture import mixture_logprobs, solve_alpha
from qstar_cli.engine.sampler import DualModelSampler


def invoke(*args):
    """``qstar ARGS`` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def analysis(sidecar) -> dict:
    """What ``qstar analyze SIDECAR --json`` prints, but the file's name."""
    result = invoke("analyze", sidecar, "--json")
    assert result.exit_code == 0, result.output
    return {k: v for k, v in json.loads(result.stdout).items() if k != "file"}


def one_line_error(result, *fragments, code: int = 2) -> str:
    """The command failed with ``code`` and one ``error:`` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def snapshot(*roots):
    """Every file under ``roots`` and a hash of its bytes; lock files (they stay by design) and
    Python's bytecode caches (of user adapters) aside."""
    files = (p for root in roots for p in Path(root).rglob("*") if p.is_file() and p.suffix not in (".lock", ".pyc"))
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run_files(out) -> list[Path]:
    """The main file, sidecar and manifest of the run ``out``."""
    stem = str(out).removesuffix(".jsonl")
    return [Path(out), Path(f"{stem}.diagnostics.jsonl"), Path(f"{stem}.meta.json")]


def copy_run(src, directory: Path, name: str = "run.jsonl") -> Path:
    """A copy of the run ``src`` (main file, sidecar, manifest) as ``directory/name``; its main file."""
    for path, target in zip(run_files(src), run_files(directory / name)):
        shutil.copy(path, target)
    return directory / name


def as_previous_release(sidecar: bytes) -> bytes:
    """Sidecar lines as the release before ``format_version`` wrote them: without the field, their first
    key, and otherwise the same bytes (tests/generate/test_previous_release.py checks it)."""
    return sidecar.replace(b'{"format_version":2,', b"{")


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sum of the first ten positive integers?"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another one?"}],
]


def make_sampler(pair, **kwargs):
    kwargs.setdefault("theta_format", "plain")
    kwargs.setdefault("t_format", "chat")
    kwargs.setdefault("max_new_tokens", 12)
    return DualModelSampler(pair[0], pair[1], **kwargs)


def spread_sampler(pair, **kwargs):
    """:func:`make_sampler` with room for 40 tokens, for ``spread_pair``: its responses end after 1 to 40."""
    kwargs.setdefault("max_new_tokens", 40)
    return make_sampler(pair, **kwargs)


def full_forward_logps(loaded, prompt_ids, token_ids, vocab):
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1, :vocab]
    return logits.float().log_softmax(-1)


def swapped_tokenizer(tokenizer, a=100, b=101):
    """A copy of ``tokenizer`` with the tokens of ids ``a`` and ``b`` exchanged; and the original id->token map."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=tokenizer.chat_template,
    )
    return swapped, by_id


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


#: Extra EOS ids of pi_theta in ``spread_pair``: responses end after 1 to 40 tokens.
SPREAD_EOS = tuple(range(100, 112))


def conversations(n, long_every=0):
    """Prompts of different lengths; every ``long_every``-th one is longer than a capacity chunk."""
    out = []
    for i in range(n):
        text = f"What is the number {i}? " * (1 + i % 4)
        if long_every and i % long_every == long_every - 1:
            text = "a long story about the sea " * 60
        out.append([{"role": "user", "content": text}])
    return out


def assert_equals_full_forward(pair, sampler, result):
    """Every stored per-token number equals one full forward of each model over prompt + response."""
    logp_theta = full_forward_logps(pair[0], result.prompt_ids_theta, result.token_ids, sampler.vocab)
    logp_t = full_forward_logps(pair[1], result.prompt_ids_t, result.token_ids, sampler.vocab)
    picked = torch.tensor(result.token_ids)[:, None]
    alpha = solve_alpha(logp_theta, logp_t)
    logp_q = mixture_logprobs(logp_theta, logp_t, alpha).gather(-1, picked)[:, 0]
    expected = {
        "logp_theta": logp_theta.gather(-1, picked)[:, 0],
        "logp_t": logp_t.gather(-1, picked)[:, 0],
        "alpha": alpha,
        "logp_q": logp_q,
    }
    for name, values in expected.items():
        stored = torch.tensor(result.per_token[name], dtype=torch.float64)
        assert torch.allclose(stored, values.double(), atol=2e-4), (name, result.sample_idx)


PROMPTS = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}], "id": i} for i in range(10)]
PROMPTS[3]["messages"][0]["content"] = " "
PROMPTS[7]["messages"] = None


VALID = [0, 1, 2, 4, 5, 6, 8, 9]


def cli(*args):
    return CliRunner().invoke(app, ["generate", *args])


def read_lines(path):
    return [orjson.loads(line) for line in open(path, "rb")]


def paths(out):
    stem = str(out).removesuffix(".jsonl")
    return out, f"{stem}.diagnostics.jsonl", f"{stem}.meta.json"


def file_bytes(out):
    """The main file's and the sidecar's bytes (None for a sidecar not written: ``--diagnostics none``)."""
    return [open(p, "rb").read() if os.path.exists(p) else None for p in paths(out)[:2]]


def count_lines(path):
    try:
        return open(path, "rb").read().count(b"\n")
    except FileNotFoundError:
        return 0


def write_jsonl(path: Path, rows) -> Path:
    """``path`` (and its folder) holding one JSON object per row; ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(root, prompts) -> str:
    """``root/prompts.jsonl`` holding one JSON object per prompt; its path."""
    return str(write_jsonl(root / "prompts.jsonl", prompts))


#: Runs ``qstar`` from the directory given first, not from the installed (editable) package.
LAUNCH_FROM = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]; "
    "sys.path.insert(0, sys.argv.pop(1)); from qstar_cli.cli import app; app(prog_name='qstar')"
)


def spawn(args, out, package: Path | None = None, **popen) -> subprocess.Popen:
    """``qstar generate ARGS --output OUT`` in a process of its own, of this qstar or of the
    ``qstar_cli`` under ``package`` (a previous release); its output piped unless ``popen`` (the
    keywords of :class:`subprocess.Popen`) says otherwise."""
    launch = [sys.executable, "-c", LAUNCH_FROM, str(package)] if package else [sys.executable, "-m", "qstar_cli"]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([*launch, "generate", *map(str, args), "--output", str(out)], **popen)


def as_if_killed_after(out, done: int) -> None:
    """Make the manifest of the run ``out`` say what a kill after the commit of ``done`` samples
    leaves: status running, ``done`` samples durable (the files may hold more, or torn lines)."""
    meta_path = Path(str(out).removesuffix(".jsonl") + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["status"], meta["counts"]["done"] = "running", done
    meta_path.write_text(json.dumps(meta))


def kill_at_random_moments(start, out, rng, max_delay: float, runs: int = 3) -> int:
    """Start a run (``start()`` returns its process) ``runs`` times; each time wait for progress past
    the previous kill, then kill -9 it at a random moment up to ``max_delay`` s later, or once two
    more samples are saved if that comes first (so that a run fast on a quiet machine is still
    killed before it ends). How many runs were killed before they ended (a test of resuming needs
    at least two)."""
    import time

    killed = 0
    for _ in range(runs):
        before = count_lines(out)
        proc = start()
        while count_lines(out) <= before and proc.poll() is None:
            time.sleep(0.01)
        deadline = time.monotonic() + rng.uniform(0.0, max_delay)
        while time.monotonic() < deadline and count_lines(out) < before + 2 and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.wait()
    return killed


def tiny_run_flags(model_dirs, dataset, max_new_tokens, batch_size) -> list[str]:
    """``qstar generate`` flags of a CPU run of the tiny models (pi_theta on the plain format)."""
    theta, target = model_dirs
    return ["--model-theta", theta, "--model-t", target, "--theta-format", "plain", "--dataset", str(dataset),
            "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size), "--device", "cpu"]  # fmt: skip


def tiny_generate_args(model_dirs, dataset, max_new_tokens, batch_size) -> list[str]:
    """The whole ``qstar generate`` command line of :func:`tiny_run_flags`."""
    return ["generate", *tiny_run_flags(model_dirs, dataset, max_new_tokens, batch_size)]


def bucket_kl(p_theta, ids, teacher_logprobs, teacher_tail):
    """KL(pi_t || pi_theta) over the K ids and the rest, one position, in plain Python floats."""
    p_t = [math.exp(lp) for lp in teacher_logprobs] + [math.exp(teacher_tail)]
    q = [p_theta[i] for i in ids] + [1.0 - sum(p_theta[i] for i in ids)]
    return sum(p * math.log(p / q_) for p, q_ in zip(p_t, q) if p > 0)


def teacher_topk(teacher_logp, k):
    """pi_t's top-K ids, their log-probs, and the log of the mass outside them, as an export would hold them."""
    top = teacher_logp.topk(k, -1)
    return top.indices, top.values, teacher_logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
