"""The run's sizes computed once (eavl_jax/run_sizes.py), and the rules that come with them."""
import pytest

from configs import tiny
from eavl_jax import config_check
from eavl_jax import device_memory
from eavl_jax import run_sizes


def _config(batch=16, accum=2, steps=100, refs_per_image=1):
  c = tiny.get_config()
  c.train.global_batch_size, c.optim.grad_accum_steps = batch, accum
  c.train.num_steps, c.optim.warmup_steps = steps, 0
  c.data.refs_per_image = refs_per_image
  return c


def test_sizes_from_steps_and_from_epochs():
  sizes = run_sizes.compute(_config(refs_per_image=2), num_train_examples=999)
  assert sizes == run_sizes.RunSizes(micro_batch=8, images_per_step=4, grad_accum_steps=2,
                                     total_steps=100, total_updates=50)
  c = _config(steps=0)
  c.train.num_epochs = 3
  sizes = run_sizes.compute(c, num_train_examples=100)   # 3 * 100 // 16 = 18 updates
  assert (sizes.total_updates, sizes.total_steps) == (18, 36)


@pytest.mark.parametrize('change,match', [
    (dict(batch=15), 'train.global_batch_size=15'),
    (dict(steps=99), 'train.num_steps=99'),
    (dict(refs_per_image=3), 'data.refs_per_image=3 does not divide the 8 expressions'),
])
def test_each_rule_is_one_error_from_validate_and_compute(change, match):
  c = _config(**change)
  for check in (config_check.validate, lambda c: run_sizes.compute(c, 100)):
    with pytest.raises(ValueError, match=match):
      check(c)


def test_an_epoch_count_that_gives_no_room_for_the_warmup():
  c = _config(steps=0)
  c.train.num_epochs, c.optim.warmup_steps = 1, 10
  config_check.validate(c)          # the count of examples is not known there
  with pytest.raises(ValueError, match=r'optim.warmup_steps=10: leaves no room in the 6 updates'):
    run_sizes.compute(c, num_train_examples=100)


def test_the_mesh_split_and_the_memory_search_follow_one_rule():
  c = _config(batch=32, accum=1, refs_per_image=2)
  sizes = run_sizes.compute(c, 100)
  run_sizes.check_mesh(c, sizes, batch_devices=4, eval_devices=4, processes=1)
  with pytest.raises(ValueError, match='its 16 images'):
    run_sizes.check_mesh(c, sizes, batch_devices=32, eval_devices=1, processes=1)
  # the factors the search tries are exactly those whose step splits evenly
  for f in device_memory.accum_candidates(c, 4):
    assert run_sizes.uneven_split(32 // f, 2, 4, 1) is None
  assert device_memory.accum_candidates(c, 4) == [2, 4]
  assert run_sizes.uneven_split(32 // 8, 2, 4, 1) == 'its 2 images (data.refs_per_image=2)'
