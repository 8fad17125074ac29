"""The bare Megatron-Core peer of `python -m llmtrain.bench`: one training step, nothing around it.

It builds the same architecture directly from Megatron-Core's own classes (TransformerConfig,
GPTModel with Transformer Engine's layer spec, DDP, the distributed optimizer, the
no-pipelining schedule) on random tokens, the way a user without a framework would, with the
fusions NVIDIA's own recipes turn on. Reads a JSON spec on argv[1]; prints one JSON result line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig


def main(spec: dict) -> dict:
    m = spec["model"]
    seq, micro, micro_batches = spec["seq_length"], spec["micro_batch_size"], spec["num_microbatches"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29521")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    gated = m["activation"] == "swiglu"
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], normalization=m["normalization"],
        layernorm_epsilon=m["layernorm_epsilon"], gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu, add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=m["add_qkv_bias"], kv_channels=m["kv_channels"],
        qk_layernorm=m["qk_layernorm"], attention_dropout=0.0, hidden_dropout=0.0,
        # Mixture of experts as NVIDIA's recipes run it on one GPU: grouped GEMM, alltoall.
        # (llmtrain's moe_* fields are Megatron-Core's, name for name.)
        num_moe_experts=m["num_moe_experts"],
        **{key: value for key, value in m.items() if key.startswith("moe_")},
        moe_grouped_gemm=bool(m["num_moe_experts"]), moe_token_dispatcher_type="alltoall",
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        fp8=spec["fp8"], fp8_recipe=spec["fp8_recipe"] or "delayed",
        bias_activation_fusion=True, apply_rope_fusion=True, masked_softmax_fusion=False,
        cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te",
        calculate_per_token_loss=False)
    layer_spec = get_gpt_layer_with_transformer_engine_spec(
        num_experts=m["num_moe_experts"], moe_grouped_gemm=bool(m["num_moe_experts"]),
        qk_layernorm=m["qk_layernorm"])
    model = GPTModel(config=config, transformer_layer_spec=layer_spec,
                     vocab_size=spec["padded_vocab_size"], max_sequence_length=seq,
                     position_embedding_type=m["position_embedding_type"],
                     rotary_base=m["rotary_base"],
                     share_embeddings_and_output_weights=m["share_embeddings_and_output_weights"]
                     ).cuda()
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16,
        use_distributed_optimizer=True, clip_grad=1.0), [model])
    tokens = torch.randint(0, m["vocab_size"], (micro, seq + 1), device="cuda")
    positions = torch.arange(seq, device="cuda").unsqueeze(0).expand(micro, -1)

    def forward(iterator, net):
        next(iterator)
        output = net(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        return output, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    step_times = []
    for step in range(spec["warmup"] + spec["steps"]):
        torch.cuda.synchronize()
        began = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward, data_iterator=iter(range(micro_batches)),
                                    model=[model], num_microbatches=micro_batches, seq_length=seq,
                                    micro_batch_size=micro, forward_only=False)
        optimizer.step()
        torch.cuda.synchronize()
        if step >= spec["warmup"]:
            step_times.append(time.perf_counter() - began)
    dist.destroy_process_group()
    return {"step_seconds": step_times,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
