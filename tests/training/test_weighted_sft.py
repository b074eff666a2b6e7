"""WeightedSFTTrainer (TRL, the ``train`` extra) with the distillation losses: the per-token columns at
TRL's label positions inside the real trainer, a few TRL steps of each loss on a tiny teacher-student
pair, and the refusals. The losses' maths alone: test_losses.py."""

import math

import datasets
import pytest
import torch

from qstar_cli.testing.tiny import build_tiny_model
from qstar_cli.training.weighted_sft import QstarSFTConfig, WeightedSFTTrainer
from tests.helpers import bucket_kl, teacher_topk

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fabricated_rows(vocab, k, count=6, seed=0):
    """Rows shaped as ``qstar export`` writes them, with made-up per-token columns; prompts and responses of
    unequal lengths so that padding and the shift show."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        prompt, response = 2 + i % 4, 3 + (2 * i) % 5
        teacher_logits = 3 * torch.randn(response, vocab, generator=gen, dtype=F64)
        if i == 0:
            teacher_logits[:, k:] = float("-inf")  # all of pi_t's mass on the K ids: tails of -inf
        ids, logprobs, tail = teacher_topk(teacher_logits.log_softmax(-1), k)
        rows.append({
            "input_ids": torch.randint(3, vocab, (prompt + response,), generator=gen).tolist(),
            "completion_mask": [0] * prompt + [1] * response,
            "weight": 0.2 + 3 * torch.rand(1, generator=gen).item(),
            "logp_t": (torch.randn(response, generator=gen, dtype=F64) - 6).tolist(),
            "logp_q": (torch.randn(response, generator=gen, dtype=F64) - 6).tolist(),
            "teacher_topk_ids": ids.tolist(),
            "teacher_topk_logprobs": logprobs.tolist(),
            "teacher_topk_tail": tail.tolist(),
        })  # fmt: skip
    return rows


def qstar_config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1, completion_only_loss=True,
                    use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True)  # fmt: skip
    return QstarSFTConfig(**{**settings, **overrides})


@pytest.mark.parametrize(
    "settings",
    [{}, {"distill_loss": "reverse_kl", "nll_coef": 0.5, "distill_coef": 2.0, "ratio_clip": 3.0},
     {"distill_loss": "topk_kd", "nll_coef": 0.5, "distill_coef": 2.0, "weight_distill": True}],
    ids=["none", "reverse_kl", "topk_kd"],
)  # fmt: skip
def test_trainer_loss_equals_a_per_token_hand_computation(tiny_tokenizer, tmp_path, settings):
    """compute_loss on a padded batch against a loop over each row's response tokens in input_ids order."""
    rows = fabricated_rows(len(tiny_tokenizer), k=4)
    model = build_tiny_model(tiny_tokenizer, seed=1, sharpness=4.0)
    args = qstar_config(tmp_path, per_device_train_batch_size=len(rows), **settings)
    trainer = WeightedSFTTrainer(model=model, processing_class=tiny_tokenizer, train_dataset=datasets.Dataset.from_list(rows), args=args)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        logp_vocab = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double().log_softmax(-1)
    row_of = {tuple(row["input_ids"]): row for row in rows}
    total, tokens = 0.0, 0
    for b, attention in enumerate(batch["attention_mask"]):
        row = row_of[tuple(batch["input_ids"][b][attention.bool()].tolist())]
        prompt = row["completion_mask"].index(1)
        for k, token in enumerate(row["input_ids"][prompt:]):
            logp = logp_vocab[b, prompt + k - 1]  # the distribution the k-th response token was drawn from
            nll, distill = -logp[token].item(), 0.0
            if args.distill_loss == "reverse_kl":
                ratio = min(math.exp(-nll - row["logp_q"][k]), args.ratio_clip)
                distill = ratio * (-nll - row["logp_t"][k])
            elif args.distill_loss == "topk_kd":
                topk = (row[name][k] for name in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_tail"))
                distill = bucket_kl(logp.exp().tolist(), *topk)
            total += args.nll_coef * row["weight"] * nll + args.distill_coef * (row["weight"] if args.weight_distill else 1.0) * distill
            tokens += 1
    assert loss == pytest.approx(total / tokens, rel=1e-5)


PROMPT, RESPONSE, ALPHA, TOP_K = 6, 12, 0.5, 16


@pytest.fixture(scope="module")
def pair_and_data(tiny_tokenizer, one_torch_thread):
    """A tiny student and teacher (different seeds, one tokenizer), 256 training responses and 32 held-out
    ones drawn from q = pi_theta^0.5 pi_t^0.5 / Z, with every column the losses read."""
    student, teacher = (build_tiny_model(tiny_tokenizer, seed=seed, sharpness=4.0) for seed in (1, 2))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tiny_tokenizer), (256 + 32, PROMPT), generator=gen)
    with torch.no_grad():
        for _ in range(RESPONSE):
            logp_q = (ALPHA * student(ids).logits[:, -1] + (1 - ALPHA) * teacher(ids).logits[:, -1]).log_softmax(-1)
            ids = torch.cat([ids, torch.multinomial(logp_q.exp(), 1, generator=gen)], 1)
        logp_theta, logp_t = (m(ids).logits[:, PROMPT - 1 : -1].log_softmax(-1) for m in (student, teacher))
        logp_q = (ALPHA * logp_theta + (1 - ALPHA) * logp_t).log_softmax(-1)
    sampled = ids[:, PROMPT:, None]
    top_ids, top_logprobs, tail = teacher_topk(logp_t, TOP_K)
    columns = {
        "input_ids": ids, "logp_theta": logp_theta.gather(-1, sampled)[..., 0], "logp_t": logp_t.gather(-1, sampled)[..., 0],
        "logp_q": logp_q.gather(-1, sampled)[..., 0], "teacher_topk_ids": top_ids, "teacher_topk_logprobs": top_logprobs,
        "teacher_topk_tail": tail,
    }  # fmt: skip
    rows = [{name: values[i].tolist() for name, values in columns.items()} for i in range(256)]
    train = datasets.Dataset.from_list([{**row, "completion_mask": [0] * PROMPT + [1] * RESPONSE, "weight": 1.0} for row in rows])
    return teacher, train, ids[256:]


def kls(student, teacher, ids):
    """KL(pi_t || pi_theta) and KL(pi_theta || pi_t), full vocabulary, averaged over the response positions of ``ids``."""
    with torch.no_grad():
        logp_theta, logp_t = (m(ids).logits[:, PROMPT - 1 : -1].double().log_softmax(-1) for m in (student, teacher))
    forward = (logp_t.exp() * (logp_t - logp_theta)).sum(-1).mean().item()
    return forward, (logp_theta.exp() * (logp_theta - logp_t)).sum(-1).mean().item()


@pytest.mark.parametrize("distill_loss", ["reverse_kl", "topk_kd"])
def test_a_few_steps_of_distillation_bring_the_student_to_the_teacher(tiny_tokenizer, pair_and_data, tmp_path, distill_loss):
    """16 SGD steps of the distillation term alone lower both KLs on held-out prompts' responses by 5% or more.

    SGD, not Adam: reverse_kl's one-token estimate of a gradient over the whole vocabulary is noisy,
    and with a small plain step that noise moves the KL only at second order, where Adam's
    per-coordinate normalisation would move it at first."""
    teacher, train, held_out = pair_and_data
    student = build_tiny_model(tiny_tokenizer, seed=1, sharpness=4.0)
    before = kls(student, teacher, held_out)
    args = qstar_config(tmp_path, max_steps=16, per_device_train_batch_size=32, learning_rate=2.0, optim="sgd",
                        distill_loss=distill_loss, nll_coef=0.0)  # fmt: skip
    trainer = WeightedSFTTrainer(model=student, processing_class=tiny_tokenizer, train_dataset=train, args=args)
    trainer.train()
    after = kls(student.eval(), teacher, held_out)
    print(f"{distill_loss}: KL(pi_t || pi_theta) {before[0]:.4f} -> {after[0]:.4f}, KL(pi_theta || pi_t) {before[1]:.4f} -> {after[1]:.4f}")
    assert after[0] < 0.95 * before[0] and after[1] < 0.95 * before[1]
    assert all(distill_loss in entry for entry in trainer.state.log_history if "loss" in entry)  # the term is logged


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"distill_loss": "kl"}, "distill_loss must be one of 'none', 'reverse_kl', 'topk_kd', not 'kl'"),
     ({"distill_loss": "topk_kd", "distill_coef": -1.0}, "distill_coef must be >= 0"),
     ({"nll_coef": -0.5}, "nll_coef must be >= 0"),
     ({"distill_loss": "reverse_kl", "ratio_clip": 0.0}, "ratio_clip must be > 0"),
     ({"nll_coef": 0.0}, "nll_coef is 0 and distill_loss is 'none'")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_them(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        qstar_config(tmp_path, **settings)


def test_a_missing_column_is_refused_naming_it(tiny_tokenizer, tmp_path):
    data = datasets.Dataset.from_list(fabricated_rows(len(tiny_tokenizer), k=4, count=2))
    model = build_tiny_model(tiny_tokenizer, seed=1)

    def trainer(dataset, **settings):
        return WeightedSFTTrainer(
            model=model, processing_class=tiny_tokenizer, train_dataset=dataset, args=qstar_config(tmp_path, **settings)
        )

    cases = {
        "logp_q": {"distill_loss": "reverse_kl"},
        "teacher_topk_tail": {"distill_loss": "topk_kd"},
        "weight": {"distill_loss": "topk_kd", "nll_coef": 0.0, "weight_distill": True},
    }
    for column, settings in cases.items():
        with pytest.raises(ValueError, match=f"the training set has no '{column}' column"):
            trainer(data.remove_columns(column), **settings)
    # The weight is read only by the NLL term, or by the distillation term with weight_distill.
    trainer(data.remove_columns("weight"), distill_loss="reverse_kl", nll_coef=0.0)
    with pytest.raises(ValueError, match="set completion_only_loss=True"):
        trainer(data, distill_loss="reverse_kl", completion_only_loss=False)


def test_a_json_lines_null_reads_as_minus_infinity():
    """A JSON Lines export writes a tail of no mass (-inf) as null; the trainer reads it back as -inf."""
    from qstar_cli.training.weighted_sft import _column_tensor

    tail = _column_tensor([-0.5, None], torch.float32)
    assert tail.tolist() == [-0.5, -math.inf]
    assert _column_tensor([[1, 2], [3, 4]], torch.long).dtype == torch.long
