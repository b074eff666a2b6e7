"""Training pi_theta on a ``qstar export`` set with TRL, each sequence's loss scaled by its ``weight``.

Needs the optional extra: ``pip install 'qstar[train]'`` (TRL).

>>> from datasets import load_dataset
>>> from trl import SFTConfig
>>> from qstar_cli.training.weighted_sft import WeightedSFTTrainer
>>> data = load_dataset("parquet", data_files="train.parquet", split="train")
>>> WeightedSFTTrainer(model="path/to/pi_theta", train_dataset=data,
...                    args=SFTConfig(output_dir="out", completion_only_loss=True)).train()

The loss of a batch is ``sum_i weight_i * sum_t nll_{i,t} / N`` with ``N`` the completion tokens
of the batch (of all accumulated micro-batches, as TRL counts them): the importance-weighted
log-likelihood of whole sequences, normalised exactly as TRL's own loss, so weights of 1 give TRL's
loss. ``loss_type="dft"`` multiplies each token's term by its detached probability, as TRL does.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from trl import SFTTrainer
    from trl.data_utils import get_dataset_column_names
except ImportError as err:  # trl is an optional extra
    raise ImportError("qstar_cli.training.weighted_sft needs TRL: pip install 'qstar[train]'") from err

WEIGHT = "weight"


class WeightCollator:
    """Wraps a collator: the padded batch plus the examples' ``weight`` as a float tensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        batch[WEIGHT] = torch.tensor([example[WEIGHT] for example in examples], dtype=torch.float32)
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss weights each sequence's token losses by its ``weight`` column.

    Sequences must stay whole rows of the batch, so packing, padding-free batches, label smoothing
    and ``compute_loss_func`` (which would bypass the weights) are refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = {
            "packing": self.args.packing,
            "padding_free": self.padding_free,
            "label_smoothing_factor": self.label_smoother is not None,
            "compute_loss_func": self.compute_loss_func is not None,
        }
        if any(unsupported.values()):
            named = ", ".join(name for name, on in unsupported.items() if on)
            raise ValueError(f"WeightedSFTTrainer keeps sequences whole to weight their loss; unset {named}")
        if WEIGHT not in get_dataset_column_names(self.train_dataset):
            raise ValueError(f"the training set has no {WEIGHT!r} column (qstar export writes one)")
        self.data_collator = WeightCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops the columns the model does not take; the weight must reach the collator.
        super()._set_signature_columns_if_needed()
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop(WEIGHT)
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # TRL's LM head: per-token log-probs
        per_token_nll = -outputs.log_probs  # [batch, length - 1], zero where the label is -100
        if self.args.loss_type == "dft":
            per_token_nll = per_token_nll * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (weight.to(per_token_nll.dtype)[:, None] * per_token_nll).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients (as in SFTTrainer)
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss
