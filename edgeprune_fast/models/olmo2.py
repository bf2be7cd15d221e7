"""OLMo-2 (``Olmo2ForCausalLM``): no norm on the layers' inputs; RMSNorms on the attention
and MLP outputs before the residual (``post_attention_layernorm``, ``post_feedforward_layernorm``,
gain = weight), so the head writers are each head's share g * o_h / rms(o) of the normed
attention output and the MLP writer is the normed MLP output (writers.py); and q_norm / k_norm
over the whole q / k projection of all heads (H*dh, K*dh wide), before rotary.

That q/k norm spans heads, so reader a{l}.h{h}.q projects its own input with all of W_Q
([D, H*dh]), norms the result and keeps head h's slice; each k reader likewise with all of
W_K. Cost per token and layer: the q/k readers' projections take H*D*H*dh + K*D*K*dh
multiply-adds instead of D*H*dh + D*K*dh (H and K times as many); for OLMo-2-7B (H = K = 32,
H*dh = D = 4096) 1.07 G instead of 34 M, which makes a layer about 6x the multiply-adds of a
Llama-like layer of its size (0.20 G: q, k, v, o and the MLP's 3 * 4096 * 11008). Memory:
autograd keeps the norms' float32 inputs, [H, N, H*dh] and [K, N, K*dh] per layer (N =
batch * seq), 2 * 32 * 4 N D bytes for OLMo-2-7B: two thirds of what a Llama layer's RMSNorm
over the attention readers' inputs keeps (4 (H + 2K) N D; OLMo-2 has no such norm). (The rms
alone could come from x^T (W_Q W_Q^T) x, the same [D, D] product per reader when H*dh = D.)

Post-norm modes (post_norm.py): the default "writer" as above; ``post_norm="reader"`` gives
Gemma-2's MIB / EAP-IG treatment (pre-norm head writers, each reader norming its own mix of a
layer's heads) to OLMo-2's post-attention norm, by the same machinery. MIB has no OLMo-2
(TransformerLens 2.9.1, which MIB pins, has none). TransformerLens' later OLMo-2 does not set
``use_normalization_before_and_after`` and applies the norm after ``hook_attn_out``, so EAP-IG's
evaluate_graph would mix the pre-norm ``hook_result`` linearly into a residual that receives
the norm of their sum: there its circuits do not reproduce the model's corrupted run even when
empty. "reader" is what EAP-IG's Gemma-2 path would do for this layout.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, Family, rms_norm_of, rotary_graph_config
from .llama import llama_layer, llama_like_adapter


def _layer(model: nn.Module, i: int):
    layer = model.model.layers[i]
    at = layer.self_attn
    return llama_layer(model, i, attn_norm=nn.Identity(), mlp_norm=nn.Identity(), q_norm=at.q_norm, k_norm=at.k_norm,
                       qk_norm_over_heads=True, attn_post_norm=rms_norm_of(layer.post_attention_layernorm),
                       mlp_post_norm=rms_norm_of(layer.post_feedforward_layernorm))


def adapter(model: nn.Module) -> Adapter:
    return llama_like_adapter(model, "Olmo2ForCausalLM", _layer)


FAMILY = Family(classes=("Olmo2ForCausalLM",), adapter=adapter, model_types=("olmo2",),
                graph_config=rotary_graph_config)
