"""The pretrained encoders into the parameters of the whole EAVL model."""
from absl import logging

from eavl_jax import hub
from eavl_jax.weights import bert
from eavl_jax.weights import report
from eavl_jax.weights import swin


def load_pretrained_encoders(params, model_config):
  """params: host numpy parameters of EAVL -> the same tree with the pretrained encoders in it.

  params['vision_encoder'] <- model.vision_encoder.pretrained (unless '' or 'scratch'), and the
  checkpoint's final norm (over the last stage) <- params['vision_norm_4'], which normalises that
  same map;
  params['text_encoder'] <- model.text_encoder.pretrained (likewise). Names, shapes and dtypes are
  kept; keys follow model.allow_missing_keys / allow_unexpected_keys (see report.check_keys).
  """
  params = dict(params)
  allow = dict(allow_missing=model_config.allow_missing_keys,
               allow_unexpected=model_config.allow_unexpected_keys)
  vision_spec = model_config.vision_encoder.pretrained
  if hub.names_checkpoint(vision_spec):
    params['vision_encoder'], final_norm = swin.load_swin(
        vision_spec, params['vision_encoder'], with_final_norm=True, **allow)
    if final_norm is not None and 'vision_norm_4' in params:
      loaded = report.check_keys(final_norm, report.flatten(params['vision_norm_4']),
                                 f'final norm of {vision_spec} (into vision_norm_4)', **allow)
      params['vision_norm_4'] = report.merge(params['vision_norm_4'], loaded)
    elif final_norm is None:
      logging.warning('%s has no final norm: vision_norm_4 keeps its initial values', vision_spec)
    logging.info('vision encoder loaded from %s', vision_spec)
  text_spec = model_config.text_encoder.pretrained
  if hub.names_checkpoint(text_spec):
    params['text_encoder'], _ = bert.load_bert(text_spec, params['text_encoder'], **allow)
    logging.info('text encoder loaded from %s', text_spec)
  return params

