"""``qstar export`` on tiny-model runs, and TRL training on its output (SFTTrainer, WeightedSFTTrainer)."""

import importlib
import json
import math
import shutil
import sys
import tracemalloc

import datasets
import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import torch
from trl import SFTConfig, SFTTrainer
from typer.testing import CliRunner

from qstar_cli.analysis.export import ExportConfig, export_training_set
from qstar_cli.cli import app
from qstar_cli.runfiles.format import TeacherTopK
from qstar_cli.runfiles.writer import config_differences
from qstar_cli.training.weighted_sft import WeightedSFTTrainer
from tests.helpers import one_line_error, run_files, tiny_generate_args, write_prompts

PROMPTS = [{"prompt": f"Tell me about the number {i}."} for i in range(12)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def read_lines(path):
    return [orjson.loads(line) for line in open(path, "rb")]


def sidecar_of(main):
    return main.with_name(main.name.removesuffix(".jsonl") + ".diagnostics.jsonl")


def load_parquet(path):
    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(path.parent / "cache"))


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """Main files of a tiny-model run at level full keeping pi_t's top-5 (some samples stop, some hit the
    cap) and at level summary."""
    root = tmp_path_factory.mktemp("runs")
    common = tiny_generate_args(tiny_model_dirs, write_prompts(root, PROMPTS), 64, 4)
    for level, extra in (("full", ["--teacher-topk", "5"]), ("summary", ["--num-samples", "2", "--max-new-tokens", "4"])):
        result = invoke(*common, *extra, "--diagnostics", level, "--output", root / f"{level}.jsonl")
        assert result.exit_code == 0, result.output
    return {level: root / f"{level}.jsonl" for level in ("full", "summary")}


@pytest.fixture(scope="module")
def train_set(runs, tmp_path_factory):
    """Every sample of the full run, exported to Parquet with its (unequal) weights."""
    out = tmp_path_factory.mktemp("train") / "train.parquet"
    assert invoke("export", runs["full"], "--output", out, "--include-truncated").exit_code == 0
    return load_parquet(out)


@pytest.mark.parametrize("include_truncated", [False, True])
def test_rows_are_the_exact_ids_pi_theta_saw_and_sampled(runs, tiny_tokenizer, tmp_path, include_truncated):
    out, flags = tmp_path / "train.parquet", ["--include-truncated"] * include_truncated
    result = invoke("export", runs["full"], "--output", out, *flags)
    assert result.exit_code == 0, result.output
    pairs = list(zip(read_lines(runs["full"]), read_lines(sidecar_of(runs["full"]))))
    finish = [side["finish_reason"] for _, side in pairs]
    assert 0 < finish.count("stop") < len(finish)  # the run has both kinds
    expected = [(main, side) for main, side in pairs if include_truncated or side["finish_reason"] == "stop"]
    rows = load_parquet(out)
    assert len(rows) == len(expected)
    for row, (main, side) in zip(rows, expected):
        prompt, response = side["prompt_ids_theta"], side["per_token"]["token_id"]
        assert row["input_ids"] == prompt + response
        assert row["completion_mask"] == [0] * len(prompt) + [1] * side["num_tokens"]
        assert (row["input_ids"][-1] == tiny_tokenizer.eos_token_id) == (side["finish_reason"] == "stop")
        assert all(row[name] == side["per_token"][name] for name in ("logp_theta", "logp_t", "logp_q"))
        assert (row["sample_idx"], row["response_idx"], row["finish_reason"]) == (side["sample_idx"], 0, side["finish_reason"])
        assert row["messages"] == main["messages"]
    left_out = finish.count("length")
    assert (f"left out {left_out} truncated" in result.stdout) != include_truncated
    # The JSONL form holds the same rows.
    assert invoke("export", runs["full"], "--output", tmp_path / "train.jsonl", *flags).exit_code == 0
    assert [json.loads(line) for line in open(tmp_path / "train.jsonl")] == pq.read_table(out).to_pylist()


def test_teacher_top_k_columns_are_the_sidecars(runs, tmp_path):
    out = tmp_path / "train.parquet"
    assert invoke("export", runs["full"], "--output", out, "--include-truncated", "--teacher-topk").exit_code == 0
    rows = pq.read_table(out).to_pylist()
    sides = read_lines(sidecar_of(runs["full"]))
    assert len(rows) == len(sides)
    for row, side in zip(rows, sides):
        top = TeacherTopK.from_record(side["teacher_topk"], side["num_tokens"])
        assert row["teacher_topk_ids"] == top.ids.tolist() and row["teacher_topk_tail"] == top.tail.tolist()
        assert np.array_equal(np.array(row["teacher_topk_logprobs"], np.float32), top.logprobs)
        assert len(row["teacher_topk_ids"]) == side["num_tokens"] and all(len(ids) == 5 for ids in row["teacher_topk_ids"])
        # The sampled token's logp_t is pi_t's, where it is among the top-K.
        for token, ids, logprobs, logp_t in zip(side["per_token"]["token_id"], top.ids, top.logprobs, side["per_token"]["logp_t"]):
            if token in ids:
                assert abs(logprobs[list(ids).index(token)] - logp_t) < 1e-6
    # Stored compactly: (8K + 4) * 4/3 bytes per token in base64.
    assert len(sides[0]["teacher_topk"]["ids"]) == 4 * math.ceil(sides[0]["num_tokens"] * 5 * 4 / 3)


def naive_weights(log_w, gamma):
    w = np.exp(gamma * (log_w - log_w.max()))
    return w / w.mean()


def naive_ess(w):
    return w.sum() ** 2 / (len(w) * (w**2).sum())


@pytest.mark.parametrize("ess_floor", [0.3, 0.9])
def test_weights_are_tempered_to_the_ess_floor(runs, tmp_path, ess_floor):
    out = tmp_path / "train.parquet"
    result = invoke("export", runs["full"], "--output", out, "--include-truncated", "--ess-floor", ess_floor)
    assert result.exit_code == 0, result.output
    log_w = np.array([s["logp_theta_sum"] - s["logp_q_sum"] for s in read_lines(sidecar_of(runs["full"]))])
    weights = np.array(load_parquet(out)["weight"])
    # log weight = gamma * log w + constant: recover gamma by a line fit, then check it against the floor.
    gamma, _ = np.polyfit(log_w, np.log(weights), 1)
    assert weights == pytest.approx(naive_weights(log_w, gamma), rel=1e-9)
    assert f"gamma {gamma:.4f}" in result.stdout
    assert naive_ess(naive_weights(log_w, gamma - 1e-6)) >= ess_floor
    if ess_floor == 0.9:
        assert gamma < 1.0  # this run's raw weights are below 0.9, so the floor binds
    if gamma < 1.0 - 1e-9:
        assert naive_ess(naive_weights(log_w, gamma + 1e-6)) < ess_floor
    else:
        assert naive_ess(naive_weights(log_w, 1.0)) >= ess_floor

    fixed = tmp_path / "fixed.jsonl"
    assert invoke("export", runs["full"], "--output", fixed, "--include-truncated", "--gamma", "0.5").exit_code == 0
    assert [json.loads(line)["weight"] for line in open(fixed)] == pytest.approx(naive_weights(log_w, 0.5), rel=1e-9)


def damaged_copy(run, tmp_path, edit_main, edit_sidecar, name="copy"):
    main = tmp_path / f"{name}.jsonl"
    main.write_bytes(edit_main(open(run, "rb").read().splitlines(keepends=True)))
    sidecar_of(main).write_bytes(edit_sidecar(open(sidecar_of(run), "rb").read().splitlines(keepends=True)))
    return main


def test_torn_and_missing_lines_are_skipped_and_counted(runs, tmp_path):
    """A corrupt main line 3 and a sidecar torn in its last line: those samples are left out, nothing else changes."""
    damaged = damaged_copy(
        runs["full"], tmp_path,
        lambda lines: b"".join(lines[:2]) + b"{not json\n" + b"".join(lines[3:]),
        lambda lines: b"".join(lines[:-1]) + lines[-1][:100],
    )  # fmt: skip
    result = invoke("export", damaged, "--output", tmp_path / "damaged.parquet", "--include-truncated")
    assert result.exit_code == 0, result.output
    assert "skipped 2 torn or incomplete sample line(s): 3, 12" in result.stderr
    (tmp_path / "clean").mkdir()
    clean = damaged_copy(runs["full"], tmp_path / "clean", *[lambda lines: b"".join(lines[:2] + lines[3:-1])] * 2)
    assert invoke("export", clean, "--output", tmp_path / "clean.parquet", "--include-truncated").exit_code == 0
    assert pq.read_table(tmp_path / "damaged.parquet").equals(pq.read_table(tmp_path / "clean.parquet"))


def test_response_idx_is_carried_and_checked(runs, tmp_path):
    def with_response_idx(k):
        return lambda lines: b"".join(orjson.dumps({**orjson.loads(line), "response_idx": k}) + b"\n" for line in lines)

    both = damaged_copy(runs["full"], tmp_path, with_response_idx(2), with_response_idx(2))
    assert invoke("export", both, "--output", tmp_path / "k.parquet", "--include-truncated").exit_code == 0
    assert set(load_parquet(tmp_path / "k.parquet")["response_idx"]) == {2}
    (tmp_path / "other").mkdir()
    mismatched = damaged_copy(runs["full"], tmp_path / "other", with_response_idx(1), with_response_idx(0))
    result = invoke("export", mismatched, "--output", tmp_path / "m.parquet")
    one_line_error(result, "line 1 of", "disagree (sample 0 response 1 against sample 0 response 0)", "another run")


def keep_lines(lines):
    return b"".join(lines)


def edit_topk(edit, k_on_line_2=None):
    """A sidecar edit: each line's teacher top-K changed in place by ``edit(top, line)``; with
    ``k_on_line_2`` line 2 keeps only that many ids per token (a well-formed top-K of another K)."""

    def rewrite(lines):
        out = []
        for number, line in enumerate(lines, start=1):
            record = orjson.loads(line)
            top = TeacherTopK.from_record(record["teacher_topk"], record["num_tokens"])
            top = TeacherTopK(top.ids.copy(), top.logprobs.copy(), top.tail.copy())
            edit(top, number)
            if k_on_line_2 and number == 2:
                top = TeacherTopK(top.ids[:, :k_on_line_2], top.logprobs[:, :k_on_line_2], top.tail)
            record["teacher_topk"] = top.to_record()
            out.append(orjson.dumps(record) + b"\n")
        return b"".join(out)

    return rewrite


def test_a_teacher_top_k_run_resumes_only_with_its_k(runs, tiny_model_dirs, tmp_path):
    """Leaving --teacher-topk out (0) is a change of K like any other: refused before anything changes."""
    for path in run_files(runs["full"]):
        shutil.copy(path, tmp_path / path.name)
    dataset = orjson.loads(run_files(runs["full"])[2].read_bytes())["config"]["dataset"]
    before = [path.read_bytes() for path in run_files(tmp_path / "full.jsonl")]
    for k, change in (("0", "teacher_topk (5 -> 0)"), ("3", "teacher_topk (5 -> 3)")):
        result = invoke(*tiny_generate_args(tiny_model_dirs, dataset, 64, 4), "--diagnostics", "full", "--teacher-topk", k,
                        "--output", tmp_path / "full.jsonl")  # fmt: skip
        one_line_error(result, change)
    assert [path.read_bytes() for path in run_files(tmp_path / "full.jsonl")] == before
    # Shards of two K: merge names the setting whichever shard lacks it.
    assert config_differences({"teacher_topk": 4}, {}, either=True) == ["teacher_topk (4 -> None)"]


def test_bad_input_exit_2_with_one_line(runs, tmp_path):
    only_main = tmp_path / "alone.jsonl"
    only_main.write_bytes(runs["full"].read_bytes())
    truncated_only = damaged_copy(runs["full"], tmp_path, *[lambda lines: b"".join(lines).replace(b'"stop"', b'"length"')] * 2)
    without_topk = damaged_copy(
        runs["full"],
        tmp_path,
        lambda lines: b"".join(lines),
        lambda lines: b"".join(lines).replace(b'"teacher_topk"', b'"other"'),
        "no_topk",
    )
    negative_id = damaged_copy(runs["full"], tmp_path, keep_lines, edit_topk(lambda top, line: top.ids.__setitem__((0, 1), -1)), "neg_id")
    nan_logprob = damaged_copy(
        runs["full"], tmp_path, keep_lines, edit_topk(lambda top, line: top.logprobs.__setitem__((0, 0), math.nan)), "nan_logp"
    )
    mixed_k = damaged_copy(runs["full"], tmp_path, keep_lines, edit_topk(lambda top, line: None, k_on_line_2=3), "mixed_k")
    damaged_topk = damaged_copy(
        runs["full"], tmp_path, lambda lines: b"".join(lines), lambda lines: b"".join(lines).replace(b'"k":5', b'"k":6'), "bad_topk"
    )
    cases = {
        "diagnostics level summary, which keeps no token ids; export needs level full": [
            runs["summary"],
            "--output",
            tmp_path / "a.parquet",
        ],
        "is not a run's main file: neither its sidecar": [only_main, "--output", tmp_path / "b.parquet"],
        "run file not found": [tmp_path / "nope.jsonl", "--output", tmp_path / "c.parquet"],
        "add --include-truncated": [truncated_only, "--output", tmp_path / "d.parquet"],
        "--output must end in .parquet or .jsonl": [runs["full"], "--output", tmp_path / "e.csv"],
        "--gamma must lie in [0, 1]": [runs["full"], "--output", tmp_path / "f.parquet", "--gamma", "1.5"],
        "--ess-floor must lie in (0, 1]": [runs["full"], "--output", tmp_path / "g.parquet", "--ess-floor", "0"],
        "would overwrite the input": [runs["full"], "--output", sidecar_of(runs["full"])],
        "holds no teacher top-K: the run was generated without --teacher-topk": [
            without_topk,
            "--output",
            tmp_path / "h.parquet",
            "--teacher-topk",
        ],
        "not 6 per token and a tail for each of the sample": [damaged_topk, "--output", tmp_path / "i.parquet", "--teacher-topk"],
        "teacher_topk is damaged (a negative or repeated id)": [negative_id, "--output", tmp_path / "j.parquet", "--teacher-topk"],
        "teacher_topk is damaged (a log-probability that is NaN": [nan_logprob, "--output", tmp_path / "k.parquet", "--teacher-topk"],
        "line 2: teacher_topk holds 3 ids per token where the lines before hold 5": [
            mixed_k,
            "--output",
            tmp_path / "l.parquet",
            "--teacher-topk",
        ],
    }
    for message, args in cases.items():
        result = invoke("export", *args)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not list(tmp_path.glob("*.parquet*"))


def test_export_streams_a_large_run(tmp_path):
    """Memory stays far below the files' size: lines are read one pair at a time and rows written in chunks."""
    rng = np.random.default_rng(0)
    main, tokens = tmp_path / "big.jsonl", 250
    with open(main, "wb") as m, open(sidecar_of(main), "wb") as s:
        for i in range(800):
            m.write(orjson.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "sample_idx": i, "finish_reason": "stop"}) + b"\n")
            theta, q = rng.normal(-2.0, 1.0, (2, tokens))
            per_token = {
                "token_id": rng.integers(0, 50_000, tokens).tolist(),
                "logp_theta": theta.tolist(),
                "logp_t": q.tolist(),
                "logp_q": q.tolist(),
            }
            record = {"sample_idx": i, "num_tokens": tokens, "finish_reason": "stop", "logp_theta_sum": theta.sum(), "logp_q_sum": q.sum()}
            record.update(prompt_ids_theta=[1, 2, 3], per_token=per_token)
            s.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    size = main.stat().st_size + sidecar_of(main).stat().st_size
    tracemalloc.start()
    summary = export_training_set(ExportConfig(main, tmp_path / "big.parquet", chunk_tokens=4096))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.exported == 800 and peak < size / 10, (peak, size)
    parquet = pq.ParquetFile(tmp_path / "big.parquet")
    assert parquet.metadata.num_rows == 800 and parquet.metadata.num_row_groups > 10


def sft_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                    completion_only_loss=True, use_cpu=True, save_strategy="no", report_to="none")  # fmt: skip
    return SFTConfig(**{**settings, **overrides})


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_trains_on_the_export_as_it_is(train_set, tiny_model_dirs, tmp_path):
    trainer = SFTTrainer(model=tiny_model_dirs[0], train_dataset=train_set, args=sft_config(tmp_path))
    # TRL takes the completion mask as the loss mask: the prompt is masked, every response token is a label.
    for prepared, row in zip(trainer.train_dataset, train_set):
        assert prepared["labels"] == [t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]
    trainer.train()
    plain = losses(trainer)
    assert len(plain) == 2 and all(np.isfinite(plain))
    # With every weight 1, the weighted trainer is the plain one.
    ones = train_set.map(lambda row: {"weight": 1.0})
    weighted = WeightedSFTTrainer(model=tiny_model_dirs[0], train_dataset=ones, args=sft_config(tmp_path))
    weighted.train()
    assert losses(weighted) == pytest.approx(plain, rel=1e-6)


def test_weighted_loss_equals_a_hand_computation(train_set, tiny_model_dirs, tmp_path):
    trainer = WeightedSFTTrainer(
        model=tiny_model_dirs[0], train_dataset=train_set, args=sft_config(tmp_path, per_device_train_batch_size=4)
    )
    batch = next(iter(trainer.get_train_dataloader()))
    weight_of = {tuple(row["input_ids"]): row["weight"] for row in train_set}
    rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert batch["weight"].tolist() == pytest.approx([weight_of[r] for r in rows])
    assert batch["weight"].std() > 0.1  # the weights differ
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    by_hand = -(batch["weight"].double()[:, None] * token_logp * mask).sum() / mask.sum()
    unweighted = -(token_logp * mask).sum() / mask.sum()
    assert loss == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(loss - unweighted.item()) > 1e-3


def test_weighted_trainer_refusals(train_set, tiny_model_dirs, tmp_path):
    with pytest.raises(ValueError, match="no 'weight' column"):
        WeightedSFTTrainer(model=tiny_model_dirs[0], train_dataset=train_set.remove_columns("weight"), args=sft_config(tmp_path))
    with pytest.raises(ValueError, match="packing"):
        WeightedSFTTrainer(model=tiny_model_dirs[0], train_dataset=train_set, args=sft_config(tmp_path, packing=True, max_length=64))


def test_train_without_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    monkeypatch.delitem(sys.modules, "qstar_cli.training.weighted_sft")
    with pytest.raises(ImportError, match=r"pip install 'qstar\[train\]'"):
        importlib.import_module("qstar_cli.training.weighted_sft")
