"""LAVT + the vision-language aligner on RefCOCO (table V's "LAVT + Ours"): configs/lavt_refcoco.py
with the fixed 1x1 classifier replaced by the aligner (eq. 11-14), N_q = 24 queries generated from
LAVT's own features (docs/lavt.md). Everything else, the loss included, is LAVT's.
"""
from configs import lavt_refcoco


def get_config():
  c = lavt_refcoco.get_config()
  c.model.lavt.head = 'aligner'
  return c
