"""BERT text encoder with Hugging Face's Flax BERT parameter layout (FlaxBertModule, no pooler).

Parameter tree: embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm,
encoder/layer/<i>/attention/self/{query,key,value}, encoder/layer/<i>/attention/output/{dense,LayerNorm},
encoder/layer/<i>/intermediate/dense, encoder/layer/<i>/output/{dense,LayerNorm}. The pooler is left
out: EAVL uses the last hidden state of [CLS] (F_tg) instead.
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from eavl_jax.models import layers

_init = nn.initializers.normal(0.02)  # BERT's initializer_range


class BertEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train: bool):
    length = input_ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f'text length {length} > max_position_embeddings {self.max_position_embeddings}')
    embed = lambda n, name: nn.Embed(n, self.hidden_size, embedding_init=_init, dtype=self.dtype,
                                     name=name)
    x = (embed(self.vocab_size, 'word_embeddings')(input_ids)
         + embed(self.max_position_embeddings, 'position_embeddings')(jnp.arange(length)[None])
         + embed(self.type_vocab_size, 'token_type_embeddings')(token_type_ids))  # (B, L, H)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm')(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class BertSelfAttention(nn.Module):
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool):
    b, length, hidden = x.shape
    head_dim = hidden // self.num_heads
    split = lambda t: t.reshape(b, length, self.num_heads, head_dim)  # (B, L, h, d)
    dense = lambda name: layers.Dense(hidden, kernel_init=_init, dtype=self.dtype, name=name)
    q, k, v = (split(dense(n)(x)) for n in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * head_dim ** -0.5
    probs = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)  # (B, h, L, L)
    probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, length, hidden)


class BertAddNorm(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput and BertOutput."""
  hidden_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, train: bool):
    x = layers.Dense(self.hidden_size, kernel_init=_init, dtype=self.dtype, name='dense')(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm')(x + residual)


class BertAttention(nn.Module):
  """attention/self (multi-head self-attention) and attention/output (add & norm)."""
  num_heads: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool):
    y = BertSelfAttention(self.num_heads, self.attention_dropout, self.dtype, name='self')(x, bias, train)
    return BertAddNorm(x.shape[-1], self.layer_norm_eps, self.hidden_dropout, self.dtype,
                       name='output')(y, x, train)


class BertIntermediate(nn.Module):
  intermediate_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(self.intermediate_size, kernel_init=_init, dtype=self.dtype, name='dense')(x)
    return layers.gelu(x)  # BERT's hidden_act 'gelu' (erf)


class BertLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool = False):
    x = BertAttention(self.num_heads, self.layer_norm_eps, self.hidden_dropout,
                      self.attention_dropout, self.dtype, name='attention')(x, bias, train)
    y = BertIntermediate(self.intermediate_size, self.dtype, name='intermediate')(x)  # (B, L, I)
    return BertAddNorm(x.shape[-1], self.layer_norm_eps, self.hidden_dropout, self.dtype,
                       name='output')(y, x, train)


class BertLayerCollection(nn.Module):
  """encoder/layer/<i>: the stack of layers, named '0', '1', ... as in HF's Flax BERT."""
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  remat: bool                 # `model.remat`: nn.remat around each layer
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool):
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_dropout,
                self.attention_dropout, self.dtype, name=str(i))(x, bias, train)
    return x


class BertEncoder(nn.Module):
  num_layers: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  remat: bool                 # `model.remat`: nn.remat around each layer
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool):
    return BertLayerCollection(self.num_layers, self.num_heads, self.intermediate_size,
                               self.layer_norm_eps, self.hidden_dropout, self.attention_dropout,
                               self.remat, self.dtype, name='layer')(x, bias, train)


class BertModel(nn.Module):
  """BERT: (input_ids, attention_mask) (B, L) -> last hidden states (B, L, H).

  Padded keys (attention_mask == 0) get no attention weight, so the outputs at the real tokens do
  not depend on how much padding follows them.
  """
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float
  remat: bool                 # `model.remat`
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, train: bool = False):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                       self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout_prob,
                       self.dtype, name='embeddings')(input_ids, token_type_ids, train)  # (B, L, H)
    # additive key mask, (B, 1, 1, L): the most negative float32 where the key is padding
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    return BertEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                       self.layer_norm_eps, self.hidden_dropout_prob,
                       self.attention_probs_dropout_prob, self.remat, self.dtype,
                       name='encoder')(x, bias, train)


SIZE_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
               'intermediate_size', 'max_position_embeddings', 'type_vocab_size', 'layer_norm_eps',
               'hidden_dropout_prob', 'attention_probs_dropout_prob')


def from_config(text_cfg, *, remat, dtype=jnp.float32) -> BertModel:
  """BertModel from `config.model.text_encoder` (the fields above; other keys are ignored) and
  `config.model.remat`."""
  return BertModel(**{f: text_cfg[f] for f in SIZE_FIELDS}, remat=remat, dtype=dtype)
