"""An independent fp64 evaluation of the spec (architecture.md), written with loops and no sala code.

Used as the oracle for whole-model logits. Single sequence, one-shot prefill. Slow: tiny models only.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def alibi_slopes(n: int) -> list[float]:
    def p2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    if math.log2(n).is_integer():
        return p2(n)
    c = 2 ** math.floor(math.log2(n))
    return p2(c) + p2(2 * c)[0::2][: n - c]


def rope(x, positions, theta):
    """x: [T, H, D] NeoX rotate-half."""
    D = x.shape[-1]
    inv = torch.tensor([theta ** (-2 * i / D) for i in range(D // 2)], dtype=F64)
    ang = positions[:, None].to(F64) * inv[None]  # [T, D/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    c, s = cos[:, None], sin[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def lightning(sd, p, x, cfg):
    T = x.shape[0]
    H, D = cfg.num_attention_heads, cfg.head_dim
    q = (x @ sd[p + "q_proj.weight"].T).view(T, H, D)
    k = (x @ sd[p + "k_proj.weight"].T).view(T, H, D)
    v = (x @ sd[p + "v_proj.weight"].T).view(T, H, D)
    q = rms(q, sd[p + "q_norm.weight"], cfg.rms_norm_eps)
    k = rms(k, sd[p + "k_norm.weight"], cfg.rms_norm_eps)
    pos = torch.arange(T)
    q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
    slopes = alibi_slopes(H)
    out = torch.zeros(T, H, D, dtype=F64)
    s = D**-0.5
    for h in range(H):
        S = torch.zeros(D, D, dtype=F64)
        gamma = math.exp(-slopes[h])
        for t in range(T):
            S = gamma * S + torch.outer(k[t, h], v[t, h])
            out[t, h] = s * (q[t, h] @ S)
    o = rms(out.reshape(T, H * D), sd[p + "o_norm.weight"], cfg.rms_norm_eps)
    o = o * torch.sigmoid(x @ sd[p + "z_proj.weight"].T)
    return o @ sd[p + "o_proj.weight"].T


def windows(K, ks, st):
    """K: [L, Hkv, D] -> list of (end_token, mean) for complete windows."""
    L = K.shape[0]
    out = []
    i = 0
    while i * st + ks <= L:
        out.append((i * st + ks - 1, K[i * st : i * st + ks].mean(0)))
        i += 1
    return out


def sparse(sd, p, x, cfg):
    T = x.shape[0]
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // Hkv
    sc = cfg.sparse_config
    q = (x @ sd[p + "q_proj.weight"].T).view(T, H, D)
    k = (x @ sd[p + "k_proj.weight"].T).view(T, Hkv, D)
    v = (x @ sd[p + "v_proj.weight"].T).view(T, Hkv, D)
    s = D**-0.5
    out = torch.zeros(T, H, D, dtype=F64)
    use_sparse = T >= sc["dense_len"]
    ks, st, bs = sc["kernel_size"], sc["kernel_stride"], sc["block_size"]
    w1, w2 = windows(k, ks, st), windows(k, 4 * ks, 4 * st)
    n_blocks = math.ceil(T / bs)
    local = sc["window_size"] // bs
    k_sel = min(sc["topk"] + local, n_blocks)
    for t in range(T):
        for g in range(Hkv):
            heads = range(g * G, (g + 1) * G)
            if use_sparse:
                # stage 1: per head coarse LSE and fine probabilities over complete, visible windows
                score = [0.0] * len(w1)
                for h in heads:
                    vis2 = [s * float(q[t, h] @ c[g]) for e, c in w2 if e <= t]  # c: [Hkv, D]
                    if not vis2:
                        continue
                    lse = math.log(sum(math.exp(z) for z in vis2))
                    for i, (e, c) in enumerate(w1):
                        if e <= t:
                            score[i] += math.exp(s * float(q[t, h] @ c[g]) - lse)
                qb = t // bs
                block_score = []
                for b in range(n_blocks):
                    overl = [score[i] for i in range(len(w1)) if i * st < (b + 1) * bs and i * st + ks > b * bs]
                    val = max(overl) if overl else 0.0
                    if b < sc["init_blocks"] or qb - local <= b <= qb:
                        val = math.inf
                    block_score.append(val)
                order = sorted(range(n_blocks), key=lambda b: (-block_score[b], b))[:k_sel]
                chosen = {b for b in order if b <= qb}
                keys = [j for j in range(t + 1) if j // bs in chosen]
            else:
                keys = list(range(t + 1))
            idx = torch.tensor(keys)
            for h in heads:
                a = torch.softmax(s * (k[idx, g] @ q[t, h]), dim=0)
                out[t, h] = a @ v[idx, g]
    o = out.reshape(T, H * D) * torch.sigmoid(x @ sd[p + "o_gate.weight"].T)
    return o @ sd[p + "o_proj.weight"].T


def oracle_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """ids: [T] -> fp64 logits [T, vocab] for a SALAForCausalLM's weights and config."""
    cfg = model.config
    sd = {k: v.detach().to(F64).cpu() for k, v in model.state_dict().items()}
    alpha = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
    h = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        mix = sparse if cfg.mixer_types[i] == "minicpm4" else lightning
        h = h + alpha * mix(sd, p + "self_attn.", x, cfg)
        x = rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = x @ sd[p + "mlp.gate_proj.weight"].T
        up = x @ sd[p + "mlp.up_proj.weight"].T
        h = h + alpha * ((torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T)
    h = rms(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    return (h / (cfg.hidden_size / cfg.dim_model_base)) @ sd["lm_head.weight"].T
