"""HRM: char-level Hierarchical Reasoning Model (EduardTalianu/HRM-_txt, from sapientinc/HRM).

  python -m jaxlm.train --config configs/hrm.py:tiny --workdir runs/hrm-tiny
  python -m jaxlm.train --config configs/hrm.py --workdir runs/hrm        # the original's size

Variants: '' (the original's default size: hidden 256, 8 heads, 3 L + 3 H layers, expansion 2.5, 8 ACT
segments of N=2 x T=2; 3,986,946 parameters at vocabulary 100 plus 512 for the two module-final norms of
pre-norm), 'original' (also the original's compatibility flags and training recipe; what `convert torch2jax`
writes), 'tiny' (CPU-sized: trains in under two minutes on two cores on Alice + Through the Looking-Glass).
Reasoning modes (N, T): fast 1x1, normal 2x2, deep 3x2, thorough 4x3, extreme 6x4 (jaxlm.models.hrm).

Flags that differ from the original and why:
  causal=True             the original's attention is bidirectional although it is trained and sampled as a
                          left-to-right LM: every position sees the token it must predict.
  q_head_pool='token'     the original halts on a Q-head over the sequence mean, so logits at t would depend on
                          later tokens through the number of segments; a Q-head per position halts each position
                          on its own past only.
  act_batch_halt=False    the original stops only when every row wants to; jaxlm halts each example (position)
                          independently and freezes its state.
  norm_position='pre'     pre-norm blocks plus a final norm per module (gradients pass the residual stream; the
                          final norm bounds the recurrent state as post-norm does).
  mlp_rounding='round'    the original truncates with int(); upstream HRM rounds (same width at these sizes).
  train_mode='act', q_learning=True
                          the original trains one N x T segment but generates with up to halt_max_steps
                          segments (a function it never trained); jaxlm trains what it runs: deep supervision
                          over the ACT segments with upstream HRM's Q-learning halting loss.
  carry reset per batch   the original carries z_H/z_L from one batch into the next (unrelated windows);
                          jaxlm starts every batch from the initial state, as evaluation and sampling do.
  loss normalisation      the original scales the loss by 1/len(dataset); jaxlm averages over the batch tokens.
  optimizer               one AdamW, weight decay on matrices only (the original: a second AdamW for the
                          embedding, lr 5e-4, wd 0.001, unclipped; decay on norms too). Vectors are not decayed
                          so the fixed initial states, stored as parameters, stay as drawn.
Kept from the original: embedding * sqrt(hidden), rotate-half RoPE theta 1e4, RMSNorm eps 1e-5 with weights,
SwiGLU, untied head, fixed random initial states, Q-head init (weight 0, bias -5), one-step gradient,
softmax cross-entropy (loss_fn='stablemax' is upstream's alternative), 64-token generation context.
"""
from jaxlm.config_defaults import base_config


def get_config(variant: str = ""):
  c = base_config("hrm")
  # bfloat16 compute on GPU/TPU (float32 parameters, softmax, norms and loss), float32 on CPU.
  c.model.dtype = "auto"
  c.model.update(
      arch="hrm", family="hrm", vocab_size=0, d_model=256, n_heads=8, l_layers=3, h_layers=3, expansion=2.5,
      mlp_rounding="round", n_cycles=2, t_steps=2, halt_max_steps=8, halt_exploration_prob=0.1,
      causal=True, norm_position="pre", q_head_pool="token", act_batch_halt=False, init_state="fixed",
      grad_mode="one_step", train_mode="act", q_learning=True, loss_fn="softmax", max_seq_len=64)
  c.data.update(corpus="alice+looking_glass", tokenizer="char", val_fraction=0.1)
  # The original trainer: AdamW lr 1e-3, betas (0.9, 0.999), wd 0.01, 10% warmup then cosine to 0.1, clip 1.0,
  # windows of 80 characters, batch 16.
  c.opt.update(name="adamw", schedule="cosine", lr=1e-3, warmup_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.999,
               weight_decay=0.01, weight_decay_on="matrices", clip_norm=1.0)
  c.train.update(steps=20000, batch_size=16, seq_len=80, eval_every=1000, save_every=1000, patience=0)

  if variant == "original":
    # Reproduces the original model's computation (what convert torch2jax writes) and trains as its trainer.
    c.model.update(causal=False, norm_position="post", q_head_pool="mean", act_batch_halt=True, mlp_rounding="int",
                   train_mode="single", q_learning=False)
  elif variant == "tiny":
    # One-block L and H modules of width 128 in normal mode (2 x 2: 6 block applications per segment), two ACT
    # segments trained with deep supervision and Q-learning; 600 steps of 16 x 64 characters. Evaluation runs
    # the ACT inference loop, as score and generate do.
    c.model.update(dtype="float32", d_model=128, n_heads=4, l_layers=1, h_layers=1, mlp_multiple=64, halt_max_steps=2)
    c.data.update(eval_batches=16)
    c.opt.update(lr=2e-3, warmup_steps=50, b2=0.99, weight_decay=0.1)
    c.train.update(steps=600, batch_size=16, seq_len=64, eval_every=200, save_every=200, log_every=50,
                   sample_tokens=120)
  elif variant:
    raise ValueError(f"unknown hrm variant {variant!r}; choose '', 'original' or 'tiny'")
  return c
