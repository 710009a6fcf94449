"""Where the multi-query head collapses: per checkpoint, what separates its N_q queries.

  python -m tools.query_collapse --config=configs/synthetic.py --workdir=DIR [--batches=2]
      [--steps=250,500,...]

For every saved step of --workdir (or --steps), on the same train batches (the loader of
`--config.seed`, fixed), it prints one row: the loss, then how alike the N_q queries are at each
stage of the head, from the dense vision maps to the masks. "cos" is the mean cosine over query
pairs and samples (1.0: the queries point the same way):

  f_vd     the N_q dense vision maps of eq. 7 (flattened), cos
  q_dead   share of the units of σ(f_vd W_vd) (eq. 9) that are 0 for every query and sample
  q        σ(f_vdn W_vd), cos
  A_ent    the word attention's entropy over the uniform one's (1.0: every word alike), eq. 9
  A_tv     total-variation distance between two queries' word attentions (0: the same mix)
  F_q      the queries of eq. 10, cos
  W_q      the kernels and biases of eq. 11, cos
  g_cos    the loss gradient each query receives, dL/dF_qn, cos
  g_kern   the same through eq. 11-12 alone (the estimator's path cut): 1.0 by construction with a
           linear σ in eq. 11, since y = Σ_n S_n (F_p * W_qn) is then F_p * (Σ_n S_n W_qn)
  S-ent    the estimator's entropy (eq. 13), 1.0 = uniform
  qIoU     mean IoU of two queries' binarised masks (1.0: the same mask)

Only process 0's view; a research tool for the synthetic task, not part of training.
"""
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from eavl_jax import checkpointing
from eavl_jax import input_pipeline
from eavl_jax import losses
from eavl_jax import metrics
from eavl_jax import synthetic_task
from eavl_jax import weights
from eavl_jax.models import aligner as aligner_lib
from eavl_jax.models import builder

FLAGS = flags.FLAGS
COLUMNS = ('step', 'loss', 'f_vd', 'q_dead', 'q', 'A_ent', 'A_tv', 'F_q', 'W_q', 'g_cos',
           'g_kern', 'S-ent', 'qIoU')


def define_flags():
  config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_list('steps', None, 'Saved steps to read (default: all).')
  flags.DEFINE_integer('batches', 2, 'Train batches (of train.global_batch_size) to average over.')
  flags.DEFINE_string('json', None, 'Also write the rows as JSON lines here.')


def pair_cosine(x):
  """x (B, N, D) -> mean cosine over the pairs n < m and the batch."""
  x = x.reshape(x.shape[0], x.shape[1], -1).astype(jnp.float32)
  x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
  cos = jnp.einsum('bnd,bmd->bnm', x, x)
  n = x.shape[1]
  pairs = jnp.triu(jnp.ones((n, n)), k=1)
  return (cos * pairs).sum((1, 2)).mean() / pairs.sum()


def pair_tv(a, valid):
  """a (B, N, L) attention rows -> mean total-variation distance over query pairs."""
  d = 0.5 * jnp.abs(a[:, :, None] - a[:, None]).sum(-1)             # (B, N, N)
  n = a.shape[1]
  pairs = jnp.triu(jnp.ones((n, n)), k=1)
  del valid
  return (d * pairs).sum((1, 2)).mean() / pairs.sum()


def make_diagnose(config, model):
  """-> jitted diagnose(variables, batch) -> dict of the COLUMNS' values (but step)."""
  m = config.model
  a = m.aligner
  head = aligner_lib.Aligner(m.hidden_dim, a.mode, a.use_estimator, a.estimator_heads,
                             a.kernel_activation, a.feature_activation, a.conv_impl)
  k = config.data.refs_per_image

  def diagnose(variables, batch):
    out, state = model.apply(variables, batch['image'], batch['input_ids'],
                             batch['attention_mask'], train=False, refs_per_image=k,
                             capture_intermediates=True, mutable=['intermediates'])
    inter = state['intermediates']
    qg = inter['query_generator']
    f_vd = qg['reduce_2']['__call__'][0]                             # (B, H3, W3, N_q)
    f_vd = jnp.moveaxis(f_vd, -1, 1)                                 # (B, N_q, H3, W3)
    q = qg['vd']['__call__'][0]                                      # (B, N_q, C)
    attn = qg['word_attention'][0]                                   # (B, N_q, L)
    f_q = qg['__call__'][0]                                          # (B, N_q, C)
    f_s = inter['decoder']['__call__'][0]                            # (B, H3, W3, C)
    kernels = inter['aligner']['kernel_generator']['__call__'][0]    # (B, N_q, 9 C_p + 1)
    text = batch['attention_mask'].astype(jnp.float32)               # (B, L)
    words = text.sum(-1)                                             # (B,)
    ent = -jax.scipy.special.xlogy(attn, attn).sum(-1)                # (B, N_q)
    a_ent = (ent / jnp.log(jnp.maximum(words, 2.0))[:, None]).mean()
    aligner_params = {'params': variables['params']['aligner']}

    def loss_of(f_q, cut_estimator):
      def apply(fq):
        if not cut_estimator:
          return head.apply(aligner_params, f_s, fq)['logits']
        # the estimator's scores held fixed: the gradient through eq. 11-12 only
        o = head.apply(aligner_params, f_s, fq)
        scores = jax.lax.stop_gradient(o['scores'])
        return jnp.einsum('bn,bnhw->bhw', scores, o['masks'])
      return losses.loss_fn(apply(f_q), batch['mask'], config.loss)
    g = jax.grad(loss_of)(f_q, False)
    g_kern = jax.grad(loss_of)(f_q, True)
    return {
        'loss': losses.loss_fn(out['logits'], batch['mask'], config.loss),
        'f_vd': pair_cosine(f_vd),
        'q_dead': (q.max(axis=(0, 1)) <= 0).mean(),
        'q': pair_cosine(q),
        'A_ent': a_ent,
        'A_tv': pair_tv(attn, text),
        'F_q': pair_cosine(f_q),
        'W_q': pair_cosine(kernels),
        'g_cos': pair_cosine(g),
        'g_kern': pair_cosine(g_kern),
        'S-ent': metrics.score_entropy(out['scores']).mean(),
        'qIoU': metrics.query_mask_iou(out['masks']).mean(),
    }
  return jax.jit(diagnose)


def saved_steps(workdir):
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def fixed_batches(config, count, seed):
  """The first `count` train batches of the loader seeded `seed`: the model's inputs and mask."""
  loader = input_pipeline.make_train_loader(config, seed=seed, shard_index=0, shard_count=1,
                                            batch_size=config.train.global_batch_size)
  keys = ('image', 'input_ids', 'attention_mask', 'mask')
  return [{k: b[k] for k in keys} for b in (next(loader) for _ in range(count))]


def main(argv):
  del argv
  config = FLAGS.config
  workdir = os.path.abspath(FLAGS.workdir)
  config = synthetic_task.prepare(config, workdir)
  model = builder.build_model(weights.with_checkpoint_text_sizes(config.model))
  batches = fixed_batches(config, FLAGS.batches, seed=config.seed + 12345)
  diagnose = make_diagnose(config, model)
  steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else saved_steps(workdir)
  print(' '.join(f'{c:>7}' for c in COLUMNS), flush=True)
  out = open(FLAGS.json, 'w') if FLAGS.json else None
  for step in steps:
    variables, _ = checkpointing.restore_for_eval(config, workdir, step=step)
    rows = [jax.device_get(diagnose(variables, b)) for b in batches]
    row = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS[1:]}
    print(f'{step:>7} ' + ' '.join(f'{row[c]:7.3f}' for c in COLUMNS[1:]), flush=True)
    if out:
      out.write(json.dumps({'step': step, **row}) + '\n')
  if out:
    out.close()


if __name__ == '__main__':
  define_flags()
  app.run(main)
