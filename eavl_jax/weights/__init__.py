"""Pretrained Swin and BERT weights into the Flax encoders (docs/weights.md).

load_bert(spec) -> (params, hf_config); load_swin(path, expected) -> params;
load_pretrained_encoders(params, model_config) -> params (called by train_state.create_train_state);
with_checkpoint_text_sizes(model_config): the model config with the BERT sizes of the
checkpoint's config.json, resolved by every caller before models.builder.build_model.
"""
from eavl_jax.weights.bert import bert_config_from_checkpoint
from eavl_jax.weights.bert import load_bert
from eavl_jax.weights.bert import with_checkpoint_text_sizes
from eavl_jax.weights.encoders import load_pretrained_encoders
from eavl_jax.weights.swin import load_swin
