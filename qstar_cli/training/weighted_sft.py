"""Training pi_theta on a ``qstar export`` set with TRL, each sequence's loss scaled by its ``weight``,
optionally with a distillation loss on the teacher's stored log-probs.

Needs the optional extra: ``pip install 'qstar[train]'`` (TRL).

>>> from datasets import load_dataset
>>> from qstar_cli.training.weighted_sft import QstarSFTConfig, WeightedSFTTrainer
>>> data = load_dataset("parquet", data_files="train.parquet", split="train")
>>> WeightedSFTTrainer(model="path/to/pi_theta", train_dataset=data,
...                    args=QstarSFTConfig(output_dir="out", completion_only_loss=True)).train()

The loss of a batch is ``sum_i sum_t (nll_coef * weight_i * nll_{i,t} + distill_coef * v_i * d_{i,t}) / N``
with ``N`` the completion tokens of the batch (of all accumulated micro-batches, as TRL counts them),
``d`` the per-token distillation term of ``distill_loss`` (:mod:`qstar_cli.training.losses`) and
``v_i`` the weight with ``weight_distill``, else 1. With the defaults (``nll_coef`` 1, no
distillation; a plain ``SFTConfig`` means the defaults) it is the importance-weighted
log-likelihood of whole sequences, normalised exactly as TRL's own loss, so weights of 1 give TRL's
loss. ``loss_type="dft"`` multiplies each token's NLL by its detached probability, as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qstar_cli.analysis.export import LOGP_Q, LOGP_T, TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_TAIL, WEIGHT
from qstar_cli.training.losses import RATIO_CLIP, reverse_kl_loss, to_label_positions, topk_forward_kl

try:
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import get_dataset_column_names
except ImportError as err:  # trl is an optional extra
    raise ImportError("qstar_cli.training.weighted_sft needs TRL: pip install 'qstar[train]'") from err

#: The per-completion-token columns each distillation loss reads, with their tensor types.
TOKEN_COLUMNS: dict[str, dict[str, torch.dtype]] = {
    "none": {},
    "reverse_kl": {LOGP_T: torch.float32, LOGP_Q: torch.float32},
    "topk_kd": {TEACHER_TOPK_IDS: torch.long, TEACHER_TOPK_LOGPROBS: torch.float32, TEACHER_TOPK_TAIL: torch.float32},
}
DISTILL_LOSSES = tuple(TOKEN_COLUMNS)
WRITTEN_BY = {
    WEIGHT: "qstar export writes one",
    LOGP_T: "qstar export writes one",
    LOGP_Q: "qstar export writes one",
    **dict.fromkeys(TOKEN_COLUMNS["topk_kd"], "qstar export writes one for a run generated with --teacher-topk K"),
}


@dataclass
class DistillArguments:
    """The loss settings :class:`QstarSFTConfig` adds to TRL's ``SFTConfig``."""

    distill_loss: str = field(
        default="none",
        metadata={
            "help": "Distillation term: 'reverse_kl' (per-token reverse KL on the sampled tokens, importance-weighted "
            "from q to pi_theta; reads logp_t, logp_q), 'topk_kd' (forward KL from pi_t's stored top-K and tail; "
            "reads teacher_topk_ids, teacher_topk_logprobs, teacher_topk_tail) or 'none'.",
            "choices": list(DISTILL_LOSSES),
        },
    )
    distill_coef: float = field(default=1.0, metadata={"help": "Coefficient of the distillation term."})
    nll_coef: float = field(
        default=1.0, metadata={"help": "Coefficient of the weighted NLL term; 0 trains on the distillation term alone."}
    )
    ratio_clip: float = field(
        default=RATIO_CLIP,
        metadata={"help": "reverse_kl: each token's importance ratio pi_theta / q is truncated at this value."},
    )
    weight_distill: bool = field(
        default=False,
        metadata={
            "help": "Multiply the distillation term by the sequence weight too. Off by default: reverse_kl already "
            "weights each token by its own ratio, which the sequence weight (a product of all the ratios) would count "
            "twice; for topk_kd it moves the positions' weight towards those pi_theta would visit."
        },
    )

    def check_loss_settings(self) -> None:
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(map(repr, DISTILL_LOSSES))}, not {self.distill_loss!r}")
        for name in ("distill_coef", "nll_coef"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.ratio_clip > 0:
            raise ValueError(f"ratio_clip must be > 0, not {self.ratio_clip}")
        if self.nll_coef == 0 and self.distill_loss == "none":
            raise ValueError("nll_coef is 0 and distill_loss is 'none': the loss would be 0")

    def sequence_columns(self) -> tuple[str, ...]:
        uses_weight = self.nll_coef > 0 or (self.distill_loss != "none" and self.weight_distill)
        return (WEIGHT,) if uses_weight else ()


@dataclass
class QstarSFTConfig(DistillArguments, SFTConfig):
    """TRL's ``SFTConfig`` with the loss settings of :class:`DistillArguments` (after its own fields)."""

    def __post_init__(self):
        super().__post_init__()  # SFTConfig's: DistillArguments has none
        self.check_loss_settings()


def _column_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """A per-token column of one example as a tensor. JSON has no -inf, and a JSON Lines export
    writes a log-probability of -inf (a tail of no mass) as null: null reads as -inf."""
    if dtype.is_floating_point:
        return torch.from_numpy(np.nan_to_num(np.array(values, dtype=np.float64), nan=-np.inf)).to(dtype)
    return torch.tensor(values, dtype=dtype)


class ColumnCollator:
    """Wraps a collator: the padded batch plus the examples' per-sequence columns as ``[batch]`` floats
    and their per-completion-token columns at TRL's label positions, ``[batch, length - 1, ...]``."""

    def __init__(self, collate, sequence_columns: tuple[str, ...], token_columns: dict[str, torch.dtype]):
        self.collate, self.sequence_columns, self.token_columns = collate, sequence_columns, token_columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        for name in self.sequence_columns:
            batch[name] = torch.tensor([example[name] for example in examples], dtype=torch.float32)
        for name, dtype in self.token_columns.items():
            values = [_column_tensor(example[name], dtype) for example in examples]
            batch[name] = to_label_positions(values, batch["labels"], name)
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss weights each sequence's token losses by its ``weight`` column,
    plus the distillation term that ``args`` (a :class:`QstarSFTConfig`) asks for.

    Sequences must stay whole rows of the batch, so packing, padding-free batches, label smoothing
    and ``compute_loss_func`` (which would bypass the weights) are refused; so is a set that lacks a
    column the loss reads.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_settings = self.args if isinstance(self.args, DistillArguments) else DistillArguments()
        self.sequence_columns = self.loss_settings.sequence_columns()
        self.token_columns = TOKEN_COLUMNS[self.loss_settings.distill_loss]
        self.loss_columns = (*self.sequence_columns, *self.token_columns)
        unsupported = {
            "packing": self.args.packing,
            "padding_free": self.padding_free,
            "label_smoothing_factor": self.label_smoother is not None,
            "compute_loss_func": self.compute_loss_func is not None,
        }
        if any(unsupported.values()):
            named = ", ".join(name for name, on in unsupported.items() if on)
            raise ValueError(f"WeightedSFTTrainer keeps sequences whole to weight their loss; unset {named}")
        # The per-token columns line up with the labels only if every response token is one, from the first.
        if self.token_columns and not (self.completion_only_loss and self.args.truncation_mode == "keep_start"):
            raise ValueError(
                f"distill_loss={self.loss_settings.distill_loss!r} reads one value per response token: "
                "set completion_only_loss=True and truncation_mode='keep_start'"
            )
        columns = get_dataset_column_names(self.train_dataset)
        for name in self.loss_columns:
            if name not in columns:
                raise ValueError(f"the training set has no {name!r} column ({WRITTEN_BY[name]})")
        self.data_collator = ColumnCollator(self.data_collator, self.sequence_columns, self.token_columns)

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops the columns the model does not take; the loss's columns must reach the collator.
        super()._set_signature_columns_if_needed()
        missing = [name for name in self.loss_columns if name not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        settings = self.loss_settings
        columns = {name: inputs.pop(name) for name in self.loss_columns}
        if settings.distill_loss == "topk_kd":
            outputs, log_probs, label_mask, per_token_distill = self._forward_topk_kd(model, inputs, columns)
        else:
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # TRL's LM head: per-token log-probs
            log_probs, label_mask = outputs.log_probs, outputs.label_mask  # [batch, length - 1], zero off the labels
            per_token_distill = None
            if settings.distill_loss == "reverse_kl":
                per_token_distill = reverse_kl_loss(log_probs, columns[LOGP_T], columns[LOGP_Q], settings.ratio_clip)
        weight = columns[WEIGHT].to(log_probs.dtype)[:, None] if WEIGHT in columns else None
        per_token_loss = 0.0  # check_loss_settings leaves at least one term
        if settings.nll_coef > 0:
            per_token_nll = -log_probs
            if self.args.loss_type == "dft":
                per_token_nll = per_token_nll * log_probs.exp().detach()
            per_token_loss = settings.nll_coef * weight * per_token_nll
        if per_token_distill is not None:
            distill_weight = weight if settings.weight_distill else 1.0
            per_token_loss = per_token_loss + settings.distill_coef * distill_weight * per_token_distill
            mode = "train" if model.training else "eval"  # logged: the mean term per response token
            self._metrics[mode][settings.distill_loss].append((per_token_distill.detach().sum() / label_mask.sum().clamp(min=1)).item())
        num_tokens = label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients (as in SFTTrainer)
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _forward_topk_kd(model, inputs, columns):
        """The model's own logits, as plain transformers training builds them (the fused head gives only
        the label's log-prob; topk_kd needs pi_theta at the K ids and over the rest), reduced to the
        per-token terms of the fused path."""
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        labels = inputs["labels"][:, 1:]
        label_mask = labels != -100
        # Only the response positions, in float32 (the logits may be bf16): [response tokens, vocab].
        logp_vocab = outputs.logits[:, :-1][label_mask].float().log_softmax(-1)
        token_logp = logp_vocab.gather(-1, labels[label_mask][:, None])[:, 0]
        kl = topk_forward_kl(logp_vocab, *(columns[name][label_mask] for name in TOKEN_COLUMNS["topk_kd"]))
        zeros = torch.zeros(label_mask.shape, dtype=logp_vocab.dtype, device=logp_vocab.device)
        return outputs, zeros.masked_scatter(label_mask, token_logp), label_mask, zeros.masked_scatter(label_mask, kl)
