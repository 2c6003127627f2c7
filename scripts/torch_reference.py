#!/usr/bin/env python3
"""PyTorch versions of burn-pooling's layers, timed the way examples/speed_table.rs times ours.

    THREADS=2 python3 scripts/torch_reference.py bench [OUT.json] [--device cpu|cuda] [--quick]
    python3 scripts/torch_reference.py memory-otk [--device cpu|cuda]   (OTK's saved tensors)
    THREADS=2 python3 scripts/torch_reference.py memory [--device cpu|cuda]

Writes {"torch": version, "threads": n, "device": ..., "results": [{"op", "shape", "fwd_ms",
"fwd_bwd_ms"}, ...]}, the layout speed_table reads. Each time is the median of 20 runs after 3
warm-up runs (GSP: 10 after 2; --quick: 3 after 1). On CUDA every run ends with
torch.cuda.synchronize(), so the queued kernels are inside the time.

The maths is docs/maths.md's. GSP is written the way a PyTorch user of the paper's code runs
it: the reference's Sinkhorn-style scaling in the linear domain for a fixed 100 iterations,
then the implicit backward of docs/maths.md §4 (and, as a second row, autograd through the
unrolled iterations). SALAD (docs/maths.md §13) is written the way its authors run it: 1×1
convolutions on the maps, 3 log-domain Sinkhorn sweeps unrolled through autograd, and the
aggregation as the broadcast [B, l, m, N] product of repeated tensors. `memory` prints the peak
resident memory that one SALAD forward+backward adds (CPU: getrusage's high-water mark; CUDA:
torch.cuda.max_memory_allocated), for examples/speed_table.rs --memory to compare with; OTK is
written as its authors run it too (kernel domain, 100 iterations unrolled through autograd),
and `memory-otk` prints the bytes autograd saves for its backward. Needs only torch (pip
install torch, in a virtualenv outside the repository).
"""
import json
import math
import os
import resource
import sys
import time

import torch

EPS = 1e-6  # GeM's clamp


# --------------------------------------------------------------------------- maths.md §1
def gem(x, p, dim, eps=EPS):
    """Generalized mean over `dim` with the power `p` broadcast against x: (mean max(x, ε)^p)^(1/p)."""
    return x.clamp(min=eps).pow(p).mean(dim).pow(1.0 / p)


def gem_maps(x, p):
    """GeM of maps [B, C, H, W] -> [B, C], as cirtorch writes it (average pooling of x^p)."""
    pooled = torch.nn.functional.avg_pool2d(x.clamp(min=EPS).pow(p), x.shape[-2:])
    return pooled.pow(1.0 / p).flatten(1)


def grouped_gem_tokens(x, powers):
    """GGeM of tokens [B, N, C] with one power per contiguous group of channels -> [B, C]."""
    b, n, c = x.shape
    g = powers.shape[0]
    grouped = x.reshape(b, n, g, c // g)
    return gem(grouped, powers.reshape(1, 1, g, 1), dim=1).reshape(b, c)


# --------------------------------------------------------------------------- maths.md §2-4
def phi(v):
    """φ(v) = v / max(1, ‖v‖₂) over the last axis."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1.0)


def costs_of(x, prototypes):
    """c_kn = ‖φ(ω_k) − φ(x_n)‖₂ for tokens [B, N, C] and prototypes [K, C] -> [B, K, N]."""
    fx, fp = phi(x), phi(prototypes)
    return torch.cdist(fp.unsqueeze(0).expand(x.shape[0], -1, -1), fx)


def scaling_solve(costs, mu, epsilon, iterations):
    """The reference's scaling for the scalar dual, linear domain, no stopping test.

    With G = exp(−c/ε), s_n = Σ_k G_kn and b = e^β: a_n = (1/N) / (1 + b s_n), b = μ / Σ_n a_n s_n.
    Returns X = [ρ; P] [B, K+1, N] with ρ_n = a_n and P_kn = b G_kn a_n.
    """
    batch, _, n = costs.shape
    kernel = torch.exp(-costs / epsilon)
    s = kernel.sum(1)
    b = torch.ones(batch, 1, dtype=costs.dtype, device=costs.device)
    for _ in range(iterations):
        a = (1.0 / n) / (1.0 + b * s)
        b = mu / (a * s).sum(1, keepdim=True)
    a = (1.0 / n) / (1.0 + b * s)
    plan = b.unsqueeze(1) * kernel * a.unsqueeze(1)
    return torch.cat([a.unsqueeze(1), plan], 1)


class ImplicitTransport(torch.autograd.Function):
    """X = [ρ; P] of the partial transport, with the implicit backward of docs/maths.md §4."""

    @staticmethod
    def forward(ctx, costs, mu, epsilon, iterations):
        with torch.no_grad():
            x = scaling_solve(costs, mu, epsilon, iterations)
        ctx.save_for_backward(x)
        ctx.epsilon = epsilon
        return x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        n = x.shape[2]
        mass = 1.0 / n  # a_n, no padding here
        h = x * grad
        u = h.sum(1)  # U_n over all K+1 rows
        rho, plan = x[:, 0, :], x[:, 1:, :]
        sent = plan.sum(1)  # t_n
        numerator = (rho * u).sum(1) / mass - h[:, 0, :].sum(1)
        denominator = ((rho * sent).sum(1) / mass).clamp(min=1e-20)
        lam = numerator / denominator
        v = (u + lam.unsqueeze(1) * rho) / mass
        d_costs = -(h[:, 1:, :] - v.unsqueeze(1) * plan) / ctx.epsilon
        return d_costs, None, None, None


def gsp_tokens(x, prototypes, mu=0.3, epsilon=0.2, iterations=100, implicit=True):
    """GSP of tokens [B, N, C]: (pooled [B, C], weights [B, N], attributes [B, K])."""
    n = x.shape[1]
    costs = costs_of(x, prototypes)
    if implicit:
        plan = ImplicitTransport.apply(costs, mu, epsilon, iterations)
    else:
        plan = scaling_solve(costs, mu, epsilon, iterations)
    weights = (1.0 / n - plan[:, 0, :]) / mu  # w = (a − ρ) / μ
    pooled = (weights.unsqueeze(2) * x).sum(1)  # y = Σ_n w_n x_n, as the paper's code writes it
    attributes = plan[:, 1:, :].sum(2) / mu
    return pooled, weights, attributes


# --------------------------------------------------------------------------- maths.md §8, §11
def lse_maps(x, r):
    """LSE of maps [B, C, H, W] -> [B, C] as timm's LsePlus2d writes it (r a raw parameter)."""
    top = x.amax((2, 3), keepdim=True)
    return (top + torch.log(torch.exp(r * (x - top)).mean((2, 3), keepdim=True)) / r).flatten(1)


def attention_params(c, hidden, device, map_head):
    """Random parameters (requires_grad) of MAP (map_head) or SimPool at width c."""
    def p(*shape, scale):
        return (torch.randn(*shape, device=device) * scale).requires_grad_(True)
    w = c ** -0.5
    if map_head:
        return {
            "latent": p(1, c, scale=w), "wq": p(c, c, scale=w), "bq": p(c, scale=w),
            "wkv": p(c, 2 * c, scale=w), "bkv": p(2 * c, scale=w),
            "wo": p(c, c, scale=w), "bo": p(c, scale=w),
            "ln_g": p(c, scale=1.0), "ln_b": p(c, scale=0.1),
            "w1": p(c, hidden, scale=w), "b1": p(hidden, scale=w),
            "w2": p(hidden, c, scale=hidden ** -0.5), "b2": p(c, scale=w),
        }
    return {"ln_g": p(c, scale=1.0), "ln_b": p(c, scale=0.1), "wq": p(c, c, scale=w),
            "wk": p(c, c, scale=w), "beta": p(1, scale=0.0)}


def map_tokens(x, prm, heads=8):
    """MAP of tokens [B, N, C] -> [B, C], the textbook way (timm's fused path): q from the
    latent, k and v of every token from one [C, 2C] projection, scaled_dot_product_attention,
    the output projection, y = o + MLP(LN(o)), the first latent."""
    b, n, c = x.shape
    d = c // heads
    latents = prm["latent"].shape[0]
    q = (prm["latent"] @ prm["wq"] + prm["bq"]).reshape(1, latents, heads, d).transpose(1, 2)
    kv = (x @ prm["wkv"] + prm["bkv"]).reshape(b, n, 2, heads, d).permute(2, 0, 3, 1, 4)
    o = torch.nn.functional.scaled_dot_product_attention(q.expand(b, -1, -1, -1), kv[0], kv[1])
    o = o.transpose(1, 2).reshape(b, latents, c) @ prm["wo"] + prm["bo"]
    normed = torch.nn.functional.layer_norm(o, (c,), prm["ln_g"], prm["ln_b"], 1e-6)
    y = o + torch.nn.functional.gelu(normed @ prm["w1"] + prm["b1"]) @ prm["w2"] + prm["b2"]
    return y[:, 0]


def simpool_tokens(x, prm, gamma=None):
    """SimPool of tokens [B, N, C] -> [B, C]: q = W_q mean(x), k = W_k LN(x), v = LN(x), one
    head; with gamma, (a (v − min v + 1e-6)^(γ+β))^(1/(γ+β)), the min per sample and channel."""
    c = x.shape[2]
    q = x.mean(1) @ prm["wq"]
    v = torch.nn.functional.layer_norm(x, (c,), prm["ln_g"], prm["ln_b"], 1e-6)
    k = v @ prm["wk"]
    a = torch.softmax((k @ q.unsqueeze(2)).squeeze(2) / math.sqrt(c), dim=1).unsqueeze(1)
    if gamma is None:
        return (a @ v).squeeze(1)
    e = gamma + prm["beta"]
    u = v - v.amin(1, keepdim=True) + 1e-6
    return (a @ u.pow(e)).squeeze(1).pow(1.0 / e)


# --------------------------------------------------------------------------- NetVLAD
def netvlad_maps(x, centroids, weights, bias=None, normalize_input=True):
    """NetVLAD of maps [B, C, H, W] -> [B, K·C] (cluster-major), written from docs/maths.md's
    formulas in the two-reduction form: V_k = Σ_j a_kj x_j − (Σ_j a_kj) c_k (a batched matmul
    and a sum, never the [B, K, N, C] residuals), intra-L2, then L2 (eps 1e-12)."""
    normalize = torch.nn.functional.normalize
    x = x.flatten(2)  # [B, C, N]
    if normalize_input:
        x = normalize(x, p=2, dim=1)
    logits = torch.matmul(weights, x)  # [K, C] · [B, C, N] -> [B, K, N]
    if bias is not None:
        logits = logits + bias[None, :, None]
    a = logits.softmax(1)
    v = torch.bmm(a, x.transpose(1, 2)) - a.sum(2, keepdim=True) * centroids  # [B, K, C]
    v = normalize(v, p=2, dim=2)
    return normalize(v.flatten(1), p=2, dim=1)


# --------------------------------------------------------------------------- OTK
def otk_tokens(x, weight, eps=0.1, iterations=100):
    """OTK of tokens [B, N, C] with references [heads, p, C] -> [B, p, heads·C], the way the
    authors' OTKernel runs it (claying/OTK, log_domain=False, the default), written from
    docs/maths.md §14: the kernel exp(⟨x, z⟩/ε) (inf past ⟨x, z⟩/ε ≈ 88.7 in f32), a fixed
    number of Sinkhorn scalings (position masses p/N, reference masses 1, the reference update
    last) unrolled through autograd, then the plan times the tokens as one batched matmul."""
    b, n, c = x.shape
    heads, p, _ = weight.shape
    dots = torch.einsum("bnc,hpc->bhnp", x, weight).reshape(b * heads, n, p)
    kernel = torch.exp(dots / eps)
    v = kernel.new_ones(b * heads, p, 1)
    for _ in range(iterations):
        u = (p / n) / torch.bmm(kernel, v)  # [B·heads, N, 1]
        v = 1.0 / torch.bmm(kernel.transpose(1, 2), u)  # [B·heads, p, 1]
    plan = u * kernel * v.transpose(1, 2)  # [B·heads, N, p]
    plan = plan.reshape(b, heads, n, p).permute(0, 3, 1, 2).reshape(b, p * heads, n)
    return torch.bmm(plan, x).reshape(b, p, heads * c)


def otk_saved_bytes(b=64, n=196, c=256, p=16, heads=1, iterations=100, device="cpu"):
    """Bytes autograd keeps for the backward of otk_tokens (every tensor saved by a node,
    each storage counted once): the memory that the unrolled iterations cost, whatever the
    device's allocator does. Used by `torch_reference.py memory-otk`."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    x = torch.rand(b, n, c, device=device, requires_grad=True)
    weight = ((torch.rand(heads, p, c, device=device) * 2 - 1) / math.sqrt(p)).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = otk_tokens(x, weight, iterations=iterations)
    out.sum().backward()
    return total[0]


# --------------------------------------------------------------------------- SALAD (maths.md §13)
SALAD_SHAPE = (32, 256, 768, 64, 128)  # B, N (a 16×16 map of DINOv2 ViT-B/14 tokens), C, m, l


class SaladAsItsAuthorsRunIt(torch.nn.Module):
    """SALAD (Izquierdo & Civera, CVPR 2024) written from docs/maths.md §13 in the authors'
    style: the feature and score MLPs as 1×1 convolutions on the maps [B, C, H, W] (dropout
    after the first), the global token's MLP as linear layers, the dustbin score z, 3 log-domain
    Sinkhorn sweeps from v = 0 (row update first) unrolled through autograd, the plan times N+m
    without its dustbin row, and V = Σ_j P_kj f_j as the sum over N of the product of the
    features and the plan, each repeated to [B, l, m, N]; the global vector first, then V
    l-major, each L2-normalised, then the whole."""

    def __init__(self, c, m=64, l=128, g=256, hidden=512, dropout=0.3):
        super().__init__()
        conv = torch.nn.Conv2d
        self.features = torch.nn.Sequential(
            conv(c, hidden, 1), torch.nn.Dropout(dropout), torch.nn.ReLU(), conv(hidden, l, 1))
        self.scores = torch.nn.Sequential(
            conv(c, hidden, 1), torch.nn.Dropout(dropout), torch.nn.ReLU(), conv(hidden, m, 1))
        self.token = torch.nn.Sequential(
            torch.nn.Linear(c, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, g))
        self.dustbin = torch.nn.Parameter(torch.tensor(1.0))
        self.m, self.l = m, l

    def forward(self, maps, token, iterations=3):
        normalize = torch.nn.functional.normalize
        f = self.features(maps).flatten(2)  # [B, l, N]
        s = self.scores(maps).flatten(2)  # [B, m, N]
        b, m, n = s.shape
        kappa = torch.cat([s, self.dustbin.expand(b, 1, n)], 1)  # −C/ε with ε = 1
        log_total = math.log(n + m)
        log_a = torch.full((m + 1,), -log_total, device=s.device)
        log_a[m] += math.log(n - m)
        log_b = torch.full((n,), -log_total, device=s.device)
        u = torch.zeros(b, m + 1, device=s.device)
        v = torch.zeros(b, n, device=s.device)
        for _ in range(iterations):
            u = log_a - torch.logsumexp(kappa + v.unsqueeze(1), 2)
            v = log_b - torch.logsumexp(kappa + u.unsqueeze(2), 1)
        plan = torch.exp(kappa + u.unsqueeze(2) + v.unsqueeze(1) + log_total)[:, :m]
        product = f.unsqueeze(2).repeat(1, 1, m, 1) * plan.unsqueeze(1).repeat(1, self.l, 1, 1)
        clusters = normalize(product.sum(-1), p=2, dim=1).flatten(1)  # [B, l·m], l-major
        glob = normalize(self.token(token), p=2, dim=-1)
        return normalize(torch.cat([glob, clusters], -1), p=2, dim=-1)


def salad_inputs(device, requires_grad):
    b, n, c, m, l = SALAD_SHAPE
    side = math.isqrt(n)
    maps = torch.randn(b, c, side, side, device=device).requires_grad_(requires_grad)
    token = torch.randn(b, c, device=device).requires_grad_(requires_grad)
    return maps, token


def peak_bytes(device):
    """The process's peak memory so far: CUDA's allocator peak, or the CPU's peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def otk_memory(device):
    """Peak memory that one OTK forward+backward (100 unrolled kernel-domain iterations) adds,
    in MB. Run before SALAD's: the peak only rises."""
    torch.manual_seed(0)
    b, n, c, p = 64, 196, 256, 16
    x = torch.rand(b, n, c, device=device).requires_grad_(True)
    weight = ((torch.rand(1, p, c, device=device) * 2 - 1) / math.sqrt(p)).requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(device)
    otk_tokens(x, weight).sum().backward()
    peak = peak_bytes(device) - before
    print(f"otk_tokens(p=16 100 iterations) [{b}, {n}, {c}]: one forward+backward adds "
          f"{peak / 1e6:.1f} MB (peak over the peak before)")


def memory(device):
    """Peak memory that one forward+backward of OTK, then of SALAD (training mode, dropout
    on), adds, in MB."""
    otk_memory(device)
    torch.manual_seed(0)
    b, n, c, m, l = SALAD_SHAPE
    layer = SaladAsItsAuthorsRunIt(c, m, l).to(device).train()
    maps, token = salad_inputs(device, True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    layer(maps, token).sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        what = "torch.cuda.max_memory_allocated over what was allocated before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        what = "peak RSS (getrusage) over the peak before"
    print(f"salad_maps(3 iters unrolled) B={b} N={n} C={c} m={m} l={l}: one forward+backward "
          f"adds {peak / 1e6:.1f} MB ({what}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")


# --------------------------------------------------------------------------- timing
def median_ms(fn, reps, warm, sync):
    for _ in range(warm):
        fn()
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def bench(device, quick):
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = (3, 1) if quick else (20, 3)
    gsp_runs = (3, 1) if quick else (10, 2)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": name,
        "results": [],
    }

    def record(op, shape, forward, forward_backward, reps_warm=runs):
        fwd = median_ms(forward, *reps_warm, sync)
        fwd_bwd = median_ms(forward_backward, *reps_warm, sync)
        out["results"].append({"op": op, "shape": shape, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd})
        print(f"{op:28s} {str(shape):22s} fwd {fwd:9.3f} ms   fwd+bwd {fwd_bwd:9.3f} ms", flush=True)

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()
        return run

    for b, n, c in [(64, 49, 2048), (64, 196, 768)]:
        side = math.isqrt(n)
        tokens = torch.rand(b, n, c, device=device)
        tokens_g = tokens.clone().requires_grad_(True)
        maps = tokens.transpose(1, 2).reshape(b, c, side, side).contiguous()
        maps_g = maps.clone().requires_grad_(True)
        shape = [b, c, side, side]

        def gap(m):
            return m.mean((2, 3))

        def gmp(m):
            return m.amax((2, 3))

        def gap_gmp(m):
            return m.mean((2, 3)) + m.amax((2, 3))

        for op, layer in [("gap_nchw", gap), ("gmp_nchw", gmp), ("gap_gmp_nchw(sum)", gap_gmp)]:
            record(
                op,
                shape,
                no_grad(lambda: layer(maps)),
                lambda: layer(maps_g).sum().backward(),
            )

        p = torch.tensor(3.0, device=device, requires_grad=True)
        record(
            "gem_nchw(cirtorch)",
            shape,
            no_grad(lambda: gem_maps(maps, p)),
            lambda: gem_maps(maps_g, p).sum().backward(),
        )

        groups = 12 if c % 12 == 0 else 16
        powers = torch.full((groups,), 3.0, device=device, requires_grad=True)
        record(
            f"ggem_tokens(G={groups})",
            [b, n, c],
            no_grad(lambda: grouped_gem_tokens(tokens, powers)),
            lambda: grouped_gem_tokens(tokens_g, powers).sum().backward(),
        )

    for b, n, d, k in [(64, 49, 512, 64), (128, 49, 128, 128), (64, 196, 768, 64)]:
        x = torch.randn(b, n, d, device=device) * 0.1
        prototypes = torch.randn(k, d, device=device) * 0.1
        x_g = x.clone().requires_grad_(True)
        prototypes_g = prototypes.clone().requires_grad_(True)

        def train(implicit):
            def run():
                pooled, _, attributes = gsp_tokens(x_g, prototypes_g, implicit=implicit)
                (pooled.sum() + attributes.sum()).backward()
            return run

        forward = no_grad(lambda: gsp_tokens(x, prototypes))
        record("gsp_tokens(analytic bwd)", [b, n, d, k], forward, train(True), gsp_runs)
        record("gsp_tokens(unrolled bwd)", [b, n, d, k], forward, train(False), gsp_runs)

    # Attention pooling over a ViT-B/16's 197 tokens; the backward reaches x and every parameter.
    b, n, c = 64, 197, 768
    x = torch.rand(b, n, c, device=device) * 2.0 - 1.0
    x_g = x.clone().requires_grad_(True)
    prm = attention_params(c, 4 * c, device, map_head=True)
    record(
        "map_tokens(H=8)",
        [b, n, c],
        no_grad(lambda: map_tokens(x, prm)),
        lambda: map_tokens(x_g, prm).sum().backward(),
    )
    prm = attention_params(c, 0, device, map_head=False)
    for op, gamma in [("simpool_tokens", None), ("simpool_tokens(gamma=1.25+beta)", 1.25)]:
        record(
            op,
            [b, n, c],
            no_grad(lambda: simpool_tokens(x, prm, gamma)),
            lambda: simpool_tokens(x_g, prm, gamma).sum().backward(),
        )

    # LSE at GeM's map shapes.
    for b, n, c in [(64, 49, 2048), (64, 196, 768)]:
        side = math.isqrt(n)
        maps = torch.rand(b, c, side, side, device=device)
        maps_g = maps.clone().requires_grad_(True)
        r = torch.tensor(10.0, device=device, requires_grad=True)
        record(
            "lse_nchw(timm)",
            [b, c, side, side],
            no_grad(lambda: lse_maps(maps, r)),
            lambda: lse_maps(maps_g, r).sum().backward(),
        )

    # NetVLAD V1 (the authors' experiments) on VGG16 conv5 maps at 224: [32, 512, 14, 14], K = 64.
    b, c, side, k = 32, 512, 14, 64
    maps = torch.rand(b, c, side, side, device=device)
    maps_g = maps.clone().requires_grad_(True)
    centroids = torch.rand(k, c, device=device).requires_grad_(True)
    weights = (100.0 * torch.nn.functional.normalize(centroids.detach(), dim=1)).requires_grad_(True)
    record(
        "netvlad_nchw(v1)",
        [b, c, side, side],
        no_grad(lambda: netvlad_maps(maps, centroids, weights)),
        lambda: netvlad_maps(maps_g, centroids, weights).sum().backward(),
    )
    # OTK (one head, p = 16, ε = 0.1) on 14×14 tokens of width 256, as the authors run it: 100
    # kernel-domain iterations unrolled through autograd. Uniform [0, 1) tokens keep
    # ⟨x, z⟩/ε below the kernel's f32 overflow.
    b, n, c, p = 64, 196, 256, 16
    x = torch.rand(b, n, c, device=device)
    x_g = x.clone().requires_grad_(True)
    weight = ((torch.rand(1, p, c, device=device) * 2 - 1) / math.sqrt(p)).requires_grad_(True)
    record(
        "otk_tokens(p=16 100 iterations)",
        [b, n, c],
        no_grad(lambda: otk_tokens(x, weight)),
        lambda: otk_tokens(x_g, weight).sum().backward(),
    )

    # SALAD as its authors run it on DINOv2 ViT-B/14 tokens of a 224×224 image (16×16 patches)
    # and its class token: B = 32 (the authors train with 240 images of 322×322, N = 529:
    # too much for a CPU table), m = 64, l = 128; forward in eval mode, forward+backward in
    # training mode (dropout on), the backward reaching the input and every parameter.
    b, n, c, m, l = SALAD_SHAPE
    salad = SaladAsItsAuthorsRunIt(c, m, l).to(device)
    maps, token = salad_inputs(device, False)
    maps_g, token_g = salad_inputs(device, True)

    def salad_forward():
        salad.eval()
        with torch.no_grad():
            salad(maps, token)

    def salad_train():
        salad.train()
        salad(maps_g, token_g).sum().backward()

    record("salad_maps(3 iters unrolled)", [b, n, c], salad_forward, salad_train, gsp_runs)
    return out


def main(argv):
    args = list(argv)
    device, quick = "cpu", False
    if "--quick" in args:
        args.remove("--quick")
        quick = True
    if "--device" in args:
        at = args.index("--device")
        if at + 1 >= len(args) or args[at + 1] not in ("cpu", "cuda"):
            sys.exit("torch_reference.py: --device expects cpu or cuda")
        device = args[at + 1]
        del args[at : at + 2]
    if args[:1] == ["memory-otk"]:
        # The bytes autograd saves for OTK's backward, per iteration count (no timing).
        for iterations in (10, 100):
            saved = otk_saved_bytes(iterations=iterations, device=device)
            print(f"otk_tokens [64, 196, 256] p=16: {iterations} iterations: {saved / 2**20:.1f} MiB saved for backward")
        return
    usage = ("usage: torch_reference.py bench [OUT.json] [--device cpu|cuda] [--quick]\n"
             "       torch_reference.py memory [--device cpu|cuda]\n"
             "       torch_reference.py memory-otk [--device cpu|cuda]")
    if not args or args[0] not in ("bench", "memory") or len(args) > 2:
        sys.exit(usage)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_reference.py: --device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    if args[0] == "memory":
        if len(args) != 1:
            sys.exit(usage)
        return memory(torch.device(device))
    result = bench(torch.device(device), quick)
    if len(args) == 2:
        with open(args[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
