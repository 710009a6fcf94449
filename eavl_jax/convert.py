"""Converts the configured pretrained encoders once, so that training needs neither torch nor the
original files:

  python -m eavl_jax.convert --config=configs/refcoco.py --out=DIR \
      --config.model.vision_encoder.pretrained=swin_base_patch4_window12_384_22k.pth

writes DIR/swin/swin.msgpack (the Flax Swin tree and the final norm) and DIR/bert/
(flax_model.msgpack, config.json, tokenizer files). Then train with
  --config.model.vision_encoder.pretrained=DIR/swin --config.model.text_encoder.pretrained=DIR/bert
"""
import json
import os
import sys

from absl import app
from absl import flags

from eavl_jax import cli
from eavl_jax import config_check
from eavl_jax import errors
from eavl_jax import hub
from eavl_jax.weights import bert
from eavl_jax.weights import files
from eavl_jax.weights import report
from eavl_jax.weights import swin

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  cli.define_config_flag(lock_config=False)
  flags.DEFINE_string('out', None, 'Folder for the converted encoders.')


def convert(model_config, out_dir):
  """Writes the converted encoders under out_dir; returns the config overrides that use them."""
  m = model_config
  if not (hub.names_checkpoint(m.vision_encoder.pretrained)
          or hub.names_checkpoint(m.text_encoder.pretrained)):
    raise ValueError(f'model.vision_encoder.pretrained={m.vision_encoder.pretrained!r} and '
                     f'model.text_encoder.pretrained={m.text_encoder.pretrained!r}: nothing to '
                     'convert; set them to the checkpoints to convert (docs/weights.md)')
  allow = dict(allow_missing=m.allow_missing_keys, allow_unexpected=m.allow_unexpected_keys)
  overrides = []
  if hub.names_checkpoint(m.vision_encoder.pretrained):
    params, final_norm = swin.load_swin(m.vision_encoder.pretrained,
                                        swin.abstract_params(m.vision_encoder),
                                        with_final_norm=True, **allow)
    flat = report.flatten(params)
    flat.update({f'{swin.FINAL_NORM}/{k}': v for k, v in (final_norm or {}).items()})
    files.write_msgpack(os.path.join(out_dir, 'swin', swin.CONVERTED_FILE), flat)
    overrides.append(f'--config.model.vision_encoder.pretrained={os.path.join(out_dir, "swin")}')
  if hub.names_checkpoint(m.text_encoder.pretrained):
    params, hf_config = bert.load_bert(m.text_encoder.pretrained, **allow)
    folder = os.path.join(out_dir, 'bert')
    files.write_msgpack(os.path.join(folder, 'flax_model.msgpack'), report.flatten(params))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2)
    hub.load_tokenizer(m.text_encoder).save_pretrained(folder)
    overrides.append(f'--config.model.text_encoder.pretrained={folder}')
    if m.text_encoder.tokenizer:
      overrides.append(f'--config.model.text_encoder.tokenizer={folder}')
  return overrides


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.out is None:
    raise app.UsageError('--config and --out are required')
  try:
    config_check.validate(FLAGS.config)
    overrides = convert(FLAGS.config.model, FLAGS.out)
  except (ValueError, FileNotFoundError) as e:   # the message names the key or file
    sys.exit(errors.error_message(e))
  print('converted; train with\n  ' + ' \\\n  '.join(overrides))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
