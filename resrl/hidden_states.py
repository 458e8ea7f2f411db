"""Reading a decoder layer's hidden states with a forward hook (ResRL's weights and the
displacement diagnostics score tokens by them). One place, used by the trainer's forward and
by the Hugging Face sampler, which keeps the states that produced each sampled token."""
from __future__ import annotations

import contextlib

from resrl.errors import ConfigError


@contextlib.contextmanager
def capture_hidden(model, layer: int, *, every_call: bool = False):
    """Record the hidden state `output_hidden_states[layer]` would give, via a forward hook:
    `box["h"]` is the last call's; with `every_call`, `box["all"]` lists every call's (a
    `generate` makes one forward per new token).

    Index j of HF's `hidden_states` tuple is the embedding output (0), the output of
    decoder layer j-1 (1..L-1), or the final-normed output (L, i.e. -1).
    """
    box: dict = {"all": []}
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no .model.layers: resrl cannot read its hidden states "
                          "(ResRL's weights and diagnostics need them; algorithm.diagnostics=false and a "
                          "baseline algorithm avoid it)")
    L = len(layers)
    j = layer + L + 1 if layer < 0 else layer
    if not 1 <= j <= L:
        raise ConfigError(f"algorithm.hidden_layer={layer} is outside 1..{L} (or -1..-{L})")
    target = base.norm if j == L else layers[j - 1]

    def hook(_module, _inputs, output):
        box["h"] = output[0] if isinstance(output, tuple) else output
        if every_call:
            box["all"].append(box["h"])

    handle = target.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
