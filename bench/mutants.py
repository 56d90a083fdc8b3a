"""Mutation check: does the test suite fail when the code is broken the way a refactor could break it?

  python bench/mutants.py                 # every mutation (about 20-40 minutes on 2 cores)
  python bench/mutants.py --only safety   # the mutations whose name contains 'safety'
  python bench/mutants.py --names rope-base,causal-mask-off
  python bench/mutants.py --list

Each mutation replaces one exact snippet of one source file (the snippet must occur exactly once, so a mutation
that no longer applies is reported, not silently skipped). For each, a scratch copy of the working tree is
made, the mutation applied, and the test files that guard that code are run (`pytest -x`); the mutation is
"caught" when they fail. Prints one row per mutation and, last, `N caught, M missed`. Not part of CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  what: str                      # the bug it plants, in words
  edits: Tuple[Tuple[str, str, str], ...]   # (file, exact old snippet, new snippet)
  tests: Tuple[str, ...]         # test files or node ids that must catch it (pytest options like -k pass through)


def m(name, what, tests, *edits):
  return Mutation(name, what, tuple(edits), tuple(tests))


# --- module level, above MUTATIONS (shared snippets) ---
_ROPE_BASE = ("jaxlm/models/layers.py",
              "return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))",
              "return 1.0 / ((1.3 * theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))")
_RMS_NORM_EPS = ("jaxlm/models/layers.py",
                 "y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)",
                 "y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 10 * self.eps)")
_DECODER_POST_NORM = (  # x = norm(x + f(x)) instead of x = x + f(norm(x)), both sublayers
    ("jaxlm/models/decoder.py",
     '    h = layers.make_norm(c.norm, c.norm_eps, dtype, "attn_norm")(x_BxTxD)\n    h = layers.Attention(',
     '    attn_norm = layers.make_norm(c.norm, c.norm_eps, dtype, "attn_norm")\n    h = x_BxTxD\n'
     '    h = layers.Attention('),
    ("jaxlm/models/decoder.py",
     '    x_BxTxD = x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic)\n'
     '    h = layers.make_norm(c.norm, c.norm_eps, dtype, "mlp_norm")(x_BxTxD)',
     '    x_BxTxD = attn_norm(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic))\n'
     '    mlp_norm = layers.make_norm(c.norm, c.norm_eps, dtype, "mlp_norm")\n    h = x_BxTxD'),
    ("jaxlm/models/decoder.py",
     '    x_BxTxD = constrain_residual(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic))\n',
     '    x_BxTxD = constrain_residual(mlp_norm(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=deterministic)))\n'))
_DECODER_TESTS = ["tests/test_convert_families.py", "tests/test_score.py", "tests/test_generate.py"]

MUTATIONS: List[Mutation] = [
    m("hrm-converter-swaps-norms", "HRM converter swaps a block's two norm weights, on import and on export",
      ["tests/test_convert_hrm.py"],
      ("convert/hrm.py", '*norm("norm1", "attn_norm"), *norm("norm2", "mlp_norm")',
       '*norm("norm1", "mlp_norm"), *norm("norm2", "attn_norm")')),
    m("hrm_text1-converter-swaps-norms", "HRM-Text1 converter swaps a block's two norm weights, both directions",
      ["tests/test_convert_hrm_text1.py"],
      ("convert/hrm_text1.py", '*norm(f"{m}.norm1", f"{m}/norm1"),', '*norm(f"{m}.norm1", f"{m}/norm2"),'),
      ("convert/hrm_text1.py", '*norm(f"{m}.norm2", f"{m}/norm2"),', '*norm(f"{m}.norm2", f"{m}/norm1"),')),
    m("table-slots-reversed", "a converter table stacks a gated MLP's value and gate the wrong way round on import",
      ["tests/test_convert_tables.py"],
      ("convert/table.py", "np.stack([slots[s] for s in sorted(slots)], axis=axis)",
       "np.stack([slots[s] for s in sorted(slots, reverse=True)], axis=axis)")),
    m("table-chunks-reversed", "a converter table writes a fused tensor's pieces (qkv, value|gate) in reverse order",
      ["tests/test_convert_tables.py"],
      ("convert/table.py", "sorted(parts, key=lambda p: p[0])", "sorted(parts, key=lambda p: -p[0])")),
    m("hrm-halt-target-inverted", "HRM's Q-halt head is trained towards 'wrong' instead of 'correct'",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "optax.sigmoid_binary_cross_entropy(q[..., 0], correct)",
       "optax.sigmoid_binary_cross_entropy(q[..., 0], 1.0 - correct)")),
    m("hrm-supervision-last-segment-only", "HRM's deep supervision keeps only the last segment's LM loss",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "lm = jnp.sum(_lm_losses(logits, targets, c.loss_fn) * weights * token_active)",
       "lm = jnp.sum(_lm_losses(logits, targets, c.loss_fn) * weights * token_active) * (s == m - 1)")),
    m("hrm-batch-never-halts-early", "HRM's batch halting (the original's) never halts before the step cap",
      ["tests/test_hrm.py", "tests/test_convert_hrm.py"],
      ("jaxlm/models/hrm.py", "want = jnp.broadcast_to(jnp.all(want | halted), want.shape)",
       "want = jnp.zeros_like(want)")),
    m("hrm-bootstrap-current-segment", "HRM's Q-continue target bootstraps from the current segment's Q, not the next one's",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "q_next, q, correct, active = q[1:], q[:m], correct[:m], active[:m]",
       "q_next, q, correct, active = q[:m], q[:m], correct[:m], active[:m]")),
    m("hrm-bootstrap-never-last-step", "HRM's last-step Q-continue target is max(q_halt, q_continue), not q_halt",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "is_last = (jnp.arange(m) == m - 1)", "is_last = (jnp.arange(m) == m)")),
    m("hrm-q-continue-dropped", "HRM's Q-learning loss loses its Q-continue (bootstrap) term",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "             + optax.sigmoid_binary_cross_entropy(q[..., 1], jax.lax.stop_gradient(target)))",
       "             + 0.0 * q[..., 1])")),
    m("hrm-full-grad-as-one-step", "HRM's grad_mode 'full' backpropagates like 'one_step'",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", 'if (grad_mode or c.grad_mode) == "full":', "if False:")),
    m("hrm-act-state-not-detached", "HRM's ACT training backpropagates into earlier segments",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "new_l, new_h = mdl.segment(jax.lax.stop_gradient(z_l), jax.lax.stop_gradient(z_h), ctx)",
       "new_l, new_h = mdl.segment(z_l, z_h, ctx)")),
    m("hrm-halted-still-supervised", "HRM's deep supervision keeps the LM loss of halted examples",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "token_active = active if active.ndim == 2 else active[:, None]",
       "token_active = jnp.ones_like(active) if active.ndim == 2 else jnp.ones_like(active)[:, None]")),
    m("hrm-training-never-halts", "HRM's ACT training ignores the Q-head and always runs halt_max_steps segments",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py",
       "want = jax.lax.stop_gradient(q_new[..., 0] > q_new[..., 1]) & (s + 1 >= min_steps) if c.q_learning else False",
       "want = False")),
    m("hrm-segments-summed-not-averaged", "HRM's deep supervision sums the segments' LM losses instead of averaging",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "objective = jnp.sum(lm) / m", "objective = jnp.sum(lm)")),
    m("hrm-loop-trip-counts-visible", "HRM's N/T loops lose the barrier hiding their trip counts",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "n_dyn, t_dyn = jax.lax.optimization_barrier((jnp.int32(n), jnp.int32(t)))",
       "n_dyn, t_dyn = jnp.int32(n), jnp.int32(t)")),
    m("hrm-cycles-unrolled-in-python", "HRM's N cycles unrolled in Python (the program grows with N)",
      ["tests/test_hrm.py"],
      ("jaxlm/models/hrm.py", "    z_L, z_H = self._loop_cycles(z_L, z_H, ctx, n_dyn - 1, t_dyn)\n",
       "    for _ in range(n - 1):\n      z_L = self._loop_l(z_L, z_H, ctx, t_dyn)\n      z_H = self.h_step(z_H, z_L, ctx)\n")),
    m("hrm_text1-exit-one-step-late", "HRM-Text1's early exit tests the remainder before this step's halt",
      ["tests/test_hrm_text1.py"],
      ("jaxlm/models/hrm_text1.py", "halted = jnp.all((rem_next < c.halt_eps) | ~valid_BxT)",
       "halted = jnp.all((rem < c.halt_eps) | ~valid_BxT)")),
    m("hrm_text1-never-exits-early", "HRM-Text1's pondering never exits early",
      ["tests/test_hrm_text1.py"],
      ("jaxlm/models/hrm_text1.py", "go = active & ~halted", "go = active")),
    m("dropout-key-rebased-at-resume", "the dropout key restarts from the resumed step instead of continuing",
      ["tests/test_train.py"],
      ("jaxlm/trainer.py", "self.state, step_metrics = self.step_fn(self.state, batch, self.base_rng)",
       "self.state, step_metrics = self.step_fn(self.state, batch, jax.random.fold_in(self.base_rng, self.start_step))")),
    m("resume-data-position", "a resumed run reads its data from the wrong batch",
      ["tests/test_train.py"],
      ("jaxlm/trainer.py", 'int(saved_meta.get("data_position", self.start_step))',
       'int(saved_meta.get("data_position", self.start_step)) + 1')),
    m("grad-accumulation-drops-microbatches", "gradient accumulation keeps only the last microbatch",
      ["tests/test_train.py"],
      ("jaxlm/steps.py", "return jax.tree.map(jnp.add, acc, (out, grads)), None", "return (out, grads), None")),
    m("safety-no-left-boundary", "the blocklist matches inside words ('a skill' blocked as 'kill')",
      ["tests/test_chat.py", "tests/test_safety.py"],
      ("jaxlm/safety.py", 'rf"(?<!\\w)(?:{alternatives})(?!\\w)"', 'rf"(?:{alternatives})(?!\\w)"')),
    m("safety-one-space-phrases", "a blocked phrase matches only with exactly one space between its words",
      ["tests/test_chat.py", "tests/test_safety.py"],
      ("jaxlm/safety.py", 'alternatives = "|".join(r"\\s+".join(', 'alternatives = "|".join(" ".join(')),
    m("safety-no-right-boundary", "the blocklist matches the start of longer words ('killer' blocked as 'kill')",
      ["tests/test_chat.py", "tests/test_safety.py"],
      ("jaxlm/safety.py", 'rf"(?<!\\w)(?:{alternatives})(?!\\w)"', 'rf"(?<!\\w)(?:{alternatives})"')),
    m("temperature-multiplies", "sampling multiplies the logits by the temperature instead of dividing",
      ["tests/test_generate.py", "tests/test_sampling.py"],
      ("jaxlm/sampling.py", "logits = logits / values[\"temperature\"]", "logits = logits * values[\"temperature\"]")),
    m("top-k-keeps-one-more", "top-k keeps k + 1 tokens",
      ["tests/test_generate.py", "tests/test_sampling.py"],
      ("jaxlm/sampling.py", "kth_B = jnp.take(sorted_BxV, jnp.clip(top_k, 1, v) - 1, axis=-1)",
       "kth_B = jnp.take(sorted_BxV, jnp.clip(top_k, 1, v - 1), axis=-1)")),
    m("top-p-off-by-one", "top-p keeps one token fewer than the nucleus",
      ["tests/test_generate.py", "tests/test_sampling.py"],
      ("jaxlm/sampling.py", "n_keep_B = jnp.maximum(jnp.sum(mass_before <= top_p, axis=-1), 1)",
       "n_keep_B = jnp.maximum(jnp.sum(mass_before <= top_p, axis=-1) - 1, 1)")),
    m("tied-head-own-table", "a tied model's output head reads a table of its own instead of the embedding",
      ["tests/test_layers.py"],
      ("jaxlm/models/decoder.py", "      table_VxD = embed.embedding\n",
       '      table_VxD = self.param("head_table", layers._init(c.embed_init_std, (layers.VOCAB, layers.EMBED)),\n'
       '                             embed.embedding.shape, jnp.float32)\n')),
    m("tied-head-no-gradient", "a tied model's output head does not train the embedding table",
      ["tests/test_layers.py"],
      ("jaxlm/models/decoder.py", "      table_VxD = embed.embedding\n",
       "      table_VxD = jax.lax.stop_gradient(embed.embedding)\n")),
    m("grad-accumulation-drops-microbatch-grads",
      "gradient accumulation sums every microbatch's loss but keeps only the last one's gradient",
      ["tests/test_train.py::test_grad_accumulation_equals_one_big_batch"],
      ("jaxlm/steps.py", "return jax.tree.map(jnp.add, acc, (out, grads)), None",
       "return (jax.tree.map(jnp.add, acc[0], out), grads), None")),
    m("causal-mask-off", "causal attention sees later tokens",
      ["tests/test_layers.py", "tests/test_attention.py"],
      ("jaxlm/models/attention.py", "  if causal:\n", "  if False:\n")),
    m("rope-base", "the RoPE base is 1.3x what the config says",
      ["tests/test_layers.py", "tests/test_convert_families.py"],
      ("jaxlm/models/layers.py", "return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))",
       "return 1.0 / ((1.3 * theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))")),
    m("rope-base-hrom", "HROM's RoPE base is 1.3x the checkpoint's (HROM's own tests only)",
      ["tests/test_convert_families.py", "tests/test_score.py", "tests/test_generate.py", "-k", "hrom"],
      ("jaxlm/models/layers.py", "return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))",
       "return 1.0 / ((1.3 * theta) ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))")),
    m("layernorm-eps-hrom", "LayerNorm (HROM) uses 10x the configured epsilon (HROM's own tests only)",
      ["tests/test_convert_families.py", "tests/test_score.py", "tests/test_generate.py", "-k", "hrom"],
      ("jaxlm/models/layers.py", "y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)",
       "y = (x32 - mean) * jax.lax.rsqrt(var + 10 * self.eps)")),
    m("hrm-norm-position", "HRM's post-norm blocks normalise before the sublayer instead of after",
      ["tests/test_hrm.py", "tests/test_convert_hrm.py"],
      ("jaxlm/models/hrm.py", "      x_BxTxD = attn_norm(x_BxTxD + attn(x_BxTxD, positions_BxT, mask_Bx1xTxS))\n"
                              "      return mlp_norm(x_BxTxD + mlp(x_BxTxD))",
       "      x_BxTxD = x_BxTxD + attn(attn_norm(x_BxTxD), positions_BxT, mask_Bx1xTxS)\n"
       "      return x_BxTxD + mlp(mlp_norm(x_BxTxD))")),
    m("rms-norm-eps", "RMSNorm uses 10x the configured epsilon",
      ["tests/test_layers.py", "tests/test_convert_families.py"],
      ("jaxlm/models/layers.py", "y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)",
       "y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 10 * self.eps)")),
    m("kv-cache-position", "the KV cache records each key one position late",
      ["tests/test_generate.py"],
      ("jaxlm/kv_cache.py", "pos_BxS=put(self.pos_BxS, positions_BxT.astype(jnp.int32)))",
       "pos_BxS=put(self.pos_BxS, positions_BxT.astype(jnp.int32) + 1))")),
    m("checkpoint-not-verified", "restoring skips the checksum verification",
      ["tests/test_reliability.py"],
      ("jaxlm/checkpoint.py", "    if recorded is not None:\n      _verify(self.step_dir(step),",
       "    if False:\n      _verify(self.step_dir(step),")),
    m("nonfinite-update-applied", "a NaN/Inf update reaches the parameters",
      ["tests/test_reliability.py"],
      ("jaxlm/steps.py", "keep_if_bad = lambda new, old: jnp.where(finite, new, old)", "keep_if_bad = lambda new, old: new")),
    m("process-rows-ignored", "every process reads the whole global batch",
      ["tests/test_distributed.py"],
      ("jaxlm/data/pipeline.py", "    if self.rows is not None:\n      starts = starts[self.rows]\n", "")),
    m("rope-base-optimus_prime", "Optimus Prime's RoPE base is 1.3x the checkpoint's (its own tests only)",
      _DECODER_TESTS + ["tests/test_convert_llama.py", "-k", "optimus"], _ROPE_BASE),
    m("rope-base-yinggem", "YingGem's RoPE base is 1.3x the checkpoint's (its own tests only)",
      _DECODER_TESTS + ["-k", "yinggem"], _ROPE_BASE),
    m("rope-base-hrm", "HRM's RoPE base is 1.3x the checkpoint's (the HRM converter tests only)",
      ["tests/test_convert_hrm.py"], _ROPE_BASE),
    m("rope-base-hrm_text1", "HRM-Text1's RoPE base is 1.3x the checkpoint's (the HRM-Text1 converter tests only)",
      ["tests/test_convert_hrm_text1.py"], _ROPE_BASE),
    m("rms-norm-eps-optimus_prime", "RMSNorm uses 10x the configured epsilon (Optimus Prime's own tests only)",
      _DECODER_TESTS + ["tests/test_convert_llama.py", "-k", "optimus"], _RMS_NORM_EPS),
    m("rms-norm-eps-yinggem", "RMSNorm uses 10x the configured epsilon (YingGem's own tests only)",
      _DECODER_TESTS + ["-k", "yinggem"], _RMS_NORM_EPS),
    m("rms-norm-eps-hrm", "RMSNorm uses 10x the configured epsilon (the HRM converter tests only)",
      ["tests/test_convert_hrm.py"], _RMS_NORM_EPS),
    m("rms-norm-eps-hrm_text1", "RMSNorm uses 10x the configured epsilon (the HRM-Text1 converter tests only)",
      ["tests/test_convert_hrm_text1.py"], _RMS_NORM_EPS),
    m("norm-position-hrom", "the decoder's pre-norm blocks normalise after the residual add (HROM's own tests only)",
      _DECODER_TESTS + ["-k", "hrom"], *_DECODER_POST_NORM),
    m("norm-position-optimus_prime", "the decoder's pre-norm blocks normalise after the residual add "
      "(Optimus Prime's own tests only)", _DECODER_TESTS + ["tests/test_convert_llama.py", "-k", "optimus"],
      *_DECODER_POST_NORM),
    m("norm-position-yinggem", "the decoder's pre-norm blocks normalise after the residual add "
      "(YingGem's own tests only)", _DECODER_TESTS + ["-k", "yinggem"], *_DECODER_POST_NORM),
    m("hrm_text1-norm-position", "HRM-Text1's pre-norm blocks normalise after the residual add instead of before",
      ["tests/test_convert_hrm_text1.py"],
      ("jaxlm/models/hrm_text1.py",
       '    h = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm1")(x_BxTxD)\n    h = layers.Attention(',
       '    norm1 = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm1")\n    h = x_BxTxD\n'
       '    h = layers.Attention('),
      ("jaxlm/models/hrm_text1.py",
       '    x_BxTxD = x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic)\n'
       '    h = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm2")(x_BxTxD)',
       '    x_BxTxD = norm1(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic))\n'
       '    norm2 = layers.RMSNorm(eps=c.norm_eps, dtype=dtype, name="norm2")\n    h = x_BxTxD'),
      ("jaxlm/models/hrm_text1.py",
       '    return x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic)\n\n\nclass HRMLayer',
       '    return norm2(x_BxTxD + nn.Dropout(c.dropout)(h, deterministic=self.deterministic))\n\n\nclass HRMLayer')),
    m("grad-accumulation-contiguous-split", "microbatches are contiguous slices of the batch (each on a subset of the devices)",
      ["tests/test_grad_accum_sharding.py"],
      ("jaxlm/steps.py", "  x = jnp.swapaxes(x.reshape((-1, grad_accum) + x.shape[1:]), 0, 1)\n",
       "  x = x.reshape((grad_accum, -1) + x.shape[1:])\n")),
    m("chunked-attention-no-rescale", "the online softmax forgets to rescale the accumulator when the running max grows",
      ["tests/test_attention.py"],
      ("jaxlm/models/attention.py", "return m_new, l_new, acc * rescale[..., None] + pv", "return m_new, l_new, acc + pv")),
    m("chunked-attention-skips-a-needed-block", "the chunked attention skips the key block on the causal diagonal",
      ["tests/test_attention.py"],
      ("jaxlm/models/attention.py", "jax.lax.cond(jnp.any(allowed_BxCqxCk), accumulate",
       "jax.lax.cond(jnp.all(allowed_BxCqxCk), accumulate")),
    m("chunked-attention-dropout-not-rescaled", "attention dropout in the chunked path does not divide by the keep rate",
      ["tests/test_attention.py"],
      ("jaxlm/models/attention.py", "probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)\n        pv",
       "probs = jnp.where(keep, probs, 0.0)\n        pv")),
    m("dense-attention-backward-ignores-the-mask", "the written-out softmax backward gives masked scores a gradient",
      ["tests/test_attention.py"],
      ("jaxlm/models/attention.py", "d_scores = jnp.where(mask_Bx1xTxS, d_scores, 0.0).astype(q_BxTxNxH.dtype)",
       "d_scores = d_scores.astype(q_BxTxNxH.dtype)")),
    m("dense-attention-backward-without-the-row-term", "the softmax backward leaves out rowsum(dO * O)",
      ["tests/test_attention.py"],
      ("jaxlm/models/attention.py", "d_scores = probs_BxNxTxS * (d_probs - row_BxNxT[..., None]) * scale",
       "d_scores = probs_BxNxTxS * d_probs * scale")),
    m("chunked-xent-drops-the-last-chunk", "the chunked cross-entropy leaves out the last chunk",
      ["tests/test_attention.py"],
      ("jaxlm/models/losses.py", "(tiles(hidden_BxTxD), tiles(targets_BxT), tiles(weights_BxT)))",
       "(tiles(hidden_BxTxD)[:-1], tiles(targets_BxT)[:-1], tiles(weights_BxT)[:-1]))")),
    m("padded-vocab-not-masked", "padded vocabulary ids take part in the softmax (decoders and HRM-Text1)",
      ["tests/test_vocab_padding.py"],
      ("jaxlm/models/layers.py", "  if logits_xV.shape[-1] == vocab_size:\n", "  if True:\n")),
    m("scanned-layers-ignore-their-windows", "scanned layers with different windows all use full attention",
      ["tests/test_scan_layers.py"],
      ("jaxlm/models/decoder.py", "      spec = spec.replace(layer_window=window)", "      pass")),
    m("factored-statistics-sharded-like-the-parameter", "Adafactor's v_col keeps the axes of v_row",
      ["tests/test_shardings.py"],
      ("jaxlm/sharding.py", 'axis = axes[-1] if "/v_row/" in where else axes[0]', "axis = axes[-1]")),
    # Issue 11, second part: splash attention, activation sharding, HRM-Text1's padded vocabulary.
    m("splash-window-one-too-wide", "the splash kernel's causal window reaches one key further back than W - 1",
      ["tests/test_attention.py", "-k", "splash"],
      ("jaxlm/models/splash.py", "masks.LocalMask(shape, (window - 1, 0), 0)", "masks.LocalMask(shape, (window, 0), 0)")),
    m("splash-padding-keys-visible", "the splash kernel's segment ids let queries attend to padding keys",
      ["tests/test_attention.py", "-k", "splash"],
      ("jaxlm/models/splash.py", "k_ids = jnp.where(spec.k_valid_BxS.astype(bool), k_ids, -1)", "k_ids = k_ids")),
    m("splash-outside-shard-map", "the splash kernel is left to the partitioner (inputs gathered on every device)",
      ["tests/test_shardings.py", "-k", "residual"],
      ("jaxlm/models/splash.py", "  if active is None:\n    return local(*args)", "  if True:\n    return local(*args)")),
    m("residual-stream-unconstrained", "the residual stream carries no sharding constraint",
      ["tests/test_shardings.py", "-k", "residual"],
      ("jaxlm/models/decoder.py", "  return sharding.constrain(x_BxTxD, RESIDUAL)", "  return x_BxTxD")),
    m("embedding-lookup-on-the-sharded-table", "the embedding is looked up in the fsdp-sharded table",
      ["tests/test_shardings.py", "-k", "activations"],
      ("jaxlm/models/decoder.py", "table_VxD = sharding.constrain(embed.embedding, (layers.VOCAB, None))",
       "table_VxD = embed.embedding")),
    # Issue 14, third session: the pairwise gradient sum and the record cache.
    m("pairwise-sum-keeps-only-the-partner", "each exchange replaces a device's vector by its partner's instead of adding",
      ["tests/test_pairwise_sum.py"],
      ("jaxlm/pairwise_sum.py", "x_N = x_N + jax.lax.ppermute(x_N, axis_name, partner)",
       "x_N = jax.lax.ppermute(x_N, axis_name, partner)")),
    m("pairwise-sum-one-exchange-short", "the butterfly stops one exchange early (partial sums on 4 devices)",
      ["tests/test_pairwise_sum.py"],
      ("jaxlm/pairwise_sum.py", "  while stride < n_devices:", "  while 2 * stride < n_devices:")),
    m("pairwise-auto-ignores-randomness", "auto sums pairwise even when the loss draws random numbers",
      ["tests/test_pairwise_sum.py"],
      ("jaxlm/pairwise_sum.py", "    if same_randomness:\n", "    if False:\n")),
    m("pairwise-any-key-use-counts", "a key folded with the microbatch index and never used counts as randomness",
      ["tests/test_pairwise_sum.py"],
      ("jaxlm/pairwise_sum.py", "  return any(used[-n_key_leaves:])", "  return bool(closed.jaxpr.eqns)")),
    m("loop-runs-ahead-unbounded", "the training loop never waits for the steps it dispatched",
      ["tests/test_train.py", "-k", "steps_ahead"],
      ("jaxlm/trainer.py", "    if len(self.pending) > MAX_STEPS_AHEAD:\n", "    if False:\n")),
    m("record-cache-unbounded", "the decoded-record cache ignores its byte budget",
      ["tests/test_data_prepared.py", "-k", "decoded_records"],
      ("jaxlm/data/store.py", "functools.lru_cache(maxsize=max(1, RECORD_CACHE_BYTES // bytes_per_record))",
       "functools.lru_cache(maxsize=None)")),
    # Issue 14, fourth session.
    m("cpu-step-copies-donated-state", "the CPU train step is compiled without region analysis (moments copied)",
      ["tests/test_pairwise_sum.py"],
      ("jaxlm/xla_options.py", '"xla_cpu_copy_insertion_use_region_analysis": True',
       '"xla_cpu_copy_insertion_use_region_analysis": False')),
    # Issue 14, sixth session.
    m("scan-unroll-ignored", "model.scan_unroll is ignored: the stacked blocks stay a loop",
      ["tests/test_scan_layers.py", "-k", "unrolled"],
      ("jaxlm/models/decoder.py", "unroll=max(1, min(c.scan_unroll, c.n_layers)),", "unroll=1,")),
    m("placed-batches-out-of-order", "batches placed several at a time are handed to the steps in reverse order",
      ["tests/test_cpu_speed.py", "-k", "batches_placed"],
      ("jaxlm/trainer.py", "      for index in indices:\n", "      for index in reversed(indices):\n")),
    m("rope-table-off-by-one", "the RoPE table for positions 0..T-1 starts at position 1",
      ["tests/test_layers.py"],
      ("jaxlm/models/layers.py", "_rope_cos_sin(jnp.arange(x_BxTxNxH.shape[1], dtype=jnp.int32)[None]",
       "_rope_cos_sin(1 + jnp.arange(x_BxTxNxH.shape[1], dtype=jnp.int32)[None]")),
    m("window-read-past-record-end", "a batch's window ending one token past its record is sliced from it alone",
      ["tests/test_data_prepared.py", "-k", "batch_of_windows"],
      ("jaxlm/data/store.py", "      if start + length <= end:\n", "      if start + length <= end + 1:\n")),
]


def _copy_tree(dest: str) -> None:
  """The files git knows (tracked, and untracked but not ignored), as they are in the working tree."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, check=True).stdout.decode().split("\0")
  for rel in filter(None, listed):
    src = os.path.join(ROOT, rel)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


def _apply(tree: str, mutation: Mutation) -> None:
  for rel, old, new in mutation.edits:
    path = os.path.join(tree, rel)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if text.count(old) != 1:
      raise ValueError(f"{mutation.name}: the snippet occurs {text.count(old)} times in {rel} (must be once): {old!r}")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text.replace(old, new))


def run(mutation: Mutation, timeout: float) -> Tuple[str, float, str]:
  """('caught' | 'missed' | 'stale' | 'error', seconds, the first failing test or why). Failing tests or a timeout
  are a catch; collection errors (the mutant itself is broken), usage errors or an empty selection are errors."""
  with tempfile.TemporaryDirectory(prefix="jaxlm-mutant-") as tree:
    _copy_tree(tree)
    try:
      _apply(tree, mutation)
    except ValueError as e:
      return "stale", 0.0, str(e)
    tests, takes_value = [], False
    for t in mutation.tests:  # test files that exist in this tree, and every pytest option with its value
      if takes_value or t.startswith("-") or os.path.exists(os.path.join(tree, t.split("::")[0])):
        tests.append(t)
      takes_value = t in ("-k", "-m")
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    try:
      out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return "caught", time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    failed = next((line.split(" ")[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")), "")
    if out.returncode == 0:
      return "missed", seconds, f"{' '.join(tests)} pass"
    if out.returncode != 1:  # only failing tests are a catch: a mutant that breaks collection (2) is a broken
      text = (out.stdout + out.stderr).strip()  # mutant, and a usage error (4) or an empty selection (5) a bad entry
      return "error", seconds, text.splitlines()[-1][:120] if text else f"pytest exit {out.returncode}"
    return "caught", seconds, failed or out.stdout.strip().splitlines()[-1][:120]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", help="run the mutations whose name contains this")
  parser.add_argument("--names", help="run exactly these mutations (comma-separated names)")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run")
  args = parser.parse_args(argv)
  chosen = [mu for mu in MUTATIONS if (not args.only or args.only in mu.name)
            and (not args.names or mu.name in args.names.split(","))]
  if args.list:
    for mu in chosen:
      print(f"{mu.name:38s} {mu.what}  [{', '.join(mu.tests)}]")
    return 0
  counts = {"caught": 0, "missed": 0, "stale": 0, "error": 0}
  for mu in chosen:
    verdict, seconds, detail = run(mu, args.timeout)
    counts[verdict] += 1
    print(f"{mu.name:38s} {verdict:7s} {seconds:6.0f} s  {detail}", flush=True)
  line = f"{counts['caught']} caught, {counts['missed']} missed"
  extra = [f"{counts['stale']} no longer apply"] * bool(counts["stale"]) + [f"{counts['error']} errors"] * bool(
      counts["error"])
  print(line + "".join(", " + e for e in extra))
  return 0 if counts["missed"] == counts["stale"] == counts["error"] == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
