"""GLM-4 (transformers' GlmForCausalLM, the Hugging Face form of THUDM's GLM-4, successor of
ChatGLM): a Llama-style decoder whose RoPE rotates interleaved channel pairs of half of each head,
with Q/K/V biases and one fused [gate; up] MLP projection. The remote-code ChatGLM2/3 checkpoints
(ChatGLMForConditionalGeneration) are not read."""

from __future__ import annotations

from functools import partial

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import DECODER, common_hf, decoder_fields, rules


def _fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems, partial_rotary=True)
    unsupported("GLM", problems)
    return {**fields, "add_qkv_bias": bool(c.attention_bias)}


def _hf(m: ModelConfig):
    from transformers import GlmConfig

    return GlmConfig(**common_hf(m, "GlmForCausalLM"), attention_bias=m.add_qkv_bias)


GLM = Family(name="glm", architecture="GlmForCausalLM", model_type="glm", base_prefix="model.",
             layers="model.layers", from_hf=_fields, hf_config=_hf,
             rules=partial(rules, fused_gate_up=True), ignored=(r"rotary_emb\.inv_freq$",),
             defaults=dict(DECODER, rotary_interleaved=True))
