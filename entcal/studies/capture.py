"""The states a transformer block receives and returns, captured with forward hooks.

:func:`capture_block_states` runs the model once and returns, per chosen block, its input (a
forward pre-hook) and its output (a forward hook); :func:`decoder_blocks` finds the blocks and
:func:`check_layers` validates indices against them. The authors' Gemma/OpenLlama samplers saved
the *input* as the "output" (a variable that still pointed at the layer input); the tests check
that the captured output differs from the input and equals the next block's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["capture_block_states", "check_layers", "decoder_blocks"]


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (``model.model.layers`` for Llama/Gemma)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def check_layers(model, layers: Sequence[int] | None) -> list[int]:
    """Validate block indices against the model; ``None`` means all blocks."""
    n = len(decoder_blocks(model))
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer indices must be integers, got {layer!r}")
        if not 0 <= layer < n:
            raise ValueError(
                f"layer {layer} is beyond the model: it has {n} blocks (valid indices 0..{n - 1})"
            )
        out.append(layer)
    if not out:
        raise ValueError("layers is empty: give at least one block index")
    return sorted(set(out))


@torch.inference_mode()
def capture_block_states(
    model, input_ids: torch.Tensor, layers: Sequence[int] | None = None, attention_mask=None
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run the model once and return ``(inputs, outputs)`` of the chosen blocks.

    ``inputs[l]`` and ``outputs[l]`` are (B, T, d) float32: what block l received and what it
    returned (the first element when a block returns a tuple).
    """
    layers = check_layers(model, layers)
    blocks = decoder_blocks(model)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(idx):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[idx] = h.detach().float().clone()

        return hook

    def post_hook(idx):
        def hook(module, args, kwargs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            outputs[idx] = h.detach().float().clone()

        return hook

    try:
        for idx in layers:
            handles.append(blocks[idx].register_forward_pre_hook(pre_hook(idx), with_kwargs=True))
            handles.append(blocks[idx].register_forward_hook(post_hook(idx), with_kwargs=True))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs
