#!/usr/bin/env python
"""PyTorch peer for benchmarking jaxlm's `configs/yinggem.py:tiny` run.

A self-contained re-implementation of nanoGPT's CPU Shakespeare-char recipe
(nanoGPT README, "I only have a macbook": config/train_shakespeare_char.py with
``--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0``).  Written from the recipe, not copied from nanoGPT.

    python bench/nanogpt_peer.py                      # full 2000-step run
    python bench/nanogpt_peer.py --steps 50           # smoke test
    python bench/nanogpt_peer.py --threads 2 --json runs/peer.json

Only torch and numpy are needed.  Everything runs in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "jaxlm" / "data" / "corpora" / "tinyshakespeare.txt"


# --------------------------------------------------------------------------- #
# Hyper-parameters (the recipe)
# --------------------------------------------------------------------------- #
@dataclass
class ModelCfg:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


@dataclass
class TrainCfg:
    batch_size: int = 12
    max_iters: int = 2000
    lr_decay_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_iters: int = 20
    eval_interval: int = 250
    log_interval: int = 200


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def load_char_data(path: Path):
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))
    n_train = int(0.9 * len(ids))
    train = torch.from_numpy(ids[:n_train].copy())
    val = torch.from_numpy(ids[n_train:].copy())
    return train, val, len(chars)


def random_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """batch_size random windows; targets are inputs shifted by one."""
    offs = torch.randint(len(data) - block_size, (batch_size,), generator=gen)
    rows = offs[:, None] + torch.arange(block_size + 1)[None, :]
    win = data[rows]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def sequential_windows(data: torch.Tensor, block_size: int):
    """All non-overlapping windows (stride block_size) that have a full target.

    Window k covers inputs data[k*T : k*T+T] and targets data[k*T+1 : k*T+T+1];
    there are (len(data) - 1) // T of them.
    """
    n = (len(data) - 1) // block_size
    x = data[: n * block_size].view(n, block_size)
    y = data[1 : n * block_size + 1].view(n, block_size)
    return x, y


# --------------------------------------------------------------------------- #
# Model: GPT-2 style, pre-norm, weight-tied head
# --------------------------------------------------------------------------- #
class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

        self.apply(self._init)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.c_proj.weight, 0.0, resid_std)
            nn.init.normal_(blk.mlp.c_proj.weight, 0.0, resid_std)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weight counted once
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        assert t <= self.cfg.block_size
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# --------------------------------------------------------------------------- #
# Optimiser and schedule
# --------------------------------------------------------------------------- #
def make_optimizer(model: nn.Module, tc: TrainCfg):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights, embeddings
    no_decay = [p for p in params if p.dim() < 2]  # LayerNorm gains / biases
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2))


def lr_at(it: int, tc: TrainCfg) -> float:
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it > tc.lr_decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, tc.lr_decay_iters - tc.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return tc.min_lr + coeff * (tc.learning_rate - tc.min_lr)


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
@torch.no_grad()
def estimate_loss(model, data, tc: TrainCfg, block_size: int, gen: torch.Generator) -> float:
    """nanoGPT-style estimate: mean loss over eval_iters random batches."""
    model.eval()
    losses = []
    for _ in range(tc.eval_iters):
        x, y = random_batch(data, tc.batch_size, block_size, gen)
        losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def full_loss(model, data, block_size: int, chunk: int = 256) -> float:
    """Token-weighted mean loss over every non-overlapping window (stride block_size)."""
    model.eval()
    xs, ys = sequential_windows(data, block_size)
    total, count = 0.0, 0
    for i in range(0, xs.shape[0], chunk):
        x, y = xs[i : i + chunk], ys[i : i + chunk]
        logits, _ = model(x)
        total += F.cross_entropy(
            logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000,
                    help="training iterations (max_iters)")
    ap.add_argument("--lr-decay-iters", type=int, default=None,
                    help="end of the cosine decay (default: = --steps, as the recipe "
                         "sets max_iters = lr_decay_iters = 2000)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", type=str, default=None, help="write the summary here")
    ap.add_argument("--eval-every", type=int, default=0, metavar="N",
                    help="also estimate val loss every N steps (0: only at the end)")
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--data", type=str, default=str(DEFAULT_CORPUS))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    train_data, val_data, vocab = load_char_data(Path(args.data))
    mc = ModelCfg(vocab_size=vocab)
    tc = TrainCfg(max_iters=args.steps, eval_iters=args.eval_iters,
                  lr_decay_iters=args.lr_decay_iters or args.steps,
                  log_interval=args.log_every)
    if args.eval_every:
        tc.eval_interval = args.eval_every

    model = GPT(mc)
    model.train()
    opt = make_optimizer(model, tc)
    n_params = model.num_params()
    n_params_ne = model.num_params(non_embedding=True)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()}")
    print(f"data: {len(train_data):,} train / {len(val_data):,} val chars, vocab {vocab}")
    print(f"model: {n_params:,} params ({n_params_ne:,} excl. position embeddings, "
          f"as nanoGPT prints)")

    train_gen = torch.Generator().manual_seed(args.seed)
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    tokens_per_step = tc.batch_size * mc.block_size
    history = []

    train_time = 0.0  # training-loop seconds, excluding periodic evals
    t_last = time.perf_counter()
    steps_last = 0
    for it in range(tc.max_iters):
        if args.eval_every and it > 0 and it % tc.eval_interval == 0:
            train_time += time.perf_counter() - t_last
            vl = estimate_loss(model, val_data, tc, mc.block_size, eval_gen)
            print(f"  eval step {it}: val loss (est, {tc.eval_iters} batches) {vl:.4f}")
            history.append({"step": it, "val_loss_est": vl})
            t_last = time.perf_counter()

        lr = lr_at(it, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = random_batch(train_data, tc.batch_size, mc.block_size, train_gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()

        step = it + 1
        if step % tc.log_interval == 0 or step == tc.max_iters:
            lossf = loss.item()
            now = time.perf_counter()
            elapsed = train_time + (now - t_last)
            tps = step * tokens_per_step / elapsed
            print(f"step {step:5d} | train loss {lossf:.4f} | lr {lr:.2e} | "
                  f"elapsed {elapsed:7.1f} s | {tps:,.0f} tok/s", flush=True)
            history.append({"step": step, "train_loss": lossf, "elapsed_s": elapsed})
    train_time += time.perf_counter() - t_last

    t0 = time.perf_counter()
    val_est = estimate_loss(model, val_data, tc, mc.block_size, eval_gen)
    val_full = full_loss(model, val_data, mc.block_size)
    eval_time = time.perf_counter() - t0
    n_windows = (len(val_data) - 1) // mc.block_size
    tokens = tc.max_iters * tokens_per_step
    summary = {
        "peer": "nanogpt-shakespeare-char-cpu (PyTorch)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "steps": tc.max_iters,
        "batch_size": tc.batch_size,
        "block_size": mc.block_size,
        "tokens": tokens,
        "train_seconds": train_time,
        "tokens_per_s": tokens / train_time,
        "final_train_loss": loss.item(),
        "val_loss_est": val_est,
        "val_loss_est_batches": tc.eval_iters,
        "val_loss_full": val_full,
        "val_full_windows": n_windows,
        "eval_seconds": eval_time,
        "n_params": n_params,
        "n_params_non_embedding": n_params_ne,
        "model": asdict(mc),
        "train": asdict(tc),
        "history": history,
    }
    print("=" * 64)
    print(f"train loop     : {train_time:.1f} s for {tc.max_iters} steps "
          f"({tokens:,} tokens)")
    print(f"throughput     : {tokens / train_time:,.0f} tokens/s")
    print(f"val loss (est) : {val_est:.4f}  (mean of {tc.eval_iters} random batches)")
    print(f"val loss (full): {val_full:.4f}  ({n_windows} non-overlapping windows, "
          f"stride {mc.block_size})")
    print(f"params         : {n_params:,}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
