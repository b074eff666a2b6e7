"""Tiny random Llama-style models with an offline tokenizer, for tests and benchmarks.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in a fraction of a
second on a small text shipped with the package, with a ChatML chat template; the models are built
from a config with seeded random weights.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``assets/tiny_corpus.txt``, with a ChatML template."""
    corpus = resources.files("qstar_cli").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    extra_rows: int = 0,
    sharpness: float = 1.0,
    hidden_size: int = 64,
    num_layers: int = 2,
    extra_eos: tuple[int, ...] = (),
) -> LlamaForCausalLM:
    """A random Llama-style causal LM over ``tokenizer``'s vocabulary, in eval mode.

    ``extra_rows`` pads the embedding matrix past the tokenizer (as many real checkpoints do);
    ``sharpness`` scales the output head so the next-token distributions are peakier; ``extra_eos``
    ids also end a response (as a generation config may list several), so lengths spread.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + extra_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *extra_eos] if extra_eos else tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def deepened_model(model: LlamaForCausalLM, extra_layers: int, residual_scale: float = 0.05, seed: int = 0) -> LlamaForCausalLM:
    """``model`` with ``extra_layers`` random decoder layers appended, whose residual branches (the
    attention and MLP output projections) are scaled by ``residual_scale``: a costlier model whose
    next-token distributions stay close to ``model``'s (a stand-in for a larger pi_t near pi_theta)."""
    config = model.config.to_dict()
    config["num_hidden_layers"] = model.config.num_hidden_layers + extra_layers
    torch.manual_seed(seed)
    deeper = LlamaForCausalLM(LlamaConfig(**config))
    deeper.load_state_dict(model.state_dict(), strict=False)  # the base layers, embeddings and head
    with torch.no_grad():
        for layer in deeper.model.layers[model.config.num_hidden_layers :]:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    deeper.generation_config = model.generation_config
    return deeper.eval()


def save_tiny_model(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny model and its tokenizer and save both to ``path`` (a ``from_pretrained`` dir)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=seed, **kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
